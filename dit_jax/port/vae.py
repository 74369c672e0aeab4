"""diffusers-format AutoencoderKL weights (stabilityai/sd-vae-ft-ema, -mse, ...) → dit_jax's NNX VAE.

A diffusers VAE folder holds config.json and diffusion_pytorch_model.safetensors (or .bin). The
state dict is loaded strictly: every parameter of the NNX model must be present with the right
shape and nothing may be left over. Both attention key spellings are accepted: the current
`to_q / to_k / to_v / to_out.0` and the legacy `query / key / value / proj_attn` of old diffusers
checkpoints, whose weights may also be 1x1-conv shaped (C, C, 1, 1).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.port.keys import (check_finite, check_keys, read_config_json, read_safetensors,
                               require_torch)
from dit_jax.port.paths import looks_like_hub_id, missing_path_message
from dit_jax.models.vae import AutoencoderKL, VAEConfig

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_SHARD_INDEX = "diffusion_pytorch_model.safetensors.index.json"

_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")

_HOW_TO = ("expected a diffusers AutoencoderKL folder with config.json and "
           "diffusion_pytorch_model.safetensors (or .bin), such as one downloaded from "
           "stabilityai/sd-vae-ft-ema (`huggingface-cli download stabilityai/sd-vae-ft-ema "
           "--local-dir DIR`), or a Hugging Face hub id such as 'stabilityai/sd-vae-ft-ema' "
           "when online; pass it as load_vae(DIR_OR_HUB_ID)")


class VAEWeightsError(ValueError):
    """A state dict that does not fit the VAE config: missing, unexpected or mis-shaped keys."""


# ----------------------------------------------------------------------------------------------
# Key and layout mapping


def _torch_key(path: tuple[Any, ...]) -> str:
    """NNX state path → diffusers state-dict key. The NNX modules mirror diffusers' names except
    where diffusers wraps a single module in a list."""
    parts = [str(p) for p in path]
    leaf = parts.pop()
    renamed = []
    for part in parts:
        renamed.append({"downsample": "downsamplers.0", "upsample": "upsamplers.0",
                        "attention": "attentions.0", "to_out": "to_out.0"}.get(part, part))
    leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    return ".".join(renamed + [leaf])


def _to_flax(value: np.ndarray, flax_shape: tuple[int, ...], key: str) -> np.ndarray:
    """A torch-layout array → the NNX layout of `flax_shape`, or VAEWeightsError naming the key."""
    if len(flax_shape) == 4:  # conv: (O, I, kh, kw) → (kh, kw, I, O)
        expected = (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
        if value.shape == expected:
            return value.transpose(2, 3, 1, 0)
    elif len(flax_shape) == 2:  # linear: (O, I) → (I, O); legacy attention may be (O, I, 1, 1)
        expected = (flax_shape[1], flax_shape[0])
        if value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]
        if value.shape == expected:
            return value.T
    else:
        expected = flax_shape
        if value.shape == expected:
            return value
    raise VAEWeightsError(f"shape mismatch for {key!r}: expected {tuple(expected)} (PyTorch layout), "
                          f"got {tuple(value.shape)}")


def _as_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor; .float() first because numpy has no bfloat16
        return value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def normalize_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Legacy attention key names → current ones (values untouched). Refuses a checkpoint that
    spells the same parameter both ways, rather than picking one."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        match = _LEGACY_RE.match(key)
        new_key = (f"{match[1]}.{_LEGACY_ATTENTION[match[2]]}.{match[3]}" if match else key)
        if new_key in out:
            raise VAEWeightsError(f"{key!r} and another key both give {new_key!r}")
        out[new_key] = value
    return out


def vae_from_torch_state_dict(state_dict: Mapping[str, Any],
                              config: VAEConfig | Mapping[str, Any] | None = None, *,
                              dtype=jnp.float32, precision=None) -> AutoencoderKL:
    """An AutoencoderKL (float32 parameters, `dtype` compute) from a diffusers AutoencoderKL
    state dict (torch tensors or numpy arrays) and its config (config.json dict or VAEConfig)."""
    cfg = config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config or {})
    # Built abstractly: no random initialisation of 84M parameters only to overwrite them.
    abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, dtype=dtype, precision=precision,
                                                    rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    weights = normalize_state_dict(state_dict)

    paths = jax.tree_util.tree_flatten_with_path(pure)[0]
    keys = {_torch_key(tuple(p.key for p in path)): (path, leaf) for path, leaf in paths}
    check_keys(weights, keys,
               f"state dict does not match the AutoencoderKL config (block_out_channels="
               f"{list(cfg.block_out_channels)}, layers_per_block={cfg.layers_per_block}, "
               f"latent_channels={cfg.latent_channels})", VAEWeightsError)

    arrays = {key: jnp.asarray(_to_flax(_as_numpy(weights[key]), leaf.shape, key), jnp.float32)
              for key, (_, leaf) in keys.items()}
    filled = jax.tree_util.tree_map_with_path(
        lambda path, _: arrays[_torch_key(tuple(p.key for p in path))], pure)
    nnx.replace_by_pure_dict(state, filled)
    return nnx.merge(graphdef, state)


def vae_to_torch_state_dict(vae: AutoencoderKL) -> dict[str, np.ndarray]:
    """The inverse mapping: diffusers key → float32 numpy array in PyTorch layout."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(vae)))[0]:
        value = np.asarray(leaf, np.float32)
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        elif value.ndim == 2:
            value = value.T
        out[_torch_key(tuple(p.key for p in path))] = np.ascontiguousarray(value)
    return out


