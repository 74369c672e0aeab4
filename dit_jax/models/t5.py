"""The T5 encoder (T5 v1.1, as PixArt-α's text encoder t5-v1_1-xxl) in Flax NNX.

The same function as transformers' `T5EncoderModel` (modeling_t5), to float32 rounding. See
docs/t5.md for the architecture and its numerics:

- RMS norm w·x·rsqrt(mean(x²) + eps), no bias, computed in float32 whatever the compute dtype;
- pre-norm residual blocks: x += Attn(norm(x)); x += FFN(norm(x)); a final RMS norm;
- attention without biases and without the 1/√d scaling of q·k; a relative position bias (one
  learned scalar per head and bucket of the key-query distance) that only the first layer holds
  and every layer adds to its scores; padded keys are masked out;
- FFN wo(act(wi_0·x) · wi_1·x) for the gated variants (v1.1: "gated-gelu", GELU with the tanh
  approximation), wo(act(wi·x)) for the original T5 ("relu").

The residual stream, norms, position bias and softmax stay float32; `dtype` is the compute dtype
of the matmuls (bfloat16 for T5-XXL on accelerators), `param_dtype` the stored one. Every
parameter carries logical axis names (`out_sharding` metadata); `dit_jax.sharding` maps them to
mesh axes, so the 4.7B-parameter T5-XXL splits over a mesh like the DiT.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.models.dit import call_block, check_remat

# transformers' ACT2FN names that T5 configurations use ("gated-gelu" means gelu_new).
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

# transformers' T5Config fields that fix the encoder's function (the rest, decoder and dropout
# settings, do not touch the encoder's inference).
HF_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
             "relative_attention_num_buckets", "relative_attention_max_distance",
             "layer_norm_epsilon", "feed_forward_proj")

# google/t5-v1_1-xxl, the text encoder of PixArt-α (its config.json's encoder fields).
T5_CONFIGS: dict[str, dict[str, Any]] = {
    "t5-v1_1-xxl": dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                        num_heads=64, feed_forward_proj="gated-gelu"),
}


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    """Hyper-parameters of a T5 encoder, named as transformers' T5Config names them."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    dtype: Any = jnp.float32  # compute dtype of the matmuls
    param_dtype: Any = jnp.float32  # stored dtype of the weights
    # Rematerialise each block in the backward pass: True recomputes everything; the name of a
    # jax.checkpoint_policies policy keeps what it saves (as DiTConfig.remat).
    remat: bool | str = False

    def __post_init__(self):
        self.activation  # noqa: B018 (validates feed_forward_proj)
        check_remat(self.remat)

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def activation(self) -> str:
        """The ACT2FN name of the FFN activation, parsed as transformers parses it."""
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is neither "
                             f"'ACTIVATION' nor 'gated-ACTIVATION'")
        name = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
        if name not in ACTIVATIONS:
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r}: unsupported "
                             f"activation {name!r}; supported: {sorted(ACTIVATIONS)}")
        return name

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], **overrides) -> "T5EncoderConfig":
        """From a transformers T5Config dict (a config.json); `overrides` set dtype,
        param_dtype, remat."""
        # transformers' default where a (pre-v1.1) config.json leaves it out: the original T5.
        fields = {"feed_forward_proj": "relu", **{k: config[k] for k in HF_FIELDS if k in config}}
        for key in ("vocab_size", "d_model", "num_layers", "num_heads", "d_kv", "d_ff"):
            if key not in fields:
                raise ValueError(f"the T5 config has no {key!r} (keys: {sorted(config)})")
        return cls(**fields, **overrides)


