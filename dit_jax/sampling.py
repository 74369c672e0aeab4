"""Class-conditional sampling from a DiT over a device mesh: the library behind sample.py.

One program for any number of devices and hosts: the model's weights are placed by their logical
axis names (`dit_jax.sharding`), each chunk's batch is split over every device of every host, and
the whole sampling loop (plus the VAE decode) is one jitted call per chunk. Samples are generated
in chunks of `batch_size`; each chunk is saved under OUT/chunks/ before the next starts, so an
interrupted run resumes where it stopped. A chunk's initial noise, step noise and random labels
derive from (seed, chunk index) alone, and JAX's partitionable PRNG gives the same bits however the
batch is sharded or padded, so the result depends neither on interruptions nor on the device count.

Outputs in OUT: `grid.png` (the first GRID_MAX samples), `samples/NNNNNN.png`, and with `npz` the
ADM-evaluator file (`arr_0` uint8 N×H×W×3 = uint8(clip(127.5·x + 128, 0, 255)), `arr_1` labels in
sample order), written by streaming the chunks so that 50,000 samples never sit in memory at once.
A latent model sampled without a VAE writes its latents instead (OUT/latents.npz, float32).

OUT/chunks/run.json records the settings and the identity of the weights (a checksum of the
parameters, and the checkpoint step for a train.py workdir): a resume with other settings or
other weights (the workdir trained on) is refused rather than mixing two runs in one output, and
an OUT holding files sample.py did not write is refused before anything is sampled.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from PIL import Image
from tqdm import tqdm

from dit_jax import diffusion as diff
from dit_jax import transport as flow
from dit_jax.checkpoint import digest, is_train_workdir, read_run_config, step_with_checksum
from dit_jax.distributed import gather_rows
from dit_jax.models.dit import DiT
from dit_jax.models.sit import sit_forward
from dit_jax.models.vae import decode_latents
from dit_jax.port.dit import load_any
from dit_jax.port.sit import from_torch
from dit_jax.port.vae import load_vae
from dit_jax.samplers import get_sampler, sample_loop, sampler_names
from dit_jax.sharding import batch_sharding, make_mesh, place, replicated, state_shardings

log = logging.getLogger(__name__)

SAMPLERS = sampler_names("diffusion")  # the samplers a DiT runs (see dit_jax.samplers)
TRANSPORT_SAMPLERS = sampler_names("transport")  # those of SiT / REPA / transport-trained models
CHECKPOINT_KINDS = ("dit", "sit", "repa")
GUIDANCE_CHANNELS = ("3", "all")
GRID_MAX = 64
NOISE_STREAM, LABEL_STREAM = 0, 1  # independent key streams under the run's seed
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"  # the decoder of the paper's FID numbers


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """Everything that defines a sampling run (sample.py's flags)."""

    ckpt: str
    model: str | None = None  # official name to check the weights against
    image_size: int | None = None  # pixels; checked against the weights (and the VAE)
    vae: str = DEFAULT_VAE  # folder or hub id; "none": pixel-space model, or latent output
    labels: tuple[int, ...] | None = None  # None: uniform random labels
    num_samples: int | None = None  # None: len(labels), or 8 with random labels
    batch_size: int = 32  # global, per chunk
    cfg_scale: float = 4.0
    guidance_channels: str = "3"  # "3": the released form; "all": every ε channel
    # Guide only for lo <= t <= hi in the model's time (transport: t in [0, 1], REPA's protocol is
    # (0.3, 1.0); diffusion: original timesteps). None: every step.
    guidance_interval: tuple[float, float] | None = None
    sampler: str = "ddpm"
    steps: int = 250
    seed: int = 0
    out: str = "samples"
    npz: str | None = None
    dtype: str = "float32"  # compute dtype of the DiT matmuls
    # None: the weights' own (official for official files and dit_jax checkpoints, diffusers for
    # diffusers folders); "official" runs the hub's facebook/DiT-XL-2-* as the paper's function.
    numerics: str | None = None
    clip_denoised: bool = False  # clip x̂0 to [-1, 1] each step: pixel-space models
    noise_schedule: str = "linear"  # the process the model was trained with
    diffusion_steps: int = 1000
    # What the model predicts (None: the workdir's run, else the family's default): epsilon (the
    # official DiT), start_x or velocity for the diffusion; velocity, noise or score for transport
    # models (docs/transport.md).
    prediction: str | None = None
    # Transport models: how a .pt file is read ("sit" / "repa": SiT's time), and the run's path
    # (None: the workdir's config, else Linear).
    kind: str = "dit"
    path_type: str | None = None

    def __post_init__(self):
        sampler = get_sampler(self.sampler)  # an unknown name fails here, with the list of names
        if self.kind not in CHECKPOINT_KINDS:
            raise ValueError(f"unknown checkpoint kind {self.kind!r}; one of {CHECKPOINT_KINDS}")
        if self.kind != "dit" and sampler.family != "transport":
            raise ValueError(f"a {self.kind} checkpoint is a flow model: sample it with a "
                             f"transport sampler, one of {TRANSPORT_SAMPLERS}")
        if self.guidance_channels not in GUIDANCE_CHANNELS:
            raise ValueError(f"guidance_channels must be one of {GUIDANCE_CHANNELS}, got "
                             f"{self.guidance_channels!r}")
        if self.numerics not in (None, "official", "diffusers"):
            raise ValueError(f"numerics must be 'official' or 'diffusers', got {self.numerics!r}")
        if self.labels is not None and not self.labels:
            raise ValueError("labels is empty: give at least one, or None for random labels")
        if min(self.batch_size, self.steps, self.total) < 1:
            raise ValueError("batch_size, steps and num_samples must be positive")

    @property
    def total(self) -> int:
        if self.num_samples is not None:
            return self.num_samples
        return len(self.labels) if self.labels is not None else 8

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.total / self.batch_size)

    def chunk_size(self, chunk: int) -> int:
        return min(self.batch_size, self.total - chunk * self.batch_size)


