"""Text embeddings of a captioned image folder, beside its extracted latents (docs/text.md):
`python -m dit_jax.extract_latents --captions --text-encoder=T5 ...` runs this after the latents.

For latents shard K (the images [start, stop) of the folder's sorted listing, minus the unreadable
ones the latents extraction skipped, as its shard record lists them) the captions
(`dit_jax.data.captions.read_captions`: a .txt beside each image, or captions.jsonl) go through
the frozen text encoder once:

    text_KKKKK.npy        (n, L, C) the encoder's last hidden states, rows aligned with
                          moments_KKKKK.npy
    text_mask_KKKKK.npy   (n, L) int8, 1 on real tokens
    text_shard_KKKKK.json written last: the shard is complete
    text_manifest.json    encoder, max_length, caption_channels, dtype, the shard list

Like the latents, shards are written atomically and skipped when complete, so an interrupted run
resumes where it stopped; host p of P does the shards p, p + P, ...
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from dit_jax.data.captions import (TEXT_FORMAT, TEXT_MANIFEST, read_captions, text_file,
                                   text_mask_file, text_record)
from dit_jax.data.folder import scan_folder
from dit_jax.data.latents import read_manifest
from dit_jax.distributed import wait_for_every_host
# The frozen encoder of the extraction; sampling a run on these embeddings uses it too.
from dit_jax.port.t5 import t5_text_encoder

log = logging.getLogger(__name__)

def _atomic(path: Path, write: Callable) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def extract_text(data: str | os.PathLike, out: str | os.PathLike, encode: Callable, *,
                 encoder_name: str, batch_size: int = 64, dtype: str = "float32"
                 ) -> dict[str, Any]:
    """Encode the captions of `data` into the latents folder `out` (written before by
    `dit_jax.extract_latents.extract` from the same folder); returns the text manifest.

    encode: captions (list of str) -> (embeddings (n, L, C), mask (n, L)), the frozen encoder
    with its tokenizer (padding to a fixed L). encoder_name: recorded in the manifest."""
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    out = Path(out).expanduser().absolute()
    latents = read_manifest(out)
    paths, _, _ = scan_folder(data, class_folders=None if not latents["class_names"] else True)
    if len(paths) != latents["files"]:
        raise ValueError(f"{data!r} lists {len(paths)} images, the latents in {out} were "
                         f"extracted from {latents['files']}: extract both from the same folder")
    captions = read_captions(data, paths)
    records = sorted(out.glob("shard_*.json"))
    store = np.float16 if dtype == "float16" else np.float32
    p, count = jax.process_index(), jax.process_count()
    for k, record_path in enumerate(records):
        if k % count != p or (out / text_record(k)).is_file():
            continue  # another host's, or done by an earlier run
        record = json.loads(record_path.read_text())
        skipped = set(record["skipped"])
        rows = [i for i in range(record["start"], record["stop"]) if paths[i] not in skipped]
        if len(rows) != record["count"]:
            raise RuntimeError(f"{record_path}: {record['count']} latents but {len(rows)} readable "
                               f"images: the folder changed since the latents were extracted")
        parts = [encode([captions[i] for i in rows[s:s + batch_size]])
                 for s in range(0, len(rows), batch_size)]
        embeddings = np.concatenate([np.asarray(e, store) for e, _ in parts]) if parts else None
        masks = np.concatenate([np.asarray(m, np.int8) for _, m in parts]) if parts else None
        if embeddings is None:
            continue  # an empty shard has no latents either
        _atomic(out / text_file(k), lambda f: np.save(f, embeddings))
        _atomic(out / text_mask_file(k), lambda f: np.save(f, masks))
        _atomic(out / text_record(k), lambda f: f.write(json.dumps(
            {"count": len(rows), "shape": list(embeddings.shape)}).encode()))
        log.info("text shard %d: %d captions", k, len(rows))
    wait_for_every_host("dit_jax.extract_text: all shards written")
    shards, shape = [], None
    for k in range(len(records)):
        if not (out / text_record(k)).is_file():
            if json.loads(records[k].read_text())["count"]:
                raise RuntimeError(f"text shard {k} of {out} is missing after every host finished")
            continue
        info = json.loads((out / text_record(k)).read_text())
        shards.append({"text": text_file(k), "mask": text_mask_file(k), "count": info["count"]})
        shape = info["shape"][1:]
    manifest = {"format": TEXT_FORMAT, "encoder": encoder_name, "max_length": shape[0],
                "caption_channels": shape[1], "dtype": dtype, "shards": shards,
                "count": sum(s["count"] for s in shards)}
    if manifest["count"] != latents["count"]:
        raise RuntimeError(f"{manifest['count']} text embeddings for {latents['count']} latents")
    if p == 0:
        _atomic(out / TEXT_MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return manifest


__all__ = ["extract_text", "t5_text_encoder"]