# --------------------------------------------------------------------------------------------
# Relative position buckets
# --------------------------------------------------------------------------------------------


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> jax.Array:
    """The bucket of each key - query distance, as T5 (Mesh TensorFlow) defines it.

    Bidirectional: half the buckets for keys before the query, half for keys after. Within a
    half, distances below num_buckets/4 have a bucket each; larger ones share log-spaced
    buckets up to max_distance; everything farther shares the last bucket."""
    relative_position = jnp.asarray(relative_position, jnp.int32)
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # float32 as the reference implementations compute it; the max() only keeps log() off 0,
    # where `is_small` discards the value anyway.
    scaled = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
              / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
    return buckets + jnp.where(is_small, distance, large)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def _meta(*names):
    # Logical axis names only: `eager_sharding=False` lets the model be built without a mesh.
    return dict(out_sharding=names, eager_sharding=False)


def _dense(in_features, out_features, std, *, names, cfg: T5EncoderConfig, rngs):
    """A bias-free Linear; std is transformers' initialisation scale (for fresh models only)."""
    return nnx.Linear(in_features, out_features, use_bias=False, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, kernel_init=nnx.initializers.normal(std),
                      rngs=rngs, kernel_metadata=_meta(*names))


class RMSNorm(nnx.Module):
    """T5's layer norm: w · x · rsqrt(mean(x²) + eps), no mean subtraction and no bias, in
    float32 (returns float32)."""

    def __init__(self, dim: int, eps: float, *, param_dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), **_meta("norm"))

    def __call__(self, x):
        x = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return self.weight[...].astype(jnp.float32) * (x * jax.lax.rsqrt(variance + self.eps))


class T5Attention(nnx.Module):
    def __init__(self, cfg: T5EncoderConfig, *, rngs: nnx.Rngs):
        d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.dtype = cfg.dtype
        # Columns of q/k/v (and rows of o) are head-major: head h holds [h·d_kv, (h+1)·d_kv).
        self.q = _dense(d, inner, (d * cfg.d_kv) ** -0.5, names=("embed", "qkv"), cfg=cfg,
                        rngs=rngs)
        self.k = _dense(d, inner, d ** -0.5, names=("embed", "qkv"), cfg=cfg, rngs=rngs)
        self.v = _dense(d, inner, d ** -0.5, names=("embed", "qkv"), cfg=cfg, rngs=rngs)
        self.o = _dense(inner, d, inner ** -0.5, names=("heads", "embed"), cfg=cfg, rngs=rngs)

    def __call__(self, x, bias):
        """x (N, L, d_model) in the compute dtype; bias (N or 1, heads, L, L) float32, the
        position bias with the padding mask folded in."""
        batch, length, _ = x.shape
        shape = (batch, length, self.num_heads, self.d_kv)
        q, k, v = (proj(x).reshape(shape) for proj in (self.q, self.k, self.v))
        # No 1/√d_kv: T5 folds it into the initialisation of q.
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return self.o(out.reshape(batch, length, self.num_heads * self.d_kv))


class T5FeedForward(nnx.Module):
    def __init__(self, cfg: T5EncoderConfig, *, rngs: nnx.Rngs):
        d, ff = cfg.d_model, cfg.d_ff
        self.act = ACTIVATIONS[cfg.activation]
        self.is_gated = cfg.is_gated
        if self.is_gated:
            self.wi_0 = _dense(d, ff, d ** -0.5, names=("embed", "mlp"), cfg=cfg, rngs=rngs)
            self.wi_1 = _dense(d, ff, d ** -0.5, names=("embed", "mlp"), cfg=cfg, rngs=rngs)
        else:
            self.wi = _dense(d, ff, d ** -0.5, names=("embed", "mlp"), cfg=cfg, rngs=rngs)
        self.wo = _dense(ff, d, ff ** -0.5, names=("mlp", "embed"), cfg=cfg, rngs=rngs)

    def __call__(self, x):
        if self.is_gated:
            return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))
        return self.wo(self.act(self.wi(x)))