def diffusion_for(sampler: str, steps: int, *, learn_sigma: bool = True,
                  noise_schedule: str = "linear", diffusion_steps: int = 1000):
    """The respaced diffusion of a sampler: `steps` steps on the sampler's default grid
    (`dit_jax.samplers`: time-uniform, the official respacing, for DDPM and DDIM; uniform in
    log-SNR for DPM-Solver++). Without a learned variance the official fixed one (β_t) is used.
    `noise_schedule` / `diffusion_steps` are the process the model was trained with (the official
    linear 1000 by default)."""
    spacing = get_sampler(sampler).default_spacing(steps)
    return diff.create_diffusion(spacing, learn_sigma=learn_sigma, noise_schedule=noise_schedule,
                                 diffusion_steps=diffusion_steps)


# The SampleRequest fields a train.py workdir's config.json decides (the model config itself, e.g.
# learn_sigma, comes with the weights).
RUN_SETTINGS = ("vae", "image_size", "clip_denoised", "noise_schedule", "diffusion_steps",
                "sampler", "path_type", "prediction")


def run_settings(ckpt: str) -> dict[str, Any]:
    """What a train.py workdir's recorded run config says about sampling from it: its VAE ("none"
    for a pixel-space run), image size, x̂0 clipping and diffusion process (or, for a run trained
    with the transport objective, its path, prediction and grid sampler), as SampleRequest
    fields; {} when `ckpt` is not a workdir."""
    config = read_run_config(ckpt)
    if config is None:
        return {}
    try:
        found = {"vae": config["vae"], "image_size": int(config["data"]["image_size"]),
                 "clip_denoised": bool(config["sample"]["clip_denoised"]),
                 "noise_schedule": config["diffusion"]["noise_schedule"],
                 "diffusion_steps": int(config["diffusion"]["diffusion_steps"]),
                 # Runs from before the option predicted ε, as the official DiT.
                 "prediction": config["diffusion"].get("prediction", "epsilon")}
        interval = config["sample"].get("guidance_interval")  # the run's grids guided only there
        if interval:
            found["guidance_interval"] = tuple(float(v) for v in interval)
        if config.get("objective", "diffusion") == "transport":  # runs from before it: diffusion
            t = config["transport"]
            found.update(sampler=t["sampler"], path_type=t["path_type"],
                         prediction=t["prediction"], clip_denoised=False)
        return found
    except (KeyError, TypeError) as err:
        raise ValueError(f"{ckpt}/config.json lacks {err} (not written by this train.py?); pass "
                         f"--vae/--image-size/--clip-denoised/--noise-schedule/--diffusion-steps "
                         f"instead") from None


