"""Gaussian diffusion as in the official DiT release (`diffusion/`, from OpenAI's improved-DDPM).

Schedules and respacing, the forward process, the model's reverse step (ε prediction with the
learned-range variance), the training loss (MSE + VB) and the DDPM / DDIM samplers; see
docs/numerics.md#diffusion. Everything here is a pure function of arrays plus a
`model_fn(x_t, t) -> out` with channels-last outputs (`out[..., :C]` is ε, `out[..., C:]` the
variance values v) and `t` the ORIGINAL timesteps (int32, shape (N,)); this module knows nothing
of Flax.

The tables are built in float64 NumPy exactly as the official code builds them and kept on the
`GaussianDiffusion` object; the values a step uses are gathered from float32 copies of them, which
is what the official `_extract_into_tensor` does (gather float64, cast to float32).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion import solver

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
# What the model's mean channels predict: ε (DiT), x0, or v (not official; off by default).
MODEL_MEAN_TYPES = ("epsilon", "start_x", "velocity")

# ----------------------------------------------------------------------------------------------
# Schedules and respacing (float64 NumPy, host side)


def get_beta_schedule(beta_schedule: str, *, beta_start: float, beta_end: float,
                      num_diffusion_timesteps: int) -> np.ndarray:
    """The raw `linear` beta schedule of the official code (float64); the official file's
    "quad" and "const" are not reachable from any named schedule and are left out."""
    if beta_schedule != "linear":
        raise NotImplementedError(beta_schedule)
    return np.linspace(beta_start, beta_end, num_diffusion_timesteps, dtype=np.float64)


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
    """Betas that discretise a continuous ᾱ(t), t ∈ [0, 1], capped at `max_beta`."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """`"linear"` (Ho et al., both ends scaled by 1000/T so any T keeps the same shape) or
    `"squaredcos_cap_v2"` (Nichol & Dhariwal's cosine schedule)."""
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return get_beta_schedule("linear", beta_start=scale * 0.0001, beta_end=scale * 0.02,
                                 num_diffusion_timesteps=num_diffusion_timesteps)
    if schedule_name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise NotImplementedError(f"unknown beta schedule: {schedule_name}")


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """The official respacing rule: which original steps a respaced process keeps.

    `section_counts` is a list of ints or a string: "250" (one section), "10,20,30" (the range
    split into len(list) near-equal sections, each strided to its count with a fractional stride
    and Python's round), or "ddimN" (range(0, T, k) for the smallest integer k giving exactly N
    steps; ValueError if none does).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError(f"cannot create exactly {desired_count} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        # Accumulating the float stride (not i * stride) and Python's banker's rounding are what
        # the official code does; "25" has exact .5 ties, so any other rounding changes the set.
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


def logsnr_timesteps(alphas_cumprod: np.ndarray, count: int) -> set[int]:
    """`count` steps spaced uniformly in log-SNR λ = log(ᾱ/(1-ᾱ)) from t = 0 to t = T-1 (both
    kept), each the original step nearest its target λ (pushed up by one where two targets fall
    on the same step, which happens only next to t = 0 where λ jumps by ~0.5 per step).

    Not in the official release: the "logsnrN" respacing of `create_diffusion`, for few-step ODE
    samplers (DPM-Solver++). A time-uniform grid ("N") leaves its last step, from t ≈ T/N to t = 0,
    spanning ~3 units of λ, which a second-order multistep solver extrapolates poorly.
    """
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    n = len(abar)
    if not 2 <= count <= n:
        raise ValueError(f"cannot take {count} log-SNR steps from {n}")
    lam = np.log(abar) - np.log1p(-abar)  # strictly decreasing in t
    steps = []
    for target in np.linspace(lam[0], lam[-1], count):
        t = int(np.argmin(np.abs(lam - target)))
        steps.append(t if not steps else max(t, steps[-1] + 1))
    if steps[-1] != n - 1:
        raise ValueError(f"cannot take {count} distinct log-SNR steps from {n}")
    return set(steps)


def linspace_timesteps(num_timesteps: int, count: int) -> set[int]:
    """diffusers' `timestep_spacing="linspace"` (DPMSolverMultistepScheduler's default, PixArt-α's
    scheduler): round(linspace(0, T-1, count+1)) with NumPy's rounding, the top `count` of them
    (t = 0 dropped: the last step goes from the lowest kept step to the data). "linspaceN" in
    `create_diffusion`; not in the official DiT release."""
    if not 1 <= count < num_timesteps:
        raise ValueError(f"cannot take {count} linspace steps from {num_timesteps}")
    steps = np.linspace(0, num_timesteps - 1, count + 1).round().astype(np.int64)[1:]
    if len(set(steps.tolist())) != count:
        raise ValueError(f"cannot take {count} distinct linspace steps from {num_timesteps}")
    return set(steps.tolist())


def respace_betas(betas: np.ndarray, use_timesteps) -> tuple[np.ndarray, np.ndarray]:
    """Betas of the process that keeps only `use_timesteps` (same ᾱ at the kept steps), and the
    timestep map (original t of each kept step, increasing)."""
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    keep = set(int(t) for t in use_timesteps)
    last, new_betas, timestep_map = 1.0, [], []
    for i, a in enumerate(alphas_cumprod):
        if i in keep:
            new_betas.append(1 - a / last)
            last = a
            timestep_map.append(i)
    return np.array(new_betas, dtype=np.float64), np.array(timestep_map, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# The process


_LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")


class GaussianDiffusion:
    """A (possibly respaced) Gaussian diffusion: float64 tables plus float32 copies for jit.

    The object is immutable and hashable by identity, so it can be closed over (or passed as a
    static argument) in `jax.jit`; the float32 tables then become constants of the program.

    Attributes (float64 NumPy, length `num_timesteps`): betas, alphas_cumprod,
    alphas_cumprod_prev, alphas_cumprod_next, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
    log_one_minus_alphas_cumprod, sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod,
    posterior_variance, posterior_log_variance_clipped, posterior_mean_coef1, posterior_mean_coef2.
    `timestep_map` (int64): the original timestep of each step; the model is always called with
    it. `original_num_steps`: length of the unrespaced process.

    model_var_type: "learned_range" (DiT), "fixed_large" or "fixed_small".
    model_mean_type: "epsilon" (DiT), "start_x", or "velocity" (not in the official release:
    v = sqrt(ᾱ)·ε - sqrt(1-ᾱ)·x0, Salimans & Ho's v-prediction; docs/small_data.md). loss_type: "mse" (DiT), "rescaled_mse", "kl",
    "rescaled_kl".
    """

    def __init__(self, betas, *, timestep_map=None, original_num_steps=None,
                 model_mean_type: str = "epsilon", model_var_type: str = "learned_range",
                 loss_type: str = "mse", min_snr_gamma: float = 0.0,
                 loss_space: str = "target", snr_plus_one_cap: float = 0.0):
        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be 1-D and in (0, 1]")
        if len(betas) < 2:
            # The clipped posterior log-variance borrows entry 1 for entry 0.
            raise ValueError("a diffusion needs at least 2 steps")
        if model_mean_type not in MODEL_MEAN_TYPES:
            raise ValueError(f"unknown model_mean_type {model_mean_type!r}")
        if model_var_type not in ("learned_range", "fixed_large", "fixed_small"):
            raise ValueError(f"unknown model_var_type {model_var_type!r}")
        if loss_type not in _LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}")
        if min_snr_gamma < 0:
            raise ValueError(f"min_snr_gamma must be >= 0 (0: off), got {min_snr_gamma}")
        if loss_space not in ("target", "start_x"):
            raise ValueError(f"loss_space must be 'target' or 'start_x', got {loss_space!r}")
        if snr_plus_one_cap and snr_plus_one_cap <= 1:
            raise ValueError(f"snr_plus_one_cap must be > 1 (0: off), got {snr_plus_one_cap}")
        weightings = [name for name, on in (("min_snr_gamma", min_snr_gamma),
                                            ("snr_plus_one_cap", snr_plus_one_cap),
                                            ("loss_space='start_x'", loss_space == "start_x"))
                      if on]
        if len(weightings) > 1:
            raise ValueError(f"{' and '.join(weightings)} each set the x0-space weight of the "
                             f"MSE: choose one")
        self.loss_space = loss_space
        self.model_mean_type = model_mean_type
        self.min_snr_gamma = float(min_snr_gamma)
        self.snr_plus_one_cap = float(snr_plus_one_cap)
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.num_timesteps = n = len(betas)
        self.timestep_map = (np.arange(n, dtype=np.int64) if timestep_map is None
                             else np.asarray(timestep_map, dtype=np.int64))
        if self.timestep_map.shape != (n,):
            raise ValueError("timestep_map must have one entry per step")
        self.original_num_steps = n if original_num_steps is None else int(original_num_steps)

        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod))
        # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod))
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod))

        # Fixed variances of the official p_mean_variance; FIXED_LARGE starts with the
        # posterior variance to get a better decoder log-likelihood at t = 0.
        large = np.append(self.posterior_variance[1], self.betas[1:])
        fixed = {"fixed_large": (large, np.log(large)),
                 "fixed_small": (self.posterior_variance, self.posterior_log_variance_clipped)}
        names = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2")
        f32 = {k: getattr(self, k).astype(np.float32) for k in names}
        f32["log_betas"] = np.log(self.betas).astype(np.float32)
        if self.min_snr_gamma:
            f32["mse_weight"] = min_snr_weights(self.alphas_cumprod, self.min_snr_gamma,
                                                model_mean_type).astype(np.float32)
        elif self.snr_plus_one_cap:
            f32["mse_weight"] = snr_plus_one_weights(self.alphas_cumprod, self.snr_plus_one_cap,
                                                     model_mean_type).astype(np.float32)
        elif loss_space == "start_x" and model_mean_type != "start_x":
            f32["mse_weight"] = target_weights(self.alphas_cumprod, 1.0,
                                               model_mean_type).astype(np.float32)
        if model_var_type in fixed:
            f32["fixed_variance"] = fixed[model_var_type][0].astype(np.float32)
            f32["fixed_log_variance"] = fixed[model_var_type][1].astype(np.float32)
        for v in f32.values():
            v.flags.writeable = False
        # NumPy (not jax.Array) so that the object commits to no device: under jit the tables are
        # literals of the program, replicated to wherever the batch lives.
        self.tables32 = f32
        self._timestep_map32 = self.timestep_map.astype(np.int32)

    @property
    def learn_sigma(self) -> bool:
        return self.model_var_type == "learned_range"

    def extract(self, name: str, t: jax.Array, ndim: int) -> jax.Array:
        """float32 table `name` gathered at steps t (N,), shaped to broadcast against rank ndim."""
        values = jnp.asarray(self.tables32[name])[t]
        return values.reshape(values.shape + (1,) * (ndim - values.ndim))

    def original_t(self, t: jax.Array) -> jax.Array:
        """The original timesteps (what the model sees) of process steps t."""
        return jnp.asarray(self._timestep_map32)[t]

    # The official method names (`diffusion.training_losses(model_fn, x_start, t, noise)`), so
    # code written against the PyTorch release reads the same; the functions below do the work.
    def q_sample(self, x_start, t, noise):
        return q_sample(self, x_start, t, noise)

    def training_losses(self, model_fn, x_start, t, noise):
        return training_losses(self, model_fn, x_start, t, noise)

    def p_sample_loop(self, model_fn, x_T, key, **options):
        return p_sample_loop(self, model_fn, x_T, key, **options)

    def ddim_sample_loop(self, model_fn, x_T, key=None, **options):
        return ddim_sample_loop(self, model_fn, x_T, key, **options)

    def __repr__(self):
        return (f"GaussianDiffusion(num_timesteps={self.num_timesteps}, "
                f"original_num_steps={self.original_num_steps}, mean={self.model_mean_type}, "
                f"var={self.model_var_type}, loss={self.loss_type})")


def create_diffusion(timestep_respacing="", noise_schedule: str = "linear", use_kl: bool = False,
                     sigma_small: bool = False, predict_xstart: bool = False,
                     learn_sigma: bool = True, rescale_learned_sigmas: bool = False,
                     diffusion_steps: int = 1000, prediction: str | None = None,
                     min_snr_gamma: float = 0.0, loss_space: str = "target",
                     snr_plus_one_cap: float = 0.0) -> GaussianDiffusion:
    """The official `create_diffusion`: DiT trains with `create_diffusion("")` (1000 steps,
    linear, ε prediction, learned-range variance, MSE + VB) and samples with
    `create_diffusion("250")`.

    timestep_respacing: "" or None (all steps), "N", "a,b,c" or "ddimN" (the official rules, see
    `space_timesteps`), a list of section counts, or "logsnrN" (not official: N steps uniform in
    log-SNR, see `logsnr_timesteps`; the recommended grid for DPM-Solver++), or "linspaceN"
    (not official: diffusers' linspace grid without t = 0, see `linspace_timesteps`).
    noise_schedule: "linear" or "squaredcos_cap_v2".
    Without learn_sigma the variance is fixed: β_t ("fixed_large") or, with sigma_small, the
    posterior variance β̃_t. prediction (not official): what the model predicts, "epsilon",
    "start_x" or "velocity"; None: as predict_xstart says (the official switch).
    min_snr_gamma (not official; 0: off): weigh each step's MSE by min-SNR-γ (`min_snr_weights`).
    snr_plus_one_cap (not official; 0: off): weigh each step's x0 error by min(SNR + 1, cap)
    (`snr_plus_one_weights`), the low-noise emphasis of docs/small_data.md.
    loss_space (not official): "target" (official), the MSE of what the model predicts; or
    "start_x", the MSE of the x̂0 it implies (`target_weights` with x0 weight 1): a v model then
    learns with the x0 model's weighting but keeps its skip path, x̂0 = sqrt(ᾱ)·x_t - sqrt(1-ᾱ)·v̂.
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = "rescaled_kl"
    elif rescale_learned_sigmas:
        loss_type = "rescaled_mse"
    else:
        loss_type = "mse"
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if isinstance(timestep_respacing, str) and timestep_respacing.startswith("logsnr"):
        use_timesteps = logsnr_timesteps(np.cumprod(1.0 - betas),
                                         int(timestep_respacing[len("logsnr"):]))
    elif isinstance(timestep_respacing, str) and timestep_respacing.startswith("linspace"):
        use_timesteps = linspace_timesteps(diffusion_steps,
                                           int(timestep_respacing[len("linspace"):]))
    else:
        use_timesteps = space_timesteps(diffusion_steps, timestep_respacing)
    new_betas, timestep_map = respace_betas(betas, use_timesteps)
    return GaussianDiffusion(
        new_betas, timestep_map=timestep_map, original_num_steps=diffusion_steps,
        model_mean_type=prediction or ("start_x" if predict_xstart else "epsilon"),
        model_var_type=("learned_range" if learn_sigma
                        else "fixed_small" if sigma_small else "fixed_large"),
        loss_type=loss_type, min_snr_gamma=min_snr_gamma, loss_space=loss_space,
        snr_plus_one_cap=snr_plus_one_cap)


# ----------------------------------------------------------------------------------------------
# Distributions


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over all non-batch axes."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """The tanh approximation of Φ used by the official likelihood (not the exact erf)."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """log P(x) for x on the 256-level grid of [-1, 1] (bins of width 2/255; the end bins extend to
    ±∞) under N(means, e^(2·log_scales)), elementwise, in nats."""
    centered_x = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


# ----------------------------------------------------------------------------------------------
# Forward process, posterior, model step


def _steps(t, x: jax.Array) -> jax.Array:
    """Step indices as int32 (N,); a scalar applies to the whole batch."""
    return jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))


def q_sample(diffusion: GaussianDiffusion, x_start: jax.Array, t, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε; t are step indices of `diffusion` (N,) or a scalar."""
    t = _steps(t, x_start)
    return (diffusion.extract("sqrt_alphas_cumprod", t, x_start.ndim) * x_start
            + diffusion.extract("sqrt_one_minus_alphas_cumprod", t, x_start.ndim) * noise)


def q_posterior_mean_variance(diffusion: GaussianDiffusion, x_start, x_t, t):
    """Mean and clipped log-variance of q(x_{t-1} | x_t, x0)."""
    t = _steps(t, x_t)
    mean = (diffusion.extract("posterior_mean_coef1", t, x_t.ndim) * x_start
            + diffusion.extract("posterior_mean_coef2", t, x_t.ndim) * x_t)
    return mean, diffusion.extract("posterior_log_variance_clipped", t, x_t.ndim)


def predict_xstart_from_eps(diffusion: GaussianDiffusion, x_t, t, eps):
    t = _steps(t, x_t)
    return (diffusion.extract("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t
            - diffusion.extract("sqrt_recipm1_alphas_cumprod", t, x_t.ndim) * eps)


def predict_eps_from_xstart(diffusion: GaussianDiffusion, x_t, t, pred_xstart):
    t = _steps(t, x_t)
    return ((diffusion.extract("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t - pred_xstart)
            / diffusion.extract("sqrt_recipm1_alphas_cumprod", t, x_t.ndim))


def min_snr_weights(alphas_cumprod: np.ndarray, gamma: float, model_mean_type: str) -> np.ndarray:
    """Min-SNR-γ loss weights (Hang et al. 2023), float64, one per step: the x0-space weight
    min(SNR, γ), with SNR = ᾱ/(1-ᾱ), expressed for the model's target (an ε error is an x0 error
    × sqrt(SNR), a v error × sqrt(SNR + 1)): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v,
    min(SNR, γ) for x0. Caps the weight of the easy low-noise steps, so training spends itself on
    the noise levels where the image's layout is decided."""
    abar = np.asarray(alphas_cumprod, np.float64)
    return target_weights(abar, np.minimum(abar / (1.0 - abar), gamma), model_mean_type)


def snr_plus_one_weights(alphas_cumprod: np.ndarray, cap: float, model_mean_type: str
                         ) -> np.ndarray:
    """Loss weights, float64, one per step, that weigh the implied x̂0's squared error by
    min(SNR + 1, cap): v-prediction's own x0-space weight (SNR + 1), truncated at `cap`. The
    opposite of min-SNR: every step keeps at least the x0 model's weight 1, and the low-noise
    steps, whose x0 errors are small but are what a sample's last steps draw its edges with,
    count up to `cap` times more (docs/small_data.md)."""
    abar = np.asarray(alphas_cumprod, np.float64)
    return target_weights(abar, np.minimum(abar / (1.0 - abar) + 1.0, cap), model_mean_type)


def target_weights(alphas_cumprod: np.ndarray, x0_weight, model_mean_type: str) -> np.ndarray:
    """The weights of the model target's MSE, float64, one per step, that weigh the implied x̂0's
    squared error by `x0_weight` (a number or one per step): an ε error is an x0 error × sqrt(SNR),
    a v error × sqrt(SNR + 1), with SNR = ᾱ/(1-ᾱ)."""
    abar = np.asarray(alphas_cumprod, np.float64)
    snr = abar / (1.0 - abar)
    x0_weight = np.broadcast_to(np.asarray(x0_weight, np.float64), abar.shape)
    return {"epsilon": x0_weight / snr, "velocity": x0_weight / (snr + 1.0),
            "start_x": x0_weight}[model_mean_type]


def velocity_target(diffusion: GaussianDiffusion, x_start, t, noise):
    """v = sqrt(ᾱ_t)·ε - sqrt(1-ᾱ_t)·x0: the target of a "velocity" model."""
    t = _steps(t, x_start)
    return (diffusion.extract("sqrt_alphas_cumprod", t, x_start.ndim) * noise
            - diffusion.extract("sqrt_one_minus_alphas_cumprod", t, x_start.ndim) * x_start)


def xstart_and_eps_from_velocity(diffusion: GaussianDiffusion, x_t, t, v):
    """(x̂0, ε̂) from a predicted v: with x_t = a·x0 + b·ε and v = a·ε - b·x0 (a² + b² = 1),
    x0 = a·x_t - b·v and ε = b·x_t + a·v."""
    t = _steps(t, x_t)
    a = diffusion.extract("sqrt_alphas_cumprod", t, x_t.ndim)
    b = diffusion.extract("sqrt_one_minus_alphas_cumprod", t, x_t.ndim)
    return a * x_t - b * v, b * x_t + a * v


def split_output(diffusion: GaussianDiffusion, model_output, x):
    """(mean part, variance values or None) of a channels-last model output."""
    c = x.shape[-1]
    if diffusion.learn_sigma:
        if model_output.shape != x.shape[:-1] + (2 * c,):
            raise ValueError(f"learned-sigma model output must be {x.shape[:-1] + (2 * c,)}, "
                             f"got {model_output.shape}")
        return model_output[..., :c], model_output[..., c:]
    if model_output.shape != x.shape:
        raise ValueError(f"model output must be {x.shape}, got {model_output.shape}")
    return model_output, None


def output_mean_variance(diffusion: GaussianDiffusion, model_output, x, t) -> dict:
    """p(x_{t-1} | x_t) from a model output already computed at (x, t): the official
    p_mean_variance with clip_denoised=False. Returns mean, log_variance, pred_xstart, eps."""
    t = _steps(t, x)
    mean_out, var_values = split_output(diffusion, model_output, x)
    if var_values is not None:
        min_log = diffusion.extract("posterior_log_variance_clipped", t, x.ndim)
        max_log = diffusion.extract("log_betas", t, x.ndim)
        frac = (var_values + 1) / 2  # v ∈ [-1, 1] spans [β̃_t, β_t] in log space
        log_variance = frac * max_log + (1 - frac) * min_log
    else:
        log_variance = jnp.broadcast_to(diffusion.extract("fixed_log_variance", t, x.ndim),
                                        x.shape)
    if diffusion.model_mean_type == "start_x":
        pred_xstart = mean_out
        eps = predict_eps_from_xstart(diffusion, x, t, pred_xstart)
    elif diffusion.model_mean_type == "velocity":
        pred_xstart, eps = xstart_and_eps_from_velocity(diffusion, x, t, mean_out)
    else:
        eps = mean_out
        pred_xstart = predict_xstart_from_eps(diffusion, x, t, eps)
    mean, _ = q_posterior_mean_variance(diffusion, pred_xstart, x, t)
    return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart, "eps": eps}


def p_mean_variance(diffusion: GaussianDiffusion, model_fn: ModelFn, x, t) -> dict:
    """Run the model at process steps t (it receives the original timesteps) and return
    `output_mean_variance` of its output."""
    t = _steps(t, x)
    return output_mean_variance(diffusion, model_fn(x, diffusion.original_t(t)), x, t)


# ----------------------------------------------------------------------------------------------
# Training loss


def _vb_terms_bpd(diffusion: GaussianDiffusion, model_output, x_start, x_t, t):
    """Per-example VB term in bits: KL(q(x_{t-1}|x_t,x0) ‖ p(x_{t-1}|x_t)) for t > 0, the
    discretised decoder NLL of x0 at t = 0."""
    true_mean, true_log_variance = q_posterior_mean_variance(diffusion, x_start, x_t, t)
    out = output_mean_variance(diffusion, model_output, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
    decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
        x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]))
    return jnp.where(t == 0, decoder_nll, kl) / math.log(2.0)


def training_losses(diffusion: GaussianDiffusion, model_fn: ModelFn, x_start: jax.Array, t,
                    noise: jax.Array) -> dict:
    """Per-example training terms for steps t (indices into `diffusion`; the model receives the
    original timesteps) and the given noise.

    Returns {"loss", "mse", "vb"} with a learned variance: mse = mean over non-batch axes of
    (ε - ε̂)², vb = the VB term in bits computed with ε̂ under stop_gradient (only the variance
    channels learn from it), loss = mse + vb. With a fixed variance: {"loss", "mse"} (no VB term).
    With a KL loss type: {"loss", "vb"} (the VB term on the raw output; ×T for rescaled_kl).
    The training objective is the batch mean of "loss".
    """
    t = _steps(t, x_start)
    x_t = q_sample(diffusion, x_start, t, noise)
    model_output = model_fn(x_t, diffusion.original_t(t))
    if diffusion.loss_type in ("kl", "rescaled_kl"):
        vb = _vb_terms_bpd(diffusion, model_output, x_start, x_t, t)
        if diffusion.loss_type == "rescaled_kl":
            vb = vb * diffusion.num_timesteps
        return {"loss": vb, "vb": vb}
    mean_out, var_values = split_output(diffusion, model_output, x_t)
    terms = {}
    if var_values is not None:
        # The VB term trains the variance only; the mean is trained by the MSE alone.
        frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_values], axis=-1)
        vb = _vb_terms_bpd(diffusion, frozen, x_start, x_t, t)
        if diffusion.loss_type == "rescaled_mse":
            vb = vb * (diffusion.num_timesteps / 1000.0)
        terms["vb"] = vb
    if diffusion.model_mean_type == "velocity":
        target = velocity_target(diffusion, x_start, t, noise)
    else:
        target = x_start if diffusion.model_mean_type == "start_x" else noise
    terms["mse"] = mean_flat((target - mean_out) ** 2)
    if "mse_weight" in diffusion.tables32:  # min-SNR-γ or loss_space="start_x"
        terms["mse"] = terms["mse"] * diffusion.extract("mse_weight", t, 1)
    terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
    return terms


