"""Image sets to evaluate, read in batches: ADM-format .npz files and image folders.

- .npz: uint8 (N, H, W, 3) under `arr_0` (what sample.py --npz and the ADM reference batches
  hold), streamed from the archive batch by batch: a 50K × 256² set is 9.8 GB.
- folder: every image under it (recursively, sorted), decoded as RGB; with `image_size` each is
  ADM-center-cropped to image_size² (how the reference statistics of a training set are made),
  without it all images must share one size (sample folders).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from dit_jax.data.folder import scan_folder
from dit_jax.data.transforms import center_crop_arr, load_rgb

IMAGES_KEY = "arr_0"


@dataclass
class ImageSet:
    """An image set on disk: `len()` images, `batches(n)` yields uint8 (≤ n, H, W, 3) arrays."""

    path: str
    image_size: int | None = None

    def __post_init__(self):
        path = Path(self.path).expanduser()
        if path.is_dir():
            self.paths, _, _ = scan_folder(path, class_folders=False)
            self._count = len(self.paths)
        elif path.is_file():
            self.paths = None
            shape, dtype = npz_array_info(path, IMAGES_KEY)
            if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
                raise ValueError(f"{path}: {IMAGES_KEY} must be uint8 images (N, H, W, 3), got "
                                 f"{dtype} {shape}")
            self._count = shape[0]
        else:
            raise FileNotFoundError(f"image set {path} not found: pass an ADM-format .npz "
                                    f"(uint8 N×H×W×3 under {IMAGES_KEY}) or an image folder")

    def __len__(self) -> int:
        return self._count

    def load(self, index: int) -> np.ndarray:
        image = load_rgb(self.paths[index])
        if self.image_size is not None:
            return center_crop_arr(image, self.image_size)
        return np.asarray(image)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if self.paths is None:
            yield from npz_batches(self.path, IMAGES_KEY, batch_size)
            return
        for start in range(0, len(self), batch_size):
            images = [self.load(i) for i in range(start, min(start + batch_size, len(self)))]
            shapes = {im.shape for im in images}
            if len(shapes) > 1:
                raise ValueError(f"{self.path}: images of different sizes {sorted(shapes)}; pass "
                                 "--image-size to center-crop them to one size")
            yield np.stack(images)


def _open_member(path, key):
    zf = zipfile.ZipFile(path)
    name = f"{key}.npy"
    if name not in zf.namelist():
        zf.close()
        raise KeyError(f"{path} has no {key} array (found {', '.join(zf.namelist())})")
    return zf, zf.open(name)


def _read_header(f):
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, fortran, dtype = read(f)
    if fortran:
        raise ValueError("Fortran-ordered image arrays are not supported")
    return shape, dtype


def npz_array_info(path: str | os.PathLike, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array of an .npz, read from its header only."""
    try:
        zf, f = _open_member(path, key)
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not an .npz file") from None
    with zf, f:
        return _read_header(f)


def npz_batches(path: str | os.PathLike, key: str, batch_size: int) -> Iterator[np.ndarray]:
    """The rows of one .npz array, batch_size at a time, without loading the whole array."""
    zf, f = _open_member(path, key)
    with zf, f:
        shape, dtype = _read_header(f)
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            data = f.read(n * row_bytes)
            if len(data) != n * row_bytes:
                raise ValueError(f"{path}: {key} ends early (row {start + len(data) // row_bytes} "
                                 f"of {shape[0]})")
            yield np.frombuffer(data, dtype).reshape(n, *shape[1:])


__all__ = ["IMAGES_KEY", "ImageSet", "npz_array_info", "npz_batches"]
