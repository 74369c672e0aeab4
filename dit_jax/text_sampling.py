"""Sampling a text-to-image model (`model.condition = "text"`, docs/text.md): prompts in, images
out, with classifier-free guidance whose unconditional branch is the null caption or a negative
prompt.

    model, tokenizer, settings = load_text_run("runs/text_demo")
    images = sample_prompts(model, tokenizer, ["a blue triangle"], **settings)

The prompts go through the run's tokenizer and the model's own encoder, or, for a model trained on
a frozen T5's extracted embeddings, through that T5 and its tokenizer (the run's config.json
records which, `text.t5`); then any sampler of the registry (`dit_jax.samplers`) runs the guided
model_fn, and a latent-space run's VAE decodes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from dit_jax import diffusion as diff
from dit_jax.checkpoint.model import CONFIG_FILE, config_from_dict
from dit_jax.checkpoint.workdir import RUN_CONFIG_FILE, Checkpoints
from dit_jax.data.captions import WordTokenizer
from dit_jax.models.text import TextModelConfig, TextToImage, split_text_model
from dit_jax.port.paths import looks_like_hub_id
from dit_jax.port.t5 import t5_text_encoder
from dit_jax.samplers import sample_loop
from dit_jax.sampling import (PROMPTS_FILE, Decoder, check_out_dir, clip_denoised_fn,
                              diffusion_for, load_vae_decoder, make_grid, save_png, to_uint8)
from dit_jax.sharding import abstract_with_shardings, make_mesh, state_shardings

TOKENIZER_FILE = "text_tokenizer.json"  # the words of a run's WordTokenizer


def text_config_from_dict(fields: dict[str, Any]) -> TextModelConfig:
    return config_from_dict(fields, TextModelConfig)


def text_model_buffers(cfg: TextModelConfig, mesh: Mesh) -> nnx.State:
    """The model's fixed variables (the null caption), replicated: built from nnx.Rngs(0), so they
    depend on the config alone and training and sampling see the same null caption."""
    _, _, abstract = split_text_model(cfg)
    return jax.jit(lambda: nnx.split(TextToImage(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)[2],
                   out_shardings=state_shardings(abstract, mesh))()


def save_tokenizer(workdir: str | Path, tokenizer: WordTokenizer) -> None:
    path = Path(workdir) / TOKENIZER_FILE
    path.write_text(json.dumps({"words": tokenizer.words, "max_length": tokenizer.max_length}) + "\n")


T5_HELP = ("pass --t5=SRC: the T5 folder (with its tokenizer) or hub id the latents were "
           "extracted with (extract_latents --text-encoder)")


class FrozenT5Prompts:
    """Prompts → (embeddings (N, L, C) float32, mask (N, L) int32) through a frozen T5 and its
    tokenizer, exactly as `extract_latents --captions` encoded the training captions (no
    lower-casing or cleaning, max-length padding to the run's `max_length`). Stands where a
    jointly trained run's word tokenizer stands: the model passes embeddings through."""

    def __init__(self, src: str, *, max_length: int, caption_channels: int, where: str):
        self.src, self.where, self.caption_channels = src, where, caption_channels
        self._encode = t5_text_encoder(src, max_length=max_length)

    def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        embeddings, mask = self._encode(list(prompts))
        if embeddings.shape[-1] != self.caption_channels:
            raise ValueError(f"the T5 encoder {self.src!r} ({self.where}) has width "
                             f"{embeddings.shape[-1]}, the model reads {self.caption_channels}: "
                             f"{T5_HELP}")
        return np.asarray(embeddings, np.float32), np.asarray(mask, np.int32)


def frozen_t5(workdir: Path, run: dict[str, Any], cfg: TextModelConfig,
              t5: str | None = None) -> FrozenT5Prompts:
    """The prompt encoder of a run trained on a frozen T5's embeddings: `t5` when given, else
    the encoder its config.json records (text.t5, copied from the latents' text manifest at
    train time). A missing or unloadable encoder is a one-line error naming --t5."""
    recorded = str((run.get("text") or {}).get("t5") or "")
    src = t5 or recorded
    where = "--t5" if t5 else f"text.t5 in {workdir / RUN_CONFIG_FILE}"
    if not src:
        raise FileNotFoundError(f"{workdir} was trained on a frozen T5's text embeddings and its "
                                f"{RUN_CONFIG_FILE} names no encoder (text.t5): {T5_HELP}")
    if not Path(src).expanduser().exists() and not looks_like_hub_id(src):
        raise FileNotFoundError(f"the T5 encoder {src!r} ({where}) does not exist: {T5_HELP}")
    try:
        return FrozenT5Prompts(src, max_length=cfg.max_length,
                               caption_channels=cfg.caption_channels, where=where)
    except (OSError, ValueError, KeyError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FileNotFoundError(f"the T5 encoder {src!r} ({where}) cannot be loaded "
                                f"({reason.split(': expected')[0]}): {T5_HELP}") from None


def load_text_run(workdir: str | Path, *, which: str = "ema", mesh: Mesh | None = None,
                  t5: str | None = None, vae: str | None = None
                  ) -> tuple[TextToImage, Any, dict[str, Any]]:
    """(model with the `which` weights of the newest checkpoint, prompt tokenizer, the run's
    sampling settings) of a text run's workdir.

    The tokenizer is the run's word tokenizer (a jointly trained encoder: token ids), or, for a
    run trained on a frozen T5's extracted embeddings, that T5 with its tokenizer
    (`FrozenT5Prompts`: embeddings), `t5` or else the one the run recorded. The settings hold a
    `decoder`: the run's VAE (`vae` overrides it) for a latent-space run, None in pixel space."""
    workdir = Path(workdir).absolute()
    config_path = workdir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{workdir} is not a training workdir (no {CONFIG_FILE})")
    fields = json.loads(config_path.read_text())
    if fields.get("condition") != "text":
        raise ValueError(f"{workdir} holds a class-conditional model: sample it with --labels, "
                         f"not --prompt")
    cfg = text_config_from_dict(fields)
    run_path = workdir / RUN_CONFIG_FILE
    if not run_path.is_file():
        raise FileNotFoundError(f"{workdir} has no {RUN_CONFIG_FILE} (the run's training config)")
    run = json.loads(run_path.read_text())
    # The text side first: a missing encoder fails before any weights are read.
    if cfg.encoder == "none":
        tokenizer = frozen_t5(workdir, run, cfg, t5)
    else:
        if t5:
            raise ValueError(f"--t5 is for runs trained on a frozen T5's embeddings; {workdir} "
                             f"trained its own text encoder (its tokenizer is {TOKENIZER_FILE})")
        if not (workdir / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"{workdir / TOKENIZER_FILE} is missing: the run's tokenizer")
        words = json.loads((workdir / TOKENIZER_FILE).read_text())
        tokenizer = WordTokenizer(words["words"], max_length=int(words["max_length"]))
    vae = vae or run.get("vae") or "none"
    if vae == "none" and cfg.in_channels not in (1, 3):
        raise ValueError(f"{workdir} holds a latent-space model and its {RUN_CONFIG_FILE} names "
                         f"no VAE: pass --vae")
    decoder = None if vae == "none" else load_vae_decoder(vae)
    mesh = mesh or make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
    graphdef, abstract, _ = split_text_model(cfg)
    target = abstract_with_shardings(abstract, state_shardings(abstract, mesh))
    checkpoints = Checkpoints(workdir, read_only=True)
    try:
        step = checkpoints.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoints in {checkpoints.directory}")
        weights = checkpoints.manager.restore(step, args=ocp.args.Composite(**{which: ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))}))[which]
    finally:
        checkpoints.close()
    model = nnx.merge(graphdef, weights, text_model_buffers(cfg, mesh))
    settings = {"noise_schedule": run["diffusion"]["noise_schedule"],
                "diffusion_steps": int(run["diffusion"]["diffusion_steps"]),
                "prediction": run["diffusion"]["prediction"],
                "clip_denoised": bool(run["sample"]["clip_denoised"]),
                "sampler": run["sample"]["sampler"], "steps": int(run["sample"]["steps"]),
                "cfg_scale": float(run["sample"]["cfg_scale"]),
                "image_size": int(run["data"]["image_size"]), "decoder": decoder}
    return model, tokenizer, settings


