"""SiT and REPA checkpoints (PyTorch) ↔ the DiT of this project, read in SiT's convention.

- SiT (github willisma/SiT, `SiT-XL-2-256x256.pt` and its train.py dicts): the official DiT keys
  and shapes, learned-sigma head included. A SiT file cannot be told from a DiT file by its keys:
  `kind="sit"` says which it is. It loads as the same DiT; `dit_jax.models.sit.sit_forward` calls it
  as SiT does (t in [0, 1], first in_channels outputs = the velocity).
- REPA (github sihyun-yu/REPA, `last.pt` and train.py dicts with "ema"): the DiT keys without
  learned sigma (final layer p²·in_channels outputs), plus `projectors.*` (the alignment heads,
  used only in training: dropped here), and the time reversed: REPA's t = 1 is noise, its velocity
  is ε − x. Loading with `kind="repa"` folds the reversal into the weights, so the returned DiT
  speaks SiT's convention exactly like a SiT checkpoint: v_sit(x, t) = −v_repa(x, 1 − t).
  The timestep embedding [cos(t·f), sin(t·f)] of 1 − t is a fixed linear map of the embedding of t
  (per frequency f, a reflection [[cos f, sin f], [sin f, −cos f]], its own inverse), so it is
  multiplied into the first timestep-MLP weight; the sign is folded into the final linear layer.
  The fold is exact up to float32 rounding of the folded weights and is undone on export
  (`to_torch(model, kind="repa")`). It is tied to the timestep frequencies of the numerics the
  model was loaded with (REPA's are the official ones): do not switch `numerics` afterwards.

A REPA checkpoint is recognised by its projectors.* keys whatever `kind` says.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dit_jax.models.dit import NUMERICS, TIMESTEP_FREQ_DIM, DiT
from dit_jax.port import dit as dit_port
from dit_jax.port.keys import require_torch

KINDS = ("dit", "sit", "repa")
REPA_PREFIX = "projectors."
TIME_WEIGHT = "t_embedder.mlp.0.weight"
FINAL = ("final_layer.linear.weight", "final_layer.linear.bias")


def detect_kind(state_dict: Mapping[str, Any]) -> str | None:
    """"repa" when the keys show it (projectors.*), else None: DiT and SiT share one layout."""
    return "repa" if any(k.startswith(REPA_PREFIX) for k in state_dict) else None


def time_reversal_matrix(numerics: str = "official", dim: int = TIMESTEP_FREQ_DIM) -> np.ndarray:
    """M (dim, dim), float64, with emb(1 − t) = M @ emb(t) for emb = [cos(t·f), sin(t·f)], f the
    model's timestep frequencies; M @ M = I."""
    half = dim // 2
    shift = NUMERICS[numerics]["timestep_freq_shift"]
    freqs = np.exp(-math.log(10000.0) * np.arange(half, dtype=np.float64) / (half - shift))
    c, s = np.diag(np.cos(freqs)), np.diag(np.sin(freqs))
    return np.block([[c, s], [s, -c]])


def reverse_time(state_dict: Mapping[str, np.ndarray], numerics: str = "official"
                 ) -> dict[str, np.ndarray]:
    """The official-layout weights of the model v'(x, t) = −v(x, 1 − t): the REPA ↔ SiT time
    convention, either way (the map is its own inverse). Projectors are not touched."""
    out = dict(state_dict)
    weight = np.asarray(state_dict[TIME_WEIGHT], np.float64)  # torch layout (out, in)
    out[TIME_WEIGHT] = (weight @ time_reversal_matrix(numerics, weight.shape[1])).astype(np.float32)
    for key in FINAL:
        out[key] = -np.asarray(state_dict[key])
    return out


def _check_kind(kind: str) -> None:
    if kind not in KINDS + ("auto",):
        raise ValueError(f"unknown checkpoint kind {kind!r}; choose one of {KINDS} (or 'auto')")


