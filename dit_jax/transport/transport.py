"""The SiT transport: a path, what the network predicts, the loss weight and the time intervals.

`create_transport` takes the released arguments and defaults. A `Transport` is a frozen,
hashable dataclass (usable as a static argument of jax.jit); every function here is pure in
arrays and takes the network as `model_fn(x, t) -> out` with t (N,) floats in [0, 1]
(t = 0 noise, t = 1 data).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from dit_jax.diffusion.gaussian import mean_flat
from dit_jax.transport import path as paths

PREDICTIONS = ("velocity", "noise", "score")
LOSS_WEIGHTS = (None, "velocity", "likelihood")
T_SAMPLING = ("uniform", "logit_normal")


@dataclasses.dataclass(frozen=True)
class Transport:
    path_type: str = "Linear"
    prediction: str = "velocity"
    loss_weight: str | None = None
    train_eps: float = 0.0
    sample_eps: float = 0.0
    # Not in the release: how training draws t ("uniform" as released, or "logit_normal").
    t_sampling: str = "uniform"


def create_transport(path_type: str = "Linear", prediction: str = "velocity",
                     loss_weight: str | None = None, train_eps: float | None = None,
                     sample_eps: float | None = None, *, t_sampling: str = "uniform"
                     ) -> Transport:
    """A Transport with the released eps defaults.

    VP: train_eps 1e-5, sample_eps 1e-3. Linear/GVP with a noise or score prediction: 1e-3 and
    1e-3 (those are singular at the ends). Velocity with Linear/GVP is regular on all of [0, 1]: both
    eps are 0 whatever is passed (as released). A given train_eps keeps the given sample_eps; the
    release then leaves sample_eps unset, here it falls back to the default. `t_sampling` (not
    in the release) is the default distribution of `sample_t`.
    """
    paths.check_path_type(path_type)
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
    if loss_weight not in LOSS_WEIGHTS:
        raise ValueError(f"unknown loss_weight {loss_weight!r}; choose one of {LOSS_WEIGHTS}")
    if t_sampling not in T_SAMPLING:
        raise ValueError(f"unknown t_sampling {t_sampling!r}; choose one of {T_SAMPLING}")
    if path_type == "VP":
        defaults = (1e-5, 1e-3)
    elif prediction != "velocity":
        defaults = (1e-3, 1e-3)
    else:
        defaults = None
    if defaults is None:
        train_eps = sample_eps = 0.0
    else:
        train_eps = defaults[0] if train_eps is None else float(train_eps)
        sample_eps = defaults[1] if sample_eps is None else float(sample_eps)
    return Transport(path_type, prediction, loss_weight, train_eps, sample_eps, t_sampling)


def interval(transport: Transport, *, sde: bool = False, eval: bool = False,
             diffusion_form: str = "SBDM", last_step_size: float = 0.0,
             reverse: bool = False) -> tuple[float, float]:
    """(t0, t1) of training (eval=False, train_eps) or sampling (eval=True, sample_eps), as
    released: VP ends at 1 − eps; Linear/GVP with a noise/score model, or any SDE, start at eps
    (for a noise/score model or an SBDM diffusion) and end at 1 − eps; an SDE with a last step
    ends at 1 − last_step_size instead (the last step covers the rest)."""
    eps = transport.sample_eps if eval else transport.train_eps
    t0, t1 = 0.0, 1.0
    end = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
    if transport.path_type == "VP":
        t1 = end
    elif transport.prediction != "velocity" or sde:
        if (diffusion_form == "SBDM" and sde) or transport.prediction != "velocity":
            t0 = eps
        t1 = end
    if reverse:
        t0, t1 = 1 - t0, 1 - t1
    return t0, t1


def sample_t(transport: Transport, key: jax.Array, n: int, *, distribution: str | None = None,
             loc: float = 0.0, scale: float = 1.0, dtype=jnp.float32) -> jax.Array:
    """Training times (n,) drawn from `distribution` (default: the transport's t_sampling):
    "uniform" on [t0, t1) as released, or "logit_normal" (not in the release): sigmoid(loc + scale·N(0, 1)) mapped onto [t0, t1] (REPA's "lognormal" weighting,
    σ = e^N and t = σ/(1+σ), is this with loc 0, scale 1, by symmetry in either time direction)."""
    t0, t1 = interval(transport)
    distribution = distribution or transport.t_sampling
    if distribution == "uniform":
        u = jax.random.uniform(key, (n,), dtype)
    elif distribution == "logit_normal":
        u = jax.nn.sigmoid(loc + scale * jax.random.normal(key, (n,), dtype))
    else:
        raise ValueError(f"unknown t distribution {distribution!r}; choose one of {T_SAMPLING}")
    return u * (t1 - t0) + t0


def training_losses(transport: Transport, model_fn: Callable, x1: jax.Array, t: jax.Array,
                    x0: jax.Array) -> dict[str, jax.Array]:
    """{"loss": (N,)}: the released objective at times t (N,) with noise x0, data x1.

    velocity: mean (out − u_t)²; noise: mean w·(out − x0)²; score: mean w·(out·σ_t + x0)², with
    w = 1 (loss_weight None), (drift_var/σ)² ("velocity") or drift_var/σ² ("likelihood"); the
    velocity prediction is never weighted (as released). Computed in float32 whatever the model's
    compute dtype.
    """
    x1 = x1.astype(jnp.float32)
    x0 = x0.astype(jnp.float32)
    t = jnp.asarray(t, jnp.float32)
    xt, ut = paths.plan(transport.path_type, t, x0, x1)
    out = model_fn(xt, t).astype(jnp.float32)
    if out.shape != xt.shape:
        raise ValueError(f"model_fn returned shape {out.shape} for inputs {xt.shape}: a SiT model "
                         f"returns only the first {xt.shape[-1]} channels (see dit_jax.models.sit)")
    if transport.prediction == "velocity":
        return {"loss": mean_flat((out - ut) ** 2)}
    te = paths.expand_t_like_x(t, xt)
    _, drift_var = paths.drift(transport.path_type, xt, te)
    sigma_t, _ = paths.sigma(transport.path_type, te)
    if transport.loss_weight == "velocity":
        weight = (drift_var / sigma_t) ** 2
    elif transport.loss_weight == "likelihood":
        weight = drift_var / sigma_t ** 2
    else:
        weight = 1.0
    if transport.prediction == "noise":
        return {"loss": mean_flat(weight * (out - x0) ** 2)}
    return {"loss": mean_flat(weight * (out * sigma_t + x0) ** 2)}


# --------------------------------------------------------------------------------------------
# What sampling needs from the network's output
# --------------------------------------------------------------------------------------------


def velocity_from_output(transport: Transport, out, x, t):
    """The probability-flow ODE's velocity from the network output at (x, t) (t broadcast)."""
    if transport.prediction == "velocity":
        return out
    score = score_from_output(transport, out, x, t)
    return paths.velocity_from_score(transport.path_type, score, x, t)


def score_from_output(transport: Transport, out, x, t):
    """∇log p_t(x) from the network output at (x, t) (t broadcast against x)."""
    if transport.prediction == "score":
        return out
    if transport.prediction == "noise":
        return out / -paths.sigma(transport.path_type, t)[0]
    return paths.score_from_velocity(transport.path_type, out, x, t)


def ode_drift(transport: Transport, model_fn: Callable) -> Callable:
    """`drift(x, t) -> dx/dt` of the probability-flow ODE, t a scalar or (N,)."""
    def drift(x, t):
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
        out = model_fn(x, t).astype(x.dtype)
        return velocity_from_output(transport, out, x, paths.expand_t_like_x(t, x))
    return drift


def sde_drift(transport: Transport, model_fn: Callable, *, diffusion_form: str = "sigma",
              diffusion_norm: float = 1.0) -> Callable:
    """`drift(x, t) -> (v + w·score, v, score)` of the sampling SDE, from ONE network call (the
    release calls the network twice, once for v and once for the score, on the same input)."""
    def drift(x, t):
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
        te = paths.expand_t_like_x(t, x)
        out = model_fn(x, t).astype(x.dtype)
        v = velocity_from_output(transport, out, x, te)
        score = score_from_output(transport, out, x, te)
        w = paths.diffusion_coefficient(transport.path_type, te, diffusion_form, diffusion_norm)
        return v + w * score, v, score
    return drift
