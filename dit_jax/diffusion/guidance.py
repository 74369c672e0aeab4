"""Classifier-free guidance as a wrapper around a class-conditional model_fn(x, t, y).

The released DiT (`forward_with_cfg`) runs [x; x] with labels [y; null] as one batch and guides
output channels 0..2 only: ε = ε_uncond + s·(ε_cond - ε_uncond) there, while channel 3 and the
variance channels keep the conditional prediction (docs/numerics.md#classifier-free-guidance).
The textbook form guides every ε channel. The wrapper returns an ordinary model_fn(x, t) of the
un-doubled batch, so any sampler takes it unchanged.
"""

from __future__ import annotations

import operator
from typing import Callable

import jax
import jax.numpy as jnp

RELEASED_GUIDE_CHANNELS = 3  # the official forward_with_cfg guides eps[:, :3]


def classifier_free_guidance(model_fn: Callable, y: jax.Array, scale, *, null_label: int,
                             guide_channels: int | None = RELEASED_GUIDE_CHANNELS,
                             interval: tuple[float, float] | None = None,
                             time_dtype=jnp.int32) -> Callable:
    """Wrap a class-conditional `model_fn(x, t, y)` into a guided `model_fn(x, t)`.

    y: int labels (N,). scale: guidance scale s (s = 1 is unguided; the paper's FID uses 1.5).
    null_label: the unconditional class, required: for a DiT it is `model.null_label`
    (= num_classes, 1000 for the released models). No default, because a label past the end of a
    smaller table reads a NaN row under jit instead of failing.
    guide_channels: how many leading output channels are guided; 3 (default) is the released form,
    None guides all ε channels (x.shape[-1]). The other output channels come from the conditional
    half.
    interval: optional (t_lo, t_hi) in the model's time (inclusive): ORIGINAL timesteps for the
    diffusion, t in [0, 1] for the transport (t = 0 noise; REPA's "t ≤ 0.7" in its reversed time
    is (0.3, 1.0) there); outside it the step is unguided (Kynkäänniemi et al. 2024 guide only a
    middle range of noise levels). Default None:
    guide at every step. When no example of the batch is inside the interval the wrapper runs only
    the conditional batch of N (a lax.cond), so the steps outside cost half.

    time_dtype: the dtype t is cast to before the model sees it: int32 (default) for the
    diffusion's integer timesteps; None keeps the caller's (float t of the transport).

    One model call per step: a batch of 2N when guiding, of N when `scale` is the Python number 1
    (then the wrapper is exactly the conditional model).
    """
    try:
        null_label = operator.index(null_label)
    except TypeError:
        raise TypeError(f"null_label must be an int (a DiT's `model.null_label`), got "
                        f"{null_label!r}") from None
    if null_label < 0:
        raise ValueError(f"null_label must be a non-negative class index, got {null_label}")
    return conditional_guidance(model_fn, y, jnp.full_like(y, null_label), scale,
                                guide_channels=guide_channels, interval=interval,
                                time_dtype=time_dtype)


def conditional_guidance(model_fn: Callable, cond, uncond, scale, *,
                         guide_channels: int | None = None,
                         interval: tuple[float, float] | None = None,
                         time_dtype=jnp.int32) -> Callable:
    """Wrap `model_fn(x, t, c)` into the guided `model_fn(x, t)`: ε = ε(uncond) + s·(ε(cond) -
    ε(uncond)) on the first `guide_channels` channels (None: all, the text-to-image form), the
    other channels from the conditional half. `cond` and `uncond` are pytrees of arrays with the
    batch first (labels; or text embeddings and mask, where `uncond` is the null caption or a
    negative prompt's), run as one batch of 2N. `interval` and `time_dtype` as in
    `classifier_free_guidance`, which is this function with the null class as `uncond`."""
    if not isinstance(scale, jax.Array) and float(scale) == 1.0:
        return lambda x, t: model_fn(x, t, cond)
    both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)

    def conditional(x, t):
        return model_fn(x, t, cond)

    def guided(x, t):
        n = x.shape[0]
        out = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both)
        cond_out, uncond_out = out[:n], out[n:]
        k = x.shape[-1] if guide_channels is None else guide_channels
        eps = uncond_out[..., :k] + scale * (cond_out[..., :k] - uncond_out[..., :k])
        if interval is not None:
            # Selected rather than s = 1, which would round u + (c - u) away from c.
            inside = _inside(t, interval).reshape((n,) + (1,) * (x.ndim - 1))
            eps = jnp.where(inside, eps, cond_out[..., :k])
        return jnp.concatenate([eps, cond_out[..., k:]], axis=-1)

    def wrapped(x, t):
        t = jnp.broadcast_to(jnp.asarray(t, time_dtype), (x.shape[0],))
        if interval is None:
            return guided(x, t)
        return jax.lax.cond(jnp.any(_inside(t, interval)), guided, conditional, x, t)

    return wrapped


def _inside(t, interval):
    lo, hi = interval
    return (t >= lo) & (t <= hi)
