"""Training with `model.condition = "text"` (docs/text.md): the loop of `dit_jax.train.loop`
for a text-to-image model, whose batches carry captions instead of labels.

What differs from the class-conditional run:
- the data yields captions: the built-in captioned shapes (`dit_jax.data.captions`), tokenized by
  a word tokenizer for the model's own T5 encoder trained from scratch (`text.encoder="t5"`),
  or a latents folder whose text embeddings a frozen T5 computed once (`text.encoder="none"`,
  `python -m dit_jax.extract_latents --captions`);
- the model is `dit_jax.models.text.TextToImage` (PixArt-α blocks, plus the encoder);
- caption dropout replaces a caption by the fixed null caption at rate `text.caption_dropout`
  (drawn for the whole batch, after the encoder, inside the step);
- the sample grids draw `text.prompts` (guided against the null caption, or against
  `text.negative_prompt`) and, on the built-in data, score how well they follow their prompts;
- `init_from` names a PixArt-α to fine-tune (anything `dit_jax.port.load_pixart` reads,
  configs/pixart_finetune.py): the model's size comes from its weights, checked against the
  data, and the run starts from them exactly;
- a run on extracted embeddings records the T5 that computed them (`text.t5`, from the
  latents' text manifest) in its config.json, for `sample.py --prompt`.

Checkpoints, resuming, the optimiser, EMA and logging are those of the class-conditional loop.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dit_jax.checkpoint import Checkpoints, write_run_config
from dit_jax.data import make_batches
from dit_jax.data.captions import CaptionedShapes, TextLatentSource, WordTokenizer, prompt_check
from dit_jax.diffusion import training_losses
from dit_jax.models.pixart import PixArt
from dit_jax.models.text import TextModelConfig, TextToImage, split_text_model
from dit_jax.port.pixart import load_pixart
from dit_jax.sampling import make_grid, save_png
from dit_jax.sharding import (batch_sharding, host_batch_rows, make_mesh, place, replicated,
                              shard_batch, state_shardings)
from dit_jax.text_sampling import sample_prompts, save_tokenizer, text_model_buffers
from dit_jax.train.logging import MetricWriter, Progress, read_log
from dit_jax.train.state import TrainState, _DTYPES, check_init_params, ema_update, make_optimizer

log = logging.getLogger(__name__)


def text_source(config):
    """(captioned source, tokenizer) of a text run: the built-in captioned shapes with a word
    tokenizer (for the jointly trained encoder), or a latents folder with extracted text
    embeddings (tokenizer None: the batches carry the embeddings).

    For a latents folder, `config` (the run's resolved copy) is completed from its
    text_manifest.json: text.max_length and text.caption_channels when 0 (else they must agree),
    and text.t5, the frozen encoder that computed the embeddings, when empty: config.json then
    records it, and `sample.py --prompt` encodes prompts with the same T5 and tokenizer."""
    d = config.data
    if d.source == "latents":
        if config.text.encoder != "none":
            raise ValueError("data.source='latents' holds a frozen encoder's text embeddings: set "
                             "text.encoder='none'")
        if config.vae == "none":
            raise ValueError(f"data.source='latents' holds VAE latents: set --config.vae to the VAE "
                             f"they were extracted with (the 'vae' of {d.path}/manifest.json)")
        source = TextLatentSource(d.path, image_size=d.image_size)
        with config.unlocked():
            for key, value in (("max_length", source.max_length),
                               ("caption_channels", source.caption_channels)):
                if int(config.text[key]) == 0:  # "as the data says"
                    config.text[key] = value
                elif int(config.text[key]) != value:
                    raise ValueError(f"the text embeddings in {d.path} have {key}={value}, but "
                                     f"text.{key}={config.text[key]}: set "
                                     f"--config.text.{key}={value} (or 0: from the data)")
            if not config.text.get("t5"):
                config.text.t5 = str(source.text_manifest.get("encoder") or "")
        return source, None
    if d.source != "builtin":
        raise ValueError(f"model.condition='text' trains on data.source='builtin' (the captioned "
                         f"shapes) or 'latents' (with text embeddings); got {d.source!r}")
    if config.vae != "none":
        raise ValueError("the builtin data is pixel-space: set --config.vae=none")
    source = CaptionedShapes(image_size=d.image_size,
                             size=d.num_examples or CaptionedShapes.DEFAULT_SIZE,
                             seed=d.dataset_seed)
    return source, WordTokenizer(source.vocabulary(), max_length=int(config.text.max_length))


def text_model_config(config, tokenizer: WordTokenizer, in_channels: int, input_size: int,
                      *, pixart: PixArt | None = None, latent_scale: int = 1) -> TextModelConfig:
    """The TextModelConfig of a run: from model.* and text.*, or, fine-tuning a PixArt-α
    (`pixart`, loaded from init_from), from the weights, checked against the data."""
    m, t = config.model, config.text
    if m.dtype not in _DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {m.dtype!r}")
    common = dict(max_length=int(t.max_length), caption_dropout=float(t.caption_dropout),
                  dtype=_DTYPES[m.dtype], latent_scale=int(latent_scale),
                  attention_impl="xla" if m.attention_impl == "auto" else m.attention_impl)
    if pixart is not None:
        return TextModelConfig(**pixart_fields(config, pixart, in_channels, input_size,
                                               latent_scale), **common)
    if m.name:
        raise ValueError("model.condition='text' builds its size from model.hidden_size, depth, "
                         "num_heads and patch_size: set model.name=''")
    unset = [k for k in ("hidden_size", "depth", "num_heads", "patch_size") if m.get(k) is None]
    if unset:
        raise ValueError(f"model.{unset[0]} is not set: set --config.model.{unset[0]} (and "
                         f"{', '.join(unset[1:]) or 'the rest of the size'}), or "
                         f"--config.init_from=PIXART to fine-tune PixArt-α (its weights decide)")
    return TextModelConfig(
        input_size=input_size, in_channels=in_channels, hidden_size=int(m.hidden_size),
        depth=int(m.depth), num_heads=int(m.num_heads), patch_size=int(m.patch_size),
        learn_sigma=bool(m.learn_sigma), caption_channels=int(t.caption_channels),
        encoder=t.encoder, vocab_size=tokenizer.vocab_size if t.encoder == "t5" else 0,
        encoder_layers=int(t.encoder_layers), encoder_heads=int(t.encoder_heads),
        encoder_head_dim=int(t.encoder_head_dim), encoder_ff=int(t.encoder_ff),
        pooled_text=bool(t.get("pooled_text", False)), **common)


def pixart_fields(config, pixart: PixArt, in_channels: int, input_size: int,
                  latent_scale: int) -> dict[str, Any]:
    """The model fields of a run fine-tuning `pixart` (init_from): its depth, width, heads,
    patch, learned sigma, caption width, micro-conditions and position scale. The data must be
    what it reads (latent channels, latent size, caption width, and the null caption's length
    for an original checkpoint that has one); model.* values set in the config must agree."""
    p, spec, d = pixart.config, config.init_from, config.data
    if config.text.encoder != "none" or d.source != "latents":
        raise ValueError(f"init_from {spec!r} is a PixArt-α: it fine-tunes on a frozen T5's "
                         f"embeddings: set text.encoder='none' and data.source='latents' "
                         f"(python -m dit_jax.extract_latents --captions)")
    if config.text.get("pooled_text", False):
        raise ValueError("PixArt-α has no pooled-text path: set text.pooled_text=False to "
                         "fine-tune it")
    if p.mlp_ratio != 4:
        raise ValueError(f"init_from {spec!r} has mlp_ratio {p.mlp_ratio}; text runs build "
                         f"PixArt-α's 4")
    for key, theirs in (("hidden_size", p.hidden_size), ("depth", p.depth),
                        ("num_heads", p.num_heads), ("patch_size", p.patch_size)):
        ours = config.model.get(key)
        if ours is not None and int(ours) != theirs:
            raise ValueError(f"init_from {spec!r} has model.{key}={theirs}, the config says "
                             f"{ours}: leave --config.model.{key} unset (the weights decide)")
    if in_channels != p.in_channels:
        raise ValueError(f"init_from {spec!r} reads {p.in_channels}-channel latents, the latents "
                         f"in {d.path} have {in_channels}: extract them with the model's VAE")
    if input_size != p.input_size:
        raise ValueError(f"init_from {spec!r} was trained on {p.input_size}×{p.input_size} "
                         f"latents ({p.input_size * latent_scale} px), the latents in {d.path} "
                         f"are {input_size}×{input_size} ({input_size * latent_scale} px): extract "
                         f"them with "
                         f"--image-size={p.input_size * latent_scale}")
    if int(config.text.caption_channels) != p.caption_channels:
        raise ValueError(f"init_from {spec!r} reads text embeddings of width "
                         f"{p.caption_channels}, those in {d.path} have "
                         f"{config.text.caption_channels}: extract them with the T5 the model "
                         f"was trained with")
    if p.model_max_length and int(config.text.max_length) != p.model_max_length:
        raise ValueError(f"init_from {spec!r} has a {p.model_max_length}-token null caption, the "
                         f"text embeddings in {d.path} have {config.text.max_length} tokens: "
                         f"extract them with --max-text-length={p.model_max_length}")
    return dict(input_size=p.input_size, in_channels=p.in_channels, hidden_size=p.hidden_size,
                depth=p.depth, num_heads=p.num_heads, patch_size=p.patch_size,
                learn_sigma=p.learn_sigma, caption_channels=p.caption_channels, encoder="none",
                micro_conditions=bool(p.micro_conditions),
                interpolation_scale=float(p.interpolation_scale))


def load_init_pixart(config) -> PixArt | None:
    """The PixArt-α transformer `init_from` names (anything `dit_jax.port.load_pixart` reads:
    a diffusers folder or pipeline, a hub id, an original .pth), or None to start from random
    weights."""
    spec = config.get("init_from") or ""
    return load_pixart(spec) if spec else None


def pixart_init_params(config, pixart: PixArt, model_cfg: TextModelConfig) -> nnx.State:
    """The initial weights of a fine-tuning run: exactly `pixart`'s, as the TextToImage's `dit`
    (checked by name and shape as every init_from is)."""
    _, abstract, _ = split_text_model(model_cfg)
    weights = {"dit": nnx.to_pure_dict(nnx.state(pixart, nnx.Param))}
    check_init_params(config.init_from, weights, nnx.to_pure_dict(abstract))
    params = jax.tree.map(lambda a: a, abstract)
    nnx.replace_by_pure_dict(params, weights)
    return params


class CaptionBatches:
    """The class-conditional batch iterator of a captioned source with the captions tokenized:
    {"x", "text" (rows, L) int32 ids, "text_mask" (rows, L) int32}, or with `tokenizer` None the
    extracted embeddings (rows, L, C) as "text"; same state as the wrapped iterator."""

    def __init__(self, batches, tokenizer):
        self.batches, self.tokenizer = batches, tokenizer

    @property
    def next_batch(self) -> int:
        return self.batches.next_batch

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.batches)
        if self.tokenizer is None:  # extracted embeddings
            return {"x": batch["x"], "text": batch["text"], "text_mask": batch["text_mask"]}
        ids, mask = self.tokenizer(list(batch["caption"]))
        return {"x": batch["x"], "text": ids, "text_mask": mask}

    def get_state(self):
        return self.batches.get_state()

    def set_state(self, state) -> None:
        self.batches.set_state(state)

    def close(self) -> None:
        self.batches.close()


def make_text_train_step(graphdef, diffusion, tx: optax.GradientTransformation,
                         schedule: Callable, ema_decay: float) -> Callable:
    """`train_step(state, buffers, batch) -> (state, metrics)` of a TextToImage: timesteps, noise
    and caption dropout drawn for the whole batch from fold_in(rng, step), as the
    class-conditional step does; the text encoder (if the model has one) gets gradients too."""

    def train_step(state: TrainState, buffers, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        t_key, noise_key, drop_key = jax.random.split(key, 3)
        x = batch["x"]
        n = x.shape[0]
        t = jax.random.randint(t_key, (n,), 0, diffusion.num_timesteps, jnp.int32)
        noise = jax.random.normal(noise_key, x.shape, jnp.float32)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, buffers)
            embeddings = model.encode(batch["text"], batch["text_mask"])
            embeddings, mask = model.drop_captions(embeddings, batch["text_mask"], drop_key)
            terms = training_losses(diffusion, lambda x_t, t_: model.denoise(x_t, t_, embeddings, mask),
                                    x, t, noise)
            return jnp.mean(terms["loss"]), terms

        (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema=ema_update(state.ema, params, ema_decay))
        metrics = {name: jnp.mean(terms[name]) for name in ("loss", "mse", "vb") if name in terms}
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        return new_state, metrics

    return train_step


def _new_state(params, tx, key) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                      rng=jax.random.key_data(key))


def train_text(config, workdir: str | os.PathLike, make_objective: Callable) -> dict[str, Any]:
    """Train (or resume) the text run of `config` in `workdir`; `make_objective(config,
    model_cfg)` is the run's diffusion (the class-conditional loop's). Returns {"step", "start",
    "status" ("completed", or "complete" when the workdir had finished before), "metrics"} as
    `dit_jax.train.loop.train` does."""
    workdir = Path(workdir).absolute()
    if config.objective != "diffusion":
        raise ValueError("model.condition='text' trains with objective='diffusion'")
    if int(config.optim.accum_steps) != 1:
        raise ValueError("model.condition='text' does not accumulate gradients: set "
                         "optim.accum_steps=1")
    source, tokenizer = text_source(config)
    side, _, channels = source.element_shape
    pixart = load_init_pixart(config)
    model_cfg = text_model_config(config, tokenizer, channels, side, pixart=pixart,
                                  latent_scale=int(config.data.image_size) // side)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    total_steps, global_batch = int(config.total_steps), int(config.global_batch_size)
    with jax.set_mesh(mesh):
        write_run_config(workdir, config, model_cfg)
        if jax.process_index() == 0 and tokenizer is not None:
            save_tokenizer(workdir, tokenizer)
        tx, schedule = make_optimizer(config.optim, total_steps)
        diffusion = make_objective(config, model_cfg)
        graphdef, abstract_params, _ = split_text_model(model_cfg)
        abstract = jax.eval_shape(lambda p: _new_state(p, tx, jax.random.key(0)), abstract_params)
        shardings = state_shardings(abstract, mesh)
        buffers = text_model_buffers(model_cfg, mesh)
        checkpoints = Checkpoints(workdir, keep=config.keep_checkpoints,
                                  keep_every=config.keep_every,
                                  async_save=config.async_checkpointing)
        restored = checkpoints.restore(abstract, shardings)
        if restored is not None:
            state, data_state = restored
        elif pixart is not None:  # fine-tuning: the loaded weights exactly, the EMA a copy
            params = place(pixart_init_params(config, pixart, model_cfg), shardings.params)
            key = jax.random.fold_in(jax.random.key(int(config.seed)), 1)
            state = jax.jit(lambda p: _new_state(p, tx, key), out_shardings=shardings)(params)
            data_state = None
        else:
            root = jax.random.key(int(config.seed))

            def init(key):
                model = TextToImage(model_cfg, rngs=nnx.Rngs(jax.random.fold_in(key, 0)))
                return _new_state(nnx.state(model, nnx.Param), tx, jax.random.fold_in(key, 1))
            state, data_state = jax.jit(init, out_shardings=shardings)(root), None
        del pixart  # its weights are in the state now
        start = int(jax.device_get(state.step))
        if start >= total_steps:  # a finished run: nothing to compile or load
            checkpoints.close()
            return {"step": start, "start": start, "status": "complete",
                    "metrics": next((r for r in reversed(read_log(workdir)) if "loss" in r), {})}
        batches = CaptionBatches(make_batches(source, global_batch_size=global_batch,
                                              seed=int(config.seed),
                                              host_rows=host_batch_rows(mesh, global_batch)),
                                 tokenizer)
        if data_state is not None:
            batches.set_state(data_state)
        text_ndim = 2 if tokenizer is not None else 3  # ids, or embeddings
        batch_shardings = {"x": batch_sharding(mesh, 4), "text": batch_sharding(mesh, text_ndim),
                           "text_mask": batch_sharding(mesh, 2)}
        step_fn = jax.jit(make_text_train_step(graphdef, diffusion, tx, schedule,
                                               float(config.optim.ema_decay)),
                          in_shardings=(shardings, state_shardings(buffers, mesh), batch_shardings),
                          out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))
        writer = MetricWriter(workdir, resume_step=start, enabled=jax.process_index() == 0)
        progress = Progress(total_steps, start, enabled=jax.process_index() == 0)
        # Prompts need the run's tokenizer: grids on the built-in data (a frozen T5's runs are
        # sampled with sample.py).
        prompts = list(config.text.prompts) if tokenizer is not None else []
        window, last = [], {}
        step = start
        try:
            while step < total_steps:
                state, metrics = step_fn(state, buffers,
                                         shard_batch(next(batches), mesh, global_batch))
                step += 1
                window.append(metrics)
                progress.update()
                if step % config.log_every == 0 or step == total_steps:
                    fetched = jax.device_get(window)
                    last = {k: (float(fetched[-1][k]) if k == "lr" else
                                float(np.mean([m[k] for m in fetched]))) for k in fetched[-1]}
                    if not np.isfinite(last["loss"]):
                        raise FloatingPointError(f"non-finite loss at step {step}")
                    window = []
                    if prompts and config.sample_every > 0 and (
                            step % config.sample_every == 0 or step == total_steps):
                        last.update(sample_grid(workdir, step, graphdef, state.ema, buffers,
                                                tokenizer, prompts, config, progress))
                    writer.write(step, last)
                    progress.show(last)
                if step % config.checkpoint_every == 0 or step == total_steps:
                    checkpoints.save(state, data_state=batches.get_state(), model_config=model_cfg)
        finally:
            checkpoints.wait()
            checkpoints.close()
            batches.close()
            progress.close()
            writer.close()
    return {"step": step, "start": start, "status": "completed", "metrics": last}


def sample_grid(workdir: Path, step: int, graphdef, ema, buffers, tokenizer, prompts, config,
                progress) -> dict[str, float]:
    """Samples of `prompts` from the EMA weights, written to WORKDIR/samples/step_N.png; returns
    the prompt-following scores (the built-in judge's shape and colour, seen and held-out pairs)."""
    s = config.sample
    images = sample_prompts(
        nnx.merge(graphdef, ema, buffers), tokenizer, prompts,
        negative_prompt=config.text.negative_prompt or None, cfg_scale=float(s.cfg_scale),
        sampler=s.sampler, steps=int(s.steps), seed=int(config.seed),
        image_size=int(config.data.image_size), noise_schedule=config.diffusion.noise_schedule,
        diffusion_steps=int(config.diffusion.diffusion_steps),
        prediction=config.diffusion.prediction, clip_denoised=bool(s.clip_denoised))
    if jax.process_index() != 0:
        return {}
    directory = workdir / "samples"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:07d}.png"
    save_png(path, make_grid(images))
    np.savez(path.with_suffix(".npz"), images=images, prompts=np.asarray(prompts))
    scores = prompt_check(images, prompts)
    out = {f"prompt_{k}": v for k, v in scores.items() if k != "per_image" and v is not None}
    progress.write(f"step {step}: samples in {path}, prompt score {scores['both']:.2f} (held-out "
                   f"pairs {scores['both_held_out'] if scores['both_held_out'] is not None else '-'})")
    return out


__all__ = ["CaptionBatches", "load_init_pixart", "make_text_train_step", "pixart_fields",
           "pixart_init_params", "sample_grid", "text_model_config", "text_source", "train_text"]
