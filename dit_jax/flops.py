"""Analytic cost of a DiT and the peak rates used for MFU (docs/numerics.md#cost-and-mfu).

The paper's "Gflops" are multiply-accumulates (MACs) of one forward pass of one image, counted
over the matrix products: every Linear and the patch convolution, plus the two attention
products (QKᵀ and AV, T²·D each). Element-wise work (norms, softmax, activations, modulation) is
not counted. This count reproduces the paper's table (XL/2 256 px: 118.64; B/4: 5.56; S/2: 6.06)
to within 0.1%, and follows the block kind (`DiTConfig.block`): the paper's cross-attention block
costs XL/2 about 16% more, in-context 0.6% more, adaLN slightly less (docs/blocks.md#cost).

Model FLOPs of one training step = 6 × forward MACs × images: 2 FLOPs per MAC, and the backward
pass costs twice the forward; recomputation under remat is not counted, as usual for MFU.
"""

from __future__ import annotations

import jax.numpy as jnp

from dit_jax.models.dit import TIMESTEP_FREQ_DIM, DiTConfig


def forward_macs(cfg: DiTConfig) -> int:
    """Multiply-accumulates of one forward pass of one image, for the block kind `cfg.block`
    (docs/blocks.md#cost)."""
    d, p = cfg.hidden_size, cfg.patch_size
    gh, gw = cfg.grid_size
    tokens = gh * gw
    mlp = int(d * cfg.mlp_ratio)
    context = 2 if cfg.num_classes > 0 else 1  # conditioning tokens: [t_emb, y_emb] or [t_emb]

    def transformer(n):  # self-attention and MLP over n tokens
        return (n * d * 3 * d  # qkv
                + 2 * n * n * d  # QKᵀ and attention-weighted V
                + n * d * d  # attention output projection
                + 2 * n * d * mlp)  # MLP

    patch_embed = tokens * (p * p * cfg.in_channels) * d
    timestep_mlp = TIMESTEP_FREQ_DIM * d + d * d
    if cfg.block == "adaln_zero":
        per_block = d * 6 * d + transformer(tokens)  # the modulation: once per image, not per token
    elif cfg.block == "adaln":
        per_block = d * 4 * d + transformer(tokens)  # shift and scale only, no gates
    elif cfg.block == "cross_attention":
        per_block = transformer(tokens) + (
            2 * tokens * d * d  # queries and output projection, per image token
            + 2 * context * d * d  # keys and values of the conditioning tokens
            + 2 * tokens * context * d)  # QKᵀ and attention-weighted V over those few keys
    elif cfg.block == "in_context":
        per_block = transformer(tokens + context)  # the conditioning tokens join the sequence
    else:
        raise ValueError(f"unknown block {cfg.block!r}")
    final = tokens * d * (p * p * cfg.out_channels)
    if cfg.block in ("adaln_zero", "adaln"):
        final += d * 2 * d  # the final layer's adaptive shift and scale
    return patch_embed + timestep_mlp + cfg.depth * per_block + final


def train_flops_per_image(cfg: DiTConfig) -> int:
    return 6 * forward_macs(cfg)


# Dense peak TFLOP/s per JAX device for 16-bit matrix work (bf16/fp16), by a substring of
# `device.device_kind`. First match wins, so specific names come before general ones. A TPU v2/v3
# device is one core (half a chip); v4 and later expose one device per chip.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("V100", 125.0),
    ("TPU v6", 918.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
    ("TPU v3", 61.5),
    ("TPU v2", 22.5),
)


# Devices without TF32 tensor cores: float32 matmuls run on the plain FP32 units.
FP32_TFLOPS_WITHOUT_TF32 = {"V100": 15.7}


def peak_flops_per_device(device_kind: str, platform: str, override_tflops: float = 0.0,
                          dtype="bfloat16") -> float | None:
    """FLOP/s of one device for matmuls in `dtype` (the model's compute dtype), or None where no
    meaningful peak exists (CPU) or the device is unknown. `override_tflops` > 0 wins over the
    table. float32 matmuls run, at JAX's default precision, as TF32 on NVIDIA GPUs (half the
    16-bit rate on Ampere and later) and as one bfloat16 pass on TPUs (the 16-bit rate)."""
    if override_tflops and override_tflops > 0:
        return float(override_tflops) * 1e12
    if platform == "cpu":
        return None
    sixteen_bit = jnp.dtype(dtype).itemsize <= 2
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            if sixteen_bit or platform == "tpu":
                return tflops * 1e12
            return FP32_TFLOPS_WITHOUT_TF32.get(name, tflops / 2) * 1e12
    return None
