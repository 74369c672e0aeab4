"""The training loop: `train(config, workdir)`, one program on every host.

Read top to bottom, a run:
1. builds the data source and the model config from the training config;
2. builds the mesh over every device of every host (axes data, fsdp, tensor; dit_jax.sharding);
3. restores the newest readable checkpoint of the workdir, or creates a fresh state (random or
   `init_from` weights) directly in its sharded layout;
4. compiles the train step once for the state's and the batch's shardings;
5. loops: this host loads its rows of the global batch, the rows become one global array, the
   step runs; every `log_every` steps the metrics are fetched, checked and written; every
   `checkpoint_every` steps a checkpoint is saved (asynchronously); every `sample_every` steps a
   grid of EMA samples is written; every `eval.every` steps the FID of EMA samples is logged
   (`TrainingFID`); on SIGTERM (or a multi-host preemption notice) a checkpoint
   of the current step is saved and the run stops.

Metrics are fetched from the devices only at those points, so the host runs ahead of the devices
in between. Every checkpoint is preceded by such a fetch, and a non-finite loss or gradient norm
in any step since the previous fetch stops the run (`NonFiniteLossError`) before anything is
saved: the newest checkpoint is always one whose every step had a finite loss (and whose values
were checked finite when saved and against their checksums when restored, dit_jax.checkpoint).
The logged loss, mse, vb and grad_norm are means over the steps since the previous log line; lr
is that of the logged step.

Before anything is built, the config's values are checked (`validate_config`) and the workdir is
locked against a second trainer (`dit_jax.checkpoint.lock`); a resume must ask for the model and
optimiser of its checkpoints (`Checkpoints.check_resume`), and config.json / model_config.json
are written only once the state is restored or created.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from dit_jax.checkpoint import (Checkpoints, NonFiniteStateError, ResumeMismatchError,
                                WorkdirLock, WorkdirLockedError, write_run_config)
from dit_jax.data import BatchIterator, Source, make_batches, make_source
from dit_jax.data.builtin import shape_accuracy, shape_score
from dit_jax.data.folder import save_class_mapping
from dit_jax.diffusion import create_diffusion
from dit_jax.distributed import initialize_distributed, on_every_host
from dit_jax.evaluation import FeatureExtractor, load_inception, read_set
from dit_jax.evaluation.suite import features_of
from dit_jax.flops import train_flops_per_image
from dit_jax.models.dit import DiTConfig, convert_blocks, split_model
from dit_jax.models.vae import AutoencoderKL, encode_to_latents
from dit_jax.port import load_any
from dit_jax.port.vae import load_vae
from dit_jax.sampling import ChunkSampler, Decoder, load_vae_decoder, make_grid, save_png
from dit_jax.sharding import host_batch_rows, make_mesh, model_buffers, shard_batch, state_shardings
from dit_jax.transport import create_transport
from dit_jax.train.logging import MetricWriter, Progress, Throughput, read_log
from dit_jax.train.state import (abstract_train_state, check_init_params, create_train_state,
                                 make_optimizer, model_config_from)
from dit_jax.train.step import StepConfig, lower_train_step
from dit_jax.train.text import train_text

log = logging.getLogger(__name__)

SAMPLES_DIR = "samples"
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: schedulers treat the job as interrupted, not done


class NonFiniteLossError(FloatingPointError):
    """A step produced a NaN or infinite loss or gradient norm; the run stopped without saving."""


class ConfigError(ValueError):
    """A training config value that cannot work (found before anything is built)."""


# What train.py reports as one line (the run cannot start as asked), and what stops a run on a
# non-finite value.
SETUP_ERRORS = (ConfigError, WorkdirLockedError, ResumeMismatchError)
NON_FINITE_ERRORS = (NonFiniteLossError, NonFiniteStateError)


def train(config, workdir: str | os.PathLike) -> dict[str, Any]:
    """Train (or resume) the run of `config` in `workdir`. Returns {"step": the last step,
    "start": the step it began at, "status": "completed" | "preempted" | "complete" (nothing
    to do: the workdir had finished total_steps before), "metrics": the last logged metrics}."""
    workdir = Path(workdir).absolute()
    config = config.copy_and_resolve_references()  # resolved below; the caller's stays as given
    validate_config(config)
    lock = WorkdirLock(workdir)
    # Process 0 holds the lock for all hosts (they share the workdir); all of them stop if it
    # cannot, each with its reason.
    error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirLockedError as err:
            error = err
    if not on_every_host(error is None):
        raise error or WorkdirLockedError(f"process 0 could not lock {lock.path}")
    try:
        if config.model.get("condition", "class") == "text":
            return train_text(config, workdir, make_objective)  # captions: dit_jax/train/text.py
        return _train(config, workdir)
    finally:
        lock.release()


def _train(config, workdir: Path) -> dict[str, Any]:
    # 1. Data and model.
    vae = training_vae(config)
    source = training_source(config, vae)
    if source.class_names and jax.process_index() == 0:
        save_class_mapping(workdir, source.class_names)
    model_cfg = run_model_config(config, source, vae)

    # 2. Mesh.
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    _check_batch(config, mesh)
    with jax.set_mesh(mesh):
        return _run(config, workdir, source, model_cfg, mesh, vae)


def _run(config, workdir: Path, source: Source, model_cfg: DiTConfig, mesh: Mesh,
         vae: AutoencoderKL | None = None) -> dict[str, Any]:
    host0 = jax.process_index() == 0
    total_steps = int(config.total_steps)
    global_batch = int(config.global_batch_size)

    # 3. State: resume, or start fresh.
    tx, schedule = make_optimizer(config.optim, total_steps)
    diffusion = make_objective(config, model_cfg)
    graphdef, _, _ = split_model(model_cfg)
    abstract = abstract_train_state(model_cfg, tx)
    shardings = state_shardings(abstract, mesh)
    buffers = model_buffers(model_cfg, mesh)
    checkpoints = Checkpoints(workdir, keep=config.keep_checkpoints, keep_every=config.keep_every,
                              async_save=config.async_checkpointing)
    optim_config = config.optim.to_dict()
    checkpoints.check_resume(model_cfg, optim_config)
    restored = checkpoints.restore(abstract, shardings)
    if restored is not None:
        state, data_state = restored
        log.info("resuming from checkpoint %d in %s", int(state.step), checkpoints.directory)
    else:
        state = create_train_state(model_cfg, tx, mesh, seed=int(config.seed),
                                   init_params=_initial_params(config, model_cfg))
        data_state = None
    start = int(jax.device_get(state.step))
    # Only now: a resume that fails leaves the files describing the checkpoints that are there.
    write_run_config(workdir, config, model_cfg)
    if start >= total_steps:  # a finished run: nothing to compile or load
        checkpoints.close()
        return {"step": start, "start": start, "status": "complete",
                "metrics": next((r for r in reversed(read_log(workdir)) if "loss" in r), {})}

    rows = host_batch_rows(mesh, global_batch)
    log.info("process %d of %d: %d of %d devices, mesh %s; loads rows [%d, %d) of each batch",
             jax.process_index(), jax.process_count(), jax.local_device_count(), mesh.size,
             dict(mesh.shape), *rows)
    batches: BatchIterator = make_batches(source, global_batch_size=global_batch,
                                          seed=int(config.seed), host_rows=rows,
                                          num_workers=int(config.data.num_workers))
    if data_state is not None:
        batches.set_state(data_state)
    if batches.next_batch != start:
        raise RuntimeError(f"data iterator is at batch {batches.next_batch} but the state at step {start}")

    # 4. The step, compiled once.
    step_config = StepConfig(ema_decay=float(config.optim.ema_decay),
                             accum_steps=int(config.optim.accum_steps))
    encoder, step_buffers = None, buffers
    if vae is not None:
        vae_graphdef, vae_weights = nnx.split(vae)
        step_buffers = (buffers, jax.device_put(vae_weights, state_shardings(vae_weights, mesh)))
        encoder = _latent_encoder(vae_graphdef)
    lowered, _, _ = lower_train_step(
        graphdef, diffusion, tx, schedule, step_config, mesh, abstract_state=abstract,
        buffers=step_buffers, element_shape=tuple(source.element_shape),
        global_batch=global_batch, encoder=encoder)
    train_step = lowered.compile()
    grids = (SampleGrids(graphdef, (abstract.ema, buffers), model_cfg, config, mesh, workdir,
                         vae=vae)
             if config.sample_every and config.sample_every > 0 else None)
    fid = (TrainingFID(graphdef, (abstract.ema, buffers), model_cfg, config, mesh, vae=vae)
           if config.eval.every > 0 else None)

    # 5. The loop.
    writer = MetricWriter(workdir, resume_step=start, enabled=host0)
    writer.write_text(start, "config", f"```\n{config.to_json_best_effort(indent=2)}\n```")
    progress = Progress(total_steps, start, enabled=host0)
    throughput = Throughput(global_batch_size=global_batch,
                            flops_per_image=train_flops_per_image(model_cfg),
                            num_devices=mesh.size,
                            peak_tflops_override=float(config.peak_tflops),
                            dtype=model_cfg.dtype)
    preemption = Preemption(checkpoints)
    pending: list[tuple[int, dict]] = []  # metrics on device, not yet fetched
    window: list[tuple[int, dict]] = []  # fetched, not yet logged
    last_logged: dict[str, Any] = {}
    skipped = batches.skipped  # unreadable images, as restored (None: data that cannot skip)
    status = "completed"
    step = start
    try:
        while step < total_steps:
            batch = shard_batch(next(batches), mesh, global_batch)
            state, metrics = train_step(state, step_buffers, batch)
            step += 1
            pending.append((step, metrics))
            progress.update()
            if step == start + 1:
                # The first step's time is mostly compilation; keep it out of the throughput.
                jax.block_until_ready(metrics)
                throughput.restart(step)

            preempted = preemption.reached(step)
            log_now = step % config.log_every == 0 or step == total_steps
            save_now = step % config.checkpoint_every == 0 or step == total_steps or preempted
            sample_now = grids is not None and step % config.sample_every == 0
            eval_now = fid is not None and step % config.eval.every == 0
            if log_now or save_now or sample_now or eval_now:
                window += fetch_and_check(pending, checkpoints)
                pending = []
            if log_now or save_now:
                skipped = report_skipped(batches, skipped)
            rates = throughput.measure(step) if log_now else None  # before sampling's time
            sample_metrics = sample_grid(grids, step, state, buffers, writer, progress,
                                         separate_record=not log_now) if sample_now else {}
            if log_now:
                last_logged = summarize(window, rates)
                if skipped is not None:
                    last_logged["skipped"] = skipped
                last_logged.update(sample_metrics)
                writer.write(step, last_logged)
                progress.show(last_logged)
                window = []
                throughput.restart(step)
            if save_now:
                checkpoints.save(state, data_state=batches.get_state(), model_config=model_cfg,
                                 optim_config=optim_config)
            if eval_now:
                value = fid(state.ema, buffers)
                writer.write(step, {"fid": value})
                progress.write(f"step {step}: FID-{fid.num_samples // 1000}K {value:.3f}"
                               if fid.num_samples >= 1000 else f"step {step}: FID {value:.3f}")
            if save_now or sample_now or eval_now:
                throughput.restart(step)
            if preempted:
                status = "preempted"
                progress.write(f"preempted: saved checkpoint {step}, stopping")
                break
    finally:
        # Only good states were ever handed to the checkpointer: let the saves in flight finish.
        checkpoints.wait()
        checkpoints.close()
        batches.close()
        preemption.close()
        progress.close()
        writer.close()
    return {"step": step, "start": start, "status": status, "metrics": last_logged}


# --------------------------------------------------------------------------------------------
# Resolving the run: VAE, data source, model config


def training_vae(config) -> AutoencoderKL | None:
    """The VAE that encodes images inside the train step (float32, as released): only for an
    image folder trained in latent space; None otherwise (pixel space, or extracted latents)."""
    if config.data.source == "builtin" and config.vae != "none":
        raise ValueError("the builtin data is pixel-space: set --config.vae=none")
    if config.data.source == "latents" and config.vae == "none":
        raise ValueError("data.source=latents holds VAE latents: set --config.vae to the VAE they "
                         "were extracted with (their manifest.json names it)")
    if config.data.source == "folder" and config.vae != "none":
        return load_vae(config.vae)
    return None


def model_input_shape(config, vae: AutoencoderKL | None) -> tuple[int, int, int]:
    """(side, side, channels) of what the DiT sees."""
    if config.vae == "none":
        return (config.data.image_size, config.data.image_size, 3)
    if vae is not None:
        side = config.data.image_size // vae.scale_factor
        return (side, side, vae.latent_channels)
    return (config.data.image_size // 8, config.data.image_size // 8, 4)


def training_source(config, vae: AutoencoderKL | None) -> Source:
    """The data source of the run, checked against the model input (images when `vae` encodes
    them inside the step)."""
    model_input = model_input_shape(config, vae)
    source = make_source(config.data, model_input=model_input,
                         num_classes=config.model.num_classes if config.model.num_classes >= 0 else 1000)
    expected = model_input if vae is None else (config.data.image_size,) * 2 + (3,)
    if tuple(source.element_shape) != expected:
        raise ValueError(f"the data source yields {source.element_shape}, the model expects "
                         f"{expected}")
    if config.data.source == "latents" and source.manifest["vae"] != config.vae:
        log.warning("the latents were extracted with VAE %r, this run decodes samples with %r",
                    source.manifest["vae"], config.vae)
    return source


def run_model_config(config, source: Source, vae: AutoencoderKL | None) -> DiTConfig:
    """The DiTConfig of the run; `config.model.num_classes` is set to the resolved class count
    (so that config.json records it)."""
    num_classes = config.model.num_classes if config.model.num_classes >= 0 else source.num_classes
    if 0 < num_classes < source.num_classes:
        raise ValueError(f"model.num_classes={num_classes}, but the data has {source.num_classes} "
                         f"classes (set -1 to follow the data)")
    if num_classes != source.num_classes:
        # Allowed (fine-tuning official 1000-class weights on fewer classes), but worth a look.
        consequence = (
            "the model is unconditional and ignores the labels" if num_classes == 0 else
            "every label is 0" if source.num_classes == 0 else
            f"labels {source.num_classes}..{num_classes - 1} are never trained")
        log.warning("model.num_classes=%d but the data has %d classes: %s", num_classes,
                    source.num_classes, consequence)
    config.model.num_classes = num_classes
    side, _, channels = model_input_shape(config, vae)
    return model_config_from(config, num_classes=num_classes, in_channels=channels,
                             input_size=side)


# --------------------------------------------------------------------------------------------
# Pieces of the loop


def sample_grid(grids: "SampleGrids", step: int, state, buffers, writer: MetricWriter,
                progress: Progress, separate_record: bool) -> dict[str, float]:
    """Draw and write the sample grid of `step`; the grid also goes to TensorBoard. Returns the
    grid's quality metrics (the shape-aware score on the built-in data) for the step's log line,
    or writes them as a line of their own when no metrics line is due at this step."""
    path = grids(step, state.ema, buffers)
    if path is None:  # not host 0
        return {}
    writer.write_image(step, "samples/grid", grids.grid)
    message = f"step {step}: samples in {path}"
    if "shape_score" in grids.metrics:
        message += f", shape score {grids.metrics['shape_score']:.2f}"
    progress.write(message)
    if separate_record and grids.metrics:
        writer.write(step, grids.metrics)
        return {}
    return dict(grids.metrics)


def report_skipped(batches: BatchIterator, reported: int | None) -> int | None:
    """The unreadable images skipped so far on all hosts (a collective: every host calls it at
    the same steps), with a warning when there are new ones since `reported`; None for data
    that cannot skip any."""
    total = batches.sync_skipped()
    if total is not None and total > reported:
        log.warning("%d unreadable image(s) skipped so far, each replaced by the next readable "
                    "one (the warnings above name the files)", total)
    return total


# (key, what it is, smallest allowed value): integers checked before anything is built.
_INT_BOUNDS = (
    ("total_steps", "the steps to train", 1),
    ("global_batch_size", "the batch of one step", 1),
    ("log_every", "steps between log lines", 1),
    ("checkpoint_every", "steps between checkpoints", 1),
    ("keep_checkpoints", "how many recent checkpoints are kept", 1),
    ("keep_every", "every Kth checkpoint kept forever (0: none)", 0),
    ("sample_every", "steps between sample grids (0: none)", 0),
    ("eval.every", "steps between FID evaluations (0: none)", 0),
    ("optim.accum_steps", "microbatches per step", 1),
    ("optim.warmup_steps", "warmup steps", 0),
    ("data.num_workers", "data loading threads", 0),
    ("diffusion.diffusion_steps", "diffusion timesteps", 1),
)
# Checked only when the feature they belong to is on (key of the switch).
_INT_BOUNDS_WHEN = (
    ("sample_every", ("sample.num_images", "images per sample grid", 1)),
    ("sample_every", ("sample.steps", "sampling steps of the grids", 1)),
    ("eval.every", ("eval.num_samples", "samples per FID evaluation", 1)),
    ("eval.every", ("eval.batch_size", "samples per FID batch", 1)),
)


def _config_value(config, key: str):
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def validate_config(config) -> None:
    """Raise ConfigError, naming the key, for a value that cannot work (a non-positive
    interval, a negative count, an EMA decay outside [0, 1]...), before anything is built."""
    def check_int(key, meaning, low):
        try:
            value = _config_value(config, key)
        except KeyError:
            return  # a config without that key: the code's default applies
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            bound = "a positive integer" if low == 1 else "an integer >= 0"
            raise ConfigError(f"config.{key}={value!r}: must be {bound} ({meaning}); set "
                              f"--config.{key}")

    for key, meaning, low in _INT_BOUNDS:
        check_int(key, meaning, low)
    for switch, (key, meaning, low) in _INT_BOUNDS_WHEN:
        if _config_value(config, switch) > 0:
            check_int(key, meaning, low)
    for key, low, high in (("optim.ema_decay", 0.0, 1.0), ("optim.lr", 0.0, float("inf")),
                           ("optim.grad_clip", 0.0, float("inf")),
                           ("optim.weight_decay", 0.0, float("inf"))):
        value = _config_value(config, key)
        if not (isinstance(value, (int, float)) and low <= value <= high):
            raise ConfigError(f"config.{key}={value!r}: must be a number in [{low}, {high}]; set "
                              f"--config.{key}")
    for axis in ("data", "fsdp", "tensor"):
        value = config.mesh[axis]
        if isinstance(value, bool) or not isinstance(value, int) or value == 0 or value < -1:
            raise ConfigError(f"config.mesh.{axis}={value!r}: must be a positive size, or -1 for "
                              f"the devices the other axes leave; set --config.mesh.{axis}")


def _check_batch(config, mesh: Mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch, accum = int(config.global_batch_size), int(config.optim.accum_steps)
    if batch % (shards * accum):
        raise ValueError(
            f"global_batch_size {batch} must be divisible by data × fsdp = {shards} times "
            f"optim.accum_steps = {accum} (every microbatch is split over the batch devices)")


def fetch_and_check(pending: list[tuple[int, dict]], checkpoints: Checkpoints
                    ) -> list[tuple[int, dict]]:
    """Host copies of the pending metrics; raises NonFiniteLossError at the first bad step."""
    fetched = jax.device_get(pending)
    for step, metrics in fetched:
        bad = {k: float(metrics[k]) for k in ("loss", "grad_norm") if not np.isfinite(metrics[k])}
        if bad:
            checkpoints.wait()
            latest = checkpoints.latest_step()
            raise NonFiniteLossError(
                f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step}; "
                f"stopping without saving. The last good checkpoint is "
                f"{'step ' + str(latest) if latest is not None else 'none'} in "
                f"{checkpoints.directory}. Lower the learning rate or enable optim.grad_clip "
                f"before resuming.")
    return [(s, {k: float(v) for k, v in m.items()}) for s, m in fetched]


def summarize(window: list[tuple[int, dict]], rates: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key in window[-1][1]:
        values = [m[key] for _, m in window]
        out[key] = values[-1] if key == "lr" else float(np.mean(values))
    out.update(rates)
    out["time"] = time.time()
    return out


class Preemption:
    """Whether to stop and save now. One process: a SIGTERM sets a flag (the handler is
    installed for the run and removed after). Several processes: JAX's preemption sync point,
    which agrees on one step for all hosts (a signal arriving at the hosts at different steps
    must not make them save different steps)."""

    def __init__(self, checkpoints: Checkpoints):
        self.checkpoints = checkpoints
        self.flag = False
        self.previous = None
        self.multi_process = jax.process_count() > 1
        if not self.multi_process:
            try:
                self.previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread: no handler, no preemption saves
                self.previous = None

    def _handle(self, signum, frame):
        self.flag = True

    def reached(self, step: int) -> bool:
        if self.multi_process:
            return self.checkpoints.manager.reached_preemption(step)
        return self.flag

    def close(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


def _initial_params(config, model_cfg: DiTConfig) -> nnx.State | None:
    """Weights to fine-tune from (`init_from`: anything `dit_jax.port.load_any` reads), checked
    against the model of this run; None to start from random weights."""
    spec = config.init_from
    if not spec:
        return None
    model = load_any(spec)
    if model.config.scan_blocks != model_cfg.scan_blocks:
        model = convert_blocks(model, scan_blocks=model_cfg.scan_blocks)
    params = nnx.state(model, nnx.Param)
    check_init_params(spec, params, split_model(model_cfg)[1])
    return params


def make_objective(config, model_cfg: DiTConfig):
    """The training objective of `config.objective`: the official GaussianDiffusion
    ("diffusion", default) or SiT's flow matching ("transport", from config.transport)."""
    objective = config.objective
    if objective == "transport":
        t = config.transport
        weight = None if t.loss_weight in (None, "", "none") else t.loss_weight
        return create_transport(t.path_type, t.prediction, weight, t_sampling=t.t_sampling)
    if objective != "diffusion":
        raise ValueError(f"config.objective={objective!r}: choose 'diffusion' or 'transport'")
    return create_diffusion("", noise_schedule=config.diffusion.noise_schedule,
                            learn_sigma=model_cfg.learn_sigma,
                            diffusion_steps=int(config.diffusion.diffusion_steps),
                            prediction=config.diffusion.prediction,
                            min_snr_gamma=float(config.diffusion.min_snr_gamma),
                            # Not in configs/dit.py (the official recipe): configs/small.py sets it.
                            loss_space=config.diffusion.get("loss_space", "target"),
                            snr_plus_one_cap=float(config.diffusion.get("snr_plus_one_cap", 0.0)))


