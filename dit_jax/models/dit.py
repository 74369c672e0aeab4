"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") in Flax NNX.

The same function as the official PyTorch release (facebookresearch/DiT, `models.py`), to float32
rounding, in channels-last layout: images are (N, H, W, C) in and out. See docs/numerics.md#model.

Every parameter carries logical axis names (`out_sharding` metadata, e.g. ("embed", "mlp")); the
mapping of those names to mesh axes lives in `dit_jax.sharding`, so this file knows nothing of
meshes. Parameters are created without a mesh (`eager_sharding=False`) and placed by the caller.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.pallas.ops.tpu import splash_attention as splash

# The twelve official configurations (names exactly as the official `DiT_models` dict).
_SIZES = {
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
}
DIT_CONFIGS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{patch}": dict(_SIZES[size], patch_size=patch)
    for size in _SIZES
    for patch in (2, 4, 8)
}

# Numerics of the two PyTorch implementations. The official model is the default; the diffusers
# port (`DiTTransformer2DModel`) divides its timestep frequencies by (half - 1) instead of half and
# uses eps 1e-5 in the LayerNorm before each MLP, so diffusers weights run with "diffusers".
NUMERICS = {
    "official": dict(timestep_freq_shift=0.0, mlp_norm_eps=1e-6),
    "diffusers": dict(timestep_freq_shift=1.0, mlp_norm_eps=1e-5),
}

TIMESTEP_FREQ_DIM = 256
NORM_EPS = 1e-6
ATTENTION_IMPLS = ("xla", "cudnn", "splash", "auto")

# The paper's four ways of feeding (t, y) to the blocks (its section 3.2; docs/blocks.md). Only
# adaLN-Zero was released: it is the default, with the official numerics and weights.
#   adaln_zero       c = t_emb + y_emb regresses shift, scale and a zero-initialised gate per branch
#   adaln            c regresses shift and scale only (no gates, ordinary initialisation)
#   cross_attention  plain pre-norm blocks with a cross-attention to the 2 tokens [t_emb, y_emb]
#   in_context       t_emb and y_emb join the image tokens as 2 extra tokens; plain ViT blocks
BLOCK_TYPES = ("adaln_zero", "adaln", "cross_attention", "in_context")
# The blocks whose conditioning is the vector c (the others take the tokens [t_emb, y_emb]).
ADALN_BLOCKS = ("adaln_zero", "adaln")


def check_remat(remat) -> None:
    """ValueError unless `remat` is a bool or the name of a jax.checkpoint_policies policy."""
    if isinstance(remat, str) and not callable(getattr(jax.checkpoint_policies, remat, None)):
        raise ValueError(f"remat must be a bool or a jax.checkpoint_policies name, got {remat!r}")


def remat_policy(remat):
    """The jax.checkpoint policy a `remat` setting names (None: recompute everything)."""
    return getattr(jax.checkpoint_policies, remat) if isinstance(remat, str) else None


def call_block(block: nnx.Module, remat, *args):
    """`block(*args)`, rematerialised in the backward pass when `remat` says so (True, or the
    name of a jax.checkpoint_policies policy); shared by the DiT, PixArt and T5 block stacks."""
    if not remat:
        return block(*args)
    return nnx.remat(type(block).__call__, policy=remat_policy(remat))(block, *args)


def check_execution_options(attention_impl: str, remat) -> None:
    """The options that change how a model runs, not what it computes, checked (DiT, PixArt)."""
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, "
                         f"got {attention_impl!r}")
    check_remat(remat)


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Hyper-parameters of one DiT. `input_size` is the side of the model's input (the latent side,
    image_size // 8, for latent models), an int or (height, width)."""

    input_size: int | tuple[int, int] = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    # 0 means unconditional: no label embedding at all and `y` is ignored.
    num_classes: int = 1000
    learn_sigma: bool = True
    numerics: str = "official"
    dtype: Any = jnp.float32  # compute dtype of the attention and MLP matmuls
    # "xla"; "cudnn" (flash attention on NVIDIA GPUs); "splash" (the Pallas flash kernel for TPUs,
    # run in interpret mode on CPU); "auto": the best of these for the platform at trace time.
    attention_impl: str = "xla"
    # Rematerialise each block in the backward pass: True recomputes everything; the name of a
    # jax.checkpoint_policies policy (e.g. "dots_with_no_batch_dims_saveable") keeps what it saves.
    remat: bool | str = False
    scan_blocks: bool = False  # one stacked block scanned `depth` times (faster compiles)
    block: str = "adaln_zero"  # how the blocks are conditioned: one of BLOCK_TYPES

    def __post_init__(self):
        size = self.input_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"input_size {size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError("hidden_size must be divisible by 4 for the 2-D sin-cos embedding")
        if self.numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {sorted(NUMERICS)}, got {self.numerics!r}")
        if self.block not in BLOCK_TYPES:
            raise ValueError(f"block must be one of {BLOCK_TYPES}, got {self.block!r}")
        check_execution_options(self.attention_impl, self.remat)

    @property
    def grid_size(self) -> tuple[int, int]:
        size = self.input_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return height // self.patch_size, width // self.patch_size

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels


# --------------------------------------------------------------------------------------------
# Fixed embeddings (float64 NumPy where the official code uses NumPy)
# --------------------------------------------------------------------------------------------


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """[sin(pos·ω), cos(pos·ω)] with ω_i = 1 / 10000^(i / (embed_dim/2)), in float64."""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_size: tuple[int, int]) -> np.ndarray:
    """The MAE 2-D sin-cos table, (h·w, embed_dim), float64, row-major over the token grid.

    The official code builds the grid as meshgrid(grid_w, grid_h), so the FIRST half of the
    channels encodes the column (w) coordinate and the second half the row (h) coordinate.
    """
    grid_h, grid_w = grid_size
    cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))
    return np.concatenate(
        [sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)


def timestep_frequencies(t: jax.Array, dim: int = TIMESTEP_FREQ_DIM, *, freq_shift: float = 0.0,
                         max_period: float = 10000.0) -> jax.Array:
    """[cos(t·f), sin(t·f)] (cos first, as released), f_i = exp(-ln(max_period)·i/(half - shift))."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def _meta(*names):
    # Logical axis names only: `eager_sharding=False` lets the model be built without a mesh.
    return dict(out_sharding=names, eager_sharding=False)


def _linear(in_features, out_features, *, rngs, names, dtype=jnp.float32,
            kernel_init=nnx.initializers.xavier_uniform()):
    return nnx.Linear(
        in_features, out_features, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=kernel_init, bias_init=nnx.initializers.zeros_init(), rngs=rngs,
        kernel_metadata=_meta(*names), bias_metadata=_meta(names[1]))


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without learned scale or bias, computed in float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale[:, None]) + shift[:, None]


class LayerNorm(nnx.Module):
    """LayerNorm with a learned scale (initially 1) and offset (initially 0), in float32: the norm
    of the standard, unmodulated blocks (cross-attention and in-context conditioning)."""

    def __init__(self, hidden_size: int, *, eps: float = NORM_EPS):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((hidden_size,), jnp.float32), **_meta("embed"))
        self.bias = nnx.Param(jnp.zeros((hidden_size,), jnp.float32), **_meta("embed"))

    def __call__(self, x):
        return layer_norm(x, self.eps) * self.scale[...] + self.bias[...]


class TimestepEmbedder(nnx.Module):
    def __init__(self, hidden_size: int, *, freq_shift: float, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.freq_shift = freq_shift
        self.linear_1 = _linear(TIMESTEP_FREQ_DIM, hidden_size, rngs=rngs, names=("freq", "embed"),
                                kernel_init=init)
        self.linear_2 = _linear(hidden_size, hidden_size, rngs=rngs, names=("embed_in", "embed"),
                                kernel_init=init)

    def __call__(self, t):
        freqs = timestep_frequencies(t, freq_shift=self.freq_shift)
        return self.linear_2(nnx.silu(self.linear_1(freqs)))


class LabelEmbedder(nnx.Module):
    """Class table as released (`use_cfg_embedding`): num_classes rows, plus one null-label row
    (index num_classes, for classifier-free guidance) only when dropout_prob > 0. Without that
    row there is no null label: label dropout and guidance are unavailable."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, *, rngs: nnx.Rngs):
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.has_null_label = dropout_prob > 0
        rows = num_classes + int(self.has_null_label)
        self.embedding_table = nnx.Param(
            jax.random.normal(rngs.params(), (rows, hidden_size), jnp.float32) * 0.02,
            **_meta("classes", "embed"))

    @property
    def null_label(self) -> int:
        if not self.has_null_label:
            raise ValueError(
                f"this DiT has no null-label row (built with class_dropout_prob=0, so its table has "
                f"{self.num_classes} rows): classifier-free guidance and label dropout need a model "
                f"trained with class_dropout_prob > 0")
        return self.num_classes

    def drop_labels(self, labels: jax.Array, key: jax.Array) -> jax.Array:
        drop = jax.random.uniform(key, labels.shape) < self.dropout_prob
        return jnp.where(drop, self.null_label, labels)

    def __call__(self, labels, *, train: bool, key=None):
        if train and self.dropout_prob > 0:
            if key is None:
                raise ValueError("label dropout in training needs rngs (e.g. nnx.Rngs(dropout=key))")
            labels = self.drop_labels(labels, key)
        table = self.embedding_table[...]
        # jnp.take's default "fill" mode turns an out-of-range label into a NaN row, which would
        # surface steps later as NaN samples. Concrete labels are checked here; under a trace they
        # cannot be, and "clip" would silently map them to a real class, so traced callers must
        # pass valid labels (guidance takes the null label from DiT.null_label).
        if not isinstance(labels, jax.core.Tracer) and getattr(labels, "is_fully_addressable",
                                                               True):
            values = np.asarray(labels)
            if values.size and (values.min() < 0 or values.max() >= table.shape[0]):
                null = (f"{self.num_classes} is the null label" if self.has_null_label else
                        "no null label: class_dropout_prob=0")
                raise ValueError(
                    f"class labels must lie in [0, {table.shape[0]}) ({null}); got labels from "
                    f"{values.min()} to {values.max()}")
        return jnp.take(table, labels, axis=0)


class Attention(nnx.Module):
    def __init__(self, hidden_size: int, num_heads: int, *, dtype, implementation: str,
                 rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.implementation = implementation
        # One (D, 3D) matrix, initialised as one matrix as released; columns [q | k | v], head-major.
        self.qkv = _linear(hidden_size, 3 * hidden_size, rngs=rngs, names=("embed", "qkv"),
                           dtype=dtype)
        self.proj = _linear(hidden_size, hidden_size, rngs=rngs, names=("heads", "embed"),
                            dtype=dtype)

    def __call__(self, x):
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = dot_product_attention(q, k, v, self.implementation)
        return self.proj(out.reshape(batch, tokens, width))


class CrossAttention(nnx.Module):
    """Multi-head attention from the tokens x (N, T, D) to a context sequence (N, L, D): queries
    from x, keys and values from the context (separate Linear layers with bias, head-major
    features), softmax scale head_dim^-0.5, output Linear(D, D)."""

    def __init__(self, hidden_size: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.q = _linear(hidden_size, hidden_size, rngs=rngs, names=("embed", "qkv"), dtype=dtype)
        self.k = _linear(hidden_size, hidden_size, rngs=rngs, names=("embed", "qkv"), dtype=dtype)
        self.v = _linear(hidden_size, hidden_size, rngs=rngs, names=("embed", "qkv"), dtype=dtype)
        self.proj = _linear(hidden_size, hidden_size, rngs=rngs, names=("heads", "embed"),
                            dtype=dtype)

    def __call__(self, x, context):
        batch, tokens, width = x.shape
        heads = (self.num_heads, width // self.num_heads)
        q = self.q(x).reshape(batch, tokens, *heads)
        k = self.k(context).reshape(batch, context.shape[1], *heads)
        v = self.v(context).reshape(batch, context.shape[1], *heads)
        # XLA's attention whatever attention_impl says: the context is a couple of tokens, where a
        # flash kernel saves nothing (and the splash kernel wants as many keys as queries).
        out = dot_product_attention(q, k, v, "xla")
        return self.proj(out.reshape(batch, tokens, width))


# --------------------------------------------------------------------------------------------
# Attention implementations


def attention_platform() -> str:
    """The platform the program being traced is for: that of the devices of the mesh set with
    `jax.set_mesh` (a TPU mesh while compiling ahead of time from a CPU host), else the default
    backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def resolve_attention_impl(implementation: str, dtype=None, platform: str | None = None) -> str:
    """The implementation "auto" stands for: splash on TPU; cuDNN flash attention on NVIDIA GPUs
    for 16-bit inputs (the only dtypes it takes); XLA's attention elsewhere."""
    if implementation != "auto":
        return implementation
    platform = platform or attention_platform()
    if platform == "tpu":
        return "splash"
    if platform in ("gpu", "cuda") and dtype is not None and jnp.dtype(dtype).itemsize == 2:
        return "cudnn"
    return "xla"


def dot_product_attention(q, k, v, implementation: str = "xla"):
    """softmax(q·kᵀ / √head_dim)·v over (batch, tokens, heads, head_dim) operands, no mask."""
    implementation = resolve_attention_impl(implementation, q.dtype)
    if implementation == "splash":
        return splash_attention(q, k, v)
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


# Logical axis names of activations: (batch, tokens, width) token states, (batch, width)
# conditioning vectors, and the (batch, tokens, heads, head_dim) operands of attention.
TOKENS_AXES = ("batch", None, None)
VECTOR_AXES = ("batch", None)
ATTENTION_AXES = ("batch", None, "heads", None)

# How arrays are laid out over the mesh being traced for, as a function (logical axis names,
# shape) -> PartitionSpec. A layout decision, so it belongs to dit_jax.sharding, which installs it
# here when imported (`set_partitioning`): this file stays free of mesh axes, and every program
# that builds a mesh with dit_jax has it. Used for the splash kernel's operands and for the
# activation constraints of `constrain`.
_partitioning = None


def set_partitioning(spec_fn) -> None:
    global _partitioning
    _partitioning = spec_fn


def constrain(x, names):
    """`x` laid out as its logical axis `names` say on the mesh being traced for; unchanged off a
    multi-device mesh. The blocks pin their branch outputs and modulations to the batch layout:
    besides being the layout tensor parallelism wants there, it keeps XLA's SPMD partitioner
    from a wrong-result bug (jax 0.10–0.12): on a mesh with data, fsdp and tensor all > 1, a
    product like gate[:, None] · proj(attention), left to sharding propagation, came out wrong
    by up to 70% of its magnitude (docs/numerics.md, "Sharded activations")."""
    mesh = jax.sharding.get_abstract_mesh()
    if _partitioning is None or mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, _partitioning(names, x.shape))


def splash_attention(q, k, v, *, interpret: bool | None = None):
    """Non-causal attention with the splash flash-attention kernel (Pallas, for TPUs).

    The kernel attends over (heads, tokens, head_dim) of one example and does not scale: q is
    pre-scaled by head_dim^-0.5 here. Its blocks are multiples of 128 tokens, so a sequence of
    another length is padded and the padding kept apart by segment ids (real tokens attend only
    to real tokens). XLA cannot partition a Pallas kernel, so under a multi-device mesh the
    kernel runs inside `jax.shard_map`, split as dit_jax.sharding says (batch over the batch axes,
    heads over the tensor axis). Off TPU it runs in Pallas' interpret mode (slow; for tests).
    """
    platform = attention_platform()
    if interpret is None:
        if platform in ("gpu", "cuda", "rocm"):
            raise ValueError("attention_impl='splash' is a TPU kernel; on GPUs use 'cudnn' or 'auto'")
        interpret = platform != "tpu"
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return _splash_local(q, k, v, interpret=interpret)
    if _partitioning is None:
        raise RuntimeError("splash attention under a mesh needs its partitioning: import "
                           "dit_jax.sharding (which installs it) before tracing the model")
    spec = _partitioning(ATTENTION_AXES, q.shape)
    # check_vma=False: the kernel's pallas_call does not declare how its outputs vary over the
    # mesh axes; each shard is an independent set of examples and heads, so nothing is reduced.
    return jax.shard_map(partial(_splash_local, interpret=interpret), mesh=mesh,
                         in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def _splash_local(q, k, v, *, interpret: bool):
    batch, tokens, heads, head_dim = q.shape
    padded = -(-tokens // 128) * 128
    block = next(b for b in (512, 256, 128) if padded % b == 0)
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.FullMask((padded, padded))] * heads)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
    segments = None
    if padded != tokens:
        ids = jnp.asarray(np.arange(padded) >= tokens, jnp.int32)
        segments = splash.SegmentIds(q=ids, kv=ids)

    def to_kernel(a):  # (B, T, H, D) -> (B, H, T', D)
        return jnp.pad(a, ((0, 0), (0, padded - tokens), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
    out = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(
        to_kernel(q), to_kernel(k), to_kernel(v))
    return out.transpose(0, 2, 1, 3)[:, :tokens]


class Mlp(nnx.Module):
    def __init__(self, hidden_size: int, mlp_hidden: int, *, dtype, rngs: nnx.Rngs):
        self.fc1 = _linear(hidden_size, mlp_hidden, rngs=rngs, names=("embed", "mlp"), dtype=dtype)
        self.fc2 = _linear(mlp_hidden, hidden_size, rngs=rngs, names=("mlp", "embed"), dtype=dtype)

    def __call__(self, x):
        return self.fc2(nnx.gelu(self.fc1(x), approximate=True))


# --------------------------------------------------------------------------------------------
# The blocks: one class per conditioning of the paper (DiTConfig.block; docs/blocks.md). Each is
# called as block(x, c) with x the (N, T, D) tokens and c what DiT.embed gives for that kind.
# The residual stream, norms and modulation stay float32; only the attention and MLP matmuls run
# in the compute dtype.


def _attention_and_mlp(cfg: DiTConfig, rngs: nnx.Rngs) -> tuple[Attention, Mlp]:
    d = cfg.hidden_size
    attn = Attention(d, cfg.num_heads, dtype=cfg.dtype, implementation=cfg.attention_impl,
                     rngs=rngs)
    return attn, Mlp(d, int(d * cfg.mlp_ratio), dtype=cfg.dtype, rngs=rngs)


class DiTBlock(nnx.Module):
    """adaLN-Zero block, as released: c (N, D) regresses shift, scale and gate of each branch from
    a zero-initialised Linear, so a fresh block is the identity."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.mlp_norm_eps = NUMERICS[cfg.numerics]["mlp_norm_eps"]
        self.dtype = cfg.dtype
        self.attn, self.mlp = _attention_and_mlp(cfg, rngs)
        self.adaLN_modulation = _linear(d, 6 * d, rngs=rngs, names=("embed", "modulation"),
                                        kernel_init=nnx.initializers.zeros_init())

    def __call__(self, x, c):
        modulation = constrain(self.adaLN_modulation(nnx.silu(c)), VECTOR_AXES)  # (N, 6D)
        (shift_msa, scale_msa, gate_msa,
         shift_mlp, scale_mlp, gate_mlp) = jnp.split(modulation, 6, axis=-1)
        h = modulate(layer_norm(x, NORM_EPS), shift_msa, scale_msa)
        attn = constrain(self.attn(h.astype(self.dtype)), TOKENS_AXES)
        x = x + gate_msa[:, None] * attn.astype(jnp.float32)
        h = modulate(layer_norm(x, self.mlp_norm_eps), shift_mlp, scale_mlp)
        mlp = constrain(self.mlp(h.astype(self.dtype)), TOKENS_AXES)
        return x + gate_mlp[:, None] * mlp.astype(jnp.float32)


class AdaLNBlock(nnx.Module):
    """The paper's adaLN block: c (N, D) regresses only the shift and scale of the two LayerNorms
    (one Linear(D, 4D) on SiLU(c), cut into shift_msa, scale_msa, shift_mlp, scale_mlp). No gates
    on the residual branches and the ordinary xavier-uniform initialisation: a fresh block is not
    the identity."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.dtype = cfg.dtype
        self.attn, self.mlp = _attention_and_mlp(cfg, rngs)
        self.adaLN_modulation = _linear(d, 4 * d, rngs=rngs, names=("embed", "modulation"))

    def __call__(self, x, c):
        shift_msa, scale_msa, shift_mlp, scale_mlp = jnp.split(
            constrain(self.adaLN_modulation(nnx.silu(c)), VECTOR_AXES), 4, axis=-1)
        h = modulate(layer_norm(x, NORM_EPS), shift_msa, scale_msa)
        x = x + constrain(self.attn(h.astype(self.dtype)), TOKENS_AXES).astype(jnp.float32)
        h = modulate(layer_norm(x, NORM_EPS), shift_mlp, scale_mlp)
        return x + constrain(self.mlp(h.astype(self.dtype)), TOKENS_AXES).astype(jnp.float32)


class CrossAttentionBlock(nnx.Module):
    """The paper's cross-attention block: a standard pre-norm transformer block (learned-affine
    LayerNorms, no modulation) with a multi-head cross-attention after the self-attention, as in
    the original transformer's decoder and LDM's class-conditional blocks. c is the conditioning
    sequence (N, L, D), [t_emb, y_emb] (L = 2; L = 1, t_emb alone, for an unconditional model)."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.dtype = cfg.dtype
        self.attn, self.mlp = _attention_and_mlp(cfg, rngs)
        self.cross_attn = CrossAttention(d, cfg.num_heads, dtype=cfg.dtype, rngs=rngs)
        self.norm1, self.norm2, self.norm3 = LayerNorm(d), LayerNorm(d), LayerNorm(d)

    def __call__(self, x, c):
        dtype = self.dtype
        x = x + constrain(self.attn(self.norm1(x).astype(dtype)), TOKENS_AXES).astype(jnp.float32)
        x = x + constrain(self.cross_attn(self.norm2(x).astype(dtype), c.astype(dtype)),
                          TOKENS_AXES).astype(jnp.float32)
        return x + constrain(self.mlp(self.norm3(x).astype(dtype)), TOKENS_AXES).astype(jnp.float32)


class InContextBlock(nnx.Module):
    """The block of the paper's in-context conditioning: a standard pre-norm ViT block
    (learned-affine LayerNorms, no modulation). The conditioning is already in the sequence (the
    model appends t_emb and y_emb as tokens), so c is ignored."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.dtype = cfg.dtype
        self.attn, self.mlp = _attention_and_mlp(cfg, rngs)
        self.norm1, self.norm2 = LayerNorm(d), LayerNorm(d)

    def __call__(self, x, c=None):
        x = x + constrain(self.attn(self.norm1(x).astype(self.dtype)),
                          TOKENS_AXES).astype(jnp.float32)
        return x + constrain(self.mlp(self.norm2(x).astype(self.dtype)),
                             TOKENS_AXES).astype(jnp.float32)


BLOCKS = {"adaln_zero": DiTBlock, "adaln": AdaLNBlock, "cross_attention": CrossAttentionBlock,
          "in_context": InContextBlock}


class FinalLayer(nnx.Module):
    """adaLN final layer: modulate(LN(x), shift, scale) with (shift, scale) regressed from c, then
    Linear(D, p·p·out). As released (adaLN-Zero) both Linears start at zero; the paper's adaLN
    model (`zero_init=False`) gives them the ordinary xavier-uniform initialisation."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *, rngs: nnx.Rngs,
                 zero_init: bool = True):
        init = nnx.initializers.zeros_init() if zero_init else nnx.initializers.xavier_uniform()
        self.adaLN_modulation = _linear(hidden_size, 2 * hidden_size, rngs=rngs,
                                        names=("embed", "modulation"), kernel_init=init)
        self.linear = _linear(hidden_size, patch_size * patch_size * out_channels, rngs=rngs,
                              names=("embed", "patch_out"), kernel_init=init)

    def __call__(self, x, c):
        modulation = constrain(self.adaLN_modulation(nnx.silu(c)), VECTOR_AXES)  # (N, 2D)
        shift, scale = jnp.split(modulation, 2, axis=-1)
        return self.linear(modulate(layer_norm(x, NORM_EPS), shift, scale))


class NormFinalLayer(nnx.Module):
    """Final layer of the unmodulated (cross-attention, in-context) models: the paper's decoder
    applies "the final layer norm (adaptive if using adaLN)", so here a standard learned-affine
    LayerNorm, then Linear(D, p·p·out) (xavier-uniform). c is ignored."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *, rngs: nnx.Rngs):
        self.norm = LayerNorm(hidden_size)
        self.linear = _linear(hidden_size, patch_size * patch_size * out_channels, rngs=rngs,
                              names=("embed", "patch_out"))

    def __call__(self, x, c=None):
        return self.linear(self.norm(x))


def unpatchify(tokens: jax.Array, grid_size: tuple[int, int], patch_size: int) -> jax.Array:
    """(N, h·w, p·p·C) → (N, h·p, w·p, C); each token's vector is indexed (p_row, p_col, channel)."""
    n, _, features = tokens.shape
    (h, w), p = grid_size, patch_size
    c = features // (p * p)
    x = tokens.reshape(n, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h * p, w * p, c)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class DiT(nnx.Module):
    """Diffusion Transformer, NHWC, its blocks conditioned as `config.block` says (adaLN-Zero, the
    released model, by default; docs/blocks.md for the paper's other three).

    `model(x, t, y, train=False, rngs=None)`: x (N, H, W, in_channels); t (N,) timesteps of the
    ORIGINAL 1000-step process (int or float); y (N,) int labels, y == num_classes is the null
    class (`null_label`; only when class_dropout_prob > 0, as released). Returns
    (N, H, W, out_channels): ε in the first in_channels channels, then the variance
    interpolation values when learn_sigma. With `train=True` labels are dropped with probability
    class_dropout_prob, using `rngs` (an nnx.Rngs with a `dropout` stream, or a key).
    """

    def __init__(self, cfg: DiTConfig | None = None, *, rngs: nnx.Rngs | None = None, **kwargs):
        if cfg is None:
            cfg = DiTConfig(**kwargs)
        elif kwargs:
            cfg = dataclasses.replace(cfg, **kwargs)
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        numerics = NUMERICS[cfg.numerics]

        # xavier-uniform on the flattened (D, C·p·p) view: fan-in over (kh, kw, C), fan-out D.
        conv_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform",
                                                      in_axis=(0, 1, 2), out_axis=3)
        self.x_embedder = nnx.Conv(
            cfg.in_channels, d, kernel_size=(p, p), strides=(p, p), padding="VALID",
            kernel_init=conv_init, bias_init=nnx.initializers.zeros_init(), rngs=rngs,
            kernel_metadata=_meta(None, None, None, "embed"), bias_metadata=_meta("embed"))
        # Fixed, not trained: a plain constant rather than a Param keeps it out of the optimiser.
        self.pos_embed = nnx.Variable(
            jnp.asarray(sincos_2d(d, cfg.grid_size), jnp.float32)[None], **_meta(None, None, None))
        self.t_embedder = TimestepEmbedder(d, freq_shift=numerics["timestep_freq_shift"], rngs=rngs)
        self.y_embedder = (LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob, rngs=rngs)
                           if cfg.num_classes > 0 else None)
        if cfg.scan_blocks:
            self.blocks = _stacked_blocks(cfg, rngs)
        else:
            self.blocks = nnx.List([BLOCKS[cfg.block](cfg, rngs=rngs) for _ in range(cfg.depth)])
        if cfg.block in ADALN_BLOCKS:
            self.final_layer = FinalLayer(d, p, cfg.out_channels, rngs=rngs,
                                          zero_init=cfg.block == "adaln_zero")
        else:
            self.final_layer = NormFinalLayer(d, p, cfg.out_channels, rngs=rngs)

    @property
    def null_label(self) -> int:
        """The label of the unconditional (null) class for classifier-free guidance: num_classes.
        Raises for a model without one (unconditional, or class_dropout_prob=0)."""
        if self.y_embedder is None:
            raise ValueError("this DiT is unconditional (num_classes=0): it has no null label")
        return self.y_embedder.null_label

    def embed(self, x, t, y, *, train: bool = False, rngs=None):
        """Token sequence (N, T, D) and the conditioning: for the adaLN blocks the vector
        c = t_emb + y_emb (N, D); for cross-attention and in-context the sequence [t_emb, y_emb]
        (N, 2, D) ([t_emb], (N, 1, D), for an unconditional model)."""
        cfg = self.config
        x = self.x_embedder(x.astype(jnp.float32))  # (N, H/p, W/p, D)
        x = x.reshape(x.shape[0], -1, cfg.hidden_size) + self.pos_embed[...]  # (N, T, D)
        c = self.t_embedder(t)  # (N, D)
        embeddings = [c]
        if self.y_embedder is not None:
            key = None
            if train and rngs is not None:
                key = rngs.dropout() if isinstance(rngs, nnx.Rngs) else rngs
            embeddings.append(self.y_embedder(y, train=train, key=key))  # (N, D)
            c = c + embeddings[-1]  # (N, D)
        if cfg.block not in ADALN_BLOCKS:
            c = jnp.stack(embeddings, axis=1)  # (N, L, D)
        return x, c

    def __call__(self, x, t, y=None, *, train: bool = False, rngs=None):
        cfg = self.config
        if self.y_embedder is not None and y is None:
            raise ValueError("this DiT is class-conditional (num_classes > 0): pass labels y")
        # x: (N, H, W, C) latents or images; t: (N,); y: (N,)
        tokens, c = self.embed(x, t, y, train=train, rngs=rngs)  # (N, T, D), (N, D); T = H·W / p²
        tokens = self.run_blocks(tokens, c)  # (N, T, D)
        out = self.final_layer(tokens, c)  # (N, T, p·p·out_channels)
        return unpatchify(out, cfg.grid_size, cfg.patch_size)  # (N, H, W, out_channels)

    def run_blocks(self, x, c):
        """The blocks on the tokens x (N, T, D) with the conditioning c of `embed`; (N, T, D)."""
        cfg = self.config
        extra = 0
        if cfg.block == "in_context":
            # t_emb and y_emb join the sequence as extra tokens (no position embedding), seen by
            # every block like image tokens, and leave it again before the final layer.
            extra = c.shape[1]
            x, c = jnp.concatenate([x, c.astype(x.dtype)], axis=1), None
        if cfg.scan_blocks:
            # A plain lax.scan over the stacked state rather than nnx.scan: nnx.scan refuses
            # variables created at an outer trace level, so a scanned DiT could not be called
            # inside another scan (the sampling loops, gradient accumulation).
            graphdef, stacked = nnx.split(self.blocks)

            def body(carry, layer):
                return nnx.merge(graphdef, layer)(carry, c), None
            if cfg.remat:
                body = jax.checkpoint(body, policy=remat_policy(cfg.remat))
            x = jax.lax.scan(body, x, stacked)[0]
        else:
            for block in self.blocks:
                x = call_block(block, cfg.remat, x, c)
        return x[:, :-extra] if extra else x


def _stacked_blocks(cfg: DiTConfig, rngs: nnx.Rngs) -> nnx.Module:
    """One block (of the kind cfg.block) whose parameters carry a leading `layers` axis of length
    depth."""

    @nnx.split_rngs(splits=cfg.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return BLOCKS[cfg.block](cfg, rngs=rngs)

    return make(rngs)


def create_model(name: str | None = None, *, image_size: int | tuple[int, int] = 256,
                 rngs: nnx.Rngs | None = None, **overrides) -> DiT:
    """A DiT by official name ("DiT-XL/2" … "DiT-S/8") at `image_size` pixels (latent side
    image_size // 8), or by plain hyper-parameters when `name` is None. `overrides` replace any
    DiTConfig field (e.g. dtype=jnp.bfloat16, num_classes=10, input_size=32)."""
    fields = {}
    if name is not None:
        if name not in DIT_CONFIGS:
            raise ValueError(f"unknown DiT model {name!r}; choose one of {sorted(DIT_CONFIGS)}")
        fields.update(DIT_CONFIGS[name])
        size = image_size
        if isinstance(size, int):
            if size % 8:
                raise ValueError(f"image_size {size} is not divisible by 8 (the VAE down-sampling)")
            fields["input_size"] = size // 8
        else:
            fields["input_size"] = tuple(s // 8 for s in size)
    fields.update(overrides)
    return DiT(DiTConfig(**fields), rngs=rngs if rngs is not None else nnx.Rngs(0))


def count_params(model: nnx.Module, *, include_pos_embed: bool = True) -> int:
    """Parameter count as the official code reports it (pos_embed included by default)."""
    params = nnx.state(model, nnx.Param)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    if include_pos_embed:
        total += int(np.prod(model.pos_embed.shape))
    return total


def convert_blocks(model: DiT, *, scan_blocks: bool) -> DiT:
    """The same model with its blocks as a list (`scan_blocks=False`) or stacked along a leading
    `layers` axis (`scan_blocks=True`); the two forms compute the same function."""
    cfg = model.config
    if cfg.scan_blocks == scan_blocks:
        return model
    target = nnx.eval_shape(lambda: DiT(dataclasses.replace(cfg, scan_blocks=scan_blocks)))
    values = nnx.to_pure_dict(nnx.state(model))
    blocks = values["blocks"]
    if scan_blocks:
        values["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *(blocks[i] for i in range(cfg.depth)))
    else:
        values["blocks"] = {i: jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(cfg.depth)}
    state = nnx.state(target)
    nnx.replace_by_pure_dict(state, values)
    nnx.update(target, state)
    return target


def split_model(cfg: DiTConfig):
    """(graphdef, abstract params, abstract buffers) of a DiT without allocating its weights."""
    return split_abstract(lambda: DiT(cfg, rngs=nnx.Rngs(0)))


def split_abstract(build: Callable[[], nnx.Module]):
    """(graphdef, abstract params, abstract other variables) of the module `build()` returns,
    without allocating its weights."""
    # jax.eval_shape rather than nnx.eval_shape: the latter turns logical axis names into mesh
    # axes when a mesh is set, which they are not (the rules in dit_jax.sharding map them).
    graphdefs = []

    def split():
        graphdef, params, buffers = nnx.split(build(), nnx.Param, ...)
        graphdefs.append(graphdef)
        return params, buffers

    params, buffers = jax.eval_shape(split)
    return graphdefs[0], params, buffers
