"""Pre-extracted VAE latents (written by `python -m dit_jax.extract_latents`): the fast path.

A latents folder holds

    manifest.json          what is stored (see `MANIFEST_STORED`), image_size, latent_shape,
                           count, vae, scaling_factor, shift_factor, class_names, dtype, the
                           shard list, the unreadable images that were skipped
    moments_KKKKK.npy      (n, 2, 2, h, w, c): example × orientation (as is, mirrored) ×
                           moment (mean, std) of the VAE posterior, unscaled
    labels_KKKKK.npy       (n,) int32 class indices

Why moments and not one latent per image: the released recipe draws a fresh posterior sample
(× 0.18215) every time an image is seen. Storing mean and std keeps that: each visit of an
example draws new noise (`LatentSource.augment`, from grain's per-example generator keyed by the
run seed and the stream position, so a run is reproducible and resumes exactly), at the cost of
2× the storage of a single sample. Both orientations are stored because the encoder is not
mirror-equivariant: the latent of a flipped image is not the flipped latent, and the random flip
must stay the released one.

A shard is checked when a process first opens it: a file shorter than its .npy header says (an
interrupted copy), labels outside [0, number of classes) and NaN/Inf moments are errors that name
the file, instead of an mmap error, a label that trains as the null class, or a NaN loss.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from dit_jax.data.source import label_error

MANIFEST = "manifest.json"
FORMAT = "dit_jax-latents-v1"
MANIFEST_STORED = (
    "Posterior moments of the VAE encoder for every image, after the ADM center crop: "
    "moments_K.npy is (n, 2, 2, h, w, c) = (example, orientation [as is, horizontally flipped "
    "before encoding], moment [mean, std], latent height, width, channels), unscaled; a training "
    "latent is (mean + std * N(0, 1) - shift_factor) * scaling_factor with fresh noise at every "
    "visit. "
    "labels_K.npy is (n,) int32.")


def moments_file(shard: int) -> str:
    return f"moments_{shard:05d}.npy"


def labels_file(shard: int) -> str:
    return f"labels_{shard:05d}.npy"


# Examples per step of the finite check of a shard: bounded memory, whatever the shard size.
_CHECK_ROWS = 256


def _redo(path: Path) -> str:
    shard = path.stem.rsplit("_", 1)[-1]
    return (f"delete it and shard_{shard}.json next to it, then run `python -m "
            f"dit_jax.extract_latents` again with the same --data/--out: it encodes only the "
            f"missing shard")


def load_npy(path: str | os.PathLike, *, mmap: bool = False) -> np.ndarray:
    """np.load of a shard file, with one-line errors naming it: a file shorter than its header
    announces (an interrupted copy) or not a .npy file at all."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            header = {(1, 0): np.lib.format.read_array_header_1_0,
                      (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if header is not None:
                shape, _, dtype = header(f)
                expected = f.tell() + math.prod(shape) * dtype.itemsize
                size = os.fstat(f.fileno()).st_size
                if size < expected:
                    raise EOFError(f"{size} of the {expected} bytes its header announces")
        return np.load(path, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path} is truncated or not a .npy file ({err}); {_redo(path)}") from None


def check_shard(moments_path: str | os.PathLike, moments: np.ndarray,
                labels_path: str | os.PathLike, labels: np.ndarray, num_classes: int) -> None:
    """A shard's labels inside [0, num_classes) and its moments finite (read in bounded steps)."""
    problem = label_error(labels, num_classes)
    if problem is not None:
        raise ValueError(f"{labels_path}: {problem} (the manifest's class_names); this shard "
                         f"does not belong to this latents folder or is damaged: "
                         f"{_redo(Path(labels_path))}")
    for start in range(0, len(moments), _CHECK_ROWS):
        block = np.asarray(moments[start:start + _CHECK_ROWS])
        finite = np.isfinite(block).reshape(len(block), -1).all(axis=1)
        if not finite.all():
            first = start + int(np.argmin(finite))
            raise ValueError(f"{moments_path}: example {first} of this shard holds NaN/Inf "
                             f"moments; the encoder overflowed (extract with --dtype float32 "
                             f"and a float32 VAE) or the file is damaged: "
                             f"{_redo(Path(moments_path))}")


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path).expanduser()
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        partial = sorted(path.glob("moments_*.npy")) if path.is_dir() else []
        hint = (" (shards are there but no manifest: the extraction did not finish; run it again "
                "to complete it)") if partial else ""
        raise FileNotFoundError(f"{str(path)!r} is not a latents folder: no {MANIFEST}{hint}")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def sample_latent(moments: np.ndarray, orientation: int, noise: np.ndarray,
                  scaling_factor: float, shift_factor: float = 0.0) -> np.ndarray:
    """(mean + std · noise - shift) · scaling of one stored orientation, in float32 and in the
    order of `dit_jax.models.vae.encode_to_latents`, so equal noise gives equal latents."""
    mean = moments[orientation, 0].astype(np.float32)
    std = moments[orientation, 1].astype(np.float32)
    sample = mean + std * noise.astype(np.float32)
    return (sample - np.float32(shift_factor)) * np.float32(scaling_factor)