DEFAULT_REQUEST = {f.name: f.default for f in dataclasses.fields(SampleRequest)}


def transport_for(request: SampleRequest) -> flow.Transport | None:
    """The transport of a transport sampler (None for the diffusion samplers), with the requested
    path and prediction (default SiT's Linear / velocity). A train.py workdir trained with the
    other objective is an error."""
    family = get_sampler(request.sampler).family
    run = read_run_config(request.ckpt) or {}
    objective = run.get("objective", "diffusion") if run else None
    if objective is not None and (family == "transport") != (objective == "transport"):
        names = TRANSPORT_SAMPLERS if objective == "transport" else SAMPLERS
        raise ValueError(f"{request.ckpt} was trained with objective={objective!r}: "
                         f"--sampler {request.sampler} does not fit it; use one of {names}")
    if family != "transport":
        return None
    return flow.create_transport(request.path_type or "Linear", request.prediction or "velocity")


def guided_model_fn(model: DiT, labels: jax.Array, cfg_scale: float, guidance_channels: str,
                    *, sit: bool = False, interval: tuple[float, float] | None = None):
    """model_fn(x, t) of the samplers: the DiT with classifier-free guidance (none at scale 1 or
    for an unconditional model). `sit`: read as a SiT (float t in [0, 1], first channels)."""
    cfg = model.config

    def model_fn(x, t, y):
        return sit_forward(model, x, t, y) if sit else model(x, t, y)

    if cfg.num_classes == 0 or cfg_scale == 1.0:
        return lambda x, t: model_fn(x, t, labels)
    channels = min(3, cfg.in_channels) if guidance_channels == "3" else None
    return diff.classifier_free_guidance(model_fn, labels, cfg_scale, null_label=model.null_label,
                                         guide_channels=channels, interval=interval,
                                         time_dtype=None if sit else jnp.int32)