# --------------------------------------------------------------------------------------------
# Sample grids


class SampleGrids:
    """Class-conditional samples from the EMA weights with classifier-free guidance, written to
    WORKDIR/samples/step_<step>.png (a grid) and .npz (images uint8 and labels); after each call
    `grid` is the grid (uint8) and `metrics` its quality metrics (`shape_score` and
    `shape_accuracy` on the built-in data). The labels cycle
    through the classes and the initial noise is the same every time, so successive grids show
    the same draws as training proceeds. The sampler of sample.py, with the run's diffusion."""

    def __init__(self, graphdef, abstract_weights: tuple, model_cfg: DiTConfig, config,
                 mesh: Mesh, workdir: Path, vae=None):
        n = int(config.sample.num_images)
        self.labels = np.arange(n, dtype=np.int32) % max(model_cfg.num_classes, 1)
        self.directory = workdir / SAMPLES_DIR
        self.builtin_data = config.data.source == "builtin"
        self.grid, self.metrics = None, {}  # of the latest grid
        self.sampler = ema_sampler(graphdef, abstract_weights, model_cfg, config, mesh, n, vae)

    def __call__(self, step: int, ema, buffers) -> Path | None:
        images = self.sampler(0, self.labels, (ema, buffers))
        if jax.process_index() != 0:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"step_{step:07d}.png"
        self.grid = make_grid(images)
        save_png(path, self.grid)
        # The built-in shapes can be judged by program: the fraction of samples that show the
        # requested shape, clean-edged, in the requested colour, on a clean background.
        self.metrics = ({"shape_score": shape_score(images, self.labels),
                         "shape_accuracy": shape_accuracy(images, self.labels)}
                        if self.builtin_data else {})
        np.savez(path.with_suffix(".npz"), images=images, labels=self.labels)
        return path