def text_guidance(model: TextToImage, embeddings, mask, scale, *, negative=None):
    """model_fn(x, t) of the samplers: the model on the prompts' `embeddings` and `mask`, guided
    at `scale` on every channel against `negative` = (embeddings, mask) of a negative prompt, or
    the null caption when None."""
    n = embeddings.shape[0]
    uncond = model.null_caption(n) if negative is None else negative
    uncond = (uncond[0].astype(jnp.float32), jnp.asarray(uncond[1], jnp.int32))
    if uncond[0].shape[1] != embeddings.shape[1]:
        raise ValueError(f"the unconditional text has {uncond[0].shape[1]} tokens, the prompts "
                         f"{embeddings.shape[1]}: pad both to the model's max_length")

    def model_fn(x, t, text):
        return model.denoise(x, t, *text)

    return diff.conditional_guidance(model_fn, (embeddings, jnp.asarray(mask, jnp.int32)), uncond,
                                     scale, guide_channels=None)


def sample_prompts(model: TextToImage, tokenizer, prompts: Sequence[str], *,
                   negative_prompt: str | None = None, cfg_scale: float = 4.0,
                   sampler: str = "ddim", steps: int = 50, seed: int = 0, image_size: int,
                   noise_schedule: str = "linear", diffusion_steps: int = 1000,
                   prediction: str = "epsilon", clip_denoised: bool = False,
                   decoder: Decoder | None = None) -> np.ndarray:
    """uint8 images (N, S, S, 3), S = `image_size`, of text model `model`, one per prompt; the
    noise of image i is drawn from (seed, i). `tokenizer(prompts)` gives token ids for the
    model's own encoder, or a frozen encoder's embeddings; a latent-space model's samples go
    through `decoder` (the run's VAE)."""
    cfg = model.config
    ids, mask = tokenizer(list(prompts))
    negative = None
    if negative_prompt is not None:
        negative = tokenizer([negative_prompt] * len(prompts))
    process = diffusion_for(sampler, steps, learn_sigma=cfg.learn_sigma,
                            noise_schedule=noise_schedule, diffusion_steps=diffusion_steps)
    full = diff.create_diffusion("", noise_schedule=noise_schedule,
                                 diffusion_steps=diffusion_steps, learn_sigma=cfg.learn_sigma)
    graphdef, state = nnx.split(model)
    vae_graphdef, vae_state = nnx.split(decoder.module) if decoder is not None else (None, None)

    @jax.jit
    def run(state, vae_state, ids, mask, negative, x_T, key):
        model = nnx.merge(graphdef, state)
        embeddings = model.encode(ids, mask)
        neg = None if negative is None else (model.encode(*negative), negative[1])
        model_fn = text_guidance(model, embeddings, mask, cfg_scale, negative=neg)
        if clip_denoised or prediction != "epsilon":
            model_fn = clip_denoised_fn(model_fn, full, cfg.in_channels,
                                        1.0 if clip_denoised else None, prediction)
        samples = sample_loop(sampler, process, model_fn, x_T, key)
        if decoder is not None:
            samples = decoder.decode(nnx.merge(vae_graphdef, vae_state), samples)
        return to_uint8(samples)

    side = image_size
    if decoder is not None:
        if image_size % decoder.scale_factor:
            raise ValueError(f"image size {image_size} is not a multiple of the VAE's "
                             f"{decoder.scale_factor}")
        side = image_size // decoder.scale_factor
    shape = (side, side, cfg.in_channels)
    x_T = jnp.stack([jax.random.normal(jax.random.key(np.uint32(seed) + i), shape)
                     for i in range(len(prompts))])
    return np.asarray(run(state, vae_state, ids, mask, negative, x_T, jax.random.key(seed)))


