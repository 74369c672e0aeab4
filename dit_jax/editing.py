"""Image editing with any of the samplers: image-to-image (SDEdit) and inpainting.

- img2img (Meng et al., SDEdit): noise the given latent to step t0 with the forward process, then
  denoise from t0. `strength` s ∈ [0, 1] sets how many of the diffusion's K steps are run:
  round(s·K), starting at process step round(s·K) - 1; s = 0 returns the input, s = 1 starts from
  (almost) pure noise at the top step.
- inpainting: `mask` is True (or 1) where the values of `x_known` are kept. Before every step the
  known region of the current x_t is replaced by the forward-noised original at that step
  (q_sample(x_known, t) with fresh noise), and the known region of the result is the original
  itself. Masks are binary; they broadcast against x (e.g. (N, H, W, 1)).

Samplers by their registry name (`dit_jax.samplers`): "ddpm", "ddim" (with `eta`), "dpm++".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dit_jax.diffusion import gaussian, solver
from dit_jax.samplers import make_solver


def _solver(name: str, diffusion, model_fn, eta: float) -> solver.Solver:
    return make_solver(name, diffusion, model_fn, **({"eta": eta} if eta else {}))


def img2img(diffusion: gaussian.GaussianDiffusion, model_fn, x0: jax.Array, key, *,
            strength: float, sampler: str = "ddim", eta: float = 0.0,
            return_trajectory: bool = False, return_pred_x0: bool = False):
    """SDEdit: q_sample x0 to step round(strength·K) - 1, then run `sampler` down to step 0.
    `strength` is a Python float (it fixes the number of steps, hence the program)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    num_steps = int(round(strength * diffusion.num_timesteps))
    if num_steps == 0:
        return x0
    noise_key, loop_key = jax.random.split(key)
    start = num_steps - 1
    x = gaussian.q_sample(diffusion, x0, start,
                          jax.random.normal(noise_key, x0.shape, x0.dtype))
    return solver.run(_solver(sampler, diffusion, model_fn, eta), x, loop_key,
                      first_step=start, return_trajectory=return_trajectory,
                      return_pred_x0=return_pred_x0)


def inpaint(diffusion: gaussian.GaussianDiffusion, model_fn, x_known: jax.Array, mask, x_T, key,
            *, sampler: str = "ddpm", eta: float = 0.0, return_trajectory: bool = False,
            return_pred_x0: bool = False):
    """Sample from x_T with the region where `mask` is true held to `x_known` (module docstring)."""
    mask = jnp.asarray(mask).astype(bool)

    def write_known(x, i, key_i):
        noised = gaussian.q_sample(diffusion, x_known, i,
                                   jax.random.normal(key_i, x.shape, x.dtype))
        return jnp.where(mask, noised, x)

    out = solver.run(_solver(sampler, diffusion, model_fn, eta), x_T, key,
                     first_step=diffusion.num_timesteps - 1, before_step=write_known,
                     return_trajectory=return_trajectory, return_pred_x0=return_pred_x0)
    if isinstance(out, dict):
        out["sample"] = jnp.where(mask, x_known, out["sample"])
        return out
    return jnp.where(mask, x_known, out)
