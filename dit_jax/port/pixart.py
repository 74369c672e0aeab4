"""PixArt-α weights ↔ `dit_jax.models.pixart.PixArt`: diffusers folders, the original .pth files.

Sources `load_pixart` reads:

- a diffusers `PixArtTransformer2DModel` folder (config.json + diffusion_pytorch_model.safetensors,
  .bin or sharded); a PixArtAlphaPipeline folder, whose model is in transformer/; a hub id such as
  PixArt-alpha/PixArt-XL-2-1024-MS through huggingface_hub. The hub's PixArt repos predate the
  class and name it `Transformer2DModel` with norm_type "ada_norm_single": the same keys.
- the original release (github PixArt-alpha/PixArt-alpha): PixArt-XL-2-512x512.pth (the `PixArt`
  class) and PixArt-XL-2-1024-MS.pth (`PixArtMS`, with the micro-condition embedders), dicts
  {"state_dict": …}; its train.py checkpoints add "state_dict_ema". Their keys are the model's
  module names (x_embedder.proj, t_embedder.mlp.0/2, t_block.1, y_embedder.y_proj.fc1/2,
  csize_embedder, ar_embedder, blocks.i.{attn.qkv, attn.proj, cross_attn.q_linear,
  cross_attn.kv_linear, cross_attn.proj, mlp.fc1, mlp.fc2, scale_shift_table},
  final_layer.{linear, scale_shift_table}) plus two buffers: pos_embed (recomputed here, as the
  original's own loader does, and checked) and y_embedder.y_embedding (the null caption, kept).

diffusers splits the fused tensors (attn.qkv into attn1.to_q/to_k/to_v, cross_attn.kv_linear into
attn2.to_k/to_v) and renames the rest, as the original repository's
tools/convert_pixart_alpha_to_diffusers.py does; the table below is that renaming. It stores no
null caption and no position table.

What the tensors do not show comes from the diffusers config, or for .pth files from the
official table: the head count (16 for the width 1152 of every release, else num_heads=), the
latent side input_size (from the stored pos_embed's token count), the interpolation scale
(max(input_size // 64, 1): 1 for 512 px, 2 for 1024 px, as the original inference script sets
it). Export: `save_pixart(model, DEST)` writes a diffusers folder, or the original {"state_dict"}
layout to a .pth. See docs/pixart.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.models.pixart import PixArt, PixArtConfig
from dit_jax.port import dit as dit_port
from dit_jax.port.keys import check_keys, require_torch, shape_of, write_safetensors

DOWNLOAD_HELP = (
    "PixArt-α weights: the Hugging Face hub pipelines PixArt-alpha/PixArt-XL-2-512x512 and "
    "PixArt-alpha/PixArt-XL-2-1024-MS (diffusers; the model is their transformer/ folder), or the "
    "original PixArt-XL-2-512x512.pth / PixArt-XL-2-1024-MS.pth of the hub repo "
    "PixArt-alpha/PixArt-alpha. Pass a folder, a .pth file or a hub id.")

DIFFUSERS_CLASS = "PixArtTransformer2DModel"
HEADS_BY_WIDTH = {1152: 16}  # PixArt-XL-2, every release
# Weight-fixed config fields: an override that disagrees with the checkpoint is an error.
CHECKPOINT_FIELDS = ("patch_size", "in_channels", "hidden_size", "depth", "mlp_ratio",
                     "caption_channels", "learn_sigma", "micro_conditions", "model_max_length")
ORIGINAL_ENTRIES = {"ema": "state_dict_ema", "model": "state_dict"}
NULL_CAPTION = "y_embedder.y_embedding"

# diffusers name → original name, for Linear layers (".weight" and ".bias" each).
_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "caption_projection.linear_1": "y_embedder.y_proj.fc1",
    "caption_projection.linear_2": "y_embedder.y_proj.fc2",
    "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "adaln_single.linear": "t_block.1",
    "proj_out": "final_layer.linear",
}
_MICRO = {
    "adaln_single.emb.resolution_embedder.linear_1": "csize_embedder.mlp.0",
    "adaln_single.emb.resolution_embedder.linear_2": "csize_embedder.mlp.2",
    "adaln_single.emb.aspect_ratio_embedder.linear_1": "ar_embedder.mlp.0",
    "adaln_single.emb.aspect_ratio_embedder.linear_2": "ar_embedder.mlp.2",
}
_BLOCK = {  # inside transformer_blocks.i → inside blocks.i
    "attn1.to_out.0": "attn.proj",
    "attn2.to_q": "cross_attn.q_linear",
    "attn2.to_out.0": "cross_attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
_FUSED = {  # original fused Linear → its diffusers parts, in row order
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
}


def diffusers_keys(depth: int, micro_conditions: bool) -> dict[str, tuple[str, int, int]]:
    """diffusers key → (original key, which part of its rows, how many parts): a fused tensor is
    split into equal row blocks; everything else is one part of one."""
    table: dict[str, tuple[str, int, int]] = {
        "scale_shift_table": ("final_layer.scale_shift_table", 0, 1)}
    top = dict(_TOP, **(_MICRO if micro_conditions else {}))
    for i in range(depth):
        top.update({f"transformer_blocks.{i}.{k}": f"blocks.{i}.{v}" for k, v in _BLOCK.items()})
        table[f"transformer_blocks.{i}.scale_shift_table"] = (f"blocks.{i}.scale_shift_table", 0, 1)
        for fused, parts in _FUSED.items():
            for j, part in enumerate(parts):
                for p in ("weight", "bias"):
                    table[f"transformer_blocks.{i}.{part}.{p}"] = (
                        f"blocks.{i}.{fused}.{p}", j, len(parts))
    for src, dst in top.items():
        for p in ("weight", "bias"):
            table[f"{src}.{p}"] = (f"{dst}.{p}", 0, 1)
    return table


def diffusers_to_original(weights: Mapping[str, np.ndarray], depth: int,
                          micro_conditions: bool) -> dict[str, np.ndarray]:
    """The original-layout state_dict (without pos_embed and null caption) of diffusers weights."""
    table = diffusers_keys(depth, micro_conditions)
    check_keys(weights, table, f"the weights do not match a {depth}-layer diffusers "
                               f"{DIFFUSERS_CLASS} (micro-conditions "
                               f"{'on' if micro_conditions else 'off'})")
    parts: dict[str, list] = {}
    for key, (dst, j, n) in table.items():
        parts.setdefault(dst, [None] * n)[j] = key
    out = {}
    for dst, keys in parts.items():
        shapes = {tuple(weights[k].shape) for k in keys}
        if len(shapes) != 1:
            raise ValueError(f"{', '.join(keys)} are the row blocks of one fused tensor and must "
                             f"have one shape; they have {sorted(shapes)}")
        out[dst] = (np.asarray(weights[keys[0]]) if len(keys) == 1 else
                    np.concatenate([np.asarray(weights[k]) for k in keys], axis=0))
    return out


def original_to_diffusers(state_dict: Mapping[str, Any], depth: int,
                          micro_conditions: bool) -> dict[str, Any]:
    """The diffusers state_dict of original-layout arrays (the fused ones split)."""
    return {key: np.ascontiguousarray(np.split(np.asarray(state_dict[src]), n, axis=0)[j])
            for key, (src, j, n) in diffusers_keys(depth, micro_conditions).items()}


# --------------------------------------------------------------------------------------------
# The original layout ↔ the model
# --------------------------------------------------------------------------------------------


def original_keys(cfg: PixArtConfig) -> dict[str, tuple[tuple, str]]:
    """Original key → (path in the model's pure dict, conversion). pos_embed is not a parameter:
    the model recomputes it."""
    table: dict[str, tuple[tuple, str]] = {
        "x_embedder.proj.weight": (("x_embedder", "kernel"), "conv"),
        "x_embedder.proj.bias": (("x_embedder", "bias"), "copy"),
        "final_layer.scale_shift_table": (("final_layer", "scale_shift_table"), "copy"),
    }

    def linear(name, path):
        table[f"{name}.weight"] = (path + ("kernel",), "linear")
        table[f"{name}.bias"] = (path + ("bias",), "copy")

    embedders = ["t_embedder"] + (["csize_embedder", "ar_embedder"] if cfg.micro_conditions else [])
    for embedder in embedders:
        linear(f"{embedder}.mlp.0", (embedder, "linear_1"))
        linear(f"{embedder}.mlp.2", (embedder, "linear_2"))
    linear("t_block.1", ("t_block",))
    linear("y_embedder.y_proj.fc1", ("y_embedder", "y_proj", "fc1"))
    linear("y_embedder.y_proj.fc2", ("y_embedder", "y_proj", "fc2"))
    if cfg.model_max_length > 0:
        table[NULL_CAPTION] = (("y_embedder", "y_embedding"), "copy")
    for i in range(cfg.depth):
        for name in ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear",
                     "cross_attn.proj", "mlp.fc1", "mlp.fc2"):
            linear(f"blocks.{i}.{name}", ("blocks", i) + tuple(name.split(".")))
        table[f"blocks.{i}.scale_shift_table"] = (("blocks", i, "scale_shift_table"), "copy")
    linear("final_layer.linear", ("final_layer", "linear"))
    return table


def _node(values, path):
    for part in path:
        values = values[part]
    return values


def build(state_dict: Mapping[str, np.ndarray], cfg: PixArtConfig) -> PixArt:
    """A PixArt of `cfg` holding an original-layout state_dict (pos_embed, if there, is checked
    against the table the model computes and then dropped), loaded strictly."""
    state_dict = dict(state_dict)
    stored_pos = state_dict.pop("pos_embed", None)
    table = original_keys(cfg)
    check_keys(state_dict, table, "the state_dict does not match the original PixArt-α layout "
                                  f"for {cfg.depth} blocks, micro-conditions "
                                  f"{'on' if cfg.micro_conditions else 'off'}, null caption "
                                  f"{'on' if cfg.model_max_length else 'off'}")
    model = nnx.eval_shape(lambda: PixArt(cfg))
    state = nnx.state(model)
    values = nnx.to_pure_dict(state)
    for key, (path, kind) in table.items():
        want = dit_port._to_torch_layout(np.empty(_node(values, path).shape, np.bool_), kind).shape
        if tuple(state_dict[key].shape) != want:
            raise ValueError(f"{key}: the checkpoint has shape {tuple(state_dict[key].shape)}, the "
                             f"model expects {want}")
        _node(values, path[:-1])[path[-1]] = jnp.asarray(
            dit_port._to_jax_layout(np.asarray(state_dict[key]), kind), jnp.float32)
    if stored_pos is not None:
        side = cfg.base_size
        table_now = model.pos_embed((side, side))
        if stored_pos.shape != table_now.shape or not np.allclose(stored_pos, table_now, atol=1e-5):
            warnings.warn(f"the checkpoint's pos_embed differs from the position table for "
                          f"input_size {cfg.input_size}, interpolation_scale "
                          f"{cfg.interpolation_scale}; the model recomputes it (as the original "
                          f"loader does): check those two settings")
    nnx.replace_by_pure_dict(state, values)
    nnx.update(model, state)
    return model


def _resolve(found: Mapping[str, Any], overrides: Mapping[str, Any], source: str) -> PixArtConfig:
    fields = dict(found)
    known = {f.name for f in dataclasses.fields(PixArtConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown PixArtConfig field(s) {unknown}; known: {sorted(known)}")
    for key, value in overrides.items():
        if key in CHECKPOINT_FIELDS and key in fields and value != fields[key]:
            raise ValueError(f"{key}={value!r} was given but {source} has {key}={fields[key]!r}")
        fields[key] = jnp.dtype(value) if key == "dtype" else value
    if "num_heads" not in fields:
        width = fields["hidden_size"]
        if width not in HEADS_BY_WIDTH:
            raise ValueError(f"{source}: cannot infer num_heads for hidden_size {width} (the "
                             f"tensors do not show it; PixArt-XL-2 has {HEADS_BY_WIDTH}): pass "
                             f"num_heads=")
        fields["num_heads"] = HEADS_BY_WIDTH[width]
    return PixArtConfig(**fields)


def infer_original(state_dict: Mapping[str, np.ndarray], source: str = "the state_dict"
                   ) -> dict[str, Any]:
    """The weight-fixed PixArtConfig fields (and input_size, from pos_embed) of an original
    state_dict."""

    def need(key, ndim):
        try:
            return shape_of(state_dict, key, ndim, "an original PixArt-α")
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    width, in_channels, patch, _ = need("x_embedder.proj.weight", 4)
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise ValueError(f"{source}: no blocks.N.* keys")
    out_channels, rest = divmod(need("final_layer.linear.weight", 2)[0], patch * patch)
    if rest or out_channels not in (in_channels, 2 * in_channels):
        outputs = out_channels * patch ** 2 + rest
        raise ValueError(f"{source}: final_layer.linear.weight has {outputs} outputs: not "
                         f"patch² × {in_channels} or patch² × {2 * in_channels}")
    found = dict(
        patch_size=patch, in_channels=in_channels, hidden_size=width, depth=max(blocks) + 1,
        mlp_ratio=need("blocks.0.mlp.fc1.weight", 2)[0] / width,
        caption_channels=need("y_embedder.y_proj.fc1.weight", 2)[1],
        learn_sigma=out_channels == 2 * in_channels,
        micro_conditions="csize_embedder.mlp.0.weight" in state_dict,
        model_max_length=need(NULL_CAPTION, 2)[0] if NULL_CAPTION in state_dict else 0)
    if "pos_embed" in state_dict:
        tokens = need("pos_embed", 3)[1]
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"{source}: pos_embed has {tokens} tokens, not a square grid")
        found["input_size"] = side * patch
    return found


def from_original(path_or_state_dict, *, which: str | None = None, **overrides) -> PixArt:
    """A PixArt from an original .pth/.pt/.safetensors file, or an already loaded dict: a plain
    state_dict or {"state_dict": …[, "state_dict_ema": …]}. `which` = "ema" or "model" picks
    from a training checkpoint; default: the EMA weights when there are some. input_size comes
    from the stored pos_embed, or must be given."""
    source = str(path_or_state_dict) if not isinstance(path_or_state_dict, Mapping) else "the dict"
    if isinstance(path_or_state_dict, Mapping):
        obj = path_or_state_dict
    else:
        path = Path(path_or_state_dict)
        if not path.is_file():
            raise dit_port._missing(path, DOWNLOAD_HELP)
        obj = dit_port._read_torch_file(path)
    if which is not None and which not in ORIGINAL_ENTRIES:
        raise ValueError(f"which must be one of {sorted(ORIGINAL_ENTRIES)}, got {which!r}")
    if any(isinstance(obj.get(k), Mapping) for k in ORIGINAL_ENTRIES.values()):
        entry = ORIGINAL_ENTRIES[which] if which else (
            "state_dict_ema" if isinstance(obj.get("state_dict_ema"), Mapping) else "state_dict")
        if not isinstance(obj.get(entry), Mapping):
            raise ValueError(f"{source} has no {entry!r} entry (it has {sorted(obj)})")
        obj = obj[entry]
    elif which is not None:
        raise ValueError(f"{source} is a plain state_dict: which={which!r} does not apply")
    state_dict = dit_port.read_checkpoint(obj)[0]
    if any(k.startswith("transformer_blocks.") for k in state_dict):
        raise ValueError(f"{source} holds diffusers keys: load its folder (with config.json)")
    found = infer_original(state_dict, source)
    if "input_size" not in found and "input_size" not in overrides:
        raise ValueError(f"{source} has no pos_embed to read the latent side from: pass "
                         f"input_size= (the latent side: 64 for 512 px models, 128 for 1024 px)")
    return build(state_dict, _resolve(found, overrides, source))


def from_diffusers(folder_or_hub_id, **overrides) -> PixArt:
    """A PixArt from a diffusers PixArtTransformer2DModel folder, pipeline folder or hub id."""
    folder = dit_port._diffusers_folder(folder_or_hub_id, DOWNLOAD_HELP)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    legacy = (config.get("_class_name") == "Transformer2DModel"
              and config.get("norm_type") == "ada_norm_single")
    if config.get("_class_name") != DIFFUSERS_CLASS and not legacy:
        raise ValueError(f"{config_file} describes a {config.get('_class_name')!r}, not a "
                         f"{DIFFUSERS_CLASS}")
    expected = dict(norm_type="ada_norm_single", activation_fn="gelu-approximate",
                    attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-6,
                    attention_type="default")
    for key, want in expected.items():
        if config.get(key, want) != want:
            raise ValueError(f"{config_file}: unsupported {key}={config[key]!r} (PixArt-α has "
                             f"{want!r})")
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    width = heads * head_dim
    if config.get("caption_channels") is None:
        raise ValueError(f"{config_file}: caption_channels is null (no caption projection); "
                         f"PixArt-α projects its text tokens")
    if config.get("cross_attention_dim", width) != width:
        raise ValueError(f"{config_file}: cross_attention_dim {config['cross_attention_dim']} is "
                         f"not the width {width} that the caption projection outputs")
    in_channels = config.get("in_channels", 4)
    out_channels = config.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"{config_file}: out_channels {out_channels} is neither in_channels "
                         f"{in_channels} nor twice it")
    sample_size = config.get("sample_size", 128)
    micro = config.get("use_additional_conditions")
    micro = sample_size == 128 if micro is None else bool(micro)
    depth = config["num_layers"]
    weights = dit_port._read_diffusers_weights(folder, DOWNLOAD_HELP)
    state_dict = diffusers_to_original(weights, depth, micro)
    found = dict(
        input_size=sample_size, patch_size=config["patch_size"], in_channels=in_channels,
        hidden_size=width, depth=depth, num_heads=heads,
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / width,
        caption_channels=config["caption_channels"], learn_sigma=out_channels == 2 * in_channels,
        micro_conditions=micro, interpolation_scale=config.get("interpolation_scale"),
        # diffusers keeps no null caption: guidance there uses the encoded empty prompt.
        model_max_length=0, class_dropout_prob=0.0)
    return build(state_dict, _resolve(found, overrides, str(config_file)))


def load_pixart(src, *, which: str | None = None, **overrides) -> PixArt:
    """A PixArt-α transformer from `src`: an original .pth/.pt/.safetensors file, a diffusers
    folder (PixArtTransformer2DModel, or a pipeline with transformer/), or a hub id.
    `overrides` are PixArtConfig fields: dtype, attention_impl, remat, class_dropout_prob, and
    what the weights do not fix (num_heads, input_size, interpolation_scale)."""
    path = Path(src)
    if path.is_file():
        if path.suffix not in dit_port.TORCH_SUFFIXES:
            raise ValueError(f"{src}: unknown file type {path.suffix!r}; expected one of "
                             f"{dit_port.TORCH_SUFFIXES} (an original PixArt-α checkpoint)")
        return from_original(path, which=which, **overrides)
    if which is not None:
        raise ValueError(f"which={which!r} applies to original .pth training checkpoints only")
    if path.is_dir() or dit_port.looks_like_hub_id(str(src)):
        return from_diffusers(src, **overrides)
    raise dit_port._missing(src, DOWNLOAD_HELP)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def to_original(model: PixArt) -> dict[str, Any]:
    """The original state_dict of `model` (float32 NumPy arrays), pos_embed included."""
    values = nnx.to_pure_dict(nnx.state(model))
    out = {}
    for key, (path, kind) in original_keys(model.config).items():
        array = dit_port._to_torch_layout(np.asarray(jax.device_get(_node(values, path))), kind)
        out[key] = np.array(array, np.float32, order="C")
    side = model.config.base_size
    out["pos_embed"] = np.asarray(model.pos_embed((side, side)), np.float32)
    return out


def to_diffusers(model: PixArt) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json dict, state_dict of float32 NumPy arrays) of a diffusers
    PixArtTransformer2DModel computing the same function (the null caption is not exported:
    diffusers has no place for it)."""
    cfg = model.config
    if cfg.mlp_ratio != 4:
        raise ValueError(f"diffusers' {DIFFUSERS_CLASS} has an MLP 4x wide; mlp_ratio is "
                         f"{cfg.mlp_ratio}")
    state_dict = original_to_diffusers(to_original(model), cfg.depth, cfg.micro_conditions)
    config = {
        "_class_name": DIFFUSERS_CLASS,
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.hidden_size // cfg.num_heads,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_layers": cfg.depth,
        "dropout": 0.0,
        "norm_num_groups": 32,
        "cross_attention_dim": cfg.hidden_size,
        "attention_bias": True,
        "sample_size": cfg.input_size,
        "patch_size": cfg.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "upcast_attention": False,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "interpolation_scale": cfg.interpolation_scale,
        "use_additional_conditions": cfg.micro_conditions,
        "caption_channels": cfg.caption_channels,
        "attention_type": "default",
    }
    return config, state_dict


def save_pixart(model: PixArt, dest: str | os.PathLike) -> Path:
    """Write `model` as an original checkpoint {"state_dict": …} (dest ends in .pth/.pt) or as a
    diffusers folder (config.json + diffusion_pytorch_model.safetensors) otherwise."""
    dest = Path(dest)
    if dest.suffix in (".pth", ".pt"):
        torch = require_torch("writing a PixArt-α .pth checkpoint")
        dest.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in to_original(model).items()}},
                   dest)
        return dest
    config, state_dict = to_diffusers(model)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(state_dict, dest / "diffusion_pytorch_model.safetensors",
                      metadata={"format": "pt"})
    return dest
