"""Encode an image folder once with the VAE: the fast path of training
(docs/numerics.md#latents-and-data).

    python -m dit_jax.extract_latents --data=/data/imagenet/train --out=/data/latents256 \\
        --image-size=256 --vae=stabilityai/sd-vae-ft-ema
    # a folder of unlabelled images, half-precision storage, no progress bar (batch jobs)
    python -m dit_jax.extract_latents --data=/data/faces --out=/data/faces-latents \\
        --layout=flat --dtype=float16 --noprogress

Every image goes through the released preprocessing (ADM center crop, [-1, 1]); the VAE encodes it
and its mirror image, and the posterior mean and std of both are stored (see
`dit_jax.data.latents` for the layout and for why moments, not samples). Training then reads
`--config.data.source=latents --config.data.path=OUT`.

Scale-out: run the same command on every host of a pod (after `jax.distributed.initialize`,
done here when the environment shows a multi-host launch). The images are cut into shards of
`--shard-size` consecutive files; host p encodes the shards p, p + P, p + 2P, ... with its own
devices (the batch split over all of them by a local mesh), so hosts never wait for each other
until the end, when host 0 writes the manifest. A shard is written atomically (temporary file,
then rename) and skipped when found complete, so an interrupted extraction resumes where it
stopped: run the same command again. Unreadable images are skipped (logged, counted, and listed
in the manifest).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from tqdm import tqdm

from dit_jax import cli

from dit_jax.data.folder import LAYOUTS, ImageFolderSource, class_folders_for
from dit_jax.data.latents import (FORMAT, MANIFEST, MANIFEST_STORED, labels_file, moments_file)
from dit_jax.data.pipeline import ensure_absl_flags_parsed
from dit_jax.distributed import initialize_distributed, wait_for_every_host
from dit_jax.extract_text import extract_text
from dit_jax.port.t5 import t5_text_encoder
from dit_jax.port.paths import missing_path_message
from dit_jax.port.vae import load_vae
from dit_jax.sharding import batch_sharding, make_mesh, replicated, shard_batch

log = logging.getLogger(__name__)

PLAN = "extraction.json"  # the settings of an extraction in progress, to refuse mixing two


def shard_record(shard: int) -> str:
    return f"shard_{shard:05d}.json"


class _LoadBatch:
    """Grain map: (shard, start, stop) → the preprocessed images [start, stop) padded to `rows`,
    with a validity mask (False for padding and for unreadable files)."""

    def __init__(self, source: ImageFolderSource, rows: int):
        self.source = source
        self.rows = rows

    def __call__(self, item: tuple[int, int, int]) -> dict[str, Any]:
        shard, start, stop = item
        x = np.zeros((self.rows,) + self.source.element_shape, np.float32)
        valid = np.zeros(self.rows, bool)
        for row, index in enumerate(range(start, stop)):
            image = self.source.load(index)
            if image is not None:
                x[row] = image
                valid[row] = True
        return {"x": x, "valid": valid, "shard": np.int64(shard), "start": np.int64(start),
                "stop": np.int64(stop)}


def make_encoder(vae, mesh):
    """jitted (weights, images (B, S, S, 3)) → moments (B, 2, 2, h, w, c): orientation (as is,
    mirrored) × (mean, std), the batch split over the mesh."""
    graphdef, weights = nnx.split(vae)
    weights = jax.device_put(weights, replicated(mesh))

    def encode(weights, x):
        model = nnx.merge(graphdef, weights)
        n = x.shape[0]
        # Interleaved (image i, its mirror) rows: each device encodes both orientations of its
        # own rows, so no data moves between devices.
        both = jnp.stack([x, x[:, :, ::-1, :]], axis=1).reshape((2 * n,) + x.shape[1:])
        posterior = model.encode(both)
        moments = jnp.stack([posterior.mean, posterior.std], axis=1)  # (2n, 2, h, w, c)
        return moments.reshape((n, 2) + moments.shape[1:])

    jitted = jax.jit(encode, in_shardings=(replicated(mesh), batch_sharding(mesh, 4)),
                     out_shardings=batch_sharding(mesh, 6))
    return lambda x: jitted(weights, x)


def _digest(source: ImageFolderSource) -> str:
    h = hashlib.sha256()
    root = os.path.abspath(source.root)
    for path, label in zip(source.paths, source.labels):
        h.update(f"{os.path.relpath(path, root)}\t{label}\n".encode())
    return h.hexdigest()


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _write_json(path: Path, payload: dict) -> None:
    _write_atomic(path, lambda f: f.write((json.dumps(payload, indent=1) + "\n").encode()))


def extract(data: str | os.PathLike, out: str | os.PathLike, *, image_size: int, vae: str,
            batch_size: int = 32, shard_size: int = 2048, dtype: str = "float32",
            num_workers: int = 4, num_threads: int = 8, class_folders: bool | None = None,
            vae_dtype=jnp.float32, progress: bool = True, vae_module=None) -> dict[str, Any]:
    """Encode `data` into `out` (resuming a previous run there); returns the manifest.

    batch_size: images per device per step (each is encoded twice: as is and mirrored).
    shard_size: images per shard file. dtype: storage dtype of the moments (float32, float16).
    vae: a diffusers VAE folder or hub id (recorded in the manifest); `vae_module` may pass the
    loaded AutoencoderKL instead of loading `vae`.
    """
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    out = Path(out).expanduser().absolute()
    source = ImageFolderSource(data, image_size, class_folders=class_folders,
                               replace_unreadable=False)
    if vae_module is None:
        vae_module = load_vae(vae, dtype=vae_dtype)
    down = vae_module.scale_factor
    if image_size % down:
        raise ValueError(f"image_size {image_size} is not divisible by the VAE's {down}x downsampling")
    latent_shape = (image_size // down, image_size // down, vae_module.latent_channels)

    num_files = len(source)
    num_shards = -(-num_files // shard_size)
    plan = {"format": FORMAT, "data": os.path.abspath(source.root), "image_size": int(image_size),
            "vae": str(vae), "shard_size": int(shard_size), "dtype": dtype, "files": num_files,
            "files_sha256": _digest(source), "class_names": source.class_names,
            "latent_shape": list(latent_shape)}
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / PLAN
    if plan_path.is_file():
        previous = json.loads(plan_path.read_text())
        changed = sorted(k for k in plan if previous.get(k) != plan[k])
        if changed:
            raise ValueError(f"{out} holds an extraction with other settings ({', '.join(changed)} "
                             f"differ); use another --out or delete it")
    else:
        _write_json(plan_path, plan)

    p, count = jax.process_index(), jax.process_count()
    mine = [k for k in range(num_shards) if k % count == p]
    done = [k for k in mine if (out / shard_record(k)).is_file()]
    todo = [k for k in mine if k not in done]

    def shard_range(k):
        return k * shard_size, min((k + 1) * shard_size, num_files)

    mesh = make_mesh(devices=jax.local_devices())
    rows = int(batch_size) * mesh.size
    def shard_len(k):
        start, stop = shard_range(k)
        return stop - start

    bar = tqdm(total=sum(map(shard_len, mine)), initial=sum(map(shard_len, done)), unit="img",
               desc=f"extract (host {p}/{count})" if count > 1 else "extract",
               disable=not progress, dynamic_ncols=True)
    if todo:
        items = [(k, s, min(s + rows, shard_range(k)[1]))
                 for k in todo for s in range(shard_range(k)[0], shard_range(k)[1], rows)]
        ensure_absl_flags_parsed()
        ds = grain.MapDataset.source(items).map(_LoadBatch(source, rows)).to_iter_dataset(
            grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2, num_threads)))
        if num_workers > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                             per_worker_buffer_size=2))
        encode = make_encoder(vae_module, mesh)
        store = np.float16 if dtype == "float16" else np.float32
        shard_parts: dict[int, list] = {}

        def collect(batch, moments):
            k, start, stop = int(batch["shard"]), int(batch["start"]), int(batch["stop"])
            valid = batch["valid"][: stop - start]
            parts = shard_parts.setdefault(k, [])
            encoded = np.asarray(moments)[: stop - start][valid]
            with np.errstate(over="ignore"):  # an overflow is reported by check_encoded
                stored = encoded.astype(store)
            check_encoded(encoded, stored,
                          [source.paths[i] for i in range(start, stop) if valid[i - start]])
            parts.append((stored,
                          source.labels[start:stop][valid],
                          [source.paths[i] for i in range(start, stop) if not valid[i - start]]))
            bar.update(stop - start)
            if stop == shard_range(k)[1]:
                _write_shard(out, k, shard_parts.pop(k), shard_range(k), latent_shape, store)

        iterator = iter(ds)
        pending = None
        with jax.set_mesh(mesh):
            for batch in iterator:
                # Dispatch this batch before fetching the previous one: the host loads and
                # writes while the devices encode.
                moments = encode(shard_batch(batch["x"], mesh))
                if pending is not None:
                    collect(*pending)
                pending = (batch, moments)
            if pending is not None:
                collect(*pending)
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    bar.close()

    wait_for_every_host("dit_jax.extract_latents: all shards written")
    manifest = _manifest(out, plan, num_shards, vae_module)
    if p == 0:
        _write_json(out / MANIFEST, manifest)
        log.info("wrote %d latents (%d images skipped) to %s", manifest["count"],
                 manifest["skipped"], out)
    return manifest


def check_encoded(moments: np.ndarray, stored: np.ndarray, paths: Sequence[str]) -> None:
    """Refuse to write NaN/Inf moments (`moments` as encoded, `stored` in the storage dtype, one
    row per file of `paths`): they would reach training as a NaN loss far from their cause."""
    for name, values in (("the VAE encoder gave", moments), ("float16 storage makes", stored)):
        finite = np.isfinite(values).reshape(len(values), -1).all(axis=1)
        if not finite.all():
            bad = [paths[i] for i in np.flatnonzero(~finite)]
            fix = ("check the VAE weights and use --vae-dtype float32" if values is moments else
                   "the values exceed float16's range: extract with --dtype float32")
            raise ValueError(f"{name} NaN/Inf moments for {bad[0]} ({len(bad)} file(s) of this "
                             f"batch): {fix}")


def _write_shard(out: Path, k: int, parts: list, span: tuple[int, int], latent_shape, store) -> None:
    moments = (np.concatenate([m for m, _, _ in parts]) if parts
               else np.zeros((0, 2, 2) + tuple(latent_shape), store))
    labels = np.concatenate([y for _, y, _ in parts]).astype(np.int32)
    skipped = [path for _, _, bad in parts for path in bad]
    _write_atomic(out / moments_file(k), lambda f: np.save(f, moments))
    _write_atomic(out / labels_file(k), lambda f: np.save(f, labels))
    # Written last: its presence marks the shard complete.
    _write_json(out / shard_record(k), {"count": int(len(labels)), "start": span[0], "stop": span[1],
                                        "skipped": skipped})


def _manifest(out: Path, plan: dict, num_shards: int, vae_module) -> dict[str, Any]:
    shards, skipped = [], []
    for k in range(num_shards):
        record_path = out / shard_record(k)
        if not record_path.is_file():
            raise RuntimeError(f"shard {k} of {out} is missing after every host finished")
        record = json.loads(record_path.read_text())
        skipped.extend(record["skipped"])
        if record["count"]:
            shards.append({"moments": moments_file(k), "labels": labels_file(k),
                           "count": record["count"]})
    count = sum(s["count"] for s in shards)
    if count == 0:
        raise ValueError(f"no image of {plan['data']!r} could be read: nothing to train on")
    return {"format": FORMAT, "stored": MANIFEST_STORED, "image_size": plan["image_size"],
            "latent_shape": plan["latent_shape"], "count": count, "vae": plan["vae"],
            "scaling_factor": float(vae_module.scaling_factor),
            "shift_factor": float(vae_module.shift_factor), "class_names": plan["class_names"],
            "dtype": plan["dtype"], "data": plan["data"], "files": plan["files"],
            "skipped": len(skipped), "skipped_files": skipped[:1000], "shards": shards,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


# A FlagValues of its own: main() also runs as a function next to other command lines' flags.
FLAGS = flags.FlagValues()
flags.DEFINE_string("data", None, "image folder (class subfolders, or flat)", flag_values=FLAGS)
flags.DEFINE_string("out", None, "output folder (resumed if it exists)", flag_values=FLAGS)
flags.DEFINE_integer("image_size", 256, "image size in pixels (ADM center crop)", flag_values=FLAGS)
flags.DEFINE_string("vae", "stabilityai/sd-vae-ft-ema",
                    "diffusers VAE folder or hub id; 'ema' / 'mse' for sd-vae-ft-*",
                    flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 32, "images per device per step", flag_values=FLAGS)
flags.DEFINE_integer("shard_size", 2048, "images per shard file", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "storage dtype of the moments",
                  flag_values=FLAGS)
flags.DEFINE_enum("vae_dtype", "float32", ["float32", "bfloat16"], "compute dtype of the encoder",
                  flag_values=FLAGS)
flags.DEFINE_integer("num_workers", 4, "image loading processes", flag_values=FLAGS)
flags.DEFINE_integer("num_threads", 8, "loading threads per process", flag_values=FLAGS)
flags.DEFINE_enum("layout", "auto", list(LAYOUTS),
                  "class subfolders, one flat unconditional folder, or decide", flag_values=FLAGS)
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "jax.distributed.initialize for multi-host runs", flag_values=FLAGS)
flags.DEFINE_bool("progress", True, "show a progress bar (--noprogress: none)", flag_values=FLAGS)
# Text-to-image data (docs/text.md): the captions' embeddings beside the latents.
flags.DEFINE_bool("captions", False, "also encode each image's caption (.txt beside it, or "
                  "captions.jsonl) with --text_encoder (dit_jax.extract_text)", flag_values=FLAGS)
flags.DEFINE_string("text_encoder", "", "T5 encoder folder (transformers format, with its "
                    "tokenizer) or hub id, e.g. PixArt-alpha/PixArt-XL-2-512x512 (its "
                    "text_encoder/)", flag_values=FLAGS)
flags.DEFINE_integer("max_text_length", 120, "text tokens per caption, padded (PixArt-α: 120)",
                     flag_values=FLAGS)


def encoder_name(src: str) -> str:
    """What the text manifest records of --text-encoder: a local folder as an absolute path (a
    run trained on the embeddings finds it from any directory), a hub id as given."""
    path = Path(src).expanduser()
    return str(path.absolute()) if path.exists() else src


def main(argv: Sequence[str]) -> dict[str, Any]:
    """`python -m dit_jax.extract_latents --data=DIR --out=DIR [flags]`; argv without the program
    name. Returns the manifest."""
    FLAGS.unparse_flags()  # a previous call's values must not carry over
    args = cli.parse_flags(["python -m dit_jax.extract_latents", *argv], FLAGS)[1:]
    if args:
        raise app.UsageError(f"unexpected arguments {' '.join(args)}: the folders are --data and "
                             f"--out")
    for name in ("data", "out"):
        if FLAGS[name].value is None:
            raise app.UsageError(f"--{name} is required (--help: examples)")
    if FLAGS.captions and not FLAGS.text_encoder:
        raise app.UsageError("--captions needs --text_encoder (a T5 encoder folder or hub id)")
    if not Path(FLAGS.data).is_dir():
        raise FileNotFoundError(missing_path_message(FLAGS.data, "--data folder")
                                if not Path(FLAGS.data).exists()
                                else f"--data {FLAGS.data} is not a folder")
    initialize_distributed(FLAGS.distributed)
    manifest = extract(
        FLAGS.data, FLAGS.out, image_size=FLAGS.image_size, vae=FLAGS.vae,
        batch_size=FLAGS.batch_size, shard_size=FLAGS.shard_size, dtype=FLAGS.dtype,
        num_workers=FLAGS.num_workers, num_threads=FLAGS.num_threads,
        class_folders=class_folders_for(FLAGS.layout),
        vae_dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[FLAGS.vae_dtype],
        progress=FLAGS.progress)
    if FLAGS.captions:
        extract_text(FLAGS.data, FLAGS.out, t5_text_encoder(FLAGS.text_encoder,
                                                            max_length=FLAGS.max_text_length),
                     encoder_name=encoder_name(FLAGS.text_encoder), dtype=FLAGS.dtype)
    if jax.process_index() == 0:
        print(f"{manifest['count']} latents {tuple(manifest['latent_shape'])} in {FLAGS.out} "
              f"({manifest['skipped']} unreadable images skipped)", file=sys.stderr)
    return manifest


if __name__ == "__main__":
    cli.run(lambda argv: main(argv) and 0, flag_values=FLAGS)
