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

import math

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
    labels = np.asarray(labels)
    return render_shapes([CLASSES[int(k)][1] for k in labels], COLOURS[labels], draws, image_size)


def render_shapes(shape_of: list[str], colours: np.ndarray, draws: np.ndarray, image_size: int,
                  background: tuple[float, float] = (0.2, 0.25)) -> np.ndarray:
    """`render` with the shape names, RGB colours (n, 3) in [0, 1] and background range (lowest
    grey level, spread) given one by one: the captioned data combines them freely."""
    n, s = len(shape_of), image_size
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

    mask = np.stack([shape_mask(name, xx[i], yy[i], r[i]) for i, name in enumerate(shape_of)]
                    ).astype(np.float32) if n else np.zeros((0, big, big), np.float32)
    mask = mask.reshape(n, s, _SUPERSAMPLE, s, _SUPERSAMPLE).mean(axis=(2, 4))[..., None]

    # Grey background with a gentle linear gradient: luminance varies, colour never does.
    level = background[0] + background[1] * draws[:, 3]
    strength = 0.15 * draws[:, 4]
    angle = 2 * np.pi * draws[:, 5]
    unit = (np.arange(s, dtype=np.float32) + 0.5) / s - 0.5
    ramp = (np.cos(angle)[:, None, None] * unit[None, None, :]
            + np.sin(angle)[:, None, None] * unit[None, :, None])
    ground = (level[:, None, None] + strength[:, None, None] * ramp)[..., None]
    image = mask * np.asarray(colours, np.float32)[:, None, None, :] + (1 - mask) * ground
    return (image * 2 - 1).astype(np.float32)


def shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, r) -> np.ndarray:
    """Whether the points (xx, yy), relative to the centre, lie inside `shape` of radius r."""
    if shape == "circle":
        return xx ** 2 + yy ** 2 <= r ** 2
    if shape == "square":
        return np.maximum(np.abs(xx), np.abs(yy)) <= 0.8 * r
    if shape == "triangle":
        # Apex up, base at +0.8r: a row at height yy is inside within half-width 0.6 (yy + r).
        return (yy >= -r) & (yy <= 0.8 * r) & (np.abs(xx) <= 0.6 * (yy + r))
    if shape == "diamond":
        return np.abs(xx) + np.abs(yy) <= 1.1 * r
    raise ValueError(f"unknown shape {shape!r}")


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


# Area of each shape in units of r² (circle πr², square (1.6r)², triangle 0.6·(1.8r)², diamond
# 2·(1.1r)²), and how far its centroid lies below its centre (the triangle's, 0.2r).
_AREA = {"circle": math.pi, "square": 2.56, "triangle": 1.944, "diamond": 2.42}
_CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 0.2, "diamond": 0.0}
_SHIFTS = (-0.5, 0.0, 0.5)  # pixels
_SCALES = (0.95, 1.0, 1.05)


