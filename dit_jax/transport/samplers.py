"""ODE and SDE samplers of the SiT transport, each one compiled program (lax.scan, or diffrax's
while loop for dopri5) with no host round trip per step.

Time runs from noise (t0 ≈ 0) to data (t1 ≈ 1). `model_fn(x, t) -> out` takes t (N,) floats.

- ODE, fixed grid (`ode_sample_loop`, methods "euler" and "heun2" as torchdiffeq names them): the
  grid is linspace(t0, t1, num_steps), so num_steps − 1 steps; "heun2" is the explicit trapezoid
  k1 = f(x, t), k2 = f(x + h·k1, t + h), x + h/2·(k1 + k2).
- ODE, adaptive "dopri5" (diffrax's Dopri5 with a PID step-size controller, atol/rtol on the RMS
  norm of the whole batch state, as torchdiffeq's default); num_steps is then irrelevant to the
  final sample (the release uses it only for the saved intermediate points).
- SDE (`sde_sample_loop`): dx = [v + w(t)·score] dt + √(2 w(t)) dW on linspace(t0, t1, num_steps)
  with t1 = 1 − last_step_size, num_steps − 1 steps of Euler–Maruyama or the release's stochastic
  Heun, then one last deterministic step to t = 1 ("Mean": x + drift·Δ, "Euler": x + v·Δ,
  "Tweedie": x/α + σ²/α·score, None: none).

The step noise is drawn inside the program from fold_in(key, i), so a sample does not depend on
how the batch is sharded.
"""

from __future__ import annotations

import functools
from typing import Callable

import diffrax
import jax
import jax.numpy as jnp

from dit_jax.transport import path as paths
from dit_jax.transport.transport import Transport, interval, ode_drift, sde_drift

ODE_METHODS = ("euler", "heun2", "dopri5")
SDE_METHODS = ("Euler", "Heun")
LAST_STEPS = ("Mean", "Tweedie", "Euler", None)


def _check_steps(num_steps: int, what: str) -> None:
    if int(num_steps) < 2:
        raise ValueError(f"{what}: num_steps must be at least 2 (the grid's two ends), got "
                         f"{num_steps}")


def ode_sample_loop(transport: Transport, model_fn: Callable, x_init: jax.Array,
                    method: str = "dopri5", num_steps: int = 50, *, atol: float = 1e-6,
                    rtol: float = 1e-3, reverse: bool = False, max_steps: int = 4096,
                    return_trajectory: bool = False):
    """Integrate the probability-flow ODE from x_init at t0 to t1 (or back when `reverse`).

    Returns x at t1, or with `return_trajectory` (fixed grids only) the states at every grid time,
    (num_steps, *x.shape), the first being x_init (torchdiffeq's `odeint` output).
    """
    if method not in ODE_METHODS:
        raise ValueError(f"unknown ODE method {method!r}; choose one of {ODE_METHODS}")
    _check_steps(num_steps, "ode_sample_loop")
    t0, t1 = interval(transport, eval=True, reverse=reverse)
    drift = ode_drift(transport, model_fn)
    if method == "dopri5":
        if return_trajectory:
            raise ValueError("return_trajectory is for the fixed-grid methods (euler, heun2)")
        return _dopri5(drift, x_init, t0, t1, atol=atol, rtol=rtol, max_steps=max_steps)
    ts = jnp.linspace(t0, t1, num_steps, dtype=x_init.dtype)

    def body(x, times):
        t, t_next = times
        h = t_next - t
        k1 = drift(x, t)
        if method == "euler":
            x = x + h * k1
        else:
            k2 = drift(x + h * k1, t + h)
            x = x + h / 2 * (k1 + k2)
        return x, x if return_trajectory else None

    x, trajectory = jax.lax.scan(body, x_init, (ts[:-1], ts[1:]))
    if return_trajectory:
        return jnp.concatenate([x_init[None], trajectory], axis=0)
    return x


def _dopri5(drift, x_init, t0, t1, *, atol, rtol, max_steps):
    term = diffrax.ODETerm(lambda t, x, args: drift(x, t))
    solution = diffrax.diffeqsolve(
        term, diffrax.Dopri5(), t0=t0, t1=t1, dt0=None, y0=x_init,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True), max_steps=max_steps)
    return solution.ys[0]