def ema_sampler(graphdef, abstract_weights: tuple, model_cfg: DiTConfig, config, mesh: Mesh,
                batch_size: int, vae=None) -> ChunkSampler:
    """sample.py's ChunkSampler with the run's sampling settings (config.sample) and objective
    (the diffusion, or the transport with config.transport.sampler), decoding with the training
    VAE when there is one."""
    s = config.sample
    cfg_scale = float(s.cfg_scale)
    if model_cfg.num_classes and model_cfg.class_dropout_prob <= 0 and cfg_scale != 1.0:
        # Found now rather than at the first grid, sample_every steps into the run.
        log.warning("class_dropout_prob=0: the model has no null class, so its samples (grids, "
                    "FID) are drawn without guidance (sample.cfg_scale=%g ignored)", cfg_scale)
        cfg_scale = 1.0
    transport = (dict(transport=make_objective(config, model_cfg))
                 if config.objective == "transport" else {})
    return ChunkSampler(
        graphdef, abstract_weights, mesh=mesh, batch_size=batch_size, seed=int(config.seed),
        sampler=config.transport.sampler if transport else s.sampler, steps=int(s.steps),
        cfg_scale=cfg_scale, guidance_interval=_interval(s.get("guidance_interval")),
        decoder=(None if config.vae == "none" else  # the training VAE when there is one
                 Decoder.of(vae) if vae is not None else load_vae_decoder(config.vae)),
        # x̂0 clipping is a diffusion-sampler option; transport samplers run unclipped.
        clip_denoised=bool(s.clip_denoised) and not transport,
        noise_schedule=config.diffusion.noise_schedule,
        diffusion_steps=int(config.diffusion.diffusion_steps),
        prediction="epsilon" if transport else config.diffusion.prediction, **transport)