# ----------------------------------------------------------------------------------------------
# Files


def _read_weights(folder: Path) -> dict[str, Any]:
    safetensors_file = folder / WEIGHT_FILES[0]
    if safetensors_file.is_file():
        return read_safetensors(safetensors_file)
    index = folder / _SHARD_INDEX
    if index.is_file():
        shards = sorted(set(read_config_json(index, {"weight_map": dict})["weight_map"].values()))
        out = {}
        for shard in shards:
            out.update(read_safetensors(folder / shard))
        return out
    bin_file = folder / WEIGHT_FILES[1]
    if bin_file.is_file():
        torch = require_torch(f"{bin_file} (a PyTorch pickle; or convert it to safetensors)")
        weights = torch.load(bin_file, map_location="cpu", weights_only=True)
        check_finite(weights, bin_file)
        return weights
    raise FileNotFoundError(f"no VAE weights in {folder} (looked for {', '.join(WEIGHT_FILES)}): "
                            f"{_HOW_TO}")


def _resolve_folder(path_or_hub_id: str | os.PathLike, subfolder: str | None) -> Path:
    spec = str(path_or_hub_id)
    local = Path(spec).expanduser()
    if local.exists():
        folder = local / subfolder if subfolder else local
        # A whole pipeline folder (e.g. a Stable Diffusion snapshot) keeps its VAE under vae/.
        if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
            folder = folder / "vae"
        return folder
    if not looks_like_hub_id(spec):
        raise FileNotFoundError(f"{missing_path_message(spec, 'VAE path')}: {_HOW_TO}")
    return _download(spec, subfolder)


def _download(repo_id: str, subfolder: str | None) -> Path:
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder}/" if subfolder else ""
    try:
        # safetensors first; the .bin (same weights, pickled) only for repos that lack it.
        root = Path(snapshot_download(
            repo_id, allow_patterns=[prefix + "config.json", prefix + WEIGHT_FILES[0]]))
        folder = root / subfolder if subfolder else root
        if not (folder / WEIGHT_FILES[0]).is_file():
            root = Path(snapshot_download(repo_id, allow_patterns=[prefix + WEIGHT_FILES[1]]))
    except Exception as e:
        raise FileNotFoundError(
            f"VAE {repo_id!r} is not a local folder and could not be fetched from the Hugging Face "
            f"hub ({type(e).__name__}: {e}): {_HOW_TO}") from e
    return root / subfolder if subfolder else root


# config.json keys that VAEConfig reads, with their JSON types (`read_config_json`).
CONFIG_TYPES = {"_class_name": str, "in_channels": int, "out_channels": int,
                "block_out_channels": "ints", "layers_per_block": int, "latent_channels": int,
                "norm_num_groups": int, "sample_size": (int, list), "scaling_factor": float,
                "shift_factor": (float, type(None)), "mid_block_add_attention": bool,
                "use_quant_conv": bool, "use_post_quant_conv": bool, "act_fn": str,
                "down_block_types": list, "up_block_types": list}

# Short names of the two VAEs the DiT paper used (sample.py --vae, train.py's config.vae, ...).
VAE_SHORTHANDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


def load_vae(path_or_hub_id: str | os.PathLike, *, dtype=jnp.float32, precision=None,
             subfolder: str | None = None) -> AutoencoderKL:
    """The NNX AutoencoderKL from a diffusers VAE folder (config.json +
    diffusion_pytorch_model.safetensors or .bin) or a hub id (downloaded through huggingface_hub,
    e.g. 'stabilityai/sd-vae-ft-ema', or "ema"/"mse" for the paper's two). `dtype` is the compute
    dtype; parameters stay float32."""
    path_or_hub_id = VAE_SHORTHANDS.get(str(path_or_hub_id), path_or_hub_id)
    folder = _resolve_folder(path_or_hub_id, subfolder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {folder}: {_HOW_TO}")
    config = read_config_json(config_file, {}, CONFIG_TYPES)
    try:
        config = VAEConfig.from_dict(config)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{config_file}: {err}") from None
    return vae_from_torch_state_dict(_read_weights(folder), config, dtype=dtype, precision=precision)
