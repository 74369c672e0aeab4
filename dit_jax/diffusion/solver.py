"""The one sampling loop every sampler and editing mode runs through, and its jit helper.

A sampler is a `Solver`: a step `(x, i, state, noise) -> (x_next, state, pred_x0)` from process
step i to the step below it, plus its initial state (DPM-Solver++ keeps the previous x̂0). `run`
scans it over the steps with `jax.lax.scan`, so a whole sampling run is one compiled program with
no host round trip per step; the step noise is drawn inside the program from fold_in(key, i), so
the result does not depend on how the batch is sharded (JAX's partitionable threefry gives the same
bits whatever the sharding).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


class Solver(NamedTuple):
    init: Callable[[jax.Array], Any]
    step: Callable[[jax.Array, jax.Array, Any, jax.Array | None], tuple]
    stochastic: bool  # whether `step` uses its noise (if not, none is drawn)


def run(solver: Solver, x: jax.Array, key, *, first_step: int,
        before_step: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
        return_trajectory: bool = False, return_pred_x0: bool = False):
    """Run `solver` from process step `first_step` down to step 0.

    before_step(x, i, key_i), if given, maps the state before the step at i (inpainting writes the
    known region there), with its own key stream. Returns the final x, or with either flag a dict
    {"sample", "trajectory" (x after each step), "pred_x0" (x̂0 of each step)}, stacked on a
    leading axis of length first_step + 1.
    """
    if key is None:
        if solver.stochastic or before_step is not None:
            raise ValueError("this sampler draws noise: pass a PRNG key")
        key = jax.random.key(0)  # unused: the steps draw no noise
    step_key, hook_key = jax.random.split(key)
    steps = jnp.arange(first_step, -1, -1, dtype=jnp.int32)

    def body(carry, i):
        x, state = carry
        if before_step is not None:
            x = before_step(x, i, jax.random.fold_in(hook_key, i))
        noise = (jax.random.normal(jax.random.fold_in(step_key, i), x.shape, x.dtype)
                 if solver.stochastic else None)
        x, state, pred_x0 = solver.step(x, i, state, noise)
        return (x, state), (x if return_trajectory else None,
                            pred_x0 if return_pred_x0 else None)

    (x, _), (trajectory, pred_x0) = jax.lax.scan(body, (x, solver.init(x)), steps)
    if not (return_trajectory or return_pred_x0):
        return x
    out = {"sample": x}
    if return_trajectory:
        out["trajectory"] = trajectory
    if return_pred_x0:
        out["pred_x0"] = pred_x0
    return out


def jit_sampler(sample_loop: Callable, diffusion, apply_fn: Callable, **options) -> Callable:
    """Compile a sampling loop once per input shape, with the model's arrays as arguments.

    `apply_fn(model_args, x, t) -> out` (model_args: any pytree, e.g. (params, labels)).
    Returns `run(model_args, *loop_args, **loop_kwargs)` = jax.jit of
    `sample_loop(diffusion, lambda x, t: apply_fn(model_args, x, t), *loop_args, **options,
    **loop_kwargs)`: `options` (return flags, eta, strength, sampler name) are fixed at build
    time, the arrays (x_T, key, images, masks) are traced. Passing the weights as arguments rather
    than closing over them keeps them out of the program as constants, and a batch sharded over a
    mesh stays sharded through the loop.
    """
    def run(model_args, *loop_args, **loop_kwargs):
        def model_fn(x, t):
            return apply_fn(model_args, x, t)
        return sample_loop(diffusion, model_fn, *loop_args, **options, **loop_kwargs)
    return jax.jit(run)
