"""Which stream position each row of each global batch reads: the one definition that both batch
iterators (`dit_jax.data.Batches`, `dit_jax.data.pipeline.Loader`) follow.

The stream is the source repeated forever, epoch e in its own shuffled order; stream position
e·n + i is the i-th example of epoch e's order. Like the official loader (DistributedSampler
with a DataLoader of drop_last=True), every epoch yields n // G full global batches and drops its
last n % G examples (which ones is up to that epoch's shuffle), so no global batch straddles two
epochs and none holds an example twice.
"""

from __future__ import annotations

import numpy as np


def batches_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full global batches per epoch; an error when there is not even one."""
    if global_batch_size < 1:
        raise ValueError(f"the global batch size must be positive, got {global_batch_size}")
    if num_examples < global_batch_size:
        raise ValueError(
            f"the data has {num_examples} examples, fewer than the global batch size "
            f"{global_batch_size}: an epoch would hold no full batch (each epoch's last partial "
            f"batch is dropped); use more data or a smaller global_batch_size")
    return num_examples // global_batch_size


def stream_position(batch, row, num_examples: int, global_batch_size: int):
    """Stream position (epoch · n + offset in that epoch's order) of row `row` (0 <= row < G) of
    global batch `batch`; works on integers and on NumPy integer arrays alike."""
    epoch, within = np.divmod(batch, batches_per_epoch(num_examples, global_batch_size))
    return epoch * num_examples + within * global_batch_size + row


__all__ = ["batches_per_epoch", "stream_position"]
