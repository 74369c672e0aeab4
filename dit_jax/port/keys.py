"""What the DiT, SiT and VAE ports share: strict key matching, torch-free .safetensors reading
and writing, and the error that names the torch extra."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np


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
    takes bfloat16, which NumPy cannot)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="flax") as f:
            return {key: np.asarray(f.get_tensor(key).astype(jnp.float32)) for key in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable .safetensors file: {e}") from e


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
