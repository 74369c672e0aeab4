"""Inception features of image batches, with the batch split over every device of every host.

The Inception weights are replicated; each global batch of `batch_size` images (rounded up to a
multiple of the device count) is split over the mesh's batch axes. The last, shorter batch is
padded with black images and the padding rows are dropped, so the program compiles once per
image size. Every host passes the same global batch (the files are read on every host) and gets
every row back.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dit_jax.evaluation.inception import FIDInceptionV3
from dit_jax.sharding import batch_sharding, make_mesh

FEATURES = ("pool_3", "spatial", "logits_unbiased", "logits")


class FeatureExtractor:
    """`extractor(images)` → {pool_3, spatial, logits_unbiased, logits} as float32 NumPy for
    (N, H, W, 3) uint8 images, N ≤ batch_size (any H, W: resized to 299 inside)."""

    def __init__(self, model: FIDInceptionV3, *, mesh: Mesh | None = None, batch_size: int = 64):
        self.mesh = mesh if mesh is not None else make_mesh()
        devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.batch_size = math.ceil(batch_size / devices) * devices
        graphdef, state = nnx.split(model)
        replicated = NamedSharding(self.mesh, P())
        self.state = jax.device_put(state, replicated)
        self._rows = batch_sharding(self.mesh, 4)

        def run(state, images):
            return nnx.merge(graphdef, state)(images)

        self._run = jax.jit(run, in_shardings=(replicated, self._rows),
                            out_shardings=batch_sharding(self.mesh, 2))

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.asarray(images)
        n = len(images)
        if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3
                or not 0 < n <= self.batch_size):
            raise ValueError(f"expected at most {self.batch_size} uint8 images (N, H, W, 3), got "
                             f"{images.dtype} {images.shape}")
        padded = np.zeros((self.batch_size, *images.shape[1:]), np.uint8)
        padded[:n] = images
        batch = jax.make_array_from_callback(padded.shape, self._rows, lambda index: padded[index])
        with jax.set_mesh(self.mesh):
            out = self._run(self.state, batch)
        if jax.process_count() > 1:
            out = multihost_utils.process_allgather(out, tiled=True)
        return {k: np.asarray(v)[:n] for k, v in out.items()}

    def batches(self, images: Iterable[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """Features of each batch of an iterable of image batches (each at most batch_size)."""
        for batch in images:
            yield self(batch)


__all__ = ["FEATURES", "FeatureExtractor"]
