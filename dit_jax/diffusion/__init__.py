"""Diffusion for DiT: the official Gaussian diffusion (schedules, respacing, loss, DDPM/DDIM),
DPM-Solver++(2M) and classifier-free guidance (samplers by name: `dit_jax.samplers`; editing:
`dit_jax.editing`). Pure functions of arrays and a
`model_fn(x_t, t) -> out` (channels last; t the original timesteps); no Flax here."""

from dit_jax.diffusion.dpm_solver import (
    dpmpp_2m_coefficients,
    dpmpp_2m_sample_loop,
    dpmpp_2m_solver,
    dpmpp_2m_step,
)
from dit_jax.diffusion.gaussian import (
    MODEL_MEAN_TYPES,
    GaussianDiffusion,
    betas_for_alpha_bar,
    create_diffusion,
    ddim_sample,
    ddim_sample_loop,
    ddim_solver,
    ddpm_solver,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    linspace_timesteps,
    logsnr_timesteps,
    mean_flat,
    min_snr_weights,
    normal_kl,
    output_mean_variance,
    p_mean_variance,
    p_sample,
    p_sample_loop,
    predict_eps_from_xstart,
    predict_xstart_from_eps,
    q_posterior_mean_variance,
    q_sample,
    respace_betas,
    snr_plus_one_weights,
    space_timesteps,
    target_weights,
    training_losses,
    velocity_target,
    xstart_and_eps_from_velocity,
)
from dit_jax.diffusion.guidance import classifier_free_guidance, conditional_guidance
from dit_jax.diffusion.solver import Solver, jit_sampler

__all__ = [
    "GaussianDiffusion", "MODEL_MEAN_TYPES", "Solver", "betas_for_alpha_bar",
    "classifier_free_guidance", "conditional_guidance", "create_diffusion", "ddim_sample", "ddim_sample_loop",
    "ddim_solver", "ddpm_solver", "discretized_gaussian_log_likelihood",
    "dpmpp_2m_coefficients", "dpmpp_2m_sample_loop", "dpmpp_2m_solver", "dpmpp_2m_step",
    "get_named_beta_schedule", "jit_sampler", "linspace_timesteps", "logsnr_timesteps",
    "mean_flat", "min_snr_weights", "normal_kl", "output_mean_variance", "p_mean_variance",
    "p_sample", "p_sample_loop", "predict_eps_from_xstart", "predict_xstart_from_eps",
    "q_posterior_mean_variance", "q_sample", "respace_betas", "snr_plus_one_weights",
    "space_timesteps",
    "target_weights", "training_losses", "velocity_target", "xstart_and_eps_from_velocity",
]