def to_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] images to uint8 as the official sampler and ADM's evaluator: truncation of
    clip(127.5·x + 128); one channel is repeated to three."""
    out = jnp.clip(127.5 * images.astype(jnp.float32) + 128.0, 0, 255).astype(jnp.uint8)
    return jnp.repeat(out, 3, axis=-1) if out.shape[-1] == 1 else out


@dataclasses.dataclass
class Decoder:
    """A latent decoder run inside the sampling program: `decode(module, latents) -> images in
    [-1, 1]` with `module` an nnx module (its weights are passed as arguments, not constants)."""

    module: nnx.Module
    decode: Callable[[nnx.Module, jax.Array], jax.Array]
    scale_factor: int  # pixels per latent pixel
    latent_channels: int

    @classmethod
    def of(cls, vae) -> Decoder:
        """The decoder of a dit_jax AutoencoderKL."""
        return cls(module=vae, decode=decode_latents, scale_factor=vae.scale_factor,
                   latent_channels=vae.latent_channels)


def writes_images(model: DiT, decoder: Decoder | None) -> bool:
    """Images for a decoder or a pixel-space model (1 or 3 channels); latents otherwise."""
    return decoder is not None or model.config.in_channels in (1, 3)


class ChunkSampler:
    """The jitted program that turns a chunk index, its labels and the DiT's weights into samples:
    uint8 images (pixel-space model or a decoder) or float32 latents (latent model without
    decoder). The weights are an argument of each call, so that training can draw its sample
    grids from the current EMA with the program compiled once.

    `graphdef` and `weights` are a DiT split as `nnx.split(model, nnx.Param, ...)`; `weights` may
    be abstract: only their shapes and logical axes are read, to shard them. `clip_denoised`
    clips x̂0 to [-1, 1] at every step (pixel-space models); `noise_schedule` / `diffusion_steps`
    name the process the model was trained with."""

    def __init__(self, graphdef, weights: tuple, *, mesh: Mesh, batch_size: int, seed: int,
                 sampler: str = "ddpm", steps: int = 250, cfg_scale: float = 4.0,
                 guidance_channels: str = "3", decoder: Decoder | None = None,
                 guidance_interval: tuple[float, float] | None = None,
                 clip_denoised: bool = False, noise_schedule: str = "linear",
                 diffusion_steps: int = 1000, transport: flow.Transport | None = None,
                 prediction: str = "epsilon"):
        family = get_sampler(sampler).family
        if family != ("transport" if transport is not None else "diffusion"):
            raise ValueError(f"sampler {sampler!r} is a {family} sampler: it needs "
                             f"{'a transport' if family == 'transport' else 'a diffusion model'}")
        if transport is not None and clip_denoised:
            raise ValueError("clip_denoised is for the diffusion samplers; a transport model "
                             "samples unclipped")
        self.mesh = mesh
        # Every device gets an equal slice; padding rows are generated and thrown away.
        self.padded = math.ceil(batch_size / mesh.size) * mesh.size
        rows = batch_sharding(mesh, 4)
        self.weight_shardings = state_shardings(weights, mesh)
        vae_graphdef = vae_shardings = self.vae_weights = None
        if decoder is not None:
            vae_graphdef, vae_state = nnx.split(decoder.module)
            vae_shardings = state_shardings(vae_state, mesh)
            self.vae_weights = place(vae_state, vae_shardings)

        def run(weights, vae_weights, chunk, labels):
            dit = nnx.merge(graphdef, *weights)
            cfg = dit.config
            height, width = ((cfg.input_size,) * 2 if isinstance(cfg.input_size, int)
                             else cfg.input_size)
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), NOISE_STREAM), chunk)
            noise_key, step_key = jax.random.split(key)
            x_T = jax.lax.with_sharding_constraint(
                jax.random.normal(noise_key, (self.padded, height, width, cfg.in_channels)), rows)
            if transport is not None:  # SiT's convention: t in [0, 1], the first channels
                model_fn = guided_model_fn(dit, labels, cfg_scale, guidance_channels, sit=True,
                                           interval=guidance_interval)
                x = sample_loop(sampler, transport, model_fn, x_T, step_key, steps=steps)
            else:
                model_fn = guided_model_fn(dit, labels, cfg_scale, guidance_channels,
                                           interval=guidance_interval)
                if clip_denoised or prediction != "epsilon":
                    # The samplers take ε: x̂0 and v models are converted (guidance, being
                    # linear, gives the same ε whichever of them it combined).
                    model_fn = clip_denoised_fn(model_fn, diff.create_diffusion(
                        "", noise_schedule=noise_schedule, diffusion_steps=diffusion_steps),
                        cfg.in_channels, limit=1.0 if clip_denoised else None,
                        prediction=prediction)
                diffusion = diffusion_for(sampler, steps, learn_sigma=cfg.learn_sigma,
                                          noise_schedule=noise_schedule,
                                          diffusion_steps=diffusion_steps)
                x = sample_loop(sampler, diffusion, model_fn, x_T, step_key)
            if decoder is not None:
                x = decoder.decode(nnx.merge(vae_graphdef, vae_weights), x)
            return to_uint8(x) if writes_images(dit, decoder) else x.astype(jnp.float32)

        self._labels_sharding = batch_sharding(mesh, 1)
        self._run = jax.jit(
            run, in_shardings=(self.weight_shardings, vae_shardings, replicated(mesh),
                               self._labels_sharding),
            out_shardings=batch_sharding(mesh, 4))

    def place(self, weights: tuple) -> tuple:
        """Host (or differently placed) weights onto the sampler's shardings."""
        return place(weights, self.weight_shardings)

    def __call__(self, chunk: int, labels: np.ndarray, weights: tuple) -> np.ndarray:
        """Samples for `labels` (at most batch_size) of chunk `chunk`, as NumPy on every host;
        `weights` placed as `place` places them."""
        n = len(labels)
        padded = np.zeros(self.padded, np.int32)
        padded[:n] = labels
        global_labels = place(padded, self._labels_sharding)
        with jax.set_mesh(self.mesh):
            out = self._run(weights, self.vae_weights, np.int32(chunk), global_labels)
        return gather_rows(out)[:n]


