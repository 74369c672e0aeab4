"""Input pipeline throughput per host: images/s of the grain pipeline over an image folder of
ImageNet-sized JPEGs (decode, ADM crop, flip, normalise, batch), and of the latents path
(pre-extracted moments → posterior sample), for several worker counts.

    python bench/bench_data.py [--images 384] [--image-size 256] [--batch 64] [--workers 0,2,4]
    python bench/bench_data.py --tiny --json /tmp/data.json   # checks that it runs

Writes bench/results/bench_data_cpu.json and prints a table (median and best window: on a shared
machine noise only adds time). The JPEGs are drawn in a temporary folder (textures and shapes at
the sizes ImageNet photos typically have), nothing is downloaded. The figures
are for one host: a pod reads in parallel, each host its own slice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, measure, print_table, write_report  # noqa: E402

from dit_jax.data.folder import ImageFolderSource  # noqa: E402
from dit_jax.data.latents import (FORMAT, MANIFEST, MANIFEST_STORED, LatentSource,  # noqa: E402
                                  labels_file, moments_file)
from dit_jax.data.pipeline import Loader  # noqa: E402
from dit_jax.data.transforms import preprocess  # noqa: E402

# Width × height of common ImageNet photos (the median is about 500 × 375).
IMAGENET_SIZES = [(500, 375), (375, 500), (500, 333), (500, 400), (640, 480), (333, 500),
                  (500, 500), (800, 600), (1024, 768), (400, 300)]


def make_jpegs(root: Path, count: int, classes: int = 8) -> int:
    """`count` JPEGs (quality 90, like ImageNet's) in `classes` class folders; the bytes written.
    Smooth colour fields plus noise and shapes: file sizes close to real photos' (~110 KB)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        w, h = IMAGENET_SIZES[i % len(IMAGENET_SIZES)]
        coarse = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3)).astype(np.uint8)
        pixels = (np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.int16)
                  + rng.normal(0, 10, (h, w, 3)).astype(np.int16))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            (x0, x1), (y0, y1) = sorted(rng.integers(0, w, 2)), sorted(rng.integers(0, h, 2))
            draw.ellipse([x0, y0, x1 + 1, y1 + 1], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        path = root / f"n{i % classes:08d}" / f"img_{i:05d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
    return sum(p.stat().st_size for p in root.rglob("*.JPEG"))


def make_latents(root: Path, count: int, image_size: int) -> None:
    """A latents folder of random moments in the format `extract_latents` writes."""
    h, rng = image_size // 8, np.random.default_rng(0)
    moments = rng.standard_normal((count, 2, 2, h, h, 4)).astype(np.float32)
    moments[:, :, 1] = np.abs(moments[:, :, 1]) * 0.1
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / moments_file(0), moments)
    np.save(root / labels_file(0), rng.integers(0, 1000, count).astype(np.int32))
    (root / MANIFEST).write_text(json.dumps({
        "format": FORMAT, "stored": MANIFEST_STORED, "image_size": image_size,
        "latent_shape": [h, h, 4], "count": count, "vae": "random", "scaling_factor": 0.18215,
        "shift_factor": 0.0, "class_names": [f"c{i}" for i in range(1000)], "dtype": "float32",
        "shards": [{"moments": moments_file(0), "labels": labels_file(0), "count": count}]}))


def time_loader(source, *, batch: int, workers: int, threads: int, windows: int,
                per_window: int) -> dict:
    loader = Loader(source, global_batch_size=batch, seed=0, host_rows=(0, batch),
                    num_workers=workers, num_threads=threads, prefetch=2)
    start = time.perf_counter()
    next(loader)  # worker start-up and the first batch are not throughput
    first = time.perf_counter() - start
    t = measure(lambda: next(loader), lambda _: None, warmup=1, iters=windows, inner=per_window)
    loader.close()
    return {"mode": "grain Loader", "workers": workers, "threads": threads, "batch": batch,
            "images_per_s": batch / t["median_s"], "images_per_s_best": batch / t["min_s"],
            "first_batch_s": first, "timed_batches": windows * per_window}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--latents", type=int, default=4096, help="extracted examples")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--windows", type=int, default=3, help="timed windows per setting")
    p.add_argument("--per-window", type=int, default=4, help="batches per timed window")
    p.add_argument("--workers", default=None, help="comma-separated worker counts")
    p.add_argument("--threads", type=int, default=4, help="reader threads per process")
    p.add_argument("--tiny", action="store_true", help="16 images, batch 8, no worker processes")
    p.add_argument("--json", default=None, help="output path (default bench/results/)")
    args = p.parse_args()
    if args.tiny:
        args.images, args.latents, args.batch, args.windows, args.per_window = 16, 64, 8, 1, 1
        args.workers = args.workers or "0"
    cpus = os.cpu_count() or 1
    workers = ([int(w) for w in args.workers.split(",")] if args.workers
               else sorted({0, 1, max(1, cpus // 2), cpus}))
    report = {"benchmark": "data", "platform": "cpu", "environment": environment(),
              "image_size": args.image_size, "images": args.images, "rows": []}
    rows = report["rows"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        report["mean_jpeg_kib"] = make_jpegs(tmp / "jpegs", args.images) / args.images / 1024
        print(f"wrote {args.images} JPEGs ({report['mean_jpeg_kib']:.0f} KiB mean) in "
              f"{time.perf_counter() - start:.1f}s")
        source = ImageFolderSource(tmp / "jpegs", args.image_size)

        # One thread, no pipeline: the cost of the released preprocessing itself.
        paths = source.paths[:64]
        t = measure(lambda: [preprocess(p, args.image_size) for p in paths], lambda _: None,
                    warmup=1, iters=3)
        rows.append({"pipeline": "folder", "mode": "preprocess only", "workers": 0, "threads": 1,
                     "batch": 1, "images_per_s": len(paths) / t["median_s"],
                     "images_per_s_best": len(paths) / t["min_s"], "first_batch_s": None})
        # The timed batches wrap around the folder: a re-read image costs the same decode.
        for w in workers:
            rows.append({"pipeline": "folder", **time_loader(
                source, batch=args.batch, workers=w, windows=args.windows,
                threads=args.threads if w == 0 else max(1, args.threads // 2),
                per_window=args.per_window)})
        make_latents(tmp / "latents", args.latents, args.image_size)
        latents = LatentSource(tmp / "latents", args.image_size)
        for w in sorted({0, min(2, cpus)} if not args.tiny else {0}):
            rows.append({"pipeline": "latents", **time_loader(
                latents, batch=min(256, args.latents), workers=w, threads=args.threads,
                windows=args.windows, per_window=5 if not args.tiny else 1)})

    print_table(f"Input pipeline per host, {args.image_size} px ({cpus} CPUs, load "
                f"{report['environment']['host']['load_average_1m']:.1f})", rows, [
                    ("pipeline", "pipeline", ""), ("mode", "mode", ""),
                    ("workers", "workers", ""), ("threads", "threads", ""),
                    ("batch", "batch", ""), ("images_per_s", "images/s (median)", ".0f"),
                    ("images_per_s_best", "images/s (best window)", ".0f"),
                    ("first_batch_s", "first batch s", ".2f")])
    write_report("bench_data", report, args.json)


if __name__ == "__main__":
    main()