# ----------------------------------------------------------------------------------------------
# Samplers: single steps (noise explicit) and whole loops (noise from a key)


def p_sample(diffusion: GaussianDiffusion, model_fn: ModelFn, x, t, noise) -> dict:
    """One DDPM ancestral step from process step t: x_{t-1} = mean + [t≠0]·σ_t·noise.
    Returns {"sample", "pred_xstart"}. No clipping of x̂0 (DiT samples latents)."""
    t = _steps(t, x)
    out = p_mean_variance(diffusion, model_fn, x, t)
    nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    sample = out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def ddim_sample(diffusion: GaussianDiffusion, model_fn: ModelFn, x, t, noise=None,
                eta: float = 0.0) -> dict:
    """One DDIM step (Song et al. eq. 12) from process step t to the previous step of
    `diffusion`: σ = eta·sqrt((1-ᾱ_prev)/(1-ᾱ))·sqrt(1-ᾱ/ᾱ_prev),
    x_prev = sqrt(ᾱ_prev)·x̂0 + sqrt(1-ᾱ_prev-σ²)·ε̂ + [t≠0]·σ·noise, with ε̂ re-derived from x̂0
    as the official code does. `noise` may be None only when eta == 0."""
    t = _steps(t, x)
    out = p_mean_variance(diffusion, model_fn, x, t)
    eps = predict_eps_from_xstart(diffusion, x, t, out["pred_xstart"])
    alpha_bar = diffusion.extract("alphas_cumprod", t, x.ndim)
    alpha_bar_prev = diffusion.extract("alphas_cumprod_prev", t, x.ndim)
    sample = out["pred_xstart"] * jnp.sqrt(alpha_bar_prev)
    if eta == 0.0:
        sample = sample + jnp.sqrt(1 - alpha_bar_prev) * eps
    else:
        if noise is None:
            raise ValueError("ddim_sample with eta > 0 needs noise")
        sigma = (eta * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
                 * jnp.sqrt(1 - alpha_bar / alpha_bar_prev))
        nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        sample = sample + jnp.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps + nonzero * sigma * noise
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def ddpm_solver(diffusion: GaussianDiffusion, model_fn: ModelFn) -> solver.Solver:
    """DDPM ancestral sampling in the form `solver.run` drives."""
    def step(x, i, state, noise):
        out = p_sample(diffusion, model_fn, x, i, noise)
        return out["sample"], state, out["pred_xstart"]
    return solver.Solver(init=lambda x: (), step=step, stochastic=True)


