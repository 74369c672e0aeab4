"""Training data: random-access sources and the per-host batch iterator the train loop reads.

A *source* is anything with `__len__` and `__getitem__(index) -> {"x": (H, W, C) float32,
"y": int}` plus two attributes, `num_classes` and `element_shape` (the shape of "x"). That is
grain's `RandomAccessDataSource` protocol, so a grain source (an image folder, a latent array
file) plugs in unchanged; a source may also offer `get_batch(indices)` to build many examples at
once (the built-in ones do, vectorised).

`Batches` turns a source into the global batch stream of a run and hands each host only its own
rows of it:

- epoch e visits the source in the order of a permutation drawn from (seed, e), so the order is
  a global shuffle that depends on the seed alone, not on the number of hosts or devices; it is
  cut into n // G global batches of G distinct examples and its last n % G examples are dropped,
  as the official loader's drop_last does (`dit_jax.data.epochs`), so global batch b is batch
  b mod (n // G) of epoch b // (n // G);
- a host loads the rows [lo, hi) of each global batch that its devices hold (the train loop
  derives them from the mesh), and the hosts' slices assemble into the global batch with
  `jax.make_array_from_process_local_data`;
- its whole state is the index of the next global batch (`get_state`/`set_state`, JSON), so a
  resumed run reads exactly the batches an uninterrupted run would have.

Sources that read files (image folders, extracted latents) go through `make_batches` to grain
(`dit_jax.data.pipeline.Loader`): the same definitions and state, plus worker processes and
prefetch, and a per-example `augment(record, rng)` (random flip, posterior sample) keyed by the
seed and the stream position.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from dit_jax.data.builtin import (BuiltinShapes, classify_image, judge_shape, shape_accuracy,
                                  shape_score)
from dit_jax.data.epochs import batches_per_epoch, stream_position
from dit_jax.data.folder import ImageFolderSource, class_folders_for
from dit_jax.data.latents import LatentSource
from dit_jax.data.pipeline import Loader, check_batch_labels
from dit_jax.data.synthetic import SyntheticLatents


class Source(Protocol):
    num_classes: int
    element_shape: tuple[int, ...]
    class_names: Sequence[str]  # one per class when the data names them, else empty

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


def get_batch(source: Source, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Examples `indices` of `source` stacked into {"x": (n, H, W, C) float32, "y": (n,) int32}."""
    if hasattr(source, "get_batch"):
        return source.get_batch(np.asarray(indices))
    records = [source[int(i)] for i in indices]
    return {"x": np.stack([np.asarray(r["x"], np.float32) for r in records]),
            "y": np.asarray([r["y"] for r in records], np.int32)}


class BatchIterator(Protocol):
    """What the train loop reads: `Batches` and the grain `Loader` (`dit_jax.data.pipeline`).

    next(it) is this host's rows of the next global batch; `next_batch` the index of that batch;
    `get_state`/`set_state` its JSON state; `skipped` the unreadable examples skipped so far (None
    for sources that cannot skip any) and `sync_skipped()` their total over all hosts (a
    collective); `close()` stops any worker processes."""

    next_batch: int

    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...

    @property
    def skipped(self) -> int | None: ...

    def sync_skipped(self) -> int | None: ...

    def close(self) -> None: ...


