"""PixArt-α (Chen et al. 2023, "PixArt-α: Fast Training of Diffusion Transformer for
Photorealistic Text-to-Image Synthesis") in Flax NNX: a DiT conditioned on text tokens.

The same function as diffusers' `PixArtTransformer2DModel` and the original `PixArt` / `PixArtMS`
(github PixArt-alpha/PixArt-alpha), to float32 rounding, in channels-last layout. It is also this
project's text-conditioned DiT: a small PixArtConfig is a text-to-image model of any size. What
differs from the class-conditional DiT (see docs/pixart.md):

- adaLN-single: the timestep embedding goes through ONE Linear(SiLU(·)) → 6·D (`t_block`) shared
  by all blocks; each block adds its own learned (6, D) `scale_shift_table` and splits shift_msa,
  scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp as DiT does;
- a cross-attention to the projected text tokens after the self-attention in every block, without
  norm or gate, masked so that padding tokens take no part;
- the caption projection Linear(caption_channels, D) → GELU(tanh) → Linear(D, D);
- micro-conditions (the 1024-MS model): resolution [h, w] and aspect ratio h/w, each through the
  256-dim timestep sinusoid and an MLP to D/3, concatenated and added to the timestep embedding;
- the final layer's shift and scale are a learned (2, D) table plus the raw timestep embedding;
- the position table's positions are scaled: arange(n) / (n / base_size) / interpolation_scale,
  recomputed for every input size (any resolution runs);
- an optional fixed null caption (the original's `y_embedding`) for caption dropout in training.

Module and parameter names follow the original PixArt code (x_embedder, t_embedder, t_block,
y_embedder.y_proj, csize_embedder, ar_embedder, blocks.i.{attn, cross_attn, mlp,
scale_shift_table}, final_layer), so that its checkpoints map one to one. Every parameter carries
logical axis names, mapped to mesh axes by `dit_jax.sharding`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.models.dit import (NORM_EPS, TOKENS_AXES, VECTOR_AXES, Attention, Mlp,
                                 TimestepEmbedder, _linear, _meta, call_block,
                                 check_execution_options, constrain, layer_norm, modulate,
                                 sincos_1d, unpatchify)


@dataclasses.dataclass(frozen=True)
class PixArtConfig:
    """Hyper-parameters of one PixArt-α transformer.

    `input_size` (the original's name; diffusers says sample_size) is the latent side the model was
    trained at (64 for PixArt-XL-2-512x512, 128 for -1024-MS): it fixes the position table's base
    size (input_size // patch_size); inputs of any size divisible by the patch run.
    `micro_conditions` None means "as diffusers decides": on exactly when input_size == 128.
    `interpolation_scale` (the original's lewei_scale) None means max(input_size // 64, 1).
    `class_dropout_prob` is the caption dropout of training (the original's name): a dropped
    example's text tokens are replaced by the null caption, a fixed (model_max_length,
    caption_channels) table; model_max_length 0 means no null caption (diffusers checkpoints do
    not store one)."""

    input_size: int = 128
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    caption_channels: int = 4096
    learn_sigma: bool = True
    micro_conditions: bool | None = None
    interpolation_scale: float | None = None
    class_dropout_prob: float = 0.1
    model_max_length: int = 120
    dtype: Any = jnp.float32  # compute dtype of the attention, MLP and caption matmuls
    # Of the self-attention ("xla", "cudnn", "splash", "auto", as for DiT). The cross-attention
    # always runs XLA's: its keys are the ≤ 120 text tokens, the kernels' gains are elsewhere.
    attention_impl: str = "xla"
    remat: bool | str = False

    def __post_init__(self):
        if self.micro_conditions is None:
            object.__setattr__(self, "micro_conditions", self.input_size == 128)
        if self.interpolation_scale is None:
            object.__setattr__(self, "interpolation_scale", float(max(self.input_size // 64, 1)))
        d = self.hidden_size
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size "
                             f"{self.patch_size}")
        if d % self.num_heads:
            raise ValueError(f"hidden_size {d} is not divisible by num_heads {self.num_heads}")
        if d % 4:
            raise ValueError("hidden_size must be divisible by 4 for the 2-D sin-cos embedding")
        if self.micro_conditions and d % 3:
            raise ValueError(f"micro-conditions embed resolution and aspect ratio in hidden_size/3 "
                             f"channels each: hidden_size {d} is not divisible by 3")
        check_execution_options(self.attention_impl, self.remat)

    @property
    def base_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels


def pixart_sincos_2d(embed_dim: int, grid_size: tuple[int, int], base_size: int,
                     interpolation_scale: float) -> np.ndarray:
    """The PixArt position table (h·w, embed_dim), float64, row-major over the token grid: the
    DiT/MAE 2-D sin-cos table (first half of the channels the column coordinate) at positions
    arange(n) / (n / base_size) / interpolation_scale. The positions are computed in float32 and
    the sines in float64, as both PixArt implementations do, so that non-integer positions round
    the same way."""
    grid_h, grid_w = grid_size

    def positions(n):
        return (np.arange(n, dtype=np.float32) / np.float32(n / base_size)
                / np.float32(interpolation_scale)).astype(np.float64)

    cols, rows = np.meshgrid(positions(grid_w), positions(grid_h))
    return np.concatenate(
        [sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)


class CrossAttention(nnx.Module):
    """Multi-head attention from the image tokens (queries) to the text tokens (keys, values), with
    biases, no norm and no gate (the original `MultiHeadCrossAttention`: q_linear, kv_linear with
    rows [k | v] head-major, proj). Text tokens whose mask is False take no part: their scores are
    dropped before the softmax, which is the original's behaviour (it removes padded tokens) and
    equals diffusers' additive −10000 bias wherever that underflows to zero weight."""

    def __init__(self, hidden_size: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.q_linear = _linear(hidden_size, hidden_size, rngs=rngs, names=("embed", "qkv"),
                                dtype=dtype)
        self.kv_linear = _linear(hidden_size, 2 * hidden_size, rngs=rngs, names=("embed", "qkv"),
                                 dtype=dtype)
        # Zero as released: a fresh model ignores the text until the projection learns.
        self.proj = _linear(hidden_size, hidden_size, rngs=rngs, names=("heads", "embed"),
                            dtype=dtype, kernel_init=nnx.initializers.zeros_init())

    def __call__(self, x, cond, mask):
        batch, tokens, width = x.shape
        heads, head_dim = self.num_heads, width // self.num_heads
        q = self.q_linear(x).reshape(batch, tokens, heads, head_dim)
        kv = self.kv_linear(cond).reshape(batch, cond.shape[1], 2, heads, head_dim)
        out = jax.nn.dot_product_attention(q, kv[:, :, 0], kv[:, :, 1],
                                           mask=mask[:, None, None, :], implementation="xla")
        return self.proj(out.reshape(batch, tokens, width))


class CaptionProjection(nnx.Module):
    """fc1: caption_channels → D, GELU(tanh), fc2: D → D (weights N(0, 0.02) as released)."""

    def __init__(self, caption_channels: int, hidden_size: int, *, dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.fc1 = _linear(caption_channels, hidden_size, rngs=rngs, names=("caption", "embed"),
                           dtype=dtype, kernel_init=init)
        self.fc2 = _linear(hidden_size, hidden_size, rngs=rngs, names=("embed_in", "embed"),
                           dtype=dtype, kernel_init=init)

    def __call__(self, text):
        return self.fc2(nnx.gelu(self.fc1(text), approximate=True))


class CaptionEmbedder(nnx.Module):
    """The caption projection `y_proj` (fc1: caption_channels → D, GELU(tanh), fc2: D → D) and
    the null caption `y_embedding` used by caption dropout (when model_max_length > 0)."""

    def __init__(self, cfg: PixArtConfig, *, rngs: nnx.Rngs):
        d, c = cfg.hidden_size, cfg.caption_channels
        self.dropout_prob = cfg.class_dropout_prob
        self.y_proj = CaptionProjection(c, d, dtype=cfg.dtype, rngs=rngs)
        # Fixed (a buffer in the original, never trained): randn / √caption_channels.
        self.y_embedding = (nnx.Variable(
            jax.random.normal(rngs.params(), (cfg.model_max_length, c), jnp.float32) / c ** 0.5,
            **_meta(None, "caption")) if cfg.model_max_length > 0 else None)

    def drop_captions(self, text, key):
        """Each example's tokens replaced by the null caption with probability dropout_prob."""
        if self.y_embedding is None:
            raise ValueError("caption dropout needs the null caption, which this PixArt does not "
                             "have (model_max_length=0; diffusers checkpoints store none): set "
                             "class_dropout_prob=0 and drop captions in the data pipeline instead")
        null = self.y_embedding[...]
        if text.shape[1:] != null.shape:
            raise ValueError(f"caption dropout swaps in the null caption of shape {null.shape}: "
                             f"text tokens must then be (N, {null.shape[0]}, {null.shape[1]}), "
                             f"got {text.shape}")
        drop = jax.random.uniform(key, (text.shape[0],)) < self.dropout_prob
        return jnp.where(drop[:, None, None], null.astype(text.dtype), text)

    def __call__(self, text):
        return self.y_proj(text)


class PixArtBlock(nnx.Module):
    """Self-attention (adaLN-single modulated, gated), cross-attention to the text (no norm, no
    gate), MLP (modulated, gated). The residual stream, norms and modulation stay float32."""

    def __init__(self, cfg: PixArtConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.dtype = cfg.dtype
        self.attn = Attention(d, cfg.num_heads, dtype=cfg.dtype, implementation=cfg.attention_impl,
                              rngs=rngs)
        self.cross_attn = CrossAttention(d, cfg.num_heads, dtype=cfg.dtype, rngs=rngs)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio), dtype=cfg.dtype, rngs=rngs)
        self.scale_shift_table = nnx.Param(
            jax.random.normal(rngs.params(), (6, d), jnp.float32) / d ** 0.5,
            **_meta(None, "embed"))

    def __call__(self, x, y, t0, mask):
        # t0: (N, 6·D), the shared adaLN-single output; + this block's table.
        # The modulation and the branch outputs are pinned to the batch layout as in DiTBlock
        # (`constrain`: docs/numerics.md, "Sharded activations").
        mod = self.scale_shift_table[...][None] + constrain(t0, VECTOR_AXES).reshape(
            t0.shape[0], 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            mod[:, i] for i in range(6))
        h = modulate(layer_norm(x, NORM_EPS), shift_msa, scale_msa)
        attn = constrain(self.attn(h.astype(self.dtype)), TOKENS_AXES)
        x = x + gate_msa[:, None] * attn.astype(jnp.float32)
        x = x + constrain(self.cross_attn(x.astype(self.dtype), y, mask),
                          TOKENS_AXES).astype(jnp.float32)
        h = modulate(layer_norm(x, NORM_EPS), shift_mlp, scale_mlp)
        mlp = constrain(self.mlp(h.astype(self.dtype)), TOKENS_AXES)
        return x + gate_mlp[:, None] * mlp.astype(jnp.float32)


class T2IFinalLayer(nnx.Module):
    """shift, scale = table (2, D) + the raw timestep embedding; LN, modulate, Linear."""

    def __init__(self, cfg: PixArtConfig, *, rngs: nnx.Rngs):
        d, p = cfg.hidden_size, cfg.patch_size
        self.scale_shift_table = nnx.Param(
            jax.random.normal(rngs.params(), (2, d), jnp.float32) / d ** 0.5,
            **_meta(None, "embed"))
        self.linear = _linear(d, p * p * cfg.out_channels, rngs=rngs, names=("embed", "patch_out"),
                              kernel_init=nnx.initializers.zeros_init())

    def __call__(self, x, temb):
        table = self.scale_shift_table[...]
        shift, scale = table[0][None] + temb, table[1][None] + temb
        return self.linear(modulate(layer_norm(x, NORM_EPS), shift, scale))


class PixArt(nnx.Module):
    """The PixArt-α transformer, NHWC.

    `model(x, t, text_tokens, text_mask=None, *, resolution=None, aspect_ratio=None, train=False,
    rngs=None)`: x (N, H, W, in_channels), H and W multiples of the patch (any size: the position
    table is rebuilt for it); t (N,) timesteps of the 1000-step process; text_tokens (N, L,
    caption_channels), e.g. T5 hidden states; text_mask (N, L), true/1 for real tokens (None: all
    real). With micro-conditions, resolution (N, 2) is [height, width] in pixels and aspect_ratio
    (N,) or (N, 1) is height / width (both broadcast over the batch). Returns (N, H, W,
    out_channels): ε, then the variance interpolation values when learn_sigma. With `train=True`
    and class_dropout_prob > 0, captions are replaced by the null caption at that rate, using
    `rngs` (an nnx.Rngs with a `dropout` stream, or a key); the mask is kept, as in the original.
    `condition` (N, D), not in PixArt-α: a vector added to the timestep embedding, so that it
    drives every block's modulation (the pooled text of `TextModelConfig.pooled_text`).
    """

    def __init__(self, cfg: PixArtConfig | None = None, *, rngs: nnx.Rngs | None = None,
                 **kwargs):
        if cfg is None:
            cfg = PixArtConfig(**kwargs)
        elif kwargs:
            cfg = dataclasses.replace(cfg, **kwargs)
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        normal = nnx.initializers.normal(0.02)
        # xavier-uniform on the flattened (D, C·p·p) view, as released.
        conv_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform",
                                                      in_axis=(0, 1, 2), out_axis=3)
        self.x_embedder = nnx.Conv(
            cfg.in_channels, d, kernel_size=(p, p), strides=(p, p), padding="VALID",
            kernel_init=conv_init, bias_init=nnx.initializers.zeros_init(), rngs=rngs,
            kernel_metadata=_meta(None, None, None, "embed"), bias_metadata=_meta("embed"))
        self.t_embedder = TimestepEmbedder(d, freq_shift=0.0, rngs=rngs)
        if cfg.micro_conditions:
            self.csize_embedder = TimestepEmbedder(d // 3, freq_shift=0.0, rngs=rngs)
            self.ar_embedder = TimestepEmbedder(d // 3, freq_shift=0.0, rngs=rngs)
        else:
            self.csize_embedder = self.ar_embedder = None
        self.t_block = _linear(d, 6 * d, rngs=rngs, names=("embed", "modulation"),
                               kernel_init=normal)
        self.y_embedder = CaptionEmbedder(cfg, rngs=rngs)
        self.blocks = nnx.List([PixArtBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.final_layer = T2IFinalLayer(cfg, rngs=rngs)

    def pos_embed(self, grid_size: tuple[int, int]) -> np.ndarray:
        """The (1, h·w, D) float32 position table for a token grid (a trace-time constant)."""
        cfg = self.config
        table = pixart_sincos_2d(cfg.hidden_size, grid_size, cfg.base_size,
                                 cfg.interpolation_scale)
        return table.astype(np.float32)[None]

    def timestep_embedding(self, t, batch: int, resolution=None, aspect_ratio=None):
        """temb (N, D): the timestep embedding, plus the micro-conditions if the model has them."""
        temb = self.t_embedder(jnp.broadcast_to(jnp.asarray(t), (batch,)))
        if not self.config.micro_conditions:
            return temb
        if resolution is None or aspect_ratio is None:
            raise ValueError("this PixArt uses micro-conditions (a 1024-MS model): pass "
                             "resolution=[height, width] in pixels and aspect_ratio=height/width")
        resolution = jnp.broadcast_to(jnp.asarray(resolution, jnp.float32).reshape(-1, 2),
                                      (batch, 2))
        aspect_ratio = jnp.broadcast_to(jnp.asarray(aspect_ratio, jnp.float32).reshape(-1),
                                        (batch,))
        size = self.csize_embedder(resolution.reshape(-1)).reshape(batch, -1)  # [emb(h), emb(w)]
        return temb + jnp.concatenate([size, self.ar_embedder(aspect_ratio)], axis=-1)

    def __call__(self, x, t, text_tokens, text_mask=None, *, resolution=None, aspect_ratio=None,
                 condition=None, train: bool = False, rngs=None):
        cfg = self.config
        batch, height, width, _ = x.shape
        p = cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"input {height}x{width} is not divisible by patch_size {p}")
        if text_tokens.ndim != 3 or text_tokens.shape[0] != batch or (
                text_tokens.shape[2] != cfg.caption_channels):
            raise ValueError(f"text_tokens must be (N={batch}, L, caption_channels="
                             f"{cfg.caption_channels}), got {text_tokens.shape}")
        if text_mask is None:
            text_mask = jnp.ones(text_tokens.shape[:2], bool)
        elif text_mask.shape != text_tokens.shape[:2]:
            raise ValueError(f"text_mask must be (N, L) = {text_tokens.shape[:2]}, got "
                             f"{text_mask.shape}")
        grid = (height // p, width // p)
        tokens = self.x_embedder(x.astype(jnp.float32)).reshape(batch, -1, cfg.hidden_size)
        tokens = tokens + jnp.asarray(self.pos_embed(grid))  # (N, T, D)
        temb = self.timestep_embedding(t, batch, resolution, aspect_ratio)  # (N, D)
        if condition is not None:  # a global conditioning vector beside t (e.g. pooled text)
            temb = temb + condition
        t0 = self.t_block(nnx.silu(temb))  # (N, 6·D), shared by all blocks
        if train and cfg.class_dropout_prob > 0:
            if rngs is None:
                raise ValueError("caption dropout in training needs rngs "
                                 "(e.g. nnx.Rngs(dropout=key))")
            key = rngs.dropout() if isinstance(rngs, nnx.Rngs) else rngs
            text_tokens = self.y_embedder.drop_captions(text_tokens, key)
        y = self.y_embedder(text_tokens.astype(cfg.dtype))  # (N, L, D)
        tokens = self.run_blocks(tokens, y, t0, jnp.asarray(text_mask).astype(bool))
        out = self.final_layer(tokens, temb)  # (N, T, p·p·out_channels)
        return unpatchify(out, grid, p)  # (N, H, W, out_channels)

    def run_blocks(self, x, y, t0, mask):
        for block in self.blocks:
            x = call_block(block, self.config.remat, x, y, t0, mask)
        return x

