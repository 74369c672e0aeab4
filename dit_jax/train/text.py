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
  `text.negative_prompt`) and, on the built-in data, score how well they follow their prompts.

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
from dit_jax.models.text import TextModelConfig, TextToImage, split_text_model
from dit_jax.sampling import make_grid, save_png
from dit_jax.sharding import (batch_sharding, host_batch_rows, make_mesh, replicated, shard_batch,
                              state_shardings)
from dit_jax.text_sampling import sample_prompts, save_tokenizer, text_model_buffers
from dit_jax.train.logging import MetricWriter, Progress
from dit_jax.train.state import TrainState, _DTYPES, ema_update, make_optimizer

log = logging.getLogger(__name__)


def text_source(config):
    """(captioned source, tokenizer) of a text run: the built-in captioned shapes with a word
    tokenizer (for the jointly trained encoder), or a latents folder with extracted text
    embeddings (tokenizer None: the batches carry the embeddings)."""
    d = config.data
    if d.source == "latents":
        if config.text.encoder != "none":
            raise ValueError("data.source='latents' holds a frozen encoder's text embeddings: set "
                             "text.encoder='none'")
        source = TextLatentSource(d.path, image_size=d.image_size)
        for key, value in (("max_length", source.max_length),
                           ("caption_channels", source.caption_channels)):
            if int(config.text[key]) != value:
                raise ValueError(f"the text embeddings in {d.path} have {key}={value}, but "
                                 f"text.{key}={config.text[key]}: set --config.text.{key}={value}")
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


def text_model_config(config, tokenizer: WordTokenizer, in_channels: int, input_size: int
                      ) -> TextModelConfig:
    m, t = config.model, config.text
    if m.name:
        raise ValueError("model.condition='text' builds its size from model.hidden_size, depth, "
                         "num_heads and patch_size: set model.name=''")
    if m.dtype not in _DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {m.dtype!r}")
    return TextModelConfig(
        input_size=input_size, in_channels=in_channels, hidden_size=int(m.hidden_size),
        depth=int(m.depth), num_heads=int(m.num_heads), patch_size=int(m.patch_size),
        learn_sigma=bool(m.learn_sigma), caption_channels=int(t.caption_channels),
        max_length=int(t.max_length), caption_dropout=float(t.caption_dropout),
        encoder=t.encoder, vocab_size=tokenizer.vocab_size if t.encoder == "t5" else 0,
        encoder_layers=int(t.encoder_layers), encoder_heads=int(t.encoder_heads),
        encoder_head_dim=int(t.encoder_head_dim), encoder_ff=int(t.encoder_ff),
        pooled_text=bool(t.get("pooled_text", False)),
        dtype=_DTYPES[m.dtype], attention_impl="xla" if m.attention_impl == "auto"
        else m.attention_impl)


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
    model_cfg)` is the run's diffusion (the class-conditional loop's). Returns {"step", "status",
    "metrics"} as `dit_jax.train.loop.train` does."""
    workdir = Path(workdir).absolute()
    if config.objective != "diffusion":
        raise ValueError("model.condition='text' trains with objective='diffusion'")
    if int(config.optim.accum_steps) != 1:
        raise ValueError("model.condition='text' does not accumulate gradients: set "
                         "optim.accum_steps=1")
    source, tokenizer = text_source(config)
    side, _, channels = source.element_shape
    model_cfg = text_model_config(config, tokenizer, channels, side)
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
        else:
            root = jax.random.key(int(config.seed))

            def init(key):
                model = TextToImage(model_cfg, rngs=nnx.Rngs(jax.random.fold_in(key, 0)))
                return _new_state(nnx.state(model, nnx.Param), tx, jax.random.fold_in(key, 1))
            state, data_state = jax.jit(init, out_shardings=shardings)(root), None
        start = int(jax.device_get(state.step))
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


__all__ = ["CaptionBatches", "make_text_train_step", "sample_grid", "text_model_config",
           "text_source", "train_text"]
