"""Flow matching as SiT released it: interpolation paths (Linear, GVP, VP), velocity / noise /
score predictions, the training loss, and ODE/SDE samplers. Pure functions of arrays and a
`model_fn(x_t, t) -> out` (channels last; t (N,) floats in [0, 1], t = 0 noise, t = 1 data); no
Flax here. See docs/transport.md."""

from dit_jax.transport.path import (DIFFUSION_FORMS, PATH_TYPES, alpha, diffusion_coefficient,
                                    drift, expand_t_like_x, noise_from_velocity, plan,
                                    score_from_velocity, sigma, velocity_from_score)
from dit_jax.transport.samplers import (LAST_STEPS, ODE_METHODS, SDE_METHODS,
                                        make_ode_sampler, make_sde_sampler, ode_sample_loop,
                                        sde_sample_loop)
from dit_jax.transport.transport import (LOSS_WEIGHTS, PREDICTIONS, T_SAMPLING, Transport,
                                         create_transport, interval, ode_drift, sample_t,
                                         score_from_output, sde_drift, training_losses,
                                         velocity_from_output)

__all__ = [
    "DIFFUSION_FORMS", "LAST_STEPS", "LOSS_WEIGHTS", "ODE_METHODS", "PATH_TYPES", "PREDICTIONS",
    "SDE_METHODS", "T_SAMPLING", "Transport", "alpha", "create_transport",
    "diffusion_coefficient", "drift", "expand_t_like_x", "interval", "make_ode_sampler",
    "make_sde_sampler", "noise_from_velocity", "ode_drift", "ode_sample_loop", "plan",
    "sample_t", "score_from_output", "score_from_velocity", "sde_drift", "sde_sample_loop",
    "sigma", "training_losses", "velocity_from_output", "velocity_from_score",
]
