"""The text-to-image model of `model.condition = "text"` (docs/text.md): the PixArt-α transformer
(`dit_jax.models.pixart`) with, optionally, a T5 encoder (`dit_jax.models.t5`) trained jointly
from scratch.

    model = TextToImage(TextModelConfig(...))
    model(x, t, text, text_mask)

`text` is either token ids (N, L) int, encoded by the model's own encoder (`encoder="t5"`), or
precomputed text embeddings (N, L, caption_channels) from a frozen encoder (`encoder="none"`,
e.g. T5-XXL hidden states extracted once with `python -m dit_jax.extract_latents --captions`).
`text_mask` (N, L) is 1 on real tokens; padding never changes the output.

Caption dropout and the null caption: a dropped caption is replaced by the null caption, a fixed
random (L, caption_channels) table (randn / √caption_channels, never trained: the original
PixArt-α's `y_embedding` buffer), attended in full (an all-ones mask), in the embedding space,
after the encoder. The unconditional branch of guidance uses the same table unless a negative
prompt is given. Attending the whole table rather than keeping the caption's mask (which the
original does) makes the unconditional input one fixed thing, independent of the caption's
length, the same in training and sampling.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dit_jax.models.dit import _linear, split_abstract
from dit_jax.models.pixart import PixArt, PixArtConfig
from dit_jax.models.t5 import T5Encoder, T5EncoderConfig

ENCODERS = ("none", "t5")


@dataclasses.dataclass(frozen=True)
class TextModelConfig:
    """A text-conditioned DiT (PixArt-α blocks) and its text encoder, as flat fields (they are
    written to model_config.json). `input_size` is the latent/pixel side the model trains at
    (diffusers' sample_size); `max_length` the number of text tokens (the null caption's length);
    `caption_dropout` the training rate of the null caption. With `encoder="t5"` the model owns a
    T5 encoder of `encoder_layers` layers, `encoder_heads` heads of `encoder_head_dim`, width
    `caption_channels` and FFN `encoder_ff`, over `vocab_size` token ids, trained with the DiT."""

    input_size: int
    in_channels: int = 4
    hidden_size: int = 96
    depth: int = 3
    num_heads: int = 4
    patch_size: int = 2
    learn_sigma: bool = True
    caption_channels: int = 4096
    max_length: int = 120
    caption_dropout: float = 0.1
    encoder: str = "none"
    vocab_size: int = 0
    encoder_layers: int = 2
    encoder_heads: int = 4
    encoder_head_dim: int = 16
    encoder_ff: int = 128
    dtype: Any = jnp.float32
    attention_impl: str = "xla"
    remat: bool | str = False
    condition: str = "text"  # marks model_config.json as a text model's
    # Also add the caption's masked mean, projected to the width, to the timestep embedding, so
    # the text drives every block's modulation as a class label does in DiT (not in PixArt-α,
    # whose text reaches the image only through cross-attention; docs/text.md).
    pooled_text: bool = False
    # As the PixArt-α weights a run fine-tunes say (docs/pixart.md): the 1024-MS model's
    # micro-conditions (resolution and aspect ratio, computed from the input's latent size times
    # `latent_scale`, the VAE's pixels per latent pixel) and the position table's interpolation
    # scale (None: PixArt's default, max(input_size // 64, 1)).
    micro_conditions: bool = False
    interpolation_scale: float | None = None
    latent_scale: int = 8

    def __post_init__(self):
        if self.encoder not in ENCODERS:
            raise ValueError(f"model.text_encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.encoder == "t5" and self.vocab_size < 2:
            raise ValueError("a jointly trained T5 encoder needs the tokenizer's vocab_size")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption dropout must be in [0, 1), got {self.caption_dropout}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {self.max_length}")

    @property
    def pixart(self) -> PixArtConfig:
        return PixArtConfig(
            input_size=self.input_size, patch_size=self.patch_size, in_channels=self.in_channels,
            hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads,
            caption_channels=self.caption_channels, learn_sigma=self.learn_sigma,
            micro_conditions=self.micro_conditions,
            interpolation_scale=self.interpolation_scale, class_dropout_prob=self.caption_dropout,
            model_max_length=self.max_length, dtype=self.dtype,
            attention_impl=self.attention_impl, remat=self.remat)

    @property
    def t5(self) -> T5EncoderConfig | None:
        if self.encoder != "t5":
            return None
        return T5EncoderConfig(
            vocab_size=self.vocab_size, d_model=self.caption_channels, d_kv=self.encoder_head_dim,
            d_ff=self.encoder_ff, num_layers=self.encoder_layers, num_heads=self.encoder_heads,
            dtype=self.dtype, remat=self.remat)

    # Read by the class-conditional machinery shared with DiT (checkpoint metadata, guidance).
    @property
    def num_classes(self) -> int:
        return 0


class TextToImage(nnx.Module):
    """`model(x, t, text, text_mask)`: the PixArt transformer `dit` on the text embeddings, from
    `text_encoder` when the model has one (token ids in), else given (embeddings in)."""

    def __init__(self, cfg: TextModelConfig, *, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.dit = PixArt(cfg.pixart, rngs=rngs)
        # Zero-initialised: a fresh model starts as the plain PixArt-α block.
        self.pooled_proj = (_linear(cfg.caption_channels, cfg.hidden_size, rngs=rngs,
                                    names=("caption", "embed"),
                                    kernel_init=nnx.initializers.zeros_init())
                            if cfg.pooled_text else None)
        t5 = cfg.t5
        self.text_encoder = T5Encoder(t5, rngs=rngs) if t5 is not None else None

    def encode(self, text, text_mask):
        """Text embeddings (N, L, caption_channels) float32 of token ids, or `text` itself when
        it already is embeddings (a frozen encoder's, or the null caption)."""
        text = jnp.asarray(text)
        if jnp.issubdtype(text.dtype, jnp.integer):
            if self.text_encoder is None:
                raise ValueError("this model has no text encoder: pass text embeddings "
                                 "(N, L, caption_channels), not token ids")
            return self.text_encoder(text, text_mask)
        return text.astype(jnp.float32)

    def null_caption(self, batch: int):
        """(embeddings (N, L, C), mask (N, L)) of the null caption: the fixed random table,
        attended in full."""
        null = self.dit.y_embedder.y_embedding[...]
        return (jnp.broadcast_to(null[None], (batch,) + null.shape),
                jnp.ones((batch, null.shape[0]), jnp.int32))

    def drop_captions(self, text, text_mask, key):
        """Caption dropout on embeddings: each row replaced by the null caption (and its all-ones
        mask) with probability `caption_dropout`, drawn from `key`."""
        p = self.config.caption_dropout
        if p <= 0:
            return text, text_mask
        n, length = text.shape[:2]
        if length != self.config.max_length:
            raise ValueError(f"caption dropout swaps in the {self.config.max_length}-token null "
                             f"caption: text must have {self.config.max_length} tokens, got "
                             f"{length} (pad the captions to model.max_length)")
        null, null_mask = self.null_caption(n)
        drop = jax.random.uniform(key, (n,)) < p
        return (jnp.where(drop[:, None, None], null.astype(text.dtype), text),
                jnp.where(drop[:, None], null_mask, jnp.asarray(text_mask, jnp.int32)))

    def denoise(self, x, t, embeddings, text_mask):
        condition = None
        if self.pooled_proj is not None:
            mask = jnp.asarray(text_mask, jnp.float32)[..., None]  # (N, L, 1)
            pooled = (embeddings * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)  # (N, C)
            condition = self.pooled_proj(pooled)
        micro = {}
        if self.config.micro_conditions:
            # Square or not, the size of the image this input decodes to, as PixArt-MS trained.
            n, height, width = x.shape[0], x.shape[1] * self.config.latent_scale, \
                x.shape[2] * self.config.latent_scale
            micro = {"resolution": jnp.tile(jnp.asarray([[height, width]], jnp.float32), (n, 1)),
                     "aspect_ratio": jnp.full((n,), height / width, jnp.float32)}
        return self.dit(x, t, embeddings, text_mask, condition=condition, **micro)

    def __call__(self, x, t, text, text_mask):
        return self.denoise(x, t, self.encode(text, text_mask), text_mask)


def split_text_model(cfg: TextModelConfig):
    """(graphdef, abstract params, abstract buffers) of a TextToImage, without allocating it; the
    null caption is a buffer (never trained)."""
    return split_abstract(lambda: TextToImage(cfg, rngs=nnx.Rngs(0)))


__all__ = ["ENCODERS", "TextModelConfig", "TextToImage", "split_text_model"]
