"""Tiny real image folders for the data tests and benchmarks: drawn with PIL, written to disk,
nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def draw_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A textured background with a few filled shapes: enough structure that a crop offset, a
    resize filter or a flip changes the pixels."""
    base = rng.integers(0, 256, 3)
    yy, xx = np.mgrid[0:height, 0:width]
    grad = (xx * rng.uniform(0.2, 2.0) + yy * rng.uniform(-1.0, 1.0))[..., None]
    noise = rng.normal(0, 12, (height, width, 3))
    pixels = np.clip(base + grad * rng.uniform(-1, 1, 3) + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, x1 = sorted(rng.integers(0, width, 2))
        y0, y1 = sorted(rng.integers(0, height, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x1 + 1, y1 + 1], fill=colour)
        else:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
    return image


def write_corrupt(path: Path, kind: str, rng: np.random.Generator) -> None:
    """A file with an image extension that cannot be decoded."""
    if kind == "truncated":
        buf = Path(str(path) + ".full.jpg")
        draw_image(rng, 48, 40).save(buf, quality=90)
        data = buf.read_bytes()
        buf.unlink()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("this is not an image\n")
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        raise ValueError(kind)


def make_image_folder(root: Path, classes: dict[str, int] | None = None, *, flat: int = 0,
                      sizes=((48, 36), (36, 48), (61, 45), (45, 77), (40, 40), (97, 64)),
                      corrupt: dict[str, str] | None = None, seed: int = 0,
                      extras: bool = True) -> Path:
    """ROOT/<class>/<i>.{jpg,png} with classes[name] images each (or `flat` images directly in
    ROOT); `corrupt` maps a relative path to a corruption kind ("truncated", "text", "empty");
    `extras` adds a non-image file that the scan must ignore."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    folders = {name: root / name for name in (classes or {})} if not flat else {"": root}
    counts = classes if not flat else {"": flat}
    k = 0
    for name, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(counts[name]):
            w, h = sizes[k % len(sizes)]
            k += 1
            ext = "jpg" if i % 3 else "png"
            image = draw_image(rng, w, h)
            if i % 5 == 4:
                image = image.convert("L")  # grayscale files exist in ImageNet too
            image.save(folder / f"img_{i:03d}.{ext}", **({"quality": 95} if ext == "jpg" else {}))
        if extras:
            (folder / "README.txt").write_text("not an image")
    for rel, kind in (corrupt or {}).items():
        write_corrupt(root / rel, kind, rng)
    return root
