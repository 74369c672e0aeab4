"""Image preprocessing exactly as the official DiT `train.py` does it
(docs/numerics.md#latents-and-data).

The released transform is

    Compose([Lambda(center_crop_arr), RandomHorizontalFlip(), ToTensor(), Normalize(0.5, 0.5)])

applied to `Image.open(path).convert("RGB")`. `center_crop_arr` is ADM's: halve the image with a
BOX filter while its short side is at least twice the target, BICUBIC-resize so the short side
equals the target (the long side is rounded with Python's `round`, i.e. half to even), then crop
the centre at ((h - size) // 2, (w - size) // 2). The output here is channels-last NumPy, which
is what the model takes (NHWC).

Two departures, for files the released loader mishandles: a 16-bit grayscale image (PIL mode
I;16) is scaled to 8 bits (v / 257, rounded) where `convert("RGB")` would clip it to white (16-bit
RGB files PIL already reads by their high byte); and an image whose short side is at least
`LARGE_FACTOR` times the target is decoded reduced (a JPEG by its DCT scaling, `Image.draft`,
other formats by an integer box `Image.reduce` after decoding) to a short side of at least
`KEEP_FACTOR` times the target before the ADM crop, which then halves it as usual: the pixels
differ from a full decode by the rounding of the averages only, and a 12000-pixel photo no longer
costs gigabytes and seconds at every visit.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

_255 = np.float32(255.0)
_HALF = np.float32(0.5)


# An image at least LARGE_FACTOR × the target (short side) is reduced on decode to a short side
# of at least KEEP_FACTOR × the target.
LARGE_FACTOR = 8
KEEP_FACTOR = 4
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_warned_large = False


def _to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (I;16, or 32-bit I holding values above 255) scaled to 8 bits."""
    if image.mode not in _SIXTEEN_BIT + ("I",):
        return image
    values = np.asarray(image).astype(np.float64)
    if image.mode == "I" and values.max(initial=0) <= 255:
        return Image.fromarray(values.clip(0, 255).astype(np.uint8), "L")
    return Image.fromarray(np.rint(values.clip(0, 65535) / 257.0).astype(np.uint8), "L")


def _warn_large_once(path, size: tuple[int, int], image_size: int) -> None:
    global _warned_large
    if not _warned_large:
        _warned_large = True
        log.warning("%s is %dx%d px, far larger than the %d px trained: it is reduced after "
                    "decoding at every visit, which is slow for formats other than JPEG; shrink "
                    "such images once beforehand or extract latents (python -m "
                    "dit_jax.extract_latents) (logged once)", path, *size, image_size)


def load_rgb(path, image_size: int | None = None) -> Image.Image:
    """The image at `path` fully decoded as RGB (torchvision's `pil_loader`), 16-bit grayscale
    scaled to 8 bits, and reduced on decode when `image_size` is given and the image is at least
    LARGE_FACTOR times larger (see the module doc). Raises on a truncated or unreadable file:
    `load()` forces the whole decode here, not lazily later."""
    with open(path, "rb") as f:
        image = Image.open(f)
        short = min(image.size)
        large = image_size is not None and short >= LARGE_FACTOR * image_size
        if large and image.format == "JPEG":
            scale = KEEP_FACTOR * image_size / short  # draft keeps at least the size asked for
            image.draft(None, tuple(math.ceil(side * scale) for side in image.size))
        image.load()
        fmt = image.format
        image = _to_8bit(image).convert("RGB")
        if large and fmt != "JPEG":
            _warn_large_once(path, image.size, image_size)
            image = image.reduce(2 ** int(math.log2(short // (KEEP_FACTOR * image_size))))
        return image


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
    return normalize(center_crop_arr(load_rgb(path, image_size), image_size))


__all__ = ["center_crop_arr", "hflip", "load_rgb", "normalize", "preprocess"]
