"""Captioned data for text-to-image training: the built-in captioned shapes, captioned image
folders, and a word-level tokenizer for small encoders trained from scratch (docs/text.md).

A captioned record is {"x": image, "y": int, "caption": str}: "y" stays so that the class-based
machinery (batches, grids) keeps working; text training reads "caption" (or the text embeddings
extracted from it).

Built-in captions combine the attributes of `dit_jax.data.builtin` independently: one of four
shapes, one of four colours, a dark or light background, e.g. "a red circle on a dark
background". Four of the sixteen shape × colour pairs are never shown in training
(`HELD_OUT`: each shape and each colour is held out exactly once), so a prompt such as "a red
square" asks for a combination the model has only seen in parts. `prompt_check` scores samples
against their prompts with the built-in judge: shape and colour separately.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dit_jax.data.builtin import CLASSES, COLOURS, read_shape, render_shapes
from dit_jax.data.folder import ImageFolderSource
from dit_jax.data.latents import LatentSource

SHAPES = tuple(c[1] for c in CLASSES)  # circle, square, triangle, diamond
COLOUR_NAMES = tuple(c[0].split()[0] for c in CLASSES)  # red, green, blue, yellow
# (lowest grey level, spread) in [0, 1]: far enough apart to be named, both colourless.
BACKGROUNDS = {"dark": (0.08, 0.14), "light": (0.55, 0.15)}
# (shape, colour) index pairs never trained: shape - colour ≡ 1 (mod 4), a Latin-square
# diagonal, so every shape and every colour is trained with three partners and held out with one.
HELD_OUT = tuple((s, c) for s in range(len(SHAPES)) for c in range(len(COLOUR_NAMES))
                 if (s - c) % len(SHAPES) == 1)
CAPTIONS_FILE = "captions.jsonl"


def caption_of(shape: int, colour: int, background: str = "dark") -> str:
    return f"a {COLOUR_NAMES[colour]} {SHAPES[shape]} on a {background} background"


def parse_caption(caption: str) -> tuple[int, int]:
    """(shape, colour) indices named in a caption or prompt; -1 for an attribute it does not
    name. Words, not positions: "blue triangle" and "a triangle, blue" read the same."""
    words = re.findall(r"[a-z]+", caption.lower())
    shape = next((SHAPES.index(w) for w in words if w in SHAPES), -1)
    colour = next((COLOUR_NAMES.index(w) for w in words if w in COLOUR_NAMES), -1)
    return shape, colour


def is_held_out(caption: str) -> bool:
    return parse_caption(caption) in HELD_OUT


class CaptionedShapes:
    """The built-in shapes with captions: example i shows training pair i mod 12 (the 16 shape ×
    colour pairs minus `HELD_OUT`) on the background (i // 12) mod 2, with position, size and
    gradient drawn from (seed, i) as in `BuiltinShapes`. `get_batch` is vectorised; records carry
    "caption" and "y" = shape · 4 + colour."""

    DEFAULT_SIZE = 12_000

    def __init__(self, image_size: int = 32, size: int = DEFAULT_SIZE, seed: int = 0):
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {image_size}")
        self.image_size, self.size, self.seed = int(image_size), int(size), int(seed)
        self.pairs = [(s, c) for s in range(len(SHAPES)) for c in range(len(COLOUR_NAMES))
                      if (s, c) not in HELD_OUT]
        self.num_classes = 0  # conditioned on captions, not classes
        self.class_names: tuple[str, ...] = ()
        self.element_shape = (self.image_size, self.image_size, 3)

    def __len__(self) -> int:
        return self.size

    def attributes(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(shape, colour, background name) of the examples `indices`."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        pairs = np.asarray(self.pairs)[indices % len(self.pairs)]
        names = list(BACKGROUNDS)
        grounds = [names[int(k)] for k in (indices // len(self.pairs)) % len(names)]
        return pairs[:, 0], pairs[:, 1], grounds

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.size):
            raise IndexError(f"index out of range for {self.size} examples")
        shapes, colours, grounds = self.attributes(indices)
        draws = np.stack([np.random.default_rng([self.seed, int(i)]).random(6) for i in indices]) \
            if indices.size else np.zeros((0, 6))
        images = np.zeros((0,) + self.element_shape, np.float32)
        parts = []
        for ground in BACKGROUNDS:  # one render call per background range
            rows = np.asarray([g == ground for g in grounds], bool)
            if rows.any():
                parts.append((rows, render_shapes([SHAPES[s] for s in shapes[rows]],
                                                  COLOURS[colours[rows]], draws[rows],
                                                  self.image_size, BACKGROUNDS[ground])))
        if indices.size:
            images = np.zeros((len(indices),) + self.element_shape, np.float32)
            for rows, part in parts:
                images[rows] = part
        captions = np.asarray([caption_of(int(s), int(c), g)
                               for s, c, g in zip(shapes, colours, grounds)], dtype=object)
        return {"x": images, "y": (shapes * len(COLOUR_NAMES) + colours).astype(np.int32),
                "caption": captions}

    def __getitem__(self, index: int) -> dict[str, Any]:
        batch = self.get_batch(np.asarray([index]))
        return {"x": batch["x"][0], "y": int(batch["y"][0]), "caption": str(batch["caption"][0])}

    def vocabulary(self) -> list[str]:
        """Every word a built-in caption or prompt can use."""
        words = {"a", "on", "background", *SHAPES, *COLOUR_NAMES, *BACKGROUNDS}
        return sorted(words)


def prompt_check(images: np.ndarray, prompts: Sequence[str]) -> dict[str, Any]:
    """How well samples follow their built-in prompts, by the built-in judge: per image whether
    the best-fitting shape is the prompt's shape and whether the nearest colour is the prompt's
    colour (an attribute the prompt does not name counts as followed). Returns the per-image
    flags and the fractions: "shape", "colour", "both", and "both_seen" / "both_held_out" over
    the prompts whose pair was trained / held out (None when there are none)."""
    images = np.asarray(images)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    shape_ok, colour_ok, held = [], [], []
    for image, prompt in zip(images, prompts):
        want_shape, want_colour = parse_caption(prompt)
        seen = read_shape(image)
        shape_ok.append(want_shape < 0 or seen["shape"] == want_shape)
        colour_ok.append(want_colour < 0 or seen["colour"] == want_colour)
        held.append((want_shape, want_colour) in HELD_OUT)
    shape_ok, colour_ok, held = (np.asarray(a, bool) for a in (shape_ok, colour_ok, held))
    both = shape_ok & colour_ok

    def mean(a):
        return float(np.mean(a)) if len(a) else None
    return {"shape": mean(shape_ok), "colour": mean(colour_ok), "both": mean(both),
            "both_seen": mean(both[~held]), "both_held_out": mean(both[held]),
            "per_image": {"shape": shape_ok, "colour": colour_ok, "held_out": held}}


# --------------------------------------------------------------------------------------------
# Captioned image folders


def _read_captions_file(path: Path) -> dict[str, str]:
    """{relative path: caption} from a captions.jsonl: one JSON object a line with the image's
    path relative to the folder ("file", or "file_name" as Hugging Face image folders write it)
    and its caption ("caption" or "text")."""
    captions = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON object ({err.msg})") from None
        name = next((entry[k] for k in ("file", "file_name") if k in entry), None) \
            if isinstance(entry, dict) else None
        text = next((entry[k] for k in ("caption", "text") if k in entry), None) \
            if isinstance(entry, dict) else None
        if not isinstance(name, str) or not isinstance(text, str):
            raise ValueError(f'{path}:{number}: each line needs "file" (or "file_name") and '
                             f'"caption" (or "text") strings, got {line.strip()[:80]!r}')
        captions[os.path.normpath(name)] = text
    return captions


def read_captions(root: str | os.PathLike, paths: Sequence[str]) -> list[str]:
    """The caption of every image in `paths` (under `root`): from ROOT/captions.jsonl when it
    exists, else from the .txt file beside each image (same name, .txt extension). A missing
    caption is an error that names the image."""
    root = Path(root).expanduser()
    table = _read_captions_file(root / CAPTIONS_FILE) if (root / CAPTIONS_FILE).is_file() else None
    captions, missing = [], []
    for path in paths:
        if table is not None:
            caption = table.get(os.path.normpath(os.path.relpath(path, root)))
        else:
            txt = Path(path).with_suffix(".txt")
            caption = txt.read_text().strip() if txt.is_file() else None
        if caption is None:
            missing.append(os.path.relpath(path, root))
        captions.append(caption)
    if missing:
        where = (f"no line in {root / CAPTIONS_FILE}" if table is not None
                 else "no .txt caption beside them (or a captions.jsonl at the folder root)")
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{len(missing)} image(s) of {str(root)!r} have {where}: {shown}")
    return captions


class CaptionedFolderSource(ImageFolderSource):
    """An image folder (every image under the root, flat layout) whose records also carry the
    image's "caption" (`read_captions`)."""

    def __init__(self, root: str | os.PathLike, image_size: int, **kwargs):
        super().__init__(root, image_size, class_folders=False, **kwargs)
        self.captions = read_captions(root, self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = super().__getitem__(index)
        # A skipped file is replaced by the next readable one: its caption goes with it.
        source = (int(index) + 1) % len(self) if record["skipped"] else int(index)
        while record["skipped"] and self.load(source) is None:
            source = (source + 1) % len(self)
        return dict(record, caption=self.captions[source])


# --------------------------------------------------------------------------------------------
# Extracted text embeddings beside extracted latents (written by dit_jax.extract_text)

TEXT_MANIFEST = "text_manifest.json"
TEXT_FORMAT = "dit_jax-text-v1"


def text_file(shard: int) -> str:
    return f"text_{shard:05d}.npy"


def text_mask_file(shard: int) -> str:
    return f"text_mask_{shard:05d}.npy"


def text_record(shard: int) -> str:
    return f"text_shard_{shard:05d}.json"


class TextLatentSource(LatentSource):
    """A latents folder with its captions' text embeddings (`python -m dit_jax.extract_latents
    --captions`): records and training examples also carry "text" (L, C) float32 and
    "text_mask" (L,) int32, row for row with the latents."""

    def __init__(self, path: str | os.PathLike, image_size: int | None = None):
        super().__init__(path, image_size)
        manifest_path = Path(self.path) / TEXT_MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{self.path} has no {TEXT_MANIFEST}: extract the captions' "
                                    f"text embeddings with `python -m dit_jax.extract_latents "
                                    f"--captions --text-encoder=...`")
        self.text_manifest = json.loads(manifest_path.read_text())
        if self.text_manifest.get("format") != TEXT_FORMAT:
            raise ValueError(f"{manifest_path} has format {self.text_manifest.get('format')!r}, "
                             f"expected {TEXT_FORMAT!r}")
        counts = [s["count"] for s in self.text_manifest["shards"]]
        if counts != [int(b - a) for a, b in zip(self._starts[:-1], self._starts[1:])]:
            raise ValueError(f"{manifest_path}: text shards of {counts} rows do not match the "
                             f"latent shards: extract the text again")
        self.max_length = int(self.text_manifest["max_length"])
        self.caption_channels = int(self.text_manifest["caption_channels"])
        self._text: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self):
        state = super().__getstate__()
        state["_text"] = {}
        return state

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = super().__getitem__(index)
        shard = int(np.searchsorted(self._starts, int(index), side="right") - 1)
        if shard not in self._text:
            entry = self.text_manifest["shards"][shard]
            self._text[shard] = (np.load(os.path.join(self.path, entry["text"]), mmap_mode="r"),
                                 np.load(os.path.join(self.path, entry["mask"])))
        text, mask = self._text[shard]
        offset = int(index) - int(self._starts[shard])
        return dict(record, text=np.asarray(text[offset], np.float32),
                    text_mask=np.asarray(mask[offset], np.int32))

    def augment(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        out = super().augment(record, rng)
        return dict(out, text=record["text"], text_mask=record["text_mask"])


# --------------------------------------------------------------------------------------------
# Tokenizer for small encoders trained from scratch


class WordTokenizer:
    """Whole words → ids with T5's conventions (pad 0, EOS 1, unknown 2; the words' ids follow):
    `tokenizer(prompts) -> (input_ids, attention_mask)`, both (N, max_length) int32, the words cut
    to max_length - 1, then EOS, then padding; the mask is 1 on the words and EOS, so even the
    empty prompt has one real token. The same call as the T5 tokenizer of `dit_jax.port`, built
    on the `tokenizers` library (WordLevel model, lower-casing, whitespace/punctuation split)."""

    PAD, EOS, UNK = "<pad>", "</s>", "<unk>"

    def __init__(self, words: Sequence[str], max_length: int = 16):
        from tokenizers import Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import WordLevel

        if max_length < 1:
            raise ValueError(f"max_length must be at least 1 (room for EOS), got {max_length}")
        self.words = list(dict.fromkeys(w.lower() for w in words))
        vocab = {self.PAD: 0, self.EOS: 1, self.UNK: 2}
        vocab.update({w: 3 + i for i, w in enumerate(self.words)})
        self.vocab_size = len(vocab)
        self.max_length = int(max_length)
        self.pad_id, self.eos_id = 0, 1
        tokenizer = Tokenizer(WordLevel(vocab, unk_token=self.UNK))
        tokenizer.normalizer = normalizers.Lowercase()
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        self._tokenizer = tokenizer

    def __call__(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
        mask = np.zeros((len(prompts), self.max_length), np.int32)
        for row, encoding in enumerate(self._tokenizer.encode_batch(list(prompts))):
            tokens = list(encoding.ids[:self.max_length - 1]) + [self.eos_id]
            ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = 1
        return ids, mask


__all__ = ["TEXT_FORMAT", "TEXT_MANIFEST", "TextLatentSource", "text_file", "text_mask_file",
           "text_record", "BACKGROUNDS", "CAPTIONS_FILE", "COLOUR_NAMES", "CaptionedFolderSource",
           "CaptionedShapes", "HELD_OUT", "SHAPES", "WordTokenizer", "caption_of", "is_held_out",
           "parse_caption", "prompt_check", "read_captions"]