class T5Block(nnx.Module):
    """Pre-norm residual block; the residual stream stays float32."""

    def __init__(self, cfg: T5EncoderConfig, *, rngs: nnx.Rngs):
        self.dtype = cfg.dtype
        self.attention_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon,
                                      param_dtype=cfg.param_dtype)
        self.attention = T5Attention(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, param_dtype=cfg.param_dtype)
        self.ffn = T5FeedForward(cfg, rngs=rngs)

    def __call__(self, x, bias):
        h = self.attention(self.attention_norm(x).astype(self.dtype), bias)
        x = x + h.astype(jnp.float32)
        return x + self.ffn(self.ffn_norm(x).astype(self.dtype)).astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------


class T5Encoder(nnx.Module):
    """`encoder(input_ids, attention_mask=None)` → the last hidden state (N, L, d_model), float32.

    input_ids (N, L) int token ids; attention_mask (N, L), 1 for real tokens and 0 for padding
    (None: no padding). Padded keys get no attention weight; the rows of padded queries are
    computed all the same (as in transformers) and are what they are: downstream cross-attention
    masks them."""

    def __init__(self, cfg: T5EncoderConfig | None = None, *, rngs: nnx.Rngs | None = None,
                 **kwargs):
        if cfg is None:
            cfg = T5EncoderConfig(**kwargs)
        elif kwargs:
            cfg = dataclasses.replace(cfg, **kwargs)
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.shared = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model), cfg.param_dtype),
            **_meta("vocab", "embed"))
        # Held by the first layer in transformers; one table that every layer uses.
        self.relative_attention_bias = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.relative_attention_num_buckets, cfg.num_heads),
                              cfg.param_dtype) * cfg.d_model ** -0.5,
            **_meta("buckets", "heads"))
        self.blocks = nnx.List([T5Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon,
                                        param_dtype=cfg.param_dtype)

    def position_bias(self, length: int) -> jax.Array:
        """(1, heads, L, L) float32: the learned bias of each key - query distance."""
        cfg = self.config
        positions = np.arange(length)
        buckets = relative_position_bucket(
            positions[None, :] - positions[:, None], bidirectional=True,
            num_buckets=cfg.relative_attention_num_buckets,
            max_distance=cfg.relative_attention_max_distance)
        values = jnp.take(self.relative_attention_bias[...].astype(jnp.float32), buckets, axis=0)
        return values.transpose(2, 0, 1)[None]

    def __call__(self, input_ids, attention_mask=None):
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        if not isinstance(input_ids, jax.core.Tracer):
            check_token_ids(np.asarray(input_ids), cfg.vocab_size)
        bias = self.position_bias(input_ids.shape[1])
        if attention_mask is not None:
            mask = jnp.asarray(attention_mask)
            if mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask has shape {mask.shape}, input_ids "
                                 f"{input_ids.shape}: they must match")
            # The most negative float rather than -inf: a row without any real token (not
            # produced by the tokenizer, which always keeps EOS) averages instead of giving NaN.
            bias = jnp.where(mask[:, None, None, :] > 0, bias, jnp.finfo(jnp.float32).min)
        x = jnp.take(self.shared[...], input_ids, axis=0).astype(jnp.float32)
        for block in self.blocks:
            x = call_block(block, cfg.remat, x, bias)
        return self.final_layer_norm(x)


def check_token_ids(input_ids: np.ndarray, vocab_size: int) -> None:
    """Raise on ids outside the token table: jnp.take would turn them into NaN rows silently."""
    if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}) (the encoder's vocab_size); got ids from "
            f"{input_ids.min()} to {input_ids.max()}: is the tokenizer the encoder's own?")


def split_encoder(cfg: T5EncoderConfig):
    """(graphdef, abstract state) of a T5Encoder, without allocating its weights."""
    # jax.eval_shape rather than nnx.eval_shape: the latter turns logical axis names into mesh
    # axes when a mesh is set (the rules in dit_jax.sharding map them).
    graphdefs = []

    def build():
        graphdef, state = nnx.split(T5Encoder(cfg, rngs=nnx.Rngs(0)))
        graphdefs.append(graphdef)
        return state

    state = jax.eval_shape(build)
    return graphdefs[0], state