class Batches:
    """This host's rows [lo, hi) of every global batch of `source`, shuffled by `seed`."""

    skipped = None  # generated data: nothing is ever unreadable

    def __init__(self, source: Source, *, global_batch_size: int, seed: int,
                 host_rows: tuple[int, int] | None = None):
        lo, hi = host_rows if host_rows is not None else (0, global_batch_size)
        if not 0 <= lo < hi <= global_batch_size:
            raise ValueError(f"host rows [{lo}, {hi}) are not inside a batch of {global_batch_size}")
        if len(source) < 1:
            raise ValueError("the data source is empty")
        batches_per_epoch(len(source), global_batch_size)  # fails here, not at the first batch
        self.source = source
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rows = (lo, hi)
        self.next_batch = 0
        self._perm_epoch = -1
        self._perm = None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
            self._perm_epoch = epoch
        return self._perm

    def indices(self, batch: int) -> np.ndarray:
        """Source indices of this host's rows of global batch `batch`."""
        n = len(self.source)
        lo, hi = self.rows
        positions = stream_position(np.int64(batch), np.arange(lo, hi, dtype=np.int64), n,
                                    self.global_batch_size)
        epochs, offsets = np.divmod(positions, n)
        return self._order(int(epochs[0]))[offsets]  # a batch lies inside one epoch

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = get_batch(self.source, self.indices(self.next_batch))
        check_batch_labels(self.source, batch)
        self.next_batch += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"next_batch": int(self.next_batch), "seed": int(self.seed),
                "global_batch_size": int(self.global_batch_size)}

    def set_state(self, state: dict[str, int]) -> None:
        # A different batch size or seed would silently change which examples come next.
        for key in ("seed", "global_batch_size"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"data iterator state has {key}={state[key]}, but this run uses "
                                 f"{getattr(self, key)}")
        self.next_batch = int(state["next_batch"])

    def sync_skipped(self) -> None:
        return None

    def close(self) -> None:
        pass


def make_source(data_config, *, model_input: tuple[int, int, int] | None = None,
                num_classes: int | None = None) -> Source:
    """The source named by `data_config.source`.

    builtin: the procedural shapes data (pixel space, `data_config.image_size`).
    synthetic: random latents of shape `model_input` for benchmarks (labels in [0, num_classes)).
    folder: the images under `data_config.path`, ADM-cropped to `image_size`
    (`dit_jax.data.folder`); `data_config.layout` is "classes" (one subfolder per class),
    "flat" (every image under the folder, unconditional) or "auto" (classes when the folder
    holds subfolders and no images of its own).
    latents: a folder written by `python -m dit_jax.extract_latents` (`dit_jax.data.latents`).
    """
    name = data_config.source
    if name == "builtin":
        return BuiltinShapes(image_size=data_config.image_size,
                             size=data_config.num_examples or BuiltinShapes.DEFAULT_SIZE,
                             seed=data_config.dataset_seed)
    if name == "synthetic":
        if model_input is None:
            raise ValueError("the synthetic source needs the model's input shape")
        return SyntheticLatents(shape=model_input, num_classes=num_classes or 1000,
                                size=data_config.num_examples or SyntheticLatents.DEFAULT_SIZE,
                                seed=data_config.dataset_seed)
    if name in ("folder", "latents") and not data_config.path:
        raise ValueError(f"data.source={name!r} needs data.path (an image folder, or a folder "
                         f"written by `python -m dit_jax.extract_latents`)")
    layout = data_config.layout
    if layout != "auto" and name != "folder":
        # Latents keep the layout chosen when they were extracted (extract_latents --layout);
        # silently ignoring the setting would train with labels the user asked to drop.
        raise ValueError(f"data.layout={layout!r} applies to data.source='folder' only, not "
                         f"{name!r}" + (" (extract the latents with --layout instead)"
                                        if name == "latents" else ""))
    if name == "folder":
        return ImageFolderSource(data_config.path, data_config.image_size,
                                 class_folders=class_folders_for(layout),
                                 random_flip=bool(data_config.random_flip))
    if name == "latents":
        return LatentSource(data_config.path, image_size=data_config.image_size)
    raise ValueError(f"unknown data source {name!r}; choose builtin, synthetic, folder or latents")


def make_batches(source: Source, *, global_batch_size: int, seed: int,
                 host_rows: tuple[int, int] | None = None, num_workers: int = 0) -> BatchIterator:
    """This host's batch iterator over `source`: the grain pipeline (`dit_jax.data.pipeline`:
    worker processes, prefetch) for the sources that read files, the in-process `Batches` for
    the generated ones. Both follow the same definitions (global shuffle by seed, host rows of
    every global batch) and the same JSON state."""
    if hasattr(source, "augment"):
        return Loader(source, global_batch_size=global_batch_size, seed=seed, host_rows=host_rows,
                      num_workers=num_workers)
    return Batches(source, global_batch_size=global_batch_size, seed=seed, host_rows=host_rows)


__all__ = ["BatchIterator", "Batches", "BuiltinShapes", "Source", "SyntheticLatents", "classify_image",
           "judge_shape", "shape_accuracy", "shape_score",
           "get_batch", "make_batches", "make_source"]