def sample_text_run(ckpt: str | Path, prompts: Sequence[str], *, out: str | Path,
                    negative_prompt: str | None = None, seed: int = 0, t5: str | None = None,
                    vae: str | None = None, **overrides) -> Path:
    """`sample.py --ckpt=W --prompt=...`: one image per prompt from text run W's EMA weights,
    written as OUT/grid.png, OUT/samples.npz (images, prompts) and OUT/prompts.json (what was
    asked). The run's config.json supplies the sampler, steps, guidance, clipping and image size
    unless `overrides` give them; `t5` and `vae` replace the encoder and VAE the run recorded.
    OUT must be new, empty, or sample.py's own (`dit_jax.sampling.check_out_dir`)."""
    out = Path(out)
    check_out_dir(out)  # before anything is loaded
    model, tokenizer, settings = load_text_run(ckpt, t5=t5, vae=vae)
    settings.update(overrides)
    images = sample_prompts(model, tokenizer, prompts, negative_prompt=negative_prompt,
                            seed=seed, **settings)
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_png(out / "grid.png", make_grid(images))
        np.savez(out / "samples.npz", images=images, prompts=np.asarray(list(prompts)))
        record = {k: v for k, v in settings.items() if k != "decoder"}
        (out / PROMPTS_FILE).write_text(json.dumps(
            {"ckpt": str(ckpt), "prompts": list(prompts), "negative_prompt": negative_prompt,
             "seed": seed, **record}, indent=2) + "\n")
    return out / "grid.png"


__all__ = ["FrozenT5Prompts", "TOKENIZER_FILE", "frozen_t5", "load_text_run", "sample_prompts",
           "sample_text_run", "save_tokenizer", "text_config_from_dict", "text_guidance",
           "text_model_buffers"]