def _rgb01(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return (np.clip(images.astype(np.float32), -1, 1) + 1) / 2


def shape_coverage(image: np.ndarray) -> np.ndarray | None:
    """How much of each pixel the coloured shape covers, (H, W) in [0, 1], read from saturation
    alone: a pixel α·colour + (1 - α)·grey has saturation (max - min over RGB) α times the
    colour's, whatever the grey. None when nothing in the image is saturated."""
    rgb = _rgb01(image)
    saturation = rgb.max(axis=-1) - rgb.min(axis=-1)
    peak = saturation.max()
    if peak < 0.3:
        return None
    full = np.median(saturation[saturation >= 0.6 * peak])  # the shape's own saturation
    return np.clip(saturation / full, 0.0, 1.0)


def fit_shape(coverage: np.ndarray, shape: str) -> float:
    """Soft intersection-over-union (Σ min / Σ max) of `coverage` with the best-fitting
    anti-aliased `shape`: its size from the covered area, its centre from the centroid, then the
    best of small shifts and scalings. 1 for an exact rendering; ragged or blurred edges, holes,
    stray pixels and tinted backgrounds all lower it."""
    h, w = coverage.shape
    area = float(coverage.sum())
    if area < 1.0:
        return 0.0
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    mx, my = float((coverage * xs).sum() / area), float((coverage * ys).sum() / area)
    r0 = math.sqrt(area / _AREA[shape])
    # Every candidate (scale, shift y, shift x) at once: (K, 1, 1) parameters against the grid.
    scale, dy, dx = (a.reshape(-1, 1, 1) for a in np.meshgrid(_SCALES, _SHIFTS, _SHIFTS,
                                                                indexing="ij"))
    r = r0 * scale
    cx, cy = mx + dx, my - _CENTROID_DY[shape] * r + dy
    fine_y = (np.arange(h * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    fine_x = (np.arange(w * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    inside = shape_mask(shape, fine_x[None, None, :] - cx, fine_y[None, :, None] - cy, r)
    template = inside.reshape(-1, h, _SUPERSAMPLE, w, _SUPERSAMPLE).mean(axis=(2, 4))
    iou = (np.minimum(coverage, template).sum(axis=(1, 2))
           / np.maximum(coverage, template).sum(axis=(1, 2)))
    return float(iou.max())


def background_residual(image: np.ndarray, coverage: np.ndarray) -> float:
    """RMS deviation (0..1 scale) of the background's brightness from its best plane: the built-in
    backgrounds are linear gradients (0), speckle and smudges are not."""
    rgb = _rgb01(image)
    outside = coverage < 0.1  # generated greys carry a few levels of colour noise
    if outside.sum() < 0.2 * coverage.size:
        return 1.0
    h, w = coverage.shape
    ys, xs = np.mgrid[0:h, 0:w]
    design = np.stack([np.ones(h * w), xs.ravel() / w, ys.ravel() / h], axis=1)[outside.ravel()]
    grey = rgb.mean(axis=-1)[outside]
    coef, *_ = np.linalg.lstsq(design, grey, rcond=None)
    return float(np.sqrt(np.mean((grey - design @ coef) ** 2)))


def read_shape(image: np.ndarray) -> dict:
    """What the built-in judge sees in `image`: the best-fitting shape's index into the shapes of
    `CLASSES` (read from the saturation mask alone, never from colour) and its soft IoU, the
    index of the colour (in `COLOURS`) nearest the shape's core, and the background residual.
    shape and colour are -1 when nothing is saturated."""
    coverage = shape_coverage(image)
    if coverage is None:
        return {"shape": -1, "iou": 0.0, "colour": -1, "background": 1.0}
    shapes = [c[1] for c in CLASSES]
    ious = [fit_shape(coverage, name) for name in dict.fromkeys(shapes)]
    best = int(np.argmax(ious))
    shape_index = shapes.index(list(dict.fromkeys(shapes))[best])
    core = _rgb01(image)[coverage > 0.8]
    colour = (int(np.argmin(np.linalg.norm(core.mean(axis=0)[None] - COLOURS, axis=1)))
              if len(core) else -1)
    return {"shape": shape_index, "iou": float(ious[best]), "colour": colour,
            "background": background_residual(image, coverage)}


def judge_shape(image: np.ndarray, label: int, *, min_iou: float = 0.9,
                max_background: float = 0.03) -> dict:
    """Whether `image` shows class `label` of the built-in data as the data draws it: the shape
    (read from the saturation mask alone, never from colour) fits the class's shape with soft IoU
    ≥ `min_iou` and fits it better than any other shape; the shape's colour is nearest the
    class's colour; the background is a clean gradient. Returns the verdict ("ok") with its parts.
    `image`: (H, W, 3), uint8 in 0..255 or float in [-1, 1]."""
    seen = read_shape(image)
    if seen["shape"] < 0:
        return {"ok": False, **seen}
    wanted = CLASSES[int(label)][1]
    ok = (CLASSES[seen["shape"]][1] == wanted and seen["iou"] >= min_iou
          and seen["colour"] == int(label) and seen["background"] <= max_background)
    return {"ok": bool(ok), **seen}


def shape_score(images: np.ndarray, labels: np.ndarray, **thresholds) -> float:
    """The fraction of `images` that `judge_shape` accepts as their `labels`: the built-in data's
    quality check of generated samples (shape, clean edges, colour, clean background)."""
    images, labels = np.asarray(images), np.asarray(labels).reshape(-1)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if not len(images):
        return 0.0
    return float(np.mean([judge_shape(x, int(y), **thresholds)["ok"]
                          for x, y in zip(images, labels)]))


def shape_accuracy(images: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of `images` whose best-fitting shape (read from the saturation mask, colour
    blind, edges not judged) is their label's: a coarser signal than `shape_score`, for models
    too young to draw clean edges. Blobs read as circles, so they score about 1/4 on balanced
    labels (the circle class only)."""
    images, labels = np.asarray(images), np.asarray(labels).reshape(-1)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    shapes = [judge_shape(x, int(y))["shape"] for x, y in zip(images, labels)]
    return float(np.mean(np.asarray(shapes) == labels)) if len(labels) else 0.0


def class_names() -> list[str]:
    return [c[0] for c in CLASSES]