def clip_denoised_fn(model_fn, diffusion, channels: int, limit: float | None = 1.0,
                     prediction: str = "epsilon"):
    """model_fn whose ε is re-derived from x̂0 clipped to [-limit, limit]: the `clip_denoised=True`
    of the ADM samplers (DDPM's posterior mean and DDIM's step both follow from x̂0, and ε from
    the clipped x̂0 reproduces it). For pixel-space data, which lives in [-1, 1]; the official DiT
    samples unbounded latents and does not clip. `diffusion` is the unrespaced process: the model
    sees original timesteps. `prediction`: what the model's first `channels` outputs are
    ("epsilon", "start_x" or "velocity"); the wrapped function always returns ε, so every
    sampler runs unchanged. limit None: convert without clipping."""
    if prediction not in diff.MODEL_MEAN_TYPES:
        raise ValueError(f"unknown prediction {prediction!r}; one of {diff.MODEL_MEAN_TYPES}")

    def wrapped(x, t):
        out = model_fn(x, t)
        mean = out[..., :channels]
        if prediction == "start_x":
            x0 = mean
        elif prediction == "velocity":
            x0, _ = diff.xstart_and_eps_from_velocity(diffusion, x, t, mean)
        else:
            x0 = diff.predict_xstart_from_eps(diffusion, x, t, mean)
        if limit is not None:
            x0 = jnp.clip(x0, -limit, limit)
        eps = diff.predict_eps_from_xstart(diffusion, x, t, x0)
        return jnp.concatenate([eps, out[..., channels:]], axis=-1)

    return wrapped


def chunk_labels(request: SampleRequest, num_classes: int, chunk: int) -> np.ndarray:
    """Labels of chunk `chunk`: the given list repeated in order, or uniform at random from
    (seed, chunk) (all zeros for an unconditional model)."""
    start, n = chunk * request.batch_size, request.chunk_size(chunk)
    if num_classes == 0:
        return np.zeros(n, np.int32)
    if request.labels is not None:
        given = np.asarray(request.labels, np.int32)
        return given[np.arange(start, start + n) % len(given)]
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(request.seed), LABEL_STREAM), chunk)
    labels = jax.random.randint(key, (request.batch_size,), 0, num_classes)
    return np.asarray(labels, np.int32)[:n]


def weights_identity(model: DiT, ckpt: str | None = None) -> dict[str, Any]:
    """{"params_hash": the checksum of the model's parameters (dit_jax.checkpoint.integrity),
    "checkpoint_step": the workdir checkpoint they came from, or None}."""
    checksum = digest(nnx.state(model, nnx.Param))
    step = step_with_checksum(ckpt, checksum) if ckpt and is_train_workdir(ckpt) else None
    return {"params_hash": checksum, "checkpoint_step": step}


