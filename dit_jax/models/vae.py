"""Stable Diffusion's VAE (diffusers `AutoencoderKL`) in Flax NNX, channels-last (N, H, W, C).

The same function as diffusers' PyTorch `AutoencoderKL` with DownEncoderBlock2D / UpDecoderBlock2D
blocks (stabilityai/sd-vae-ft-ema and sd-vae-ft-mse, and any config of that family); see
docs/numerics.md#latents-and-data.
Attribute names mirror diffusers' module names (`encoder.down_blocks[0].resnets[1].conv1`, ...),
so the weight port in `dit_jax.port.vae` is a mechanical renaming.

`dtype` is the compute dtype (e.g. bfloat16); parameters are always float32, GroupNorm statistics
and the attention softmax are computed in float32, and `encode` / `decode` return float32.
The VAE carries no sharding annotations: it is small (84M parameters) and replicated.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

log = logging.getLogger(__name__)

NORM_EPS = 1e-6  # every GroupNorm of the diffusers VAE (encoder, decoder, attention)
LOGVAR_RANGE = (-30.0, 20.0)

# config.json of stabilityai/sd-vae-ft-ema and stabilityai/sd-vae-ft-mse.
SD_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# Keys of diffusers' AutoencoderKL config that do not change the function computed here.
_IGNORED_CONFIG_KEYS = {"force_upcast", "latents_mean", "latents_std"}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The subset of diffusers' AutoencoderKL config that defines the network. Defaults are
    diffusers' defaults (not the sd-vae layout: use `VAEConfig.from_dict(SD_VAE_CONFIG)`)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    # Later VAEs (SD3, Flux) shift latents before scaling; None (sd-vae) means no shift.
    shift_factor: float | None = None
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    def __post_init__(self):
        if not self.block_out_channels:
            raise ValueError("block_out_channels must name at least one block")
        for width in self.block_out_channels:
            if width % self.norm_num_groups:
                raise ValueError(f"block width {width} is not divisible by norm_num_groups "
                                 f"{self.norm_num_groups}")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "VAEConfig":
        """From a diffusers config.json dict. Rejects what this port does not implement (other
        block types, activations or norms) instead of silently computing something else."""
        config = dict(config)
        if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(f"expected an AutoencoderKL config, got _class_name "
                             f"{config['_class_name']!r}")
        if config.pop("act_fn", "silu") != "silu":
            raise ValueError("only act_fn 'silu' is supported")
        width = len(config.get("block_out_channels", cls.block_out_channels))
        for name, block in (("down_block_types", "DownEncoderBlock2D"),
                            ("up_block_types", "UpDecoderBlock2D")):
            types = list(config.pop(name, [block] * width))
            if types != [block] * width:
                raise ValueError(f"{name} must be {width} x {block!r} (one per entry of "
                                 f"block_out_channels), got {types}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for key, value in config.items():
            if key in fields:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            elif not key.startswith("_") and key not in _IGNORED_CONFIG_KEYS:
                unknown.append(key)
        if unknown:
            log.warning("ignoring AutoencoderKL config keys %s", sorted(unknown))
        return cls(**kwargs)



# ----------------------------------------------------------------------------------------------
# Layers. Hand-written rather than nnx.Conv / nnx.GroupNorm so that parameter names, the float32
# GroupNorm statistics and the exact padding are explicit and independent of library defaults.


def _torch_default_init(key, shape, fan_in):
    # PyTorch's default weight init (kaiming-uniform with a=sqrt(5)), so a fresh VAE has O(1)
    # activations like an untrained diffusers one. Biases start at zero instead of PyTorch's
    # uniform: each distinct random shape costs an XLA compile, and real use loads weights anyway.
    bound = fan_in ** -0.5
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class Conv2d(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: Sequence[tuple[int, int]] | None = None, dtype=jnp.float32,
                 precision=None, rngs: nnx.Rngs):
        fan_in = in_channels * kernel_size * kernel_size
        self.kernel = nnx.Param(_torch_default_init(
            rngs.params(), (kernel_size, kernel_size, in_channels, out_channels), fan_in))
        self.bias = nnx.Param(jnp.zeros((out_channels,), jnp.float32))
        self.stride = stride
        # "Same" padding for odd kernels unless given: diffusers uses padding = kernel_size // 2.
        half = kernel_size // 2
        self.padding = tuple(padding) if padding is not None else ((half, half), (half, half))
        self.dtype = dtype
        self.precision = precision

    def __call__(self, x):
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype),
            window_strides=(self.stride, self.stride), padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
        return y + self.bias[...].astype(self.dtype)


class Linear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, dtype=jnp.float32, precision=None,
                 rngs: nnx.Rngs):
        self.kernel = nnx.Param(_torch_default_init(rngs.params(), (in_features, out_features),
                                                    in_features))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))
        self.dtype = dtype
        self.precision = precision

    def __call__(self, x):
        y = jnp.matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                       precision=self.precision)
        return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm on NHWC input: statistics over (H, W, channels of the group), biased
    variance, all in float32 whatever the compute dtype (bf16 statistics visibly shift colours)."""

    def __init__(self, num_groups: int, num_channels: int, *, eps: float = NORM_EPS,
                 dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((num_channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_channels,), jnp.float32))
        self.num_groups = num_groups
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        *lead, channels = x.shape
        groups = x.astype(jnp.float32).reshape(*lead, self.num_groups, channels // self.num_groups)
        axes = tuple(range(1, len(lead))) + (groups.ndim - 1,)
        mean = groups.mean(axis=axes, keepdims=True)
        # Two-pass variance: E[x²] - E[x]² loses digits on large activations of the decoder.
        var = jnp.square(groups - mean).mean(axis=axes, keepdims=True)
        y = ((groups - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class ResnetBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, *, groups: int, dtype, precision,
                 rngs: nnx.Rngs):
        self.norm1 = GroupNorm(groups, in_channels, dtype=dtype)
        self.conv1 = Conv2d(in_channels, out_channels, 3, dtype=dtype, precision=precision, rngs=rngs)
        self.norm2 = GroupNorm(groups, out_channels, dtype=dtype)
        self.conv2 = Conv2d(out_channels, out_channels, 3, dtype=dtype, precision=precision,
                            rngs=rngs)
        self.conv_shortcut = (Conv2d(in_channels, out_channels, 1, dtype=dtype, precision=precision,
                                     rngs=rngs) if in_channels != out_channels else None)

    def __call__(self, x):
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x.astype(h.dtype)
        return shortcut + h


class Attention(nnx.Module):
    """The VAE's mid-block self-attention: one head as wide as the block, GroupNorm in front,
    residual connection, softmax in float32 (diffusers' upcast_softmax)."""

    def __init__(self, channels: int, *, groups: int, dtype, precision, rngs: nnx.Rngs):
        self.group_norm = GroupNorm(groups, channels, dtype=dtype)
        self.to_q = Linear(channels, channels, dtype=dtype, precision=precision, rngs=rngs)
        self.to_k = Linear(channels, channels, dtype=dtype, precision=precision, rngs=rngs)
        self.to_v = Linear(channels, channels, dtype=dtype, precision=precision, rngs=rngs)
        self.to_out = Linear(channels, channels, dtype=dtype, precision=precision, rngs=rngs)
        self.dtype = dtype
        self.precision = precision

    def __call__(self, x):
        batch, height, width, channels = x.shape
        h = self.group_norm(x).reshape(batch, height * width, channels)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, precision=self.precision,
                            preferred_element_type=jnp.float32) * channels ** -0.5
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bqk,bkc->bqc", weights, v, precision=self.precision)
        out = self.to_out(out).reshape(batch, height, width, channels)
        return x.astype(out.dtype) + out


class MidBlock(nnx.Module):
    def __init__(self, channels: int, *, groups: int, add_attention: bool, dtype, precision,
                 rngs: nnx.Rngs):
        kw = dict(groups=groups, dtype=dtype, precision=precision, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, **kw),
                                 ResnetBlock2D(channels, channels, **kw)])
        self.attention = Attention(channels, **kw) if add_attention else None

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class Downsample2D(nnx.Module):
    def __init__(self, channels: int, *, dtype, precision, rngs: nnx.Rngs):
        # Padding 0 on top/left and 1 on bottom/right, as diffusers' (0, 1, 0, 1) F.pad with the
        # stride-2 VALID conv: a symmetric pad would shift the sampling grid by one pixel.
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dtype,
                           precision=precision, rngs=rngs)

    def __call__(self, x):
        return self.conv(x)


