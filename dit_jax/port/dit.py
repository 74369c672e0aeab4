"""PyTorch ↔ JAX for DiT: official checkpoints, train.py checkpoint dicts and diffusers models.

Sources:

- the official release (facebookresearch/DiT): `DiT-XL-2-256x256.pt` / `DiT-XL-2-512x512.pt`, plain
  state_dicts, and the official train.py's checkpoints, dicts {"model", "ema", "opt", "args"}
  (samplers use "ema"). `from_torch` reads both (and .safetensors files of the same layout);
  `to_torch` / `save_torch` write that layout, so a model trained here loads in the official code.
- the Hugging Face diffusers port (`DiTTransformer2DModel`, hub repos facebook/DiT-XL-2-256 and
  facebook/DiT-XL-2-512): `from_diffusers` reads a folder or hub id; `to_diffusers` /
  `save_diffusers` write one (config.json + diffusion_pytorch_model.safetensors) that
  `DiTTransformer2DModel.from_pretrained` loads. diffusers keeps the fused qkv as to_q/to_k/to_v
  and a copy of the t/y embedders in every block; the export writes identical copies.

The two PyTorch implementations do not compute the same function with the same weights: diffusers
builds the timestep frequencies as exp(-ln(10000)·i/127) instead of /128 (`downscale_freq_shift=1`)
and uses LayerNorm eps 1e-5 (its `norm_eps`) instead of 1e-6 before each MLP. On random weights
the outputs differ by about 2% relative; on the released weights the difference is smaller but
systematic. `from_diffusers` therefore runs the weights with `numerics="diffusers"` (the function
the diffusers pipeline computes, and the one that pipeline's reported samples come from); pass
`numerics="official"` for the official function on the same weights. Official checkpoints load with
`numerics="official"`. The numerics are a DiTConfig field, not a property of the tensors: `to_torch`
exports the official layout whatever the numerics, and a diffusers-numerics model exported that way
computes the official function in the official code; likewise an official-numerics model exported
to diffusers computes the diffusers function there.

Every loader infers the architecture from the tensors (depth, width, patch, channels, learned
sigma, classes, input size from pos_embed) and checks it against `name` / `image_size` when given.
The label table is ambiguous: the released LabelEmbedder has num_classes + (class_dropout_prob > 0)
rows, so R rows are R - 1 classes and the null row (every official model: the default) or R
classes without one; `num_classes=` or `class_dropout_prob=0` settle it, and so does the
`num_classes` that the official train.py stores in its checkpoints' "args".
The head count is not in the tensors: it comes from `name`, the diffusers config, the official
table by width (1152, 1024 → 16; 768 → 12; 384 → 6) or `num_heads=`.

`load_any` dispatches on what it is given: a .pt/.pth/.safetensors file, a diffusers folder or hub
id, a dit_jax model checkpoint (`dit_jax.checkpoint`), or a train.py workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.checkpoint import (RUNTIME_FIELDS, is_model_checkpoint, is_train_workdir, load_model,
                                restore_model, with_config)
from dit_jax.models.dit import (DIT_CONFIGS, NUMERICS, DiT, DiTConfig, convert_blocks,
                                 sincos_2d)
from dit_jax.port.keys import (check_config, check_finite, check_keys, check_model_finite,
                               read_config_json, read_safetensors, require_torch, shape_of,
                               write_safetensors)
from dit_jax.port.paths import (TORCH_SUFFIXES, close_names, looks_like_hub_id,
                                missing_path_message)

DOWNLOAD_HELP = (
    "The official DiT weights are the DiT repository's downloads "
    "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt and "
    "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt, or the Hugging Face hub repos "
    "facebook/DiT-XL-2-256 and facebook/DiT-XL-2-512 (diffusers format). Download one and pass its "
    "path (a .pt/.safetensors file, a diffusers folder, a dit_jax checkpoint directory or a "
    "train.py workdir) with --ckpt PATH.")

# Heads are not visible in the tensors; the official models' widths determine them.
HEADS_BY_WIDTH = {1152: 16, 1024: 16, 768: 12, 384: 6}

# Config fields fixed by the checkpoint (read from its tensors or its config): an override that
# disagrees is an error. Every other DiTConfig field is free (RUNTIME_FIELDS).
CHECKPOINT_FIELDS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
                     "mlp_ratio", "num_classes", "learn_sigma")

TRAIN_DICT_ENTRIES = ("model", "ema")

# The official models' label dropout: their tables hold the null row
# (docs/numerics.md#forward-pass).
OFFICIAL_CLASS_DROPOUT = 0.1


def _missing(path, download_help: str = DOWNLOAD_HELP) -> FileNotFoundError:
    if close_names(path):  # a typo in a local path: the names next to it say more
        return FileNotFoundError(missing_path_message(path, "checkpoint"))
    return FileNotFoundError(f"checkpoint not found: {path}. {download_help}")


def _hw(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(int(s) for s in size)


# --------------------------------------------------------------------------------------------
# Config resolution (shared by every loader)
# --------------------------------------------------------------------------------------------


def resolve_config(found: Mapping[str, Any], *, name: str | None = None,
                   image_size: int | tuple[int, int] | None = None, **overrides) -> DiTConfig:
    """The DiTConfig of a checkpoint whose fixed fields are `found`, checked against an official
    `name` and `image_size` (pixels: 8 × the latent side) and completed by `overrides`."""
    fields = dict(found)
    known = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown DiTConfig field(s) {unknown}; known: {sorted(known)}")
    if name is not None:
        if name not in DIT_CONFIGS:
            raise ValueError(f"unknown DiT model {name!r}; choose one of {sorted(DIT_CONFIGS)}")
        wrong = {k: (fields[k], v) for k, v in DIT_CONFIGS[name].items()
                 if k in fields and fields[k] != v}
        if wrong:
            raise ValueError(f"the checkpoint is not {name}: " + ", ".join(
                f"{k} {have} (expected {want})" for k, (have, want) in wrong.items()))
        fields.setdefault("num_heads", DIT_CONFIGS[name]["num_heads"])
    if image_size is not None:
        height, width = _hw(image_size)
        if height % 8 or width % 8:
            raise ValueError(f"image_size {image_size} is not divisible by 8 (the VAE's factor)")
        latent = _hw(fields["input_size"])
        if latent != (height // 8, width // 8):
            raise ValueError(
                f"the checkpoint is for {latent[0] * 8}x{latent[1] * 8} px images (latent side "
                f"{latent[0]}x{latent[1]}), not image_size {image_size}; for a pixel-space model "
                f"pass input_size instead")
    for key, value in overrides.items():
        if key == "dtype":
            value = jnp.dtype(value)
        if (key == "class_dropout_prob" and fields.get("num_classes", 0) > 0
                and "class_dropout_prob" in fields and (value > 0) != (fields[key] > 0)):
            # The null row exists exactly when class_dropout_prob > 0: the rate may change, its
            # sign would reshape the label table.
            have = "has" if fields[key] > 0 else "has no"
            raise ValueError(
                f"class_dropout_prob={value!r} was given but the checkpoint's label table {have} "
                f"the null-label row (class_dropout_prob {fields[key]!r}); only a rate on the same "
                f"side of 0 can be used")
        if key in CHECKPOINT_FIELDS and key in fields:
            same = (_hw(value) == _hw(fields[key])) if key == "input_size" else value == fields[key]
            if not same:
                raise ValueError(
                    f"{key}={value!r} was given but the checkpoint has {key}={fields[key]!r}")
            continue
        fields[key] = value
    if "num_heads" not in fields:
        width = fields["hidden_size"]
        if width not in HEADS_BY_WIDTH:
            raise ValueError(
                f"cannot infer num_heads for hidden_size {width} (the tensors do not show it; "
                f"official widths are {HEADS_BY_WIDTH}): pass num_heads= (--num-heads on the "
                f"command line)")
        fields["num_heads"] = HEADS_BY_WIDTH[width]
    return DiTConfig(**fields)


def _finish(model: DiT, *, name=None, image_size=None, **overrides) -> DiT:
    """Check a loaded model against name / image_size and apply runtime overrides."""
    cfg = resolve_config(dataclasses.asdict(model.config), name=name, image_size=image_size,
                         **overrides)
    return with_config(model, **{f: getattr(cfg, f) for f in RUNTIME_FIELDS})


def label_fields(rows: int | None, *, num_classes: int | None = None,
                 class_dropout_prob: float | None = None,
                 key: str = "y_embedder.embedding_table.weight") -> dict[str, Any]:
    """num_classes and class_dropout_prob of a label table of `rows` rows (None: no table).

    The released LabelEmbedder has num_classes + (class_dropout_prob > 0) rows, so `rows` alone
    is ambiguous. Default: the official case, rows - 1 classes and the null row (dropout 0.1);
    `num_classes` or `class_dropout_prob` given by the caller decide otherwise."""
    if rows is None:
        return dict(num_classes=0)
    if num_classes is not None:
        if rows not in (num_classes, num_classes + 1):
            raise ValueError(f"{key} has {rows} rows: neither num_classes={num_classes} nor "
                             f"num_classes + 1 (with the null-label row)")
        null = rows == num_classes + 1
        if class_dropout_prob is not None and (class_dropout_prob > 0) != null:
            raise ValueError(
                f"{key} has {rows} rows, which for num_classes={num_classes} means "
                f"{'a' if null else 'no'} null-label row; class_dropout_prob={class_dropout_prob!r} "
                f"means {'none' if null else 'one'} (the table has num_classes + "
                f"(class_dropout_prob > 0) rows)")
    else:
        null = class_dropout_prob is None or class_dropout_prob > 0
        num_classes = rows - int(null)
        if num_classes < 1:
            raise ValueError(f"{key} has {rows} row(s): with the null-label row that leaves no "
                             f"class; pass class_dropout_prob=0 or num_classes=")
    if class_dropout_prob is None:
        class_dropout_prob = OFFICIAL_CLASS_DROPOUT if null else 0.0
    return dict(num_classes=num_classes, class_dropout_prob=class_dropout_prob)


# --------------------------------------------------------------------------------------------
# The official layout
# --------------------------------------------------------------------------------------------


def official_keys(cfg: DiTConfig) -> dict[str, tuple[tuple, str]]:
    """Official state_dict key → (path in the model's pure dict with a block list, conversion)."""
    if cfg.block != "adaln_zero":
        raise ValueError(
            f"the official (and diffusers) weight layout holds only the released adaLN-Zero "
            f"blocks; this DiT has block={cfg.block!r}: keep it in dit_jax's own model "
            f"checkpoint format (dit_jax.checkpoint.save_model)")
    table: dict[str, tuple[tuple, str]] = {
        "pos_embed": (("pos_embed",), "copy"),
        "x_embedder.proj.weight": (("x_embedder", "kernel"), "conv"),
        "x_embedder.proj.bias": (("x_embedder", "bias"), "copy"),
    }

    def linear(torch_name, path):
        table[f"{torch_name}.weight"] = (path + ("kernel",), "linear")
        table[f"{torch_name}.bias"] = (path + ("bias",), "copy")

    linear("t_embedder.mlp.0", ("t_embedder", "linear_1"))
    linear("t_embedder.mlp.2", ("t_embedder", "linear_2"))
    if cfg.num_classes > 0:
        table["y_embedder.embedding_table.weight"] = (("y_embedder", "embedding_table"), "copy")
    for i in range(cfg.depth):
        linear(f"blocks.{i}.attn.qkv", ("blocks", i, "attn", "qkv"))
        linear(f"blocks.{i}.attn.proj", ("blocks", i, "attn", "proj"))
        linear(f"blocks.{i}.mlp.fc1", ("blocks", i, "mlp", "fc1"))
        linear(f"blocks.{i}.mlp.fc2", ("blocks", i, "mlp", "fc2"))
        linear(f"blocks.{i}.adaLN_modulation.1", ("blocks", i, "adaLN_modulation"))
    linear("final_layer.linear", ("final_layer", "linear"))
    linear("final_layer.adaLN_modulation.1", ("final_layer", "adaLN_modulation"))
    return table


def _to_jax_layout(array: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":  # torch (out, in) → flax (in, out)
        return array.T
    if kind == "conv":  # torch (out, in, kh, kw) → flax (kh, kw, in, out)
        return array.transpose(2, 3, 1, 0)
    return array


def _to_torch_layout(array: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return array.T
    if kind == "conv":
        return array.transpose(3, 2, 0, 1)
    return array




def official_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Official state_dict key → the shape (PyTorch layout) a model of `cfg` expects."""
    plain = dataclasses.replace(cfg, scan_blocks=False)
    values = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: DiT(plain))))
    out = {}
    for key, (path, kind) in official_keys(plain).items():
        node = values
        for part in path:
            node = node[part]
        out[key] = _to_torch_layout(np.empty(node.shape, np.bool_), kind).shape
    return out


def _build(state_dict: Mapping[str, np.ndarray], cfg: DiTConfig) -> DiT:
    """A DiT of `cfg` holding an official-layout state_dict, loaded strictly."""
    plain = dataclasses.replace(cfg, scan_blocks=False)
    table = official_keys(plain)
    check_keys(state_dict, table, "the state_dict does not match the official DiT layout")
    expected = official_shapes(plain)
    model = nnx.eval_shape(lambda: DiT(plain))
    state = nnx.state(model)
    values = nnx.to_pure_dict(state)
    for key, (path, kind) in table.items():
        # Compared in the PyTorch layout, before any transpose, which a tensor of the wrong rank
        # would fail with an error naming no key.
        if tuple(state_dict[key].shape) != expected[key]:
            raise ValueError(f"{key}: the checkpoint has shape {tuple(state_dict[key].shape)}, the "
                             f"model expects {expected[key]}")
        node = values
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = jnp.asarray(_to_jax_layout(np.asarray(state_dict[key]), kind), jnp.float32)
    expected_pos = sincos_2d(plain.hidden_size, plain.grid_size)[None]
    if not np.allclose(values["pos_embed"], expected_pos, atol=1e-5):
        warnings.warn("pos_embed differs from the fixed 2-D sin-cos table; using the checkpoint's")
    nnx.replace_by_pure_dict(state, values)
    nnx.update(model, state)
    return with_config(model, scan_blocks=cfg.scan_blocks)


def infer_official(state_dict: Mapping[str, np.ndarray], *, input_size=None,
                   num_classes: int | None = None,
                   class_dropout_prob: float | None = None) -> dict[str, Any]:
    """The checkpoint-fixed DiTConfig fields of an official-layout state_dict, from its shapes
    (and class_dropout_prob, which decides the label table's size: see `label_fields`)."""

    def need(key, ndim):
        return shape_of(state_dict, key, ndim, "an official-layout DiT")

    width, in_channels, patch, _ = need("x_embedder.proj.weight", 4)
    tokens = need("pos_embed", 3)[1]
    if input_size is not None:
        grid = tuple(s // patch for s in _hw(input_size))
        if math.prod(grid) != tokens:
            raise ValueError(f"pos_embed has {tokens} tokens, input_size {input_size} with patch "
                             f"{patch} gives {math.prod(grid)}")
    else:
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"pos_embed has {tokens} tokens, not a square grid: pass input_size")
        input_size = side * patch
    blocks = [int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))]
    if not blocks:
        raise ValueError("missing key 'blocks.0.attn.qkv.weight': the state_dict has no blocks")
    out_features = need("final_layer.linear.weight", 2)[0]
    out_channels, rest = divmod(out_features, patch * patch)
    if rest or out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(
            f"final_layer.linear.weight has {out_features} outputs: not patch² × {in_channels} or "
            f"patch² × {2 * in_channels} (patch {patch})")
    table = "y_embedder.embedding_table.weight"
    labels = label_fields(need(table, 2)[0] if table in state_dict else None,
                          num_classes=num_classes, class_dropout_prob=class_dropout_prob)
    return dict(
        input_size=input_size, patch_size=patch, in_channels=in_channels, hidden_size=width,
        depth=max(blocks) + 1, mlp_ratio=need("blocks.0.mlp.fc1.weight", 2)[0] / width,
        learn_sigma=out_channels == 2 * in_channels, **labels)


def _numpy(tensor) -> np.ndarray:
    if isinstance(tensor, np.ndarray):  # read without torch (.safetensors)
        return tensor
    import torch

    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and tensor.dtype != torch.float32:
        tensor = tensor.float()  # bf16/fp16 checkpoints: exact in float32, and numpy has no bf16
    return tensor.numpy()


def _read_torch_file(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise _missing(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)  # float32 NumPy arrays, without torch
    torch = require_torch(f"reading {path}")

    # train.py checkpoints carry its argparse.Namespace under "args".
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise ValueError(f"{path} is not a readable PyTorch checkpoint (loaded with "
                             f"weights_only=True): {e}") from e


def read_checkpoint(src, *, which: str = "ema") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(a flat {key: float32 array}, the train.py "args" as a dict) from a file or a loaded
    object: a state_dict ({} args), or a train.py checkpoint dict from which entry `which` ("ema"
    or "model") is taken."""
    if which not in TRAIN_DICT_ENTRIES:
        raise ValueError(f"which must be one of {TRAIN_DICT_ENTRIES}, got {which!r}")
    obj = src if isinstance(src, Mapping) else _read_torch_file(Path(src))
    if not isinstance(obj, Mapping):
        raise ValueError(f"unknown checkpoint layout: a {type(obj).__name__}, not a dict")
    if obj and all(isinstance(v, np.ndarray) for v in obj.values()):  # a .safetensors file
        return dict(obj), {}
    torch = require_torch("reading a PyTorch checkpoint")
    if all(isinstance(v, torch.Tensor) for v in obj.values()) and obj:
        state_dict = obj
    elif any(isinstance(obj.get(k), Mapping) for k in TRAIN_DICT_ENTRIES):
        if not isinstance(obj.get(which), Mapping):
            raise ValueError(
                f"the train.py checkpoint has no {which!r} entry (it has {sorted(obj)})")
        state_dict = obj[which]
    else:
        raise ValueError(
            f"unknown checkpoint layout: top-level keys {sorted(obj)[:8]} are neither a state_dict "
            f"of tensors nor a train.py dict with 'ema'/'model' entries")
    not_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"unknown checkpoint layout: entries {not_tensors[:8]} are not tensors")
    args = obj.get("args") if state_dict is not obj else None
    if isinstance(args, Mapping):
        args = dict(args)
    else:  # the official train.py's argparse.Namespace, or nothing
        args = dict(vars(args)) if hasattr(args, "__dict__") else {}
    arrays = {k: _numpy(v) for k, v in state_dict.items()}
    check_finite(arrays, src if not isinstance(src, Mapping) else "the state_dict")
    return arrays, args


def from_torch(path_or_state_dict, *, name: str | None = None,
               image_size: int | tuple[int, int] | None = None, which: str = "ema",
               **overrides) -> DiT:
    """A DiT from an official-layout checkpoint: a .pt/.pth file (plain state_dict or train.py
    dict, entry `which`), a .safetensors file, or an already loaded dict. `overrides` are DiTConfig
    fields (num_heads for a non-official width, dtype, numerics, scan_blocks, ...); num_classes or
    class_dropout_prob=0 read a label table without the null row (see `label_fields`)."""
    state_dict, args = read_checkpoint(path_or_state_dict, which=which)
    return from_state_dict(state_dict, args, name=name, image_size=image_size, **overrides)


def from_state_dict(state_dict: Mapping[str, np.ndarray], args: Mapping[str, Any] | None = None,
                    *, name: str | None = None, image_size: int | tuple[int, int] | None = None,
                    **overrides) -> DiT:
    """`from_torch` of an already read official-layout {key: array} (and train.py "args")."""
    args = args or {}
    if any(k.startswith("transformer_blocks.") for k in state_dict):
        raise ValueError("this is a diffusers DiTTransformer2DModel state_dict: load its folder "
                         "(with config.json) with from_diffusers")
    if any(k.startswith("projectors.") for k in state_dict):
        raise ValueError("this state_dict has REPA's projectors.* keys: load it with "
                         "dit_jax.port.from_torch(path, kind='repa') (docs/transport.md)")
    # The official train.py stores --num-classes in "args" (not the dropout, always 0.1 there).
    num_classes = overrides.get("num_classes", args.get("num_classes"))
    found = infer_official(state_dict, input_size=overrides.get("input_size"),
                           num_classes=num_classes,
                           class_dropout_prob=overrides.get("class_dropout_prob"))
    cfg = resolve_config(found, name=name, image_size=image_size, **overrides)
    return _build(state_dict, cfg)


def to_torch(model: DiT) -> dict[str, Any]:
    """The official state_dict (pos_embed included) of `model`, float32 torch tensors."""
    torch = require_torch("exporting PyTorch tensors")

    model = convert_blocks(model, scan_blocks=False)
    values = nnx.to_pure_dict(nnx.state(model))
    out = {}
    for key, (path, kind) in official_keys(model.config).items():
        node = values
        for part in path:
            node = node[part]
        array = _to_torch_layout(np.asarray(jax.device_get(node)), kind)
        out[key] = torch.from_numpy(np.array(array, order="C"))  # a writable copy
    return out


def save_torch(model: DiT, path: str | os.PathLike) -> Path:
    """Write the official state_dict as .pt/.pth (torch.save) or .safetensors, by extension."""
    path = Path(path)
    if model.config.numerics != "official":
        warnings.warn(f"the model runs with numerics={model.config.numerics!r}; the official code "
                      f"will run these weights with the official numerics")
    return write_torch(to_torch(model), path)


def write_torch(state_dict: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a state_dict of torch tensors as .pt/.pth (torch.save) or .safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".pt", ".pth"):
        require_torch(f"writing {path}").save(state_dict, path)
    elif path.suffix == ".safetensors":
        write_safetensors(state_dict, path)
    else:
        raise ValueError(
            f"{path}: unknown extension {path.suffix!r}; use .pt, .pth or .safetensors")
    return path


# --------------------------------------------------------------------------------------------
# diffusers
# --------------------------------------------------------------------------------------------

DIFFUSERS_CLASS = "DiTTransformer2DModel"
_EMBEDDERS = {  # diffusers key inside norm1.emb of every block → official key
    "timestep_embedder.linear_1.weight": "t_embedder.mlp.0.weight",
    "timestep_embedder.linear_1.bias": "t_embedder.mlp.0.bias",
    "timestep_embedder.linear_2.weight": "t_embedder.mlp.2.weight",
    "timestep_embedder.linear_2.bias": "t_embedder.mlp.2.bias",
    "class_embedder.embedding_table.weight": "y_embedder.embedding_table.weight",
}
_BLOCK = {  # diffusers key inside transformer_blocks.i → official key inside blocks.i
    "norm1.linear": "adaLN_modulation.1",
    "attn1.to_out.0": "attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
_TOP = {"pos_embed.proj": "x_embedder.proj", "proj_out_1": "final_layer.adaLN_modulation.1",
        "proj_out_2": "final_layer.linear"}


def diffusers_keys(depth: int) -> dict[str, tuple[str, int | None]]:
    """diffusers DiTTransformer2DModel key → (official key, which third of the fused qkv rows it
    is: 0, 1, 2 for to_q, to_k, to_v; None for a whole tensor). The t/y embedder keys of every
    block map to the one official embedder."""
    table: dict[str, tuple[str, int | None]] = {}
    for src, dst in _TOP.items():
        for p in ("weight", "bias"):
            table[f"{src}.{p}"] = (f"{dst}.{p}", None)
    for i in range(depth):
        for src, dst in _BLOCK.items():
            for p in ("weight", "bias"):
                table[f"transformer_blocks.{i}.{src}.{p}"] = (f"blocks.{i}.{dst}.{p}", None)
        for j, n in enumerate("qkv"):
            for p in ("weight", "bias"):
                table[f"transformer_blocks.{i}.attn1.to_{n}.{p}"] = (f"blocks.{i}.attn.qkv.{p}", j)
        for key, dst in _EMBEDDERS.items():
            table[f"transformer_blocks.{i}.norm1.emb.{key}"] = (dst, None)
    return table


EMBEDDER_CHOICES = ("same", "block0")


def diffusers_to_official(state_dict: Mapping[str, np.ndarray], depth: int, *,
                          embedders: str = "same") -> dict[str, np.ndarray]:
    """Official-layout state_dict (without pos_embed) from a DiTTransformer2DModel state_dict.
    The t/y embedders are stored once per block and the DiT has one: with `embedders="same"` every
    copy must equal block 0's (else a ValueError, since diffusers runs each block with its own
    copy: another function than a DiT's); `embedders="block0"` takes block 0's (as diffusers'
    final layer does) and only warns."""
    if embedders not in EMBEDDER_CHOICES:
        raise ValueError(f"embedders must be one of {EMBEDDER_CHOICES}, got {embedders!r}")
    table = diffusers_keys(depth)
    check_keys(state_dict, table,
               f"the state_dict does not match a {depth}-layer diffusers {DIFFUSERS_CLASS}")
    # qkv thirds and embedder copies are gathered below.
    out = {dst: state_dict[src] for src, (dst, part) in table.items()
           if part is None and ".norm1.emb." not in src}
    for i in range(depth):
        for p in ("weight", "bias"):
            names = [f"transformer_blocks.{i}.attn1.to_{n}.{p}" for n in "qkv"]
            shapes = [tuple(state_dict[name].shape) for name in names]
            if len(set(shapes)) != 1 or len(shapes[0]) != (2 if p == "weight" else 1):
                raise ValueError(
                    f"{', '.join(names)} must be {'matrices' if p == 'weight' else 'vectors'} of "
                    f"one shape (they are the fused qkv's thirds); they have shapes "
                    f"{', '.join(map(str, shapes))}")
            out[f"blocks.{i}.attn.qkv.{p}"] = np.concatenate(  # rows [q | k | v]
                [np.asarray(state_dict[name]) for name in names], axis=0)
    differ = []
    for key, dst in _EMBEDDERS.items():
        first = state_dict[f"transformer_blocks.0.norm1.emb.{key}"]
        differ += [f"transformer_blocks.{i}.norm1.emb.{key}" for i in range(1, depth)
                   if not np.array_equal(state_dict[f"transformer_blocks.{i}.norm1.emb.{key}"],
                                         first)]
        out[dst] = first
    if differ:
        message = (f"{len(differ)} per-block embedder copies differ from block 0's (first: "
                   f"{differ[0]}); diffusers runs each block with its own copy, a DiT has one "
                   f"embedder, so no DiT computes this model's function")
        if embedders == "same":
            raise ValueError(f"{message}. To port it anyway with block 0's embedders (another "
                             f"function), pass embedders='block0' (python -m dit_jax.port: "
                             f"--embedders=block0)")
        warnings.warn(f"{message}; using block 0's (embedders='block0')")
    return out


def _check_diffusers_shapes(state_dict: Mapping[str, np.ndarray], cfg: DiTConfig) -> None:
    """Every tensor of a diffusers state_dict against the shapes a model of `cfg` needs, named by
    the diffusers key the file has."""
    expected = official_shapes(cfg)
    for key, (official, part) in diffusers_keys(cfg.depth).items():
        want = expected[official]
        if part is not None:
            want = (want[0] // 3,) + want[1:]
        have = tuple(state_dict[key].shape)
        if have != want:
            raise ValueError(f"{key}: the diffusers weights have shape {have}, the model expects "
                             f"{want} (official key {official})")


def to_diffusers(model: DiT) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json dict, state_dict of float32 torch tensors) of a diffusers
    DiTTransformer2DModel holding `model`'s weights. diffusers computes its own numerics with
    them (see the module doc): the same function as `model` when model.config.numerics is
    "diffusers"."""
    cfg = model.config
    if cfg.num_classes == 0:
        raise ValueError(f"diffusers' {DIFFUSERS_CLASS} is class-conditional only "
                         f"(num_embeds_ada_norm is required): an unconditional DiT has no export")
    if cfg.class_dropout_prob <= 0:
        raise ValueError(
            f"diffusers' {DIFFUSERS_CLASS} always holds a null-label row (num_embeds_ada_norm + 1 "
            f"rows, its class dropout is fixed at 0.1); this DiT has class_dropout_prob="
            f"{cfg.class_dropout_prob} and no such row")
    height, width = _hw(cfg.input_size)
    if height != width:
        raise ValueError(f"diffusers' {DIFFUSERS_CLASS} has one sample_size: the input "
                         f"{height}x{width} is not square")
    if cfg.mlp_ratio != 4:
        raise ValueError(f"diffusers' {DIFFUSERS_CLASS} has an MLP 4x wide; mlp_ratio is "
                         f"{cfg.mlp_ratio}")
    official = to_torch(model)
    state_dict = {}
    for key, (src, part) in diffusers_keys(cfg.depth).items():
        tensor = official[src] if part is None else official[src].chunk(3, dim=0)[part]
        # Own storage for every copy: safetensors refuses tensors that share memory.
        state_dict[key] = tensor.clone().contiguous()
    config = {
        "_class_name": DIFFUSERS_CLASS,
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.hidden_size // cfg.num_heads,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_layers": cfg.depth,
        "dropout": 0.0,
        "norm_num_groups": 32,
        "attention_bias": True,
        "sample_size": height,
        "patch_size": cfg.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": cfg.num_classes,
        "upcast_attention": False,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": NUMERICS["diffusers"]["mlp_norm_eps"],
    }
    return config, state_dict


def save_diffusers(model: DiT, folder: str | os.PathLike) -> Path:
    """Write a diffusers DiTTransformer2DModel folder (config.json and
    diffusion_pytorch_model.safetensors) that `DiTTransformer2DModel.from_pretrained` and
    `from_diffusers` load."""
    if model.config.numerics != "diffusers":
        warnings.warn(f"the model runs with numerics={model.config.numerics!r}; diffusers will run "
                      f"these weights with the diffusers numerics (about 2% different)")
    config, state_dict = to_diffusers(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(state_dict, folder / "diffusion_pytorch_model.safetensors",
                      metadata={"format": "pt"})
    return folder


# config.json keys that `from_diffusers` reads, with their JSON types (`read_config_json`).
DIFFUSERS_REQUIRED = {"num_attention_heads": int, "attention_head_dim": int, "num_layers": int,
                      "patch_size": int, "sample_size": int, "num_embeds_ada_norm": int}
DIFFUSERS_OPTIONAL = {"_class_name": str, "in_channels": int, "out_channels": (int, type(None)),
                      "norm_eps": float, "norm_type": str, "activation_fn": str,
                      "attention_bias": bool, "norm_elementwise_affine": bool}


def _diffusers_folder(folder_or_hub_id, download_help: str = DOWNLOAD_HELP) -> Path:
    path = Path(folder_or_hub_id)
    if not path.exists():
        if not looks_like_hub_id(str(folder_or_hub_id)):
            raise _missing(path, download_help)
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(
                str(folder_or_hub_id),
                allow_patterns=["model_index.json", "config.json", "diffusion_pytorch_model*",
                                "transformer/config.json", "transformer/diffusion_pytorch_model*"]))
        except Exception as e:  # offline, unknown repo, gated repo: all mean "not available"
            raise FileNotFoundError(
                f"{folder_or_hub_id} is not a local path and could not be fetched from the Hugging "
                f"Face hub ({type(e).__name__}: {e}). {download_help}") from e
    # A pipeline repo (facebook/DiT-XL-2-256) keeps the model in transformer/.
    if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        path = path / "transformer"
    if not (path / "config.json").is_file():
        raise _missing(path / "config.json", download_help)
    return path


def _read_weight_file(path: Path) -> dict[str, np.ndarray]:
    """One diffusers weight file (.safetensors or .bin) as float32 arrays, checked finite."""
    arrays = {k: _numpy(v) for k, v in _read_torch_file(path).items()}
    check_finite(arrays, path)
    return arrays


def _read_diffusers_weights(folder: Path, download_help: str = DOWNLOAD_HELP
                            ) -> dict[str, np.ndarray]:
    stem = "diffusion_pytorch_model"
    if (folder / f"{stem}.safetensors").is_file():
        return _read_weight_file(folder / f"{stem}.safetensors")
    for index_name in (f"{stem}.safetensors.index.json", f"{stem}.bin.index.json"):
        if (folder / index_name).is_file():
            index = read_config_json(folder / index_name, {"weight_map": dict})
            files = sorted(set(index["weight_map"].values()))
            return {k: v for f in files for k, v in _read_weight_file(folder / f).items()}
    if (folder / f"{stem}.bin").is_file():
        return _read_weight_file(folder / f"{stem}.bin")
    raise _missing(folder / f"{stem}.safetensors", download_help)


def from_diffusers(folder_or_hub_id, *, numerics: str = "diffusers", name: str | None = None,
                   image_size: int | tuple[int, int] | None = None, **overrides) -> DiT:
    """A DiT from a diffusers DiTTransformer2DModel: a folder with config.json and
    diffusion_pytorch_model.safetensors (or .bin, or sharded), a pipeline folder with transformer/,
    or a hub id. Runs with the diffusers numerics unless `numerics="official"` (see module doc).
    `embedders`: see `diffusers_to_official` (per-block embedder copies that differ are an error
    unless "block0")."""
    embedders = overrides.pop("embedders", "same")
    folder = _diffusers_folder(folder_or_hub_id)
    config = read_config_json(folder / "config.json", {}, {"_class_name": str})
    # The hub's facebook/DiT-XL-2-* predate the class: diffusers remaps their Transformer2DModel
    # with ada_norm_zero to DiTTransformer2DModel (same keys).
    legacy = (config.get("_class_name") == "Transformer2DModel"
              and config.get("norm_type") == "ada_norm_zero")
    if config.get("_class_name") != DIFFUSERS_CLASS and not legacy:
        raise ValueError(f"{folder / 'config.json'} describes a {config.get('_class_name')!r}, "
                         f"not a {DIFFUSERS_CLASS}")
    check_config(config, folder / "config.json", DIFFUSERS_REQUIRED, DIFFUSERS_OPTIONAL)
    expected = dict(norm_type="ada_norm_zero", activation_fn="gelu-approximate",
                    attention_bias=True, norm_elementwise_affine=False)
    for key, want in expected.items():
        if config.get(key, want) != want:
            raise ValueError(
                f"unsupported diffusers config: {key}={config[key]!r} (DiT has {want!r})")
    if numerics == "diffusers" and config.get("norm_eps", 1e-5) != 1e-5:
        raise ValueError(
            f"diffusers numerics use norm_eps 1e-5; this config has {config['norm_eps']}")
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    in_channels = config.get("in_channels", 4)
    out_channels = config.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"out_channels {out_channels} is neither in_channels nor twice it")
    depth = config["num_layers"]
    weights = _read_diffusers_weights(folder)
    check_keys(weights, diffusers_keys(depth),
               f"{folder} does not match a {depth}-layer diffusers {DIFFUSERS_CLASS}")
    width = heads * head_dim
    patch = config["patch_size"]
    table = "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"
    found = dict(
        input_size=config["sample_size"], patch_size=patch, in_channels=in_channels,
        hidden_size=width, depth=depth, num_heads=heads,
        mlp_ratio=weights["transformer_blocks.0.ff.net.0.proj.weight"].shape[0] / width,
        learn_sigma=out_channels == 2 * in_channels,
        **label_fields(weights[table].shape[0], num_classes=config["num_embeds_ada_norm"],
                       class_dropout_prob=overrides.get("class_dropout_prob"), key=table))
    cfg = resolve_config(found, name=name, image_size=image_size, numerics=numerics, **overrides)
    _check_diffusers_shapes(weights, cfg)
    state_dict = diffusers_to_official(weights, depth, embedders=embedders)
    # diffusers recomputes the position table instead of storing it: it is the same sin-cos table.
    state_dict["pos_embed"] = sincos_2d(width, cfg.grid_size).astype(np.float32)[None]
    return _build(state_dict, cfg)


# --------------------------------------------------------------------------------------------
# Any source
# --------------------------------------------------------------------------------------------

def load_any(spec, *, name: str | None = None, image_size: int | tuple[int, int] | None = None,
             which: str = "ema", **overrides) -> DiT:
    """A DiT from whatever `spec` names: a .pt/.pth/.safetensors file (official layout or train.py
    dict), a diffusers folder (config.json of a DiTTransformer2DModel, or a pipeline folder), a
    dit_jax model checkpoint (model_config.json), a train.py workdir (weights `which`), or a hub id.
    `name` / `image_size` are checked against the weights; `overrides` are DiTConfig fields."""
    if which not in TRAIN_DICT_ENTRIES:
        raise ValueError(f"which must be one of {TRAIN_DICT_ENTRIES}, got {which!r}")
    path = Path(spec)
    if path.is_file():
        if path.suffix not in TORCH_SUFFIXES:
            raise ValueError(f"{spec}: unknown checkpoint file type {path.suffix!r}; expected one of "
                             f"{TORCH_SUFFIXES} (official layout or a train.py dict)")
        return from_torch(path, name=name, image_size=image_size, which=which, **overrides)
    if path.is_dir():
        # A workdir also holds model_config.json and config.json: it is recognised first.
        if is_train_workdir(path):
            weights = {"ema": "ema", "model": "params"}[which]  # the workdir's name for "model"
            model = restore_model(path, which=weights)
            check_model_finite(model, f"{path} ({weights} weights)")
            return _finish(model, name=name, image_size=image_size, **overrides)
        if is_model_checkpoint(path):
            model = load_model(path)
            check_model_finite(model, path)
            return _finish(model, name=name, image_size=image_size, **overrides)
        if (path / "config.json").is_file() or (path / "transformer" / "config.json").is_file():
            return from_diffusers(path, name=name, image_size=image_size, **overrides)
        raise ValueError(
            f"{spec} is a directory but no checkpoint: expected model_config.json (a dit_jax model "
            f"checkpoint), config.json (a diffusers {DIFFUSERS_CLASS}) or a train.py workdir")
    if looks_like_hub_id(str(spec)):
        return from_diffusers(str(spec), name=name, image_size=image_size, **overrides)
    raise _missing(spec)
