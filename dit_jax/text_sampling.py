"""Sampling a text-to-image model (`model.condition = "text"`, docs/text.md): prompts in, images
out, with classifier-free guidance whose unconditional branch is the null caption or a negative
prompt.

    model, tokenizer, settings = load_text_run("runs/text_demo")
    images = sample_prompts(model, tokenizer, ["a blue triangle"], **settings)

The prompts go through the run's tokenizer (and the model's own encoder, or a frozen T5's
precomputed embeddings for a model trained on extracted text embeddings), then any sampler of the
registry (`dit_jax.samplers`) runs the guided model_fn.
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
from dit_jax.samplers import sample_loop
from dit_jax.sampling import clip_denoised_fn, diffusion_for, to_uint8
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


def load_text_run(workdir: str | Path, *, which: str = "ema", mesh: Mesh | None = None
                  ) -> tuple[TextToImage, WordTokenizer, dict[str, Any]]:
    """(model with the `which` weights of the newest checkpoint, tokenizer, the run's sampling
    settings) of a text run's workdir."""
    workdir = Path(workdir).absolute()
    config_path = workdir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{workdir} is not a training workdir (no {CONFIG_FILE})")
    fields = json.loads(config_path.read_text())
    if fields.get("condition") != "text":
        raise ValueError(f"{workdir} holds a class-conditional model: sample it with --labels, "
                         f"not --prompt")
    cfg = text_config_from_dict(fields)
    if not (workdir / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{workdir / TOKENIZER_FILE} is missing: the run's tokenizer")
    words = json.loads((workdir / TOKENIZER_FILE).read_text())
    tokenizer = WordTokenizer(words["words"], max_length=int(words["max_length"]))
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
    run = json.loads((workdir / RUN_CONFIG_FILE).read_text())
    settings = {"noise_schedule": run["diffusion"]["noise_schedule"],
                "diffusion_steps": int(run["diffusion"]["diffusion_steps"]),
                "prediction": run["diffusion"]["prediction"],
                "clip_denoised": bool(run["sample"]["clip_denoised"]),
                "sampler": run["sample"]["sampler"], "steps": int(run["sample"]["steps"]),
                "cfg_scale": float(run["sample"]["cfg_scale"]),
                "image_size": int(run["data"]["image_size"])}
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
                   prediction: str = "epsilon", clip_denoised: bool = False) -> np.ndarray:
    """uint8 images (N, S, S, 3) of pixel-space text model `model`, one per prompt; the noise of
    image i is drawn from (seed, i)."""
    cfg = model.config
    ids, mask = tokenizer(list(prompts))
    negative = None
    if negative_prompt is not None:
        neg_ids, neg_mask = tokenizer([negative_prompt] * len(prompts))
        negative = (neg_ids, neg_mask)
    process = diffusion_for(sampler, steps, learn_sigma=cfg.learn_sigma,
                            noise_schedule=noise_schedule, diffusion_steps=diffusion_steps)
    full = diff.create_diffusion("", noise_schedule=noise_schedule,
                                 diffusion_steps=diffusion_steps, learn_sigma=cfg.learn_sigma)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, mask, negative, x_T, key):
        model = nnx.merge(graphdef, state)
        embeddings = model.encode(ids, mask)
        neg = None if negative is None else (model.encode(*negative), negative[1])
        model_fn = text_guidance(model, embeddings, mask, cfg_scale, negative=neg)
        if clip_denoised or prediction != "epsilon":
            model_fn = clip_denoised_fn(model_fn, full, cfg.in_channels,
                                        1.0 if clip_denoised else None, prediction)
        return to_uint8(sample_loop(sampler, process, model_fn, x_T, key))

    shape = (image_size, image_size, cfg.in_channels)
    x_T = jnp.stack([jax.random.normal(jax.random.key(np.uint32(seed) + i), shape)
                     for i in range(len(prompts))])
    return np.asarray(run(state, ids, mask, negative, x_T, jax.random.key(seed)))


__all__ = ["TOKENIZER_FILE", "load_text_run", "sample_prompts", "save_tokenizer",
           "text_config_from_dict", "text_guidance", "text_model_buffers"]