class Upsample2D(nnx.Module):
    def __init__(self, channels: int, *, dtype, precision, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, 3, dtype=dtype, precision=precision, rngs=rngs)

    def __call__(self, x):
        # Nearest-neighbour 2x: every pixel becomes a 2x2 block. One axis at a time, because a
        # single reshape merging two axis pairs has no sharding rule on explicit-axis meshes.
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, add_downsample: bool,
                 groups: int, dtype, precision, rngs: nnx.Rngs):
        kw = dict(groups=groups, dtype=dtype, precision=precision, rngs=rngs)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, **kw)
            for i in range(num_layers)])
        self.downsample = (Downsample2D(out_channels, dtype=dtype, precision=precision, rngs=rngs)
                           if add_downsample else None)

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsample(x) if self.downsample is not None else x


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, add_upsample: bool,
                 groups: int, dtype, precision, rngs: nnx.Rngs):
        kw = dict(groups=groups, dtype=dtype, precision=precision, rngs=rngs)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, **kw)
            for i in range(num_layers)])
        self.upsample = (Upsample2D(out_channels, dtype=dtype, precision=precision, rngs=rngs)
                         if add_upsample else None)

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsample(x) if self.upsample is not None else x


class Encoder(nnx.Module):
    """Image (N, H, W, in_channels) → 2·latent_channels moments at 1 / 2^(blocks-1) the size."""

    def __init__(self, cfg: VAEConfig, *, dtype, precision, rngs: nnx.Rngs):
        widths = cfg.block_out_channels
        groups = cfg.norm_num_groups
        kw = dict(dtype=dtype, precision=precision, rngs=rngs)
        self.conv_in = Conv2d(cfg.in_channels, widths[0], 3, **kw)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(widths[max(i - 1, 0)], widths[i], num_layers=cfg.layers_per_block,
                               add_downsample=i < len(widths) - 1, groups=groups, **kw)
            for i in range(len(widths))])
        self.mid_block = MidBlock(widths[-1], groups=groups,
                                  add_attention=cfg.mid_block_add_attention, **kw)
        self.conv_norm_out = GroupNorm(groups, widths[-1], dtype=dtype)
        self.conv_out = Conv2d(widths[-1], 2 * cfg.latent_channels, 3, **kw)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latent (N, h, w, latent_channels) → image (N, h·2^(blocks-1), w·2^(blocks-1),
    out_channels)."""

    def __init__(self, cfg: VAEConfig, *, dtype, precision, rngs: nnx.Rngs):
        widths = tuple(reversed(cfg.block_out_channels))
        groups = cfg.norm_num_groups
        kw = dict(dtype=dtype, precision=precision, rngs=rngs)
        self.conv_in = Conv2d(cfg.latent_channels, widths[0], 3, **kw)
        self.mid_block = MidBlock(widths[0], groups=groups,
                                  add_attention=cfg.mid_block_add_attention, **kw)
        # One more resnet per block than the encoder, as diffusers (layers_per_block + 1).
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(widths[max(i - 1, 0)], widths[i], num_layers=cfg.layers_per_block + 1,
                             add_upsample=i < len(widths) - 1, groups=groups, **kw)
            for i in range(len(widths))])
        self.conv_norm_out = GroupNorm(groups, widths[-1], dtype=dtype)
        self.conv_out = Conv2d(widths[-1], cfg.out_channels, 3, **kw)

    def __call__(self, z):
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)), float32, (N, h, w, latent_channels). A pytree,
    so it can be returned from jitted functions."""

    mean: jax.Array
    logvar: jax.Array  # already clipped to LOGVAR_RANGE

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, *LOGVAR_RANGE))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL to the standard normal, summed over all but the batch axis (diffusers' `kl()`)."""
        terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        return 0.5 * terms.sum(axis=tuple(range(1, terms.ndim)))


class AutoencoderKL(nnx.Module):
    """`encode(x) -> DiagonalGaussian` for images x (N, H, W, C) in [-1, 1]; `decode(z) -> x`.
    Build from a diffusers config dict or a VAEConfig; load weights with dit_jax.port.load_vae.

    Attributes: `config`, `scaling_factor` (latent = sample · scaling_factor, 0.18215 for
    sd-vae), `scale_factor` (pixels per latent pixel, 8 for sd-vae), `latent_channels`.
    """

    def __init__(self, config: VAEConfig | Mapping[str, Any] | None = None, *, dtype=jnp.float32,
                 precision=None, rngs: nnx.Rngs):
        cfg = config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config or {})
        self.config = cfg
        self.dtype = dtype
        kw = dict(dtype=dtype, precision=precision, rngs=rngs)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        latent = cfg.latent_channels
        self.quant_conv = Conv2d(2 * latent, 2 * latent, 1, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = (Conv2d(latent, latent, 1, **kw) if cfg.use_post_quant_conv
                                else None)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.config.shift_factor or 0.0

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return DiagonalGaussian.from_moments(h)

    def decode(self, z: jax.Array) -> jax.Array:
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstruction: decode a posterior sample (the mode when no key is given)."""
        posterior = self.encode(x)
        return self.decode(posterior.mode() if key is None else posterior.sample(key))


def encode_to_latents(vae: AutoencoderKL, images: jax.Array, key: jax.Array | None = None, *,
                      noise: jax.Array | None = None) -> jax.Array:
    """Images (N, H, W, C) in [-1, 1] → the diffusion model's latents:
    (posterior sample - shift_factor) · scaling_factor (shift 0 for sd-vae). The sample is
    mean + std · ε with ε drawn from `key`, or given as `noise` (latent-shaped; the same ε as
    `key` gives is `jax.random.normal(key, latent shape)`); with neither, the posterior mean."""
    posterior = vae.encode(images)
    if noise is not None:
        z = posterior.mean + posterior.std * noise.astype(posterior.mean.dtype)
    elif key is not None:
        z = posterior.sample(key)
    else:
        z = posterior.mode()
    return (z - vae.shift_factor) * vae.scaling_factor


def decode_latents(vae: AutoencoderKL, latents: jax.Array) -> jax.Array:
    """The diffusion model's latents → images in about [-1, 1] (float32, not clipped)."""
    return vae.decode(latents.astype(jnp.float32) / vae.scaling_factor + vae.shift_factor)


def create_vae(config: VAEConfig | Mapping[str, Any] | None = None, *, dtype=jnp.float32,
               precision=None, seed: int = 0) -> AutoencoderKL:
    """A VAE with random weights, for tests and shape checks (load real ones with
    dit_jax.port.vae.load_vae). The same distribution as `AutoencoderKL(config, rngs=...)`, but
    drawn as one vector: eager construction compiles a random kernel per distinct weight shape,
    which takes seconds per shape on a small CPU."""
    abstract = nnx.eval_shape(lambda: AutoencoderKL(config, dtype=dtype, precision=precision,
                                                    rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    total = sum(leaf.size for leaf in jax.tree.leaves(pure) if leaf.ndim > 1)
    draws = np.asarray(jax.random.uniform(jax.random.key(seed), (total,), jnp.float32, -1.0, 1.0))
    offset = 0

    def init(path, leaf):
        nonlocal offset
        if leaf.ndim == 1:  # GroupNorm scale 1, every bias 0, as the module initialisers
            fill = 1.0 if path[-1].key == "scale" else 0.0
            return jnp.full(leaf.shape, fill, jnp.float32)
        # Kernels are (kh, kw, in, out) or (in, out): fan_in is everything but the last axis.
        fan_in = math.prod(leaf.shape[:-1])
        values = draws[offset:offset + leaf.size].reshape(leaf.shape) * fan_in ** -0.5
        offset += leaf.size
        return jnp.asarray(values)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(init, pure))
    return nnx.merge(graphdef, state)
