"""Input pipeline throughput per host: images/s of the grain pipeline over an image folder of
ImageNet-sized JPEGs (decode, ADM crop to 256 px, flip, normalise, batch), and of the latents
path (pre-extracted moments → posterior sample), for several worker counts.

    python bench/bench_data.py [--images 384] [--image-size 256] [--batch 64] [--workers 0,2,4]

Writes bench/results/bench_data_cpu.json and prints a table (median and best window: on a shared
machine noise only adds time). The JPEGs are generated in a temporary
folder (random textures and shapes at the sizes ImageNet photos typically have), nothing is
downloaded. The figures are for one host: a pod reads in parallel, each host its own slice.
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

from dit_jax.data.folder import ImageFolderSource
from dit_jax.data.latents import FORMAT, MANIFEST, MANIFEST_STORED, LatentSource, labels_file, moments_file
from dit_jax.data.pipeline import Loader
from dit_jax.data.transforms import preprocess

# Width × height of common ImageNet photos (the median is about 500 × 375; 400 K of the 1.28 M
# training images are 500 × 375 or 375 × 500).
IMAGENET_SIZES = [(500, 375), (375, 500), (500, 333), (500, 400), (640, 480), (333, 500),
                  (500, 500), (800, 600), (1024, 768), (400, 300)]


def make_jpegs(root: Path, count: int, classes: int = 8, seed: int = 0) -> int:
    """`count` photo-like JPEGs (quality 90, like ImageNet's) in `classes` class folders;
    returns the bytes written."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(count):
        w, h = IMAGENET_SIZES[i % len(IMAGENET_SIZES)]
        # Smooth colour fields plus noise and shapes: JPEG sizes close to real photos' (~110 KB).
        coarse = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3)).astype(np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(image).astype(np.int16) + rng.normal(0, 10, (h, w, 3)).astype(np.int16)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, x1 = sorted(rng.integers(0, w, 2))
            y0, y1 = sorted(rng.integers(0, h, 2))
            draw.ellipse([x0, y0, x1 + 1, y1 + 1], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:05d}.JPEG"
        image.save(path, quality=90)
        total += path.stat().st_size
    return total


def make_latents(root: Path, count: int, image_size: int) -> None:
    """A latents folder of random moments in the format `extract_latents` writes."""
    h = image_size // 8
    rng = np.random.default_rng(0)
    moments = rng.standard_normal((count, 2, 2, h, h, 4)).astype(np.float32)
    moments[:, :, 1] = np.abs(moments[:, :, 1]) * 0.1
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / moments_file(0), moments)
    np.save(root / labels_file(0), rng.integers(0, 1000, count).astype(np.int32))
    (root / MANIFEST).write_text(json.dumps({
        "format": FORMAT, "stored": MANIFEST_STORED, "image_size": image_size,
        "latent_shape": [h, h, 4], "count": count, "vae": "random", "scaling_factor": 0.18215, "shift_factor": 0.0,
        "class_names": [f"c{i}" for i in range(1000)], "dtype": "float32",
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
    return {"workers": workers, "threads": threads, "batch": batch,
            "images_per_s": batch / t["median_s"], "images_per_s_best": batch / t["min_s"],
            "first_batch_s": first, "timed_batches": windows * per_window}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--windows", type=int, default=3, help="timed windows per setting")
    parser.add_argument("--per-window", type=int, default=4, help="batches per timed window")
    parser.add_argument("--workers", default=None, help="comma-separated worker counts")
    parser.add_argument("--threads", type=int, default=4, help="reader threads per process")
    parser.add_argument("--json", default=None, help="output path (default bench/results/)")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    workers = ([int(w) for w in args.workers.split(",")] if args.workers
               else sorted({0, 1, max(1, cpus // 2), cpus}))
    report = {"benchmark": "data", "platform": "cpu", "environment": environment(),
              "image_size": args.image_size, "images": args.images, "rows": []}
    rows = report["rows"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        nbytes = make_jpegs(tmp / "jpegs", args.images)
        report["mean_jpeg_kib"] = nbytes / args.images / 1024
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
            threads = args.threads if w == 0 else max(1, args.threads // 2)
            rows.append({"pipeline": "folder", "mode": "grain Loader", **time_loader(
                source, batch=args.batch, workers=w, threads=threads, windows=args.windows,
                per_window=args.per_window)})

        make_latents(tmp / "latents", 4096, args.image_size)
        latents = LatentSource(tmp / "latents", args.image_size)
        for w in sorted({0, min(2, cpus)}):
            rows.append({"pipeline": "latents", "mode": "grain Loader", **time_loader(
                latents, batch=256, workers=w, threads=args.threads, windows=args.windows,
                per_window=5)})

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
