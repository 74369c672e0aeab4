"""A built-in, class-conditional image dataset made procedurally: one coloured shape on a grey
background. No download, any size, and easy to judge by eye and by program.

Each class is one colour + shape pair (`CLASSES`), so the class of an image, real or generated,
can be read off its dominant saturated colour (`classify_image`); the background is a
colourless grey gradient, so it never competes with the shape's colour. Example i is a pure
function of (seed, i): its class is i mod num_classes and its position, size and background
come from a generator seeded with (seed, i), so any host can build any example on its own.
Pixels are float32 in [-1, 1], (H, W, 3), channels last, like the model's input.
"""

from __future__ import annotations

import numpy as np

from dit_jax.data.source import BatchSource

# (name, shape, RGB in 0..255). Colours far apart in RGB so that nearest-colour classification
# stays unambiguous even for imperfect samples.
CLASSES = (
    ("red circle", "circle", (225, 35, 35)),
    ("green square", "square", (35, 185, 60)),
    ("blue triangle", "triangle", (45, 85, 235)),
    ("yellow diamond", "diamond", (235, 205, 30)),
)
COLOURS = np.asarray([c[2] for c in CLASSES], np.float32) / 255.0

_SUPERSAMPLE = 2  # shapes are drawn at 2× and box-filtered, for anti-aliased edges


class BuiltinShapes(BatchSource):
    """`size` examples of `image_size`² pixels; random access (grain's RandomAccessDataSource)."""

    DEFAULT_SIZE = 50_000

    def __init__(self, image_size: int = 32, size: int = DEFAULT_SIZE, seed: int = 0):
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {image_size}")
        self.image_size = int(image_size)
        self.size = int(size)
        self.seed = int(seed)
        self.num_classes = len(CLASSES)
        self.element_shape = (self.image_size, self.image_size, 3)

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.size):
            raise IndexError(f"index out of range for {self.size} examples")
        labels = (indices % self.num_classes).astype(np.int32)
        # Per-example generators: example i is the same wherever and in whatever batch it is built.
        draws = np.stack([np.random.default_rng([self.seed, int(i)]).random(6) for i in indices]) \
            if indices.size else np.zeros((0, 6))
        return {"x": render(labels, draws, self.image_size), "y": labels}


def render(labels: np.ndarray, draws: np.ndarray, image_size: int) -> np.ndarray:
    """Images (n, S, S, 3) in [-1, 1] for class `labels` and uniform draws (n, 6) in [0, 1):
    radius, centre x, centre y, background level, gradient strength, gradient direction."""
    n, s = len(labels), image_size
    big = s * _SUPERSAMPLE
    # Large shapes near the centre: the class colour then dominates the class-mean image, which
    # is what a diffusion model must get from the label at high noise, so conditioning is
    # learned in a few hundred steps.
    radius = (0.28 + 0.1 * draws[:, 0]) * big
    cx = big / 2 + (draws[:, 1] - 0.5) * 0.25 * big
    cy = big / 2 + (draws[:, 2] - 0.5) * 0.25 * big
    coords = np.arange(big, dtype=np.float32) + 0.5
    xx = coords[None, None, :] - cx[:, None, None]
    yy = coords[None, :, None] - cy[:, None, None]
    r = radius[:, None, None]

    masks = {
        "circle": xx ** 2 + yy ** 2 <= r ** 2,
        "square": np.maximum(np.abs(xx), np.abs(yy)) <= 0.8 * r,
        # Apex up, base at +0.8r: a row at height yy is inside within half-width (yy + r)/2.
        "triangle": (yy >= -r) & (yy <= 0.8 * r) & (np.abs(xx) <= 0.6 * (yy + r)),
        "diamond": np.abs(xx) + np.abs(yy) <= 1.1 * r,
    }
    shape_of = np.asarray([c[1] for c in CLASSES])[labels]
    mask = np.zeros((n, big, big), np.float32)
    for name, m in masks.items():
        sel = shape_of == name
        mask[sel] = m[sel]
    mask = mask.reshape(n, s, _SUPERSAMPLE, s, _SUPERSAMPLE).mean(axis=(2, 4))[..., None]

    # Grey background with a gentle linear gradient: luminance varies, colour never does.
    level = 0.2 + 0.25 * draws[:, 3]
    strength = 0.15 * draws[:, 4]
    angle = 2 * np.pi * draws[:, 5]
    unit = (np.arange(s, dtype=np.float32) + 0.5) / s - 0.5
    ramp = (np.cos(angle)[:, None, None] * unit[None, None, :]
            + np.sin(angle)[:, None, None] * unit[None, :, None])
    background = (level[:, None, None] + strength[:, None, None] * ramp)[..., None]
    image = mask * COLOURS[labels][:, None, None, :] + (1 - mask) * background
    return (image * 2 - 1).astype(np.float32)


def classify_image(image: np.ndarray, *, min_fraction: float = 0.03) -> int:
    """The class whose colour the image's saturated pixels are closest to, or -1 when fewer than
    `min_fraction` of the pixels are saturated (no shape). `image`: (H, W, 3), uint8 in 0..255 or
    float in [-1, 1]."""
    image = np.asarray(image)
    rgb = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else (
        np.clip(image.astype(np.float32), -1, 1) + 1) / 2
    pixels = rgb.reshape(-1, 3)
    saturation = pixels.max(axis=1) - pixels.min(axis=1)
    shape = pixels[saturation > 0.35]
    if len(shape) < min_fraction * len(pixels):
        return -1
    distances = np.linalg.norm(shape.mean(axis=0)[None] - COLOURS, axis=1)
    return int(np.argmin(distances))


def class_names() -> list[str]:
    return [c[0] for c in CLASSES]
