"""Base of the built-in, vectorised sources: one example is a batch of one."""

from __future__ import annotations

import abc

import numpy as np


class BatchSource(abc.ABC):
    """A source defined by `get_batch(indices)`; subclasses set `size`."""

    size: int
    class_names: tuple[str, ...] = ()  # generated data: no folder names to record

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        batch = self.get_batch(np.asarray([index]))
        return {"x": batch["x"][0], "y": int(batch["y"][0])}

    @abc.abstractmethod
    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """{"x": (n, H, W, C) float32, "y": (n,) int32} for the examples `indices`."""
