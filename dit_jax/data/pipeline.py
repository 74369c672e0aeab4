"""The grain input pipeline: a random-access source → this host's rows of every global batch.

    stream  = source, globally shuffled by (seed, epoch), repeated forever     (grain shuffle/repeat)
    example = source.augment(stream[p], rng(seed, p))                           (grain random_map)
    host    = rows [lo, hi) of each global batch: stream positions
              stream_position(b, lo .. hi - 1) (`dit_jax.data.epochs`)
    batches = host examples in groups of hi - lo                                (grain batch)
    → threads (ReadOptions) inside `num_workers` worker processes (mp_prefetch), prefetching.

The same definitions as `dit_jax.data.Batches` (the in-process iterator of the built-in data):
each epoch of n examples gives n // G global batches of G distinct examples and drops the rest,
as the official DataLoader's drop_last does, so global batch b is batch b mod (n // G) of epoch
b // (n // G). Its content depends on the seed alone, not on the number of hosts, devices or
workers; each position, hence each example used in an epoch, is read by exactly one host. The
augmentation's random numbers are keyed by the stream position, so a flip is reproducible too.
Batching happens before the worker split (workers take whole batches in turn), so the worker
count does not change any batch either.

The iterator state is a small JSON-able dict, {"next_batch", "skipped", "skipped_examples",
"seed", "global_batch_size"} (the format of `dit_jax.data.Batches` too, less the skipped ones):
"skipped" counts the distinct unreadable files met so far, "skipped_examples" lists their
indices, so a file met in every epoch counts once: saved in a checkpoint and set on a
fresh `Loader`, it continues with exactly the next batch, because a batch is random access in
grain (the restored pipeline starts at a slice of the batch dataset). It is the same on every
host and does not depend on the worker, thread or host counts, so a run may resume with others.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import grain
import numpy as np
from absl import flags

from dit_jax.data.epochs import batches_per_epoch, stream_position
from dit_jax.data.source import check_labels
from dit_jax.distributed import union_over_hosts
from dit_jax.sharding import default_host_rows


class _HostRows(grain.MapDataset):
    """Host element j = row lo + j % L of global batch j // L (L = hi - lo), read from the parent
    stream at `stream_position`: endless, since the parent repeats forever."""

    def __init__(self, parent: grain.MapDataset, num_examples: int, global_batch_size: int,
                 rows: tuple[int, int]):
        super().__init__(parent)
        self._n = int(num_examples)
        self._global = int(global_batch_size)
        self._lo, self._hi = int(rows[0]), int(rows[1])
        self._rows = self._hi - self._lo

    def __len__(self) -> int:
        return sys.maxsize

    def _position(self, index: int) -> int:
        batch, row = divmod(int(index), self._rows)
        return int(stream_position(batch, self._lo + row, self._n, self._global))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._position(index)]

    def _getitems(self, indices: Sequence[int]):
        return self._parent._getitems([self._position(i) for i in indices])  # noqa: SLF001

    def __str__(self) -> str:
        return f"HostRows(global={self._global}, rows=[{self._lo}, {self._hi}))"


def ensure_absl_flags_parsed() -> None:
    # grain reads some settings through absl flags, which fail with UnparsedFlagAccessError in a
    # program that is not an absl app (pytest, a notebook, a plain script): use their defaults.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _count_skipped(record: dict[str, Any]) -> dict[str, Any]:
    # Sources without bad-file handling still yield the keys, so every batch has one layout.
    if "skipped" not in record:
        record = dict(record, skipped=np.int32(0))
    if "bad_index" not in record:
        record = dict(record, bad_index=np.int64(-1))
    return record


def check_batch_labels(source, batch: dict[str, np.ndarray]) -> None:
    """Every label of `batch` inside [0, source.num_classes): a source's own checks (a latent
    shard's, when it opens) name the file; this one covers any other grain source."""
    if "caption" in batch:  # captioned records: "y" describes the image, the model never sees it
        return
    if "y" in batch and getattr(source, "num_classes", None) is not None:
        check_labels(batch["y"], source.num_classes, f"a batch of {source!r}")


