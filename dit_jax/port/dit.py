"""PyTorch ↔ JAX for DiT: official checkpoints, train.py checkpoint dicts and diffusers models.

Sources:

- the official release (facebookresearch/DiT): `DiT-XL-2-256x256.pt` / `DiT-XL-2-512x512.pt`, plain
  state_dicts, and the official train.py's checkpoints, dicts {"model", "ema", "opt", "args"}
  (samplers use "ema"). `from_torch` reads both (and .safetensors files of the same layout);
  `to_torch` / `save_torch` write that layout, so a model trained here loads in the official code.
- the Hugging Face diffusers port (`DiTTransformer2DModel`, hub repos facebook/DiT-XL-2-256 and
  facebook/DiT-XL-2-512): `from_diffusers`.

The two PyTorch implementations do not compute the same function with the same weights: diffusers
builds the timestep frequencies as exp(-ln(10000)·i/127) instead of /128 (`downscale_freq_shift=1`)
and uses LayerNorm eps 1e-5 (its `norm_eps`) instead of 1e-6 before each MLP. On random weights
the outputs differ by about 2% relative; on the released weights the difference is smaller but
systematic. `from_diffusers` therefore runs the weights with `numerics="diffusers"` (the function
the diffusers pipeline computes, and the one that pipeline's reported samples come from); pass
`numerics="official"` for the official function on the same weights. Official checkpoints load with
`numerics="official"`. The numerics are a DiTConfig field, not a property of the tensors: `to_torch`
exports the official layout whatever the numerics, and a diffusers-numerics model exported that way
computes the official function in the official code.

Every loader infers the architecture from the tensors (depth, width, patch, channels, learned
sigma, classes, input size from pos_embed) and checks it against `name` / `image_size` when given.
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

from dit_jax.checkpoint import RUNTIME_FIELDS, is_model_checkpoint, load_model, with_config
from dit_jax.models.dit import DIT_CONFIGS, DiT, DiTConfig, convert_blocks, sincos_2d
from dit_jax.port.keys import check_keys

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


def _missing(path) -> FileNotFoundError:
    return FileNotFoundError(f"checkpoint not found: {path}. {DOWNLOAD_HELP}")


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


# --------------------------------------------------------------------------------------------
# The official layout
# --------------------------------------------------------------------------------------------


def official_keys(cfg: DiTConfig) -> dict[str, tuple[tuple, str]]:
    """Official state_dict key → (path in the model's pure dict with a block list, conversion)."""
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




def _build(state_dict: Mapping[str, np.ndarray], cfg: DiTConfig) -> DiT:
    """A DiT of `cfg` holding an official-layout state_dict, loaded strictly."""
    plain = dataclasses.replace(cfg, scan_blocks=False)
    table = official_keys(plain)
    check_keys(state_dict, table, "the state_dict does not match the official DiT layout")
    model = nnx.eval_shape(lambda: DiT(plain))
    state = nnx.state(model)
    values = nnx.to_pure_dict(state)
    for key, (path, kind) in table.items():
        node = values
        for part in path[:-1]:
            node = node[part]
        want = node[path[-1]].shape
        array = _to_jax_layout(np.asarray(state_dict[key]), kind)
        if array.shape != tuple(want):
            raise ValueError(
                f"{key}: the checkpoint has shape {tuple(state_dict[key].shape)}, the model expects "
                f"{_to_torch_layout(np.empty(want, np.bool_), kind).shape}")
        node[path[-1]] = jnp.asarray(array, jnp.float32)
    expected_pos = sincos_2d(plain.hidden_size, plain.grid_size)[None]
    if not np.allclose(values["pos_embed"], expected_pos, atol=1e-5):
        warnings.warn("pos_embed differs from the fixed 2-D sin-cos table; using the checkpoint's")
    nnx.replace_by_pure_dict(state, values)
    nnx.update(model, state)
    return with_config(model, scan_blocks=cfg.scan_blocks)


def infer_official(state_dict: Mapping[str, np.ndarray], *, input_size=None) -> dict[str, Any]:
    """The checkpoint-fixed DiTConfig fields of an official-layout state_dict, from its shapes."""

    def need(key):
        if key not in state_dict:
            raise ValueError(f"missing key {key!r}: not an official-layout DiT state_dict "
                             f"(it has {len(state_dict)} keys, e.g. {sorted(state_dict)[:5]})")
        return tuple(state_dict[key].shape)

    width, in_channels, patch, _ = need("x_embedder.proj.weight")
    tokens = need("pos_embed")[1]
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
    out_features = need("final_layer.linear.weight")[0]
    out_channels, rest = divmod(out_features, patch * patch)
    if rest or out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(
            f"final_layer.linear.weight has {out_features} outputs: not patch² × {in_channels} or "
            f"patch² × {2 * in_channels} (patch {patch})")
    table = "y_embedder.embedding_table.weight"
    return dict(
        input_size=input_size, patch_size=patch, in_channels=in_channels, hidden_size=width,
        depth=max(blocks) + 1, mlp_ratio=need("blocks.0.mlp.fc1.weight")[0] / width,
        # The table has one extra row, the null class of classifier-free guidance.
        num_classes=state_dict[table].shape[0] - 1 if table in state_dict else 0,
        learn_sigma=out_channels == 2 * in_channels)


def _numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and tensor.dtype != torch.float32:
        tensor = tensor.float()  # bf16/fp16 checkpoints: exact in float32, and numpy has no bf16
    return tensor.numpy()


def _read_torch_file(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise _missing(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    # train.py checkpoints carry its argparse.Namespace under "args".
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise ValueError(f"{path} is not a readable PyTorch checkpoint (loaded with "
                             f"weights_only=True): {e}") from e


def read_state_dict(src, *, which: str = "ema") -> dict[str, np.ndarray]:
    """A flat {key: float32 array} from a file or a loaded object: a state_dict, or a train.py
    checkpoint dict from which entry `which` ("ema" or "model") is taken."""
    import torch

    if which not in TRAIN_DICT_ENTRIES:
        raise ValueError(f"which must be one of {TRAIN_DICT_ENTRIES}, got {which!r}")
    obj = src if isinstance(src, Mapping) else _read_torch_file(Path(src))
    if not isinstance(obj, Mapping):
        raise ValueError(f"unknown checkpoint layout: a {type(obj).__name__}, not a dict")
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
    return {k: _numpy(v) for k, v in state_dict.items()}


def from_torch(path_or_state_dict, *, name: str | None = None,
               image_size: int | tuple[int, int] | None = None, which: str = "ema",
               **overrides) -> DiT:
    """A DiT from an official-layout checkpoint: a .pt/.pth file (plain state_dict or train.py
    dict, entry `which`), a .safetensors file, or an already loaded dict. `overrides` are DiTConfig
    fields (num_heads for a non-official width, dtype, numerics, scan_blocks, ...)."""
    state_dict = read_state_dict(path_or_state_dict, which=which)
    if any(k.startswith("transformer_blocks.") for k in state_dict):
        raise ValueError("this is a diffusers DiTTransformer2DModel state_dict: load its folder "
                         "(with config.json) with from_diffusers")
    found = infer_official(state_dict, input_size=overrides.get("input_size"))
    cfg = resolve_config(found, name=name, image_size=image_size, **overrides)
    return _build(state_dict, cfg)


def to_torch(model: DiT) -> dict[str, Any]:
    """The official state_dict (pos_embed included) of `model`, float32 torch tensors."""
    import torch

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
    state_dict = to_torch(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".pt", ".pth"):
        import torch

        torch.save(state_dict, path)
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, str(path))
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


def diffusers_to_official(state_dict: Mapping[str, np.ndarray],
                          depth: int) -> dict[str, np.ndarray]:
    """Official-layout state_dict (without pos_embed) from a DiTTransformer2DModel state_dict.
    The t/y embedders are stored once per block; block 0's are taken (as diffusers' final layer
    does) and the others are checked against them."""
    mapping: dict[str, str] = {}
    for src, dst in _TOP.items():
        for p in ("weight", "bias"):
            mapping[f"{src}.{p}"] = f"{dst}.{p}"
    for i in range(depth):
        for src, dst in _BLOCK.items():
            for p in ("weight", "bias"):
                mapping[f"transformer_blocks.{i}.{src}.{p}"] = f"blocks.{i}.{dst}.{p}"
    qkv = [f"transformer_blocks.{i}.attn1.to_{n}.{p}"
           for i in range(depth) for n in "qkv" for p in ("weight", "bias")]
    copies = [f"transformer_blocks.{i}.norm1.emb.{k}" for i in range(depth) for k in _EMBEDDERS]
    check_keys(state_dict, [*mapping, *qkv, *copies],
                f"the state_dict does not match a {depth}-layer diffusers {DIFFUSERS_CLASS}")
    out = {dst: state_dict[src] for src, dst in mapping.items()}
    for i in range(depth):
        for p in ("weight", "bias"):
            parts = [state_dict[f"transformer_blocks.{i}.attn1.to_{n}.{p}"] for n in "qkv"]
            out[f"blocks.{i}.attn.qkv.{p}"] = np.concatenate(parts, axis=0)  # rows [q | k | v]
    for key, dst in _EMBEDDERS.items():
        first = state_dict[f"transformer_blocks.0.norm1.emb.{key}"]
        for i in range(1, depth):
            other = state_dict[f"transformer_blocks.{i}.norm1.emb.{key}"]
            if other.shape != first.shape or not np.array_equal(other, first):
                warnings.warn(f"transformer_blocks.{i}.norm1.emb.{key} differs from block 0's; the "
                              f"model uses block 0's (as diffusers' final layer does)")
        out[dst] = first
    return out


def _diffusers_folder(folder_or_hub_id) -> Path:
    path = Path(folder_or_hub_id)
    if not path.exists():
        if not looks_like_hub_id(str(folder_or_hub_id)):
            raise _missing(path)
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(
                str(folder_or_hub_id),
                allow_patterns=["model_index.json", "config.json", "diffusion_pytorch_model*",
                                "transformer/config.json", "transformer/diffusion_pytorch_model*"]))
        except Exception as e:  # offline, unknown repo, gated repo: all mean "not available"
            raise FileNotFoundError(
                f"{folder_or_hub_id} is not a local path and could not be fetched from the Hugging "
                f"Face hub ({type(e).__name__}: {e}). {DOWNLOAD_HELP}") from e
    # A pipeline repo (facebook/DiT-XL-2-256) keeps the model in transformer/.
    if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        path = path / "transformer"
    if not (path / "config.json").is_file():
        raise _missing(path / "config.json")
    return path


def _read_diffusers_weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    stem = "diffusion_pytorch_model"
    if (folder / f"{stem}.safetensors").is_file():
        return {k: _numpy(v) for k, v in load_file(str(folder / f"{stem}.safetensors")).items()}
    for index_name, reader in ((f"{stem}.safetensors.index.json", lambda f: load_file(str(f))),
                               (f"{stem}.bin.index.json", _read_torch_file)):
        if (folder / index_name).is_file():
            weight_map = json.loads((folder / index_name).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            return {k: _numpy(v) for f in files for k, v in reader(folder / f).items()}
    if (folder / f"{stem}.bin").is_file():
        return read_state_dict(folder / f"{stem}.bin")
    raise _missing(folder / f"{stem}.safetensors")


def from_diffusers(folder_or_hub_id, *, numerics: str = "diffusers", name: str | None = None,
                   image_size: int | tuple[int, int] | None = None, **overrides) -> DiT:
    """A DiT from a diffusers DiTTransformer2DModel: a folder with config.json and
    diffusion_pytorch_model.safetensors (or .bin, or sharded), a pipeline folder with transformer/,
    or a hub id. Runs with the diffusers numerics unless `numerics="official"` (see module doc)."""
    folder = _diffusers_folder(folder_or_hub_id)
    config = json.loads((folder / "config.json").read_text())
    # The hub's facebook/DiT-XL-2-* predate the class: diffusers remaps their Transformer2DModel
    # with ada_norm_zero to DiTTransformer2DModel (same keys).
    legacy = (config.get("_class_name") == "Transformer2DModel"
              and config.get("norm_type") == "ada_norm_zero")
    if config.get("_class_name") != DIFFUSERS_CLASS and not legacy:
        raise ValueError(f"{folder / 'config.json'} describes a {config.get('_class_name')!r}, "
                         f"not a {DIFFUSERS_CLASS}")
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
    state_dict = diffusers_to_official(_read_diffusers_weights(folder), depth)
    width = heads * head_dim
    patch = config["patch_size"]
    found = dict(
        input_size=config["sample_size"], patch_size=patch, in_channels=in_channels,
        hidden_size=width, depth=depth, num_heads=heads,
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / width,
        num_classes=config["num_embeds_ada_norm"], learn_sigma=out_channels == 2 * in_channels)
    cfg = resolve_config(found, name=name, image_size=image_size, numerics=numerics, **overrides)
    # diffusers recomputes the position table instead of storing it: it is the same sin-cos table.
    state_dict["pos_embed"] = sincos_2d(width, cfg.grid_size).astype(np.float32)[None]
    return _build(state_dict, cfg)


# --------------------------------------------------------------------------------------------
# Any source
# --------------------------------------------------------------------------------------------

TORCH_SUFFIXES = (".pt", ".pth", ".safetensors")


def looks_like_hub_id(spec: str) -> bool:
    return (re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None
            and not spec.startswith(".") and not spec.endswith(TORCH_SUFFIXES))


def _is_train_workdir(path: Path) -> bool:
    from dit_jax.train.checkpoint import CHECKPOINT_DIR

    return (path / CHECKPOINT_DIR).is_dir()


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
        if _is_train_workdir(path):
            from dit_jax.train.checkpoint import restore_model

            weights = {"ema": "ema", "model": "params"}[which]  # the workdir's name for "model"
            return _finish(restore_model(path, which=weights), name=name, image_size=image_size,
                           **overrides)
        if is_model_checkpoint(path):
            return _finish(load_model(path), name=name, image_size=image_size, **overrides)
        if (path / "config.json").is_file() or (path / "transformer" / "config.json").is_file():
            return from_diffusers(path, name=name, image_size=image_size, **overrides)
        raise ValueError(
            f"{spec} is a directory but no checkpoint: expected model_config.json (a dit_jax model "
            f"checkpoint), config.json (a diffusers {DIFFUSERS_CLASS}) or a train.py workdir")
    if looks_like_hub_id(str(spec)):
        return from_diffusers(str(spec), name=name, image_size=image_size, **overrides)
    raise _missing(spec)
