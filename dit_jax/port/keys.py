"""What the DiT, SiT, VAE, PixArt-α and T5 ports share: strict key matching, finite weights,
torch-free .safetensors reading and writing, well-formed config.json files (each check failing
with one line that names the file and the key), and the error that names the torch extra."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def check_keys(found: Iterable[str], expected: Iterable[str], what: str,
               error: type[Exception] = ValueError) -> None:
    """Raise `error` naming every missing and unexpected key, prefixed by `what`."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {missing}")
        if unexpected:
            parts.append(f"unexpected key(s) {unexpected}")
        raise error(f"{what}: " + "; ".join(parts))


TORCH_EXTRA = 'pip install -e ".[torch]"'


def shape_of(state_dict: Mapping[str, Any], key: str, ndim: int, layout: str) -> tuple[int, ...]:
    """The shape of state_dict[key], which must be there with `ndim` dimensions; else a
    ValueError saying the dict is not a `layout` state_dict (what the ports read configs from)."""
    if key not in state_dict:
        raise ValueError(f"missing key {key!r}: not {layout} state_dict (it has "
                         f"{len(state_dict)} keys, e.g. {sorted(state_dict)[:5]})")
    shape = tuple(state_dict[key].shape)
    if len(shape) != ndim:
        raise ValueError(f"{key} has shape {shape}: expected {ndim} dimensions in {layout} "
                         f"state_dict")
    return shape


def require_torch(what: str):
    """The torch module, or an ImportError that says what needed it and which extra to install."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{what} needs PyTorch, which is not installed: {TORCH_EXTRA} (or "
                          f"pip install torch); .safetensors files and dit_jax checkpoints load "
                          f"without it") from e
    return torch


def read_safetensors(path) -> dict[str, np.ndarray]:
    """A .safetensors file as float32 NumPy arrays, without torch (safetensors' flax reader also
    takes bfloat16, which NumPy cannot), checked finite."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="flax") as f:
            weights = {key: np.asarray(f.get_tensor(key).astype(jnp.float32)) for key in f.keys()}
    except SafetensorError as err:  # `header too small`, `incomplete metadata`: truncated, or
        # not a safetensors file at all
        raise ValueError(f"{path} is not a readable .safetensors file ({err}): it is truncated "
                         f"or not in the safetensors format; download or write it again") from None
    check_finite(weights, path)
    return weights


def write_safetensors(state_dict: Mapping[str, Any], path, metadata: dict | None = None) -> Path:
    """Write {name: tensor} (torch tensors or NumPy arrays) as .safetensors with the usual file
    mode (0666 less the umask; the safetensors writer makes its files private, 0600)."""
    path = Path(path)
    arrays = {k: np.ascontiguousarray(v if isinstance(v, np.ndarray) else v.detach().cpu().numpy())
              for k, v in state_dict.items()}
    from safetensors.numpy import save_file

    save_file(arrays, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return path


class NonFiniteWeightsError(ValueError):
    """Weights holding NaN or Inf: a corrupt file or the checkpoint of a diverged run. Such
    weights would sample black images and fine-tune into NaN losses without another word."""


def _count_nonfinite(value) -> int:
    """The NaN/Inf entries of one torch, JAX or NumPy array (0 for integer arrays)."""
    if hasattr(value, "detach"):  # torch.Tensor: checked where it is, no NumPy copy
        return 0 if not value.is_floating_point() else int((~value.isfinite()).sum())
    if isinstance(value, jax.Array):  # possibly sharded: reduced on its devices
        if not jnp.issubdtype(value.dtype, jnp.inexact):
            return 0
        return int(jnp.sum(~jnp.isfinite(value)))
    value = np.asarray(value)
    return 0 if not np.issubdtype(value.dtype, np.inexact) else int(np.sum(~np.isfinite(value)))


def check_finite(weights: Mapping[str, Any], where: str | os.PathLike) -> None:
    """Raise NonFiniteWeightsError naming `where` (the file) and the first key (in the order of
    `weights`) whose values are not all finite."""
    for key, value in weights.items():
        bad = _count_nonfinite(value)
        if bad:
            size = int(np.prod(getattr(value, "shape", ())))
            raise NonFiniteWeightsError(
                f"{where}: weight {key!r} holds {bad} NaN/Inf value(s) of {size}: the file is "
                f"corrupt or comes from a run that diverged; use another checkpoint")


def check_model_finite(model: nnx.Module, where: str | os.PathLike) -> None:
    """`check_finite` of every variable of an NNX model, named by its path (blocks/0/attn/...)."""
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]
    check_finite({"/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path): leaf
                  for path, leaf in leaves}, where)


# A JSON type check: a Python type, a tuple of them, or "ints" for a list of integers.
_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               list: "a list", dict: "an object", type(None): "null"}


def _has_type(value, kind) -> bool:
    if kind == "ints":
        return isinstance(value, list) and all(_has_type(v, int) for v in value) and bool(value)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):  # JSON true/false is not a number
        return bool in kinds
    # A JSON number written without a fraction (1) is an int to Python, still a valid float.
    return any(isinstance(value, (int, float) if k is float else k) for k in kinds)


def _type_name(kind) -> str:
    if kind == "ints":
        return "a non-empty list of integers"
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)


def read_config_json(path: str | os.PathLike, required: Mapping[str, Any],
                     optional: Mapping[str, Any] = {}) -> dict[str, Any]:
    """The object in the config.json at `path`, with the `required` keys present and every
    `required` / `optional` key present of its type (see `_has_type`); ValueError naming the file
    and the key otherwise."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): the file is damaged; download or "
                         f"write it again") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object of "
                         f"model settings")
    check_config(config, path, required, optional)
    return config


def check_config(config: Mapping[str, Any], path: str | os.PathLike, required: Mapping[str, Any],
                 optional: Mapping[str, Any] = {}) -> None:
    """`read_config_json`'s checks of an already read config (from the file at `path`)."""
    missing = sorted(set(required) - set(config))
    if missing:
        raise ValueError(f"{path} lacks the key(s) {missing}: not a complete model config")
    for key, kind in {**optional, **required}.items():
        if key in config and not _has_type(config[key], kind):
            raise ValueError(f"{path}: {key!r} is {config[key]!r}, expected {_type_name(kind)}")
