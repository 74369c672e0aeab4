"""Image preprocessing exactly as the official DiT `train.py` does it
(docs/numerics.md#latents-and-data).

The released transform is

    Compose([Lambda(center_crop_arr), RandomHorizontalFlip(), ToTensor(), Normalize(0.5, 0.5)])

applied to `Image.open(path).convert("RGB")`. `center_crop_arr` is ADM's: halve the image with a
BOX filter while its short side is at least twice the target, BICUBIC-resize so the short side
equals the target (the long side is rounded with Python's `round`, i.e. half to even), then crop
the centre at ((h - size) // 2, (w - size) // 2). The output here is channels-last NumPy, which
is what the model takes (NHWC).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_255 = np.float32(255.0)
_HALF = np.float32(0.5)


def load_rgb(path) -> Image.Image:
    """The image at `path` fully decoded as RGB (torchvision's `pil_loader`). Raises on a
    truncated or unreadable file: `load()` forces the whole decode here, not lazily later."""
    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()
        return image.convert("RGB")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's center crop: (image_size, image_size, C) uint8."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                                 resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size])


def normalize(arr: np.ndarray) -> np.ndarray:
    """uint8 → float32 in [-1, 1] with torchvision's rounding: ToTensor's `x / 255`, then
    Normalize's `(x - 0.5) / 0.5`, each step in float32. (`x / 127.5 - 1` is the same function
    but differs in the last bit for some x.)"""
    return (np.asarray(arr).astype(np.float32) / _255 - _HALF) / _HALF


def hflip(arr: np.ndarray) -> np.ndarray:
    """Mirror an (..., H, W, C) array left-right."""
    return np.ascontiguousarray(np.asarray(arr)[..., :, ::-1, :])


def preprocess(path, image_size: int) -> np.ndarray:
    """File → the released training input before the random flip: (S, S, 3) float32 in [-1, 1]."""
    return normalize(center_crop_arr(load_rgb(path), image_size))


__all__ = ["center_crop_arr", "hflip", "load_rgb", "normalize", "preprocess"]
