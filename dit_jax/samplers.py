"""The sampler registry: every sampler by one name, for the Python API, sample.py, the training
configs (`sample.sampler`) and editing.

A sampler is a `SamplerSpec`:

    name             its one name everywhere ("ddpm", "ddim", "dpm++"; for flow models
                     "ode-euler", "ode-heun", "ode-dopri5", "sde-euler", "sde-heun")
    family           "diffusion": built from a `GaussianDiffusion`; "transport": from a
                     flow-matching transport object
    build            build(process, model_fn, **options) -> a `Solver` (`dit_jax.diffusion.solver`,
                     stepped over the process's steps) or a plain callable sample(x_T, key) -> x
                     (e.g. an adaptive ODE solve), for the process (the respaced diffusion, or the
                     transport) and the model_fn(x_t, t) of the samplers; options are
                     sampler-specific (DDIM's eta)
    default_spacing  default_spacing(steps) -> the `timestep_respacing` string that gives the
                     sampler its `steps` (None for a family that has no respacing)
    stochastic       whether it draws noise at each step (then it needs a PRNG key)

Adding a sampler is one `register(SamplerSpec(...))` call here. `get_sampler(name)` looks one up
(raising with the list of names for an unknown one); old spellings are `ALIASES` ("dpm++2m").
Pure functions of arrays, no Flax.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

from dit_jax import transport
from dit_jax.diffusion import dpm_solver, gaussian, solver


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    name: str
    family: Literal["diffusion", "transport"]
    build: Callable[..., solver.Solver | Callable]
    default_spacing: Callable[[int], str | None]
    stochastic: bool
    description: str = ""


SAMPLERS: dict[str, SamplerSpec] = {}
ALIASES: dict[str, str] = {"dpm++2m": "dpm++"}  # older spellings of the same samplers


def register(spec: SamplerSpec) -> SamplerSpec:
    if spec.name in SAMPLERS or spec.name in ALIASES:
        raise ValueError(f"sampler {spec.name!r} is already registered")
    if spec.family not in ("diffusion", "transport"):
        raise ValueError(f"sampler family must be 'diffusion' or 'transport', got {spec.family!r}")
    SAMPLERS[spec.name] = spec
    return spec


def sampler_names(family: str | None = None) -> tuple[str, ...]:
    return tuple(n for n, s in SAMPLERS.items() if family is None or s.family == family)


def get_sampler(name: str) -> SamplerSpec:
    spec = SAMPLERS.get(ALIASES.get(name, name))
    if spec is None:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}"
                         f" (or the older spellings {', '.join(ALIASES)})")
    return spec


def make_solver(name: str, process, model_fn, **options: Any) -> solver.Solver:
    """The solver of sampler `name` for `process` and `model_fn`."""
    return get_sampler(name).build(process, model_fn, **options)


def sample_loop(name: str, process, model_fn, x_T, key=None, **options: Any):
    """Sampler `name` from x_T through every step of `process` (as `p_sample_loop`)."""
    built = make_solver(name, process, model_fn, **options)
    if isinstance(built, solver.Solver):
        return solver.run(built, x_T, key, first_step=process.num_timesteps - 1)
    return built(x_T, key)


register(SamplerSpec(
    "ddpm", "diffusion", lambda d, f: gaussian.ddpm_solver(d, f), default_spacing=str,
    stochastic=True, description="ancestral sampling, the paper's sampler (250 steps)"))
register(SamplerSpec(
    "ddim", "diffusion", lambda d, f, eta=0.0: gaussian.ddim_solver(d, f, eta),
    default_spacing=str, stochastic=False, description="DDIM (deterministic at eta=0)"))
register(SamplerSpec(
    "dpm++", "diffusion", lambda d, f: dpm_solver.dpmpp_2m_solver(d, f),
    default_spacing=lambda steps: f"logsnr{steps}", stochastic=False,
    description="DPM-Solver++(2M) on a grid uniform in log-SNR"))


# Flow-matching samplers (dit_jax.transport, docs/transport.md): built from a Transport with the
# number of steps as an option (a transport has no respacing).
def _transport(name: str, builder: Callable, method: str, stochastic: bool, description: str):
    register(SamplerSpec(
        name, "transport",
        lambda tr, f, steps=50, **options: builder(tr, f, method=method, num_steps=steps, **options),
        default_spacing=lambda steps: None, stochastic=stochastic, description=description))


_transport("ode-euler", transport.make_ode_sampler, "euler", False, "ODE, fixed-grid Euler")
_transport("ode-heun", transport.make_ode_sampler, "heun2", False, "ODE, fixed-grid Heun")
_transport("ode-dopri5", transport.make_ode_sampler, "dopri5", False,
           "ODE, adaptive dopri5 (diffrax; steps ignored, atol/rtol options)")
_transport("sde-euler", transport.make_sde_sampler, "Euler", True,
           "SDE, Euler-Maruyama with the released last step (REPA's protocol)")
_transport("sde-heun", transport.make_sde_sampler, "Heun", True, "SDE, Heun")


__all__ = ["ALIASES", "SAMPLERS", "SamplerSpec", "get_sampler", "make_solver", "register",
           "sample_loop", "sampler_names"]