def from_torch(path_or_state_dict, *, kind: str = "dit", name: str | None = None,
               image_size: int | tuple[int, int] | None = None, which: str = "ema",
               **overrides) -> DiT:
    """A DiT from a PyTorch checkpoint of `kind`:

    - "dit" (default): the official DiT layout (see `dit_jax.port.dit.from_torch`);
    - "sit": the same layout and the same DiT, to be called with t in [0, 1] (`sit_forward`);
    - "repa": projectors dropped, REPA's reversed time folded in (SiT's convention from then on);
    - "auto": "repa" when the file has projectors.* keys; a DiT-layout file raises, since DiT and
      SiT cannot be told apart by their keys.

    The other arguments are those of `dit_jax.port.dit.from_torch`.
    """
    _check_kind(kind)
    state_dict, args = dit_port.read_checkpoint(path_or_state_dict, which=which)
    found = detect_kind(state_dict)
    where = (f"{path_or_state_dict}" if isinstance(path_or_state_dict, (str, os.PathLike))
             else "the state_dict")
    if kind == "auto":
        if found is None:
            raise ValueError(f"{where} has the DiT layout, which DiT and SiT checkpoints share: "
                             f"the keys cannot say which; pass kind='dit' or kind='sit'")
        kind = found
    if found == "repa" and kind != "repa":
        raise ValueError(f"{where} has REPA's projectors.* keys: pass kind='repa' (REPA runs time "
                         f"backwards; kind={kind!r} would read it in the wrong convention)")
    if kind != "repa":
        return dit_port.from_state_dict(state_dict, args, name=name, image_size=image_size,
                                        **overrides)
    extra = [k for k in state_dict if k.startswith("blocks.") and ("q_norm" in k or "k_norm" in k)]
    if extra:
        raise ValueError(f"{where}: keys {sorted(extra)[:4]} show a REPA model trained with "
                         f"--qk-norm, which this DiT does not implement")
    denoiser = {k: v for k, v in state_dict.items() if not k.startswith(REPA_PREFIX)}
    model = dit_port.from_state_dict(
        reverse_time(denoiser, overrides.get("numerics", "official")), args, name=name,
        image_size=image_size, **overrides)
    if model.config.learn_sigma:
        raise ValueError(f"{where}: final_layer.linear has 2 × {model.config.in_channels} channels "
                         f"per patch pixel, REPA's has {model.config.in_channels} (no learned "
                         f"sigma): this is not a REPA checkpoint; pass kind='sit' or kind='dit'")
    return model


def to_torch(model: DiT, *, kind: str = "dit") -> dict[str, Any]:
    """The state_dict of `model` in the layout of `kind`: "dit"/"sit" the official layout; "repa"
    REPA's (time reversed back, only the in_channels velocity outputs, no projectors: REPA's code
    loads it with `load_state_dict(..., strict=False)`, the projectors being training-only)."""
    torch = require_torch("exporting PyTorch tensors")

    _check_kind(kind)
    tensors = dit_port.to_torch(model)
    if kind != "repa":
        return tensors
    cfg = model.config
    state = {k: v.numpy() for k, v in tensors.items()}
    if cfg.learn_sigma:  # outputs are ordered (patch row, patch col, channel): keep channels < C
        p, c = cfg.patch_size, cfg.in_channels
        weight, bias = state[FINAL[0]], state[FINAL[1]]
        state[FINAL[0]] = weight.reshape(p, p, 2 * c, -1)[:, :, :c].reshape(p * p * c, -1)
        state[FINAL[1]] = bias.reshape(p, p, 2 * c)[:, :, :c].reshape(-1)
    state = reverse_time(state, cfg.numerics)
    return {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in state.items()}


def save_torch(model: DiT, path: str | os.PathLike, *, kind: str = "dit") -> Path:
    """Write `to_torch(model, kind=kind)` as .pt/.pth (torch.save) or .safetensors."""
    if kind != "repa":
        return dit_port.save_torch(model, path)
    if model.config.numerics != "official":
        warnings.warn(f"the model runs with numerics={model.config.numerics!r}; REPA's code runs "
                      f"the official numerics")
    return dit_port.write_torch(to_torch(model, kind=kind), path)