class LatentSource:
    """Random access to an extracted latents folder: record i is {"moments": (2, 2, h, w, c)
    float32, "y": int32}; `augment` turns it into the training example {"x": (h, w, c) float32
    latent, "y"} (random orientation, fresh posterior sample).

    image_size: the resolution the run trains at; a folder extracted at another one is an error
    (the model's input size would not match what it was configured for).
    """

    def __init__(self, path: str | os.PathLike, image_size: int | None = None):
        self.path = str(Path(path).expanduser())
        self.manifest = read_manifest(self.path)
        if image_size is not None and int(image_size) != int(self.manifest["image_size"]):
            raise ValueError(
                f"latents in {self.path!r} were extracted at {self.manifest['image_size']} px, "
                f"but data.image_size is {image_size}: extract again with --image-size "
                f"{image_size} or set data.image_size={self.manifest['image_size']}")
        self.image_size = int(self.manifest["image_size"])
        self.class_names = list(self.manifest.get("class_names") or [])
        self.num_classes = len(self.class_names)
        self.element_shape = tuple(int(s) for s in self.manifest["latent_shape"])
        self.scaling_factor = float(self.manifest["scaling_factor"])
        self.shift_factor = float(self.manifest.get("shift_factor") or 0.0)
        shards = self.manifest["shards"]
        counts = np.asarray([s["count"] for s in shards], np.int64)
        self._shard_files = [(s["moments"], s["labels"]) for s in shards]
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        if int(self._starts[-1]) != int(self.manifest["count"]):
            raise ValueError(f"{self.path}/{MANIFEST}: shard counts add up to {self._starts[-1]}, "
                             f"not count={self.manifest['count']}")
        if self.manifest["count"] < 1:
            raise ValueError(f"latents folder {self.path!r} holds no examples")
        self._open: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self):
        # Memory maps are per process: a worker reopens the files it reads.
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __repr__(self) -> str:
        return (f"LatentSource({self.path!r}, {len(self)} examples, latent "
                f"{self.element_shape}, {self.num_classes} classes)")

    def _shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        if shard not in self._open:
            moments_name, labels_name = self._shard_files[shard]
            moments_path = os.path.join(self.path, moments_name)
            labels_path = os.path.join(self.path, labels_name)
            moments = load_npy(moments_path, mmap=True)
            labels = load_npy(labels_path)
            expected = (int(self._starts[shard + 1] - self._starts[shard]), 2, 2) + self.element_shape
            if moments.shape != expected or labels.shape != expected[:1]:
                raise ValueError(f"{moments_path} has shape {moments.shape} (labels "
                                 f"{labels.shape}); the manifest says {expected}")
            # Once per shard and process: a worker reads its shards whole here, then at random.
            check_shard(moments_path, moments, labels_path, labels, self.num_classes)
            self._open[shard] = (moments, labels)
        return self._open[shard]

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} latents")
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        moments, labels = self._shard(shard)
        offset = index - int(self._starts[shard])
        return {"moments": np.asarray(moments[offset], np.float32), "y": np.int32(labels[offset])}

    def augment(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """The random flip (which stored orientation) and a fresh posterior sample."""
        orientation = int(rng.random() < 0.5)
        noise = rng.standard_normal(self.element_shape, dtype=np.float32)
        return {"x": sample_latent(record["moments"], orientation, noise, self.scaling_factor,
                                   self.shift_factor),
                "y": record["y"]}


__all__ = ["FORMAT", "LatentSource", "MANIFEST", "MANIFEST_STORED", "check_shard", "labels_file",
           "load_npy", "moments_file", "read_manifest", "sample_latent"]
