"""Random latents and labels for benchmarks: the shapes and dtypes of real training data with no
I/O, so a benchmark measures the device, not the disk. Example i is a function of (seed, i)."""

from __future__ import annotations

import numpy as np

from dit_jax.data.source import BatchSource


class SyntheticLatents(BatchSource):
    """`size` examples: x ~ N(0, 1) of `shape` (H, W, C), y uniform in [0, num_classes)."""

    DEFAULT_SIZE = 1_000_000

    def __init__(self, shape: tuple[int, int, int] = (32, 32, 4), num_classes: int = 1000,
                 size: int = DEFAULT_SIZE, seed: int = 0):
        self.element_shape = tuple(int(s) for s in shape)
        self.num_classes = int(num_classes)
        self.size = int(size)
        self.seed = int(seed)

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64).reshape(-1)
        x = np.empty((len(indices),) + self.element_shape, np.float32)
        y = np.empty(len(indices), np.int32)
        for row, i in enumerate(indices):
            rng = np.random.default_rng([self.seed, int(i)])
            y[row] = rng.integers(self.num_classes) if self.num_classes > 0 else 0
            x[row] = rng.standard_normal(self.element_shape, np.float32)
        return {"x": x, "y": y}