def _describe_weights(identity: dict | None) -> str:
    if not identity:
        return "weights not recorded (an older sample.py)"
    step = identity.get("checkpoint_step")
    return (f"checkpoint step {step}, " if step is not None else "") + \
        f"params hash {identity.get('params_hash')}"


# What sample.py writes into OUT (besides an --npz named there): anything else is not its own.
OUT_ENTRIES = {"chunks", "samples", "grid.png", "latents.npz", "latents.tmp", "samples.npz",
               "samples.tmp", "metrics.json", "prompts.json"}
PROMPTS_FILE = "prompts.json"  # what sample.py --prompt of a text run asked for (its own OUT)
CHUNK_FILE = re.compile(r"\d{6}\.(npz|tmp)|run\.json")
SAMPLE_FILE = re.compile(r"\d{6}\.png")


def check_out_dir(out: Path, npz: str | None = None) -> None:
    """Refuse an OUT that holds files sample.py did not write (it writes, and on a resume
    overwrites, OUT/grid.png, samples/, chunks/...): a new or empty directory, or one of its own
    runs (OUT/chunks/run.json, or OUT/prompts.json of a text run's prompts) holding only its
    own file names."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file: name a new or empty directory")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not ((out / "chunks" / "run.json").is_file() or (out / PROMPTS_FILE).is_file()):
        foreign = entries
    else:
        known = set(OUT_ENTRIES)
        if npz and Path(npz).absolute().parent == out.absolute():
            known |= {Path(npz).name, Path(npz).with_suffix(".tmp").name}
        foreign = [name for name in entries if name not in known]
        for sub, pattern in (("chunks", CHUNK_FILE), ("samples", SAMPLE_FILE)):
            if (out / sub).is_dir():
                foreign += [f"{sub}/{p.name}" for p in sorted((out / sub).iterdir())
                            if not pattern.fullmatch(p.name)]
            elif (out / sub).exists():
                foreign.append(sub)
    if foreign:
        foreign = sorted(foreign)
        more = len(foreign) - 3
        shown = ", ".join(foreign[:3]) + (f" and {more} more" if more > 0 else "")
        raise ValueError(f"--out {out} holds files sample.py did not write ({shown}); sample into a "
                         f"new or empty directory (a resume needs the --out of that run)")


class ChunkStore:
    """OUT/chunks/NNNNNN.npz ("samples", "labels"), one per finished chunk, plus run.json: the
    settings they were made with, including the identity of the weights (`weights_identity`),
    so that a resume never mixes two different runs."""

    def __init__(self, directory: Path, settings: dict[str, Any]):
        self.directory = directory
        self.writer = jax.process_index() == 0
        settings_file = directory / "run.json"
        if settings_file.is_file():
            try:
                previous = json.loads(settings_file.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{settings_file} is not valid JSON ({err}); use another --out or "
                                 f"delete {directory.parent}") from None
            changed = sorted(k for k in set(previous) | set(settings)
                             if previous.get(k) != settings.get(k))
            if "weights" in changed:
                then, now = (_describe_weights(x.get("weights")) for x in (previous, settings))
                raise ValueError(
                    f"{directory} holds samples of other weights ({then}) than --ckpt "
                    f"{settings.get('ckpt')} now ({now}): "
                    f"resuming would mix two models in one output; use another --out or delete "
                    f"{directory.parent}")
            if changed:
                raise ValueError(
                    f"{directory} holds chunks of a different run (settings {changed} differ: "
                    f"{ {k: previous.get(k) for k in changed} } then, "
                    f"{ {k: settings.get(k) for k in changed} } now); use another --out or "
                    f"delete it")
        elif self.writer:
            directory.mkdir(parents=True, exist_ok=True)
            settings_file.write_text(json.dumps(settings, indent=2) + "\n")

    def path(self, chunk: int) -> Path:
        return self.directory / f"{chunk:06d}.npz"

    def done(self, chunk: int) -> bool:
        return self.path(chunk).is_file()

    def load(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.path(chunk)) as data:
            return data["samples"], data["labels"]

    def save(self, chunk: int, samples: np.ndarray, labels: np.ndarray):
        if not self.writer:
            return
        tmp = self.path(chunk).with_suffix(".tmp")
        with open(tmp, "wb") as f:  # an open file: np.savez would append ".npz" to a path
            np.savez(f, samples=samples, labels=labels)
        os.replace(tmp, self.path(chunk))  # atomic: a chunk file is complete or absent


def save_png(path: Path, image: np.ndarray):
    Image.fromarray(image).save(path)


def make_grid(images: np.ndarray, padding: int = 2) -> np.ndarray:
    """Images (N, H, W, 3) uint8 tiled in ceil(sqrt(N)) columns with black padding."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = image
    return grid


