"""The interpolation paths of SiT (Ma et al. 2024): x_t = α_t·x1 + σ_t·x0, x1 data, x0 ~ N(0, I).

Time runs as in SiT: t = 0 is pure noise, t = 1 is data. Every function takes `t` already shaped
to broadcast against x (see `expand_t_like_x`) and returns arrays; nothing here holds state.

Paths (docs/transport.md):
- "Linear": α = t, σ = 1 − t (rectified flow / optimal-transport interpolant);
- "GVP": α = sin(πt/2), σ = cos(πt/2) (variance preserving, α² + σ² = 1);
- "VP": the score-SDE VP schedule with β from 0.1 to 20, α = exp(ℓ_t),
  ℓ_t = −¼(1−t)²(β_max − β_min) − ½(1−t)β_min, σ = √(1 − α²).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

PATH_TYPES = ("Linear", "GVP", "VP")
VP_SIGMA_MIN = 0.1
VP_SIGMA_MAX = 20.0
# The released spelling of "increasing-decreasing" is accepted as well (the class's table key).
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
_FORM_ALIASES = {"inccreasing-decreasing": "increasing-decreasing"}


def check_path_type(path_type: str) -> str:
    if path_type not in PATH_TYPES:
        raise ValueError(f"unknown path_type {path_type!r}; choose one of {PATH_TYPES}")
    return path_type


def expand_t_like_x(t: jax.Array, x: jax.Array) -> jax.Array:
    """(N,) times → (N, 1, ..., 1), broadcastable against x (N, ...)."""
    t = jnp.asarray(t)
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def _vp_log_mean(t):
    return -0.25 * (1 - t) ** 2 * (VP_SIGMA_MAX - VP_SIGMA_MIN) - 0.5 * (1 - t) * VP_SIGMA_MIN


def _vp_half_beta(t):
    # d/dt of the log mean coefficient: β_t / 2 with β_t = β_min + (1 − t)(β_max − β_min).
    return 0.5 * (1 - t) * (VP_SIGMA_MAX - VP_SIGMA_MIN) + 0.5 * VP_SIGMA_MIN


def alpha(path_type: str, t):
    """(α_t, dα_t/dt): the data coefficient and its time derivative."""
    if path_type == "Linear":
        return t, jnp.ones_like(t)
    if path_type == "GVP":
        return jnp.sin(t * math.pi / 2), math.pi / 2 * jnp.cos(t * math.pi / 2)
    if path_type == "VP":
        a = jnp.exp(_vp_log_mean(t))
        return a, a * _vp_half_beta(t)
    raise ValueError(f"unknown path_type {path_type!r}; choose one of {PATH_TYPES}")


def sigma(path_type: str, t):
    """(σ_t, dσ_t/dt): the noise coefficient and its time derivative."""
    if path_type == "Linear":
        return 1 - t, -jnp.ones_like(t)
    if path_type == "GVP":
        return jnp.cos(t * math.pi / 2), -math.pi / 2 * jnp.sin(t * math.pi / 2)
    if path_type == "VP":
        a2 = jnp.exp(2 * _vp_log_mean(t))
        s = jnp.sqrt(1 - a2)
        return s, a2 * (2 * _vp_half_beta(t)) / (-2 * s)
    raise ValueError(f"unknown path_type {path_type!r}; choose one of {PATH_TYPES}")


def d_alpha_alpha_ratio(path_type: str, t):
    """α′/α in the closed forms the release uses (stable where α is small)."""
    if path_type == "Linear":
        return 1 / t
    if path_type == "GVP":
        return math.pi / (2 * jnp.tan(t * math.pi / 2))
    if path_type == "VP":
        return _vp_half_beta(t)
    raise ValueError(f"unknown path_type {path_type!r}; choose one of {PATH_TYPES}")


def drift(path_type: str, x, t):
    """(drift_mean, drift_var) of the path's SDE in score form: the probability-flow velocity is
    v = −drift_mean + drift_var·score, with drift_mean = −(α′/α)·x and
    drift_var = (α′/α)·σ² − σ·σ′ (Linear: (1 − t)/t; VP: β_t/2)."""
    if path_type == "VP":
        half_beta = _vp_half_beta(t)
        return -half_beta * x, half_beta
    ratio = d_alpha_alpha_ratio(path_type, t)
    s, ds = sigma(path_type, t)
    return -ratio * x, ratio * s ** 2 - s * ds


def diffusion_coefficient(path_type: str, t, form: str = "sigma", norm: float = 1.0):
    """w(t) of the sampling SDE dx = [v + w·score] dt + √(2w) dW (forms as released)."""
    form = _FORM_ALIASES.get(form, form)
    if form == "constant":
        return jnp.full_like(t, norm)
    if form == "SBDM":
        return norm * drift(path_type, jnp.zeros_like(t), t)[1]
    if form == "sigma":
        return norm * sigma(path_type, t)[0]
    if form == "linear":
        return norm * (1 - t)
    if form == "decreasing":
        return 0.25 * (norm * jnp.cos(math.pi * t) + 1) ** 2
    if form == "increasing-decreasing":
        return norm * jnp.sin(math.pi * t) ** 2
    raise ValueError(f"unknown diffusion_form {form!r}; choose one of {DIFFUSION_FORMS}")


def score_from_velocity(path_type: str, velocity, x, t):
    """∇log p_t(x) from the velocity: (α/α′·v − x) / (σ² − (α/α′)·σ′·σ)."""
    a, da = alpha(path_type, t)
    s, ds = sigma(path_type, t)
    reverse_ratio = a / da
    return (reverse_ratio * velocity - x) / (s ** 2 - reverse_ratio * ds * s)


def noise_from_velocity(path_type: str, velocity, x, t):
    """The noise x0 from the velocity: (α/α′·v − x) / ((α/α′)·σ′ − σ)."""
    a, da = alpha(path_type, t)
    s, ds = sigma(path_type, t)
    reverse_ratio = a / da
    return (reverse_ratio * velocity - x) / (reverse_ratio * ds - s)


def velocity_from_score(path_type: str, score, x, t):
    """The probability-flow velocity from the score: drift_var·score − drift_mean."""
    drift_mean, drift_var = drift(path_type, x, t)
    return drift_var * score - drift_mean


def plan(path_type: str, t, x0, x1):
    """(x_t, u_t): the point on the path and its target velocity α′·x1 + σ′·x0."""
    t = expand_t_like_x(t, x1)
    a, da = alpha(path_type, t)
    s, ds = sigma(path_type, t)
    return a * x1 + s * x0, da * x1 + ds * x0