def _interval(value) -> tuple[float, float] | None:
    """config.sample.guidance_interval, (lo, hi) in the model's time, or None (guide every step);
    not in configs/dit.py (the official recipe guides every step)."""
    if value is None or len(value) == 0:
        return None
    if len(value) != 2:
        raise ValueError(f"config.sample.guidance_interval must be (lo, hi), got {value!r}")
    return float(value[0]), float(value[1])


class TrainingFID:
    """FID of `config.eval.num_samples` EMA samples (the sample grids' sampler settings, labels
    uniform at random, the same labels and noise at every evaluation) against the pool_3
    statistics of `config.eval.reference` (an ADM reference batch or an image folder,
    docs/evaluation.md), sampled and measured over the whole mesh."""

    def __init__(self, graphdef, abstract_weights: tuple, model_cfg: DiTConfig, config,
                 mesh: Mesh, vae=None):
        e = config.eval
        if not e.reference:
            raise ValueError("config.eval.every > 0 needs config.eval.reference: an ADM "
                             "reference batch (.npz) or an image folder (docs/evaluation.md)")
        self.num_samples, self.batch_size = int(e.num_samples), int(e.batch_size)
        self.sampler = ema_sampler(graphdef, abstract_weights, model_cfg, config, mesh,
                                   self.batch_size, vae)
        rng = np.random.default_rng(int(config.seed))
        self.labels = rng.integers(0, max(model_cfg.num_classes, 1), self.num_samples,
                                   dtype=np.int32)
        self.extractor = FeatureExtractor(load_inception(e.inception_weights or None), mesh=mesh,
                                          batch_size=self.batch_size)
        self.reference = read_set(e.reference, self.extractor, per_image=False).stats

    def samples(self, ema, buffers):
        """The uint8 sample batches of one evaluation."""
        for chunk, start in enumerate(range(0, self.num_samples, self.batch_size)):
            yield self.sampler(chunk, self.labels[start:start + self.batch_size], (ema, buffers))

    def __call__(self, ema, buffers) -> float:
        stats = features_of(self.samples(ema, buffers), self.extractor, keep=False).stats
        return stats.frechet_distance(self.reference)


def _latent_encoder(vae_graphdef):
    """`encoder(vae_weights, images, noise) -> latents` for encoding inside the train step."""
    def encoder(weights, images, noise):
        return encode_to_latents(nnx.merge(vae_graphdef, weights), images, noise=noise)

    return encoder


__all__ = ["ConfigError", "NON_FINITE_ERRORS", "NonFiniteLossError", "PREEMPTED_EXIT_CODE",
           "SETUP_ERRORS", "SampleGrids", "initialize_distributed", "run_model_config", "train",
           "training_source", "training_vae", "validate_config"]
