"""Base of the built-in, vectorised sources (one example is a batch of one), and the label check
every source's batches go through."""

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


def label_error(labels: np.ndarray, num_classes: int) -> str | None:
    """What is wrong with `labels` for data of `num_classes` classes (0: unconditional, every
    label 0), or None. A label outside [0, num_classes) would index the null-class row of the label
    table (num_classes, or -1 from its end) and silently train as "no label", or past it and
    train on NaN."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        return f"labels have dtype {labels.dtype}, not an integer type"
    limit = max(int(num_classes), 1)
    bad = (labels < 0) | (labels >= limit)
    if not bad.any():
        return None
    first = int(np.argmax(bad.reshape(-1)))
    allowed = (f"[0, {num_classes}) for its {num_classes} classes" if num_classes > 0
               else "0 (the data is unconditional)")
    value = int(labels.reshape(-1)[first])
    return f"{int(bad.sum())} label(s) outside {allowed}, the first {value} at position {first}"


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """ValueError naming `where` when a label is outside [0, num_classes) (`label_error`)."""
    problem = label_error(labels, num_classes)
    if problem is not None:
        raise ValueError(f"{where}: {problem}; fix the data source (its labels and its class "
                         f"count must agree)")