def write_npz(path: Path, store: ChunkStore, chunks: Sequence[int], labels: np.ndarray):
    """The .npz of np.savez(path, arr_0=all samples, arr_1=labels), streamed chunk by chunk."""
    first = store.load(chunks[0])[0]
    header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False,
              "shape": (len(labels), *first.shape[1:])}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)  # as np.save writes it
            for chunk in chunks:
                f.write(np.ascontiguousarray(store.load(chunk)[0]).tobytes())
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, np.asarray(labels))
        zf.writestr("arr_1.npy", buffer.getvalue())
    os.replace(tmp, path)


def load_vae_decoder(spec: str) -> Decoder:
    """The diffusers-format VAE `spec` (folder, hub id, or "ema"/"mse"), decoding in float32."""
    return Decoder.of(load_vae(spec))


def check_model(model: DiT, image_size: int | None, decoder: Decoder | None):
    """The DiT against the decoder's latents and the requested image size (pixels)."""
    cfg = model.config
    if decoder is not None and cfg.in_channels != decoder.latent_channels:
        raise ValueError(f"the DiT has {cfg.in_channels} input channels but the VAE's latents have "
                         f"{decoder.latent_channels}")
    images = writes_images(model, decoder)
    if not images:
        log.warning("no VAE for a %d-channel model: writing latents, not images", cfg.in_channels)
    if image_size is None:
        return
    latent = (cfg.input_size,) * 2 if isinstance(cfg.input_size, int) else tuple(cfg.input_size)
    # Latent output keeps the pixel size of the official VAE it would be decoded with.
    factor = decoder.scale_factor if decoder is not None else (1 if images else 8)
    if latent != (image_size // factor,) * 2 or image_size % factor:
        raise ValueError(f"--image-size {image_size} does not match the model: its input is "
                         f"{latent[0]}x{latent[1]}, i.e. {latent[0] * factor}x"
                         f"{latent[1] * factor} px")


def sample(request: SampleRequest, *, mesh: Mesh | None = None, model: DiT | None = None,
           decoder: Decoder | None = None) -> dict[str, Any]:
    """Run `request`; `mesh` defaults to every device of every host, `model` / `decoder` to what
    request.ckpt / request.vae name. Returns the paths written and the sample labels."""
    check_out_dir(Path(request.out), request.npz)  # before the weights load, not at the end
    mesh = mesh if mesh is not None else make_mesh()
    transport = transport_for(request)
    if model is None:
        numerics = {"numerics": request.numerics} if request.numerics else {}
        if request.kind != "dit":  # a SiT / REPA PyTorch file
            if Path(request.ckpt).is_dir():
                raise ValueError(f"--kind {request.kind} reads a PyTorch file, and {request.ckpt} "
                                 f"is a directory (a workdir or dit_jax checkpoint is already in "
                                 f"SiT's convention): drop --kind")
            model = from_torch(request.ckpt, kind=request.kind, name=request.model,
                               dtype=request.dtype, **numerics)
        else:
            model = load_any(request.ckpt, name=request.model, dtype=request.dtype, **numerics)
    cfg = model.config
    if decoder is None and request.vae.lower() != "none":
        decoder = load_vae_decoder(request.vae)
    check_model(model, request.image_size, decoder)
    images = writes_images(model, decoder)
    bad = [y for y in request.labels or () if cfg.num_classes and not 0 <= y < cfg.num_classes]
    if bad:
        raise ValueError(f"label {bad[0]} is out of range: the model has {cfg.num_classes} classes")
    if cfg.num_classes == 0 and request.cfg_scale != 1.0:
        log.warning("the model is unconditional: sampling without guidance")
    elif request.cfg_scale != 1.0 and cfg.class_dropout_prob <= 0:
        raise ValueError(f"--cfg-scale {request.cfg_scale} needs a null class, but the model has "
                         f"none (class_dropout_prob=0); sample with --cfg-scale=1")

    out = Path(request.out)
    settings = {k: v for k, v in dataclasses.asdict(request).items() if k not in ("out", "npz")}
    settings["weights"] = weights_identity(model, request.ckpt)
    settings["labels"] = list(request.labels) if request.labels is not None else None
    if request.guidance_interval is not None:  # as JSON reads it back
        settings["guidance_interval"] = list(request.guidance_interval)
    for key in ("kind", "path_type", "prediction", "guidance_interval"):
        if settings[key] == DEFAULT_REQUEST[key]:
            del settings[key]  # absent at their defaults: chunks made before them still resume
    store = ChunkStore(out / "chunks", settings)
    chunks = range(request.num_chunks)
    todo = [c for c in chunks if not store.done(c)]
    sampler = weights = None
    png_dir = out / "samples"
    progress = tqdm(total=request.total, unit="sample", disable=jax.process_index() != 0,
                    initial=request.total - sum(request.chunk_size(c) for c in todo))
    for chunk in todo:
        if sampler is None:  # compiled only when something is left to do
            graphdef, *host_weights = nnx.split(model, nnx.Param, ...)
            sampler = ChunkSampler(
                graphdef, tuple(host_weights), mesh=mesh, batch_size=request.batch_size,
                seed=request.seed, sampler=request.sampler, steps=request.steps,
                cfg_scale=request.cfg_scale, guidance_channels=request.guidance_channels,
                guidance_interval=request.guidance_interval,
                decoder=decoder, clip_denoised=request.clip_denoised,
                noise_schedule=request.noise_schedule, diffusion_steps=request.diffusion_steps,
                transport=transport,
                prediction=request.prediction if transport is None and request.prediction
                else "epsilon")
            weights = sampler.place(tuple(host_weights))
        labels = chunk_labels(request, cfg.num_classes, chunk)
        samples = sampler(chunk, labels, weights)
        if images and jax.process_index() == 0:
            png_dir.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(samples, chunk * request.batch_size):
                save_png(png_dir / f"{i:06d}.png", image)
        store.save(chunk, samples, labels)  # after the PNGs: a saved chunk is a finished chunk
        progress.update(len(labels))
    progress.close()

    # Recomputed rather than read back: only host 0 writes, and the other hosts need not wait.
    labels = np.concatenate([chunk_labels(request, cfg.num_classes, c) for c in chunks])
    written = {"labels": labels, "chunks": store.directory}
    if jax.process_index() != 0:
        return written
    if images:
        grid_chunks = chunks[:math.ceil(GRID_MAX / request.batch_size)]
        firsts = np.concatenate([store.load(c)[0] for c in grid_chunks])
        written["grid"] = out / "grid.png"
        save_png(written["grid"], make_grid(firsts[:GRID_MAX]))
        written["samples"] = png_dir
        if request.npz:
            written["npz"] = Path(request.npz)
            write_npz(written["npz"], store, list(chunks), labels)
    else:
        written["npz"] = Path(request.npz) if request.npz else out / "latents.npz"
        write_npz(written["npz"], store, list(chunks), labels)
    return written