def sde_sample_loop(transport: Transport, model_fn: Callable, x_init: jax.Array, key: jax.Array,
                    method: str = "Euler", num_steps: int = 250, diffusion_form: str = "sigma",
                    diffusion_norm: float = 1.0, last_step: str | None = "Mean",
                    last_step_size: float = 0.04, *, return_trajectory: bool = False):
    """Sample the SDE from x_init at t0 to t = 1: num_steps − 1 stochastic steps on
    linspace(t0, 1 − last_step_size, num_steps), then the last step (the release's defaults:
    Euler–Maruyama, w = σ_t, "Mean", 0.04).

    Returns the sample, or with `return_trajectory` the states after every step,
    (num_steps, *x.shape), the last being the sample (the release's list of samples).
    """
    if method not in SDE_METHODS:
        raise ValueError(f"unknown SDE method {method!r}; choose one of {SDE_METHODS}")
    if last_step not in LAST_STEPS:
        raise ValueError(f"unknown last_step {last_step!r}; choose one of {LAST_STEPS}")
    if key is None:
        raise ValueError("sde_sample_loop draws noise: pass a PRNG key")
    _check_steps(num_steps, "sde_sample_loop")
    if last_step is None:
        last_step_size = 0.0
    t0, t1 = interval(transport, sde=True, eval=True, diffusion_form=diffusion_form,
                      last_step_size=last_step_size)
    ts = jnp.linspace(t0, t1, num_steps, dtype=x_init.dtype)
    dt = ts[1] - ts[0]
    drift = sde_drift(transport, model_fn, diffusion_form=diffusion_form,
                      diffusion_norm=diffusion_norm)

    def w(t):
        return paths.diffusion_coefficient(transport.path_type, t, diffusion_form, diffusion_norm)

    def body(x, step):
        i, t = step
        dw = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype) * jnp.sqrt(dt)
        if method == "Euler":
            mean_x = x + drift(x, t)[0] * dt
            x = mean_x + jnp.sqrt(2 * w(t)) * dw
        else:
            x_hat = x + jnp.sqrt(2 * w(t)) * dw
            k1 = drift(x_hat, t)[0]
            k2 = drift(x_hat + dt * k1, t + dt)[0]
            x = x_hat + 0.5 * dt * (k1 + k2)
        return x, x if return_trajectory else None

    steps = (jnp.arange(num_steps - 1, dtype=jnp.int32), ts[:-1])
    x, trajectory = jax.lax.scan(body, x_init, steps)
    x = _last_step(transport, drift, x, ts[-1], last_step, last_step_size)
    if return_trajectory:
        return jnp.concatenate([trajectory, x[None]], axis=0)
    return x


def _last_step(transport, drift, x, t, last_step, size):
    if last_step is None:
        return x
    sde, velocity, score = drift(x, t)
    if last_step == "Mean":
        return x + sde * size
    if last_step == "Euler":
        return x + velocity * size
    alpha_t = paths.alpha(transport.path_type, t)[0]
    sigma_t = paths.sigma(transport.path_type, t)[0]
    return x / alpha_t + sigma_t ** 2 / alpha_t * score  # Tweedie


# --------------------------------------------------------------------------------------------
# Builders with one signature: builder(transport, model_fn, *, num_steps, **options)
#   -> sample(x_init, key) -> x
# --------------------------------------------------------------------------------------------


def make_ode_sampler(transport: Transport, model_fn: Callable, *, method: str = "dopri5",
                     num_steps: int = 50, atol: float = 1e-6, rtol: float = 1e-3,
                     reverse: bool = False) -> Callable:
    """`sample(x_init, key=None) -> x` integrating the ODE (the key is unused)."""
    if method not in ODE_METHODS:
        raise ValueError(f"unknown ODE method {method!r}; choose one of {ODE_METHODS}")
    _check_steps(num_steps, "make_ode_sampler")

    def sample(x_init, key=None):
        del key
        return ode_sample_loop(transport, model_fn, x_init, method, num_steps, atol=atol,
                               rtol=rtol, reverse=reverse)
    return sample


def make_sde_sampler(transport: Transport, model_fn: Callable, *, method: str = "Euler",
                     num_steps: int = 250, diffusion_form: str = "sigma",
                     diffusion_norm: float = 1.0, last_step: str | None = "Mean",
                     last_step_size: float = 0.04) -> Callable:
    """`sample(x_init, key) -> x` sampling the SDE."""
    if method not in SDE_METHODS:
        raise ValueError(f"unknown SDE method {method!r}; choose one of {SDE_METHODS}")
    paths.diffusion_coefficient(transport.path_type, jnp.zeros(()), diffusion_form)  # checks
    _check_steps(num_steps, "make_sde_sampler")

    def sample(x_init, key):
        return sde_sample_loop(transport, model_fn, x_init, key, method, num_steps,
                               diffusion_form, diffusion_norm, last_step, last_step_size)
    return sample