class Loader:
    """Iterator over this host's rows of every global batch of `source`: dicts of stacked
    arrays ({"x": (rows, ...) float32, "y": (rows,) int32, ...}); the per-example "skipped"
    flags and "bad_index" entries are taken out of the batch, and `skipped` counts the distinct
    unreadable files (one met in every epoch is one).

    source: grain RandomAccessDataSource of dict records; its `augment(record, rng)` (if any)
    turns a record into a training example (random flip, posterior sample), with a generator
    keyed by (seed, stream position).
    host_rows: this host's rows of the global batch; default from jax.process_index/count.
    num_workers: worker processes (0: threads of this process only); num_threads: reader
    threads per process; prefetch: batches buffered per process.
    """

    def __init__(self, source, *, global_batch_size: int, seed: int,
                 host_rows: tuple[int, int] | None = None, num_workers: int = 0,
                 num_threads: int = 4, prefetch: int = 2):
        if len(source) < 1:
            raise ValueError(f"the data source {source!r} is empty")
        batches_per_epoch(len(source), global_batch_size)  # fails here, not at the first batch
        lo, hi = host_rows if host_rows is not None else default_host_rows(global_batch_size)
        if not 0 <= lo < hi <= global_batch_size:
            raise ValueError(f"host rows [{lo}, {hi}) are not inside a batch of {global_batch_size}")
        if not 0 <= seed < 2 ** 32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        self.source = source
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.rows = (int(lo), int(hi))
        self.num_workers = int(num_workers)
        self._bad_synced: set[int] = set()  # every host's unreadable files up to the last sync
        self._bad_local: set[int] = set()  # this host's since then
        self._skipped_legacy = 0  # a count restored from a state that lists no files
        self.next_batch = 0

        ensure_absl_flags_parsed()
        ds = grain.MapDataset.source(source).seed(self.seed).shuffle().repeat()
        if hasattr(source, "augment"):
            ds = ds.random_map(source.augment)
        ds = ds.map(_count_skipped)
        ds = _HostRows(ds, len(source), self.global_batch_size, self.rows)
        self._batches = ds.batch(hi - lo)
        self._read_options = grain.ReadOptions(
            # Elements are whole batches here, so the read buffer is counted in batches; it must
            # hold one per thread or threads sit idle.
            num_threads=num_threads, prefetch_buffer_size=max(1, prefetch, num_threads))
        self._mp_options = grain.MultiprocessingOptions(
            num_workers=self.num_workers, per_worker_buffer_size=max(1, prefetch))
        self._iterator = None

    def _start(self):
        # Batches are random access, so resuming at batch k is a slice: no replay, and nothing in
        # the state depends on the worker or thread counts.
        ds = self._batches[self.next_batch:] if self.next_batch else self._batches
        ds = ds.to_iter_dataset(self._read_options)
        if self.num_workers > 0:
            ds = ds.mp_prefetch(self._mp_options)
        return iter(ds)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self._start()
        # Plain copies: with workers, grain hands over arrays in shared memory, unlinked only when
        # they are freed. A batch that JAX still holds at exit (the CPU backend can alias host
        # memory) would leave them behind ("resource_tracker: ... leaked shared_memory").
        batch = {k: np.array(v) for k, v in next(self._iterator).items()}
        batch.pop("skipped")
        self._bad_local.update(int(i) for i in batch.pop("bad_index") if i >= 0)
        check_batch_labels(self.source, batch)
        self.next_batch += 1
        return batch

    @property
    def skipped(self) -> int:
        """Distinct unreadable files met: every host's up to the last `sync_skipped`, plus this
        host's since (with one process: all of them)."""
        return self._skipped_legacy + len(self._bad_synced | self._bad_local)

    def sync_skipped(self) -> int:
        """The run's count of distinct unreadable files over all hosts. With several processes
        this is a collective: call it on every host at the same point (the train loop does,
        before it logs or saves), after which `get_state` is the same on every host."""
        self._bad_synced |= union_over_hosts(self._bad_local)
        self._bad_local = set()
        return self.skipped

    def get_state(self) -> dict[str, Any]:
        # The same on every host (all have read as many batches), so the one copy a checkpoint
        # keeps restores every host, whatever its rows, worker count or the number of hosts.
        return {"next_batch": self.next_batch, "skipped": self.skipped,
                "skipped_examples": sorted(self._bad_synced | self._bad_local), "seed": self.seed,
                "global_batch_size": self.global_batch_size}

    def set_state(self, state: dict[str, Any]) -> None:
        # Any of these would silently change which examples come next.
        for key, value in (("seed", self.seed), ("global_batch_size", self.global_batch_size)):
            if key in state and state[key] != value:
                raise ValueError(f"data iterator state has {key}={state[key]}, but this run uses "
                                 f"{value}")
        self.close()
        self.next_batch = int(state["next_batch"])
        self._bad_synced = {int(i) for i in state.get("skipped_examples", [])}
        self._bad_local = set()
        # A state saved before the files were listed: its count, as it was.
        self._skipped_legacy = (0 if "skipped_examples" in state
                                else int(state.get("skipped", 0)))

    def close(self) -> None:
        """Stop the worker processes (a later `next` starts them again)."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()
        self._iterator = None


__all__ = ["Loader"]