def ddim_solver(diffusion: GaussianDiffusion, model_fn: ModelFn, eta: float = 0.0) -> solver.Solver:
    """DDIM sampling in the form `solver.run` drives (deterministic when eta == 0)."""
    def step(x, i, state, noise):
        out = ddim_sample(diffusion, model_fn, x, i, noise, eta=eta)
        return out["sample"], state, out["pred_xstart"]
    return solver.Solver(init=lambda x: (), step=step, stochastic=eta != 0.0)


def p_sample_loop(diffusion: GaussianDiffusion, model_fn: ModelFn, x_T: jax.Array, key, *,
                  return_trajectory: bool = False, return_pred_x0: bool = False):
    """DDPM ancestral sampling through every step of `diffusion` (250 for the paper's FID),
    starting from x_T, with the noise of step i drawn from fold_in(key, i).

    One `lax.scan` (no host round trip per step); jit it, or use `solver.jit_sampler`, to compile
    once per shape. Returns the sample, or with either flag a dict {"sample", "trajectory"
    (x after each step, (steps, *x.shape)), "pred_x0" (x̂0 of each step)}.
    """
    return solver.run(ddpm_solver(diffusion, model_fn), x_T, key,
                      first_step=diffusion.num_timesteps - 1,
                      return_trajectory=return_trajectory, return_pred_x0=return_pred_x0)


def ddim_sample_loop(diffusion: GaussianDiffusion, model_fn: ModelFn, x_T: jax.Array, key=None,
                     *, eta: float = 0.0, return_trajectory: bool = False,
                     return_pred_x0: bool = False):
    """DDIM sampling through every step of `diffusion` (respace it, e.g. "ddim50" or "50", to
    sample in few steps). eta = 0 (default) is deterministic and needs no key. Returns as
    `p_sample_loop`."""
    return solver.run(ddim_solver(diffusion, model_fn, eta), x_T, key,
                      first_step=diffusion.num_timesteps - 1,
                      return_trajectory=return_trajectory, return_pred_x0=return_pred_x0)
