"""SiT (Ma et al. 2024) is the DiT network called as a velocity model: t in [0, 1] as a float
(t = 0 noise, t = 1 data; no ×1000), and with a learned-sigma head only the first in_channels
outputs are used (the released forward drops the rest). Same weights and keys as DiT, so a SiT is a
`DiT`; this module holds the forward that reads it as one. See docs/transport.md."""

from __future__ import annotations

import jax

from dit_jax.models.dit import DiT


def sit_forward(model: DiT, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *,
                train: bool = False, rngs=None) -> jax.Array:
    """The SiT output (N, H, W, in_channels) of a DiT at times t (N,) in [0, 1]."""
    return model(x, t, y, train=train, rngs=rngs)[..., :model.config.in_channels]
