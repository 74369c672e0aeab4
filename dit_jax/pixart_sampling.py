"""PixArt-α text-to-image sampling: prompts → T5 → guided PixArt transformer → sampler → SD VAE,
as diffusers' PixArtAlphaPipeline computes it (docs/pixart.md#sampling-text-to-image).

    pipe = PixArtPipeline.load("PixArt-alpha/PixArt-XL-2-512x512", t5="...-512x512")
    out = pipe(["a watercolor lighthouse at dusk"], seed=0)   # out["images"] uint8 (N, H, W, 3)

What it does, and where it follows diffusers (defaults: DPM-Solver++(2M), 20 steps, guidance 4.5):
- Prompts are lower-cased and stripped (the pipeline's `_text_preprocessing` without the
  optional bs4/ftfy caption cleaning), tokenized to 120 tokens with max-length padding, and
  encoded by the T5 encoder. Embeddings are kept per prompt in memory and, with `cache_dir`, on
  disk under a key of the prompt and the encoder's identity, so a prompt is encoded once.
- Guidance as the pipeline applies it: the batch [x; x] with the prompts' and the negative
  prompt's embeddings (the negative prompt "" is encoded by T5 too), ε = ε_neg + s·(ε - ε_neg) on
  all 4 ε channels; the learned-variance channels are dropped (the pipeline keeps the first 4).
- The sampler is any diffusion sampler of `dit_jax.samplers`; "dpm++" on diffusers' "linspace"
  grid without t = 0 (`linspaceN`), its last step to the data, which is DPMSolverMultistepScheduler
  as PixArt's pipelines configure it (dpmsolver++, order 2, midpoint, lower-order final,
  final sigma 0).
- 1024-MS models get the micro-conditions resolution [H, W] (pixels) and aspect ratio H/W.
  diffusers first snaps the requested size to its aspect-ratio bins and resizes the decoded
  image back; here the requested size is sampled as given (a multiple of 8 × the patch).
- Latents are decoded by the SD VAE (`latent / 0.18215`, the VAE's scaling factor).

The transformer, the guidance, the sampling loop and the decode are one jitted program per batch
shape, sharded over a mesh as `dit_jax.sampling` shards the DiT: weights by their logical axes,
the batch over the batch axes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from dit_jax import diffusion as diff
from dit_jax.distributed import gather_rows
from dit_jax.models.pixart import PixArt
from dit_jax.port.pixart import load_pixart
from dit_jax.port.t5 import PIXART_MAX_LENGTH, encoder_fn, load_t5_encoder, load_t5_tokenizer
from dit_jax.samplers import get_sampler, sample_loop
from dit_jax.sampling import (GRID_MAX, NOISE_STREAM, ChunkStore, Decoder, load_vae_decoder,
                              make_grid, save_png, to_uint8, write_npz)
from dit_jax.sharding import batch_sharding, make_mesh, place, replicated, state_shardings

log = logging.getLogger(__name__)

# diffusers' PixArtAlphaPipeline defaults.
DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_CFG_SCALE, DEFAULT_NEGATIVE_PROMPT = "dpm++", 20, 4.5, ""
PIXART_VAE = "stabilityai/sd-vae-ft-ema"  # the VAE of every released PixArt-α pipeline


def preprocess_prompt(text: str) -> str:
    """What the pipeline feeds the tokenizer when caption cleaning is off (or bs4/ftfy absent)."""
    return text.lower().strip()


def pixart_spacing(sampler: str, steps: int) -> str:
    """The respacing of `sampler` for PixArt: diffusers' linspace grid for DPM-Solver++ (its
    scheduler's), the registry's default grid for the other diffusion samplers."""
    spec = get_sampler(sampler)
    if spec.family != "diffusion":
        raise ValueError(f"sampler {sampler!r} is a flow-model sampler; PixArt-α is a diffusion "
                         f"model: use dpm++, ddim or ddpm")
    return f"linspace{steps}" if spec.name == "dpm++" else spec.default_spacing(steps)


def _folder_identity(src: str) -> str:
    """A local folder's files (name, size, mtime) or a hub id: what makes cached embeddings of
    one encoder invalid for another."""
    path = Path(src).expanduser()
    if not path.exists():
        return str(src)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return json.dumps([str(path.resolve())] + [[str(p.relative_to(path)), p.stat().st_size,
                                                p.stat().st_mtime_ns] for p in files])


class PromptEncoder:
    """Prompts → (T5 last hidden states float32 (N, L, D), mask int32 (N, L)), each distinct
    prompt encoded once: kept in memory, and with `cache_dir` as cache_dir/KEY.npz, KEY a hash of
    the preprocessed prompt, the token length and `identity` (the encoder's files and dtype).
    `encoded` counts the prompts that went through the encoder."""

    def __init__(self, tokenizer, encode, *, identity: str, cache_dir: str | Path | None = None):
        self.tokenizer, self._encode, self.identity = tokenizer, encode, identity
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self._memory: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.encoded = 0

    @classmethod
    def load(cls, src, *, mesh: Mesh | None = None, dtype: str = "float32",
             cache_dir: str | Path | None = None,
             max_length: int = PIXART_MAX_LENGTH) -> PromptEncoder:
        """T5 encoder and tokenizer of `src` (a transformers T5 folder, a pipeline folder with
        text_encoder/ and tokenizer/, or a hub id), compiled over `mesh`."""
        tokenizer = load_t5_tokenizer(src, max_length=max_length)
        encoder = load_t5_encoder(src, dtype=jnp.dtype(dtype), mesh=mesh)
        return cls(tokenizer, encoder_fn(encoder, mesh),
                   identity=f"{_folder_identity(str(src))}|{dtype}", cache_dir=cache_dir)

    def key(self, text: str) -> str:
        blob = json.dumps([self.identity, self.tokenizer.max_length, text])
        return hashlib.sha256(blob.encode()).hexdigest()

    def _lookup(self, text: str):
        key = self.key(text)
        if key in self._memory:
            return self._memory[key]
        if self.cache_dir is not None and (self.cache_dir / f"{key}.npz").is_file():
            with np.load(self.cache_dir / f"{key}.npz") as data:
                self._memory[key] = (data["embeddings"], data["mask"])
            return self._memory[key]
        return None

    def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        texts = [preprocess_prompt(p) for p in prompts]
        missing = list(dict.fromkeys(t for t in texts if self._lookup(t) is None))
        if missing:
            ids, mask = self.tokenizer(missing)
            embeddings = np.asarray(self._encode(ids, mask), np.float32)
            self.encoded += len(missing)
            for text, e, m in zip(missing, embeddings, mask):
                key = self.key(text)
                self._memory[key] = (e, m)
                if self.cache_dir is not None and jax.process_index() == 0:
                    self.cache_dir.mkdir(parents=True, exist_ok=True)
                    tmp = self.cache_dir / f"{key}.tmp"
                    with open(tmp, "wb") as f:
                        np.savez(f, embeddings=e, mask=m, prompt=text)
                    tmp.replace(self.cache_dir / f"{key}.npz")
        found = [self._lookup(t) for t in texts]
        return np.stack([e for e, _ in found]), np.stack([m for _, m in found]).astype(np.int32)


class PixArtPipeline:
    """A PixArt-α transformer, its prompt encoder and (optionally) the SD VAE, sampled over
    `mesh` (default: every device). `__call__` samples a batch; `sample_pixart` runs a whole
    request in chunks and writes files. Pixel sizes are latent sizes times the VAE's factor, or
    `latent_factor` (the SD VAE's 8) without a VAE: what the micro-conditions are given."""

    def __init__(self, model: PixArt, prompts: PromptEncoder, decoder: Decoder | None = None,
                 *, mesh: Mesh | None = None, latent_factor: int = 8):
        if decoder is not None and decoder.latent_channels != model.config.in_channels:
            raise ValueError(f"the PixArt model has {model.config.in_channels} input channels but "
                             f"the VAE's latents have {decoder.latent_channels}")
        self.model, self.prompts, self.decoder = model, prompts, decoder
        self.mesh = mesh if mesh is not None else make_mesh()
        graphdef, *weights = nnx.split(model, nnx.Param, ...)
        self._graphdef = graphdef
        self.weight_shardings = state_shardings(tuple(weights), self.mesh)
        self.weights = place(tuple(weights), self.weight_shardings)
        self._vae = None
        if decoder is not None:
            vae_graphdef, vae_state = nnx.split(decoder.module)
            vae_shardings = state_shardings(vae_state, self.mesh)
            self._vae = (vae_graphdef, vae_shardings, place(vae_state, vae_shardings))
        self._programs: dict[tuple, Any] = {}
        self.factor = decoder.scale_factor if decoder is not None else latent_factor

    @classmethod
    def load(cls, pixart: str, *, t5: str | None = None, vae: str | None = None,
             mesh: Mesh | None = None, dtype: str = "float32", t5_dtype: str = "float32",
             cache_dir: str | Path | None = None, latent_factor: int = 8) -> PixArtPipeline:
        """From `pixart` (anything `load_pixart` reads), `t5` (default: `pixart` itself, a
        pipeline folder or hub id with text_encoder/ and tokenizer/) and `vae` (default: the
        pipeline folder's vae/, else stabilityai/sd-vae-ft-ema; "none": return latents only)."""
        mesh = mesh if mesh is not None else make_mesh()
        model = load_pixart(pixart, dtype=jnp.dtype(dtype))
        if vae is None:
            vae = pixart if (Path(pixart) / "vae" / "config.json").is_file() else PIXART_VAE
        decoder = None if str(vae).lower() == "none" else load_vae_decoder(vae)
        prompts = PromptEncoder.load(t5 if t5 is not None else pixart, mesh=mesh,
                                     dtype=t5_dtype, cache_dir=cache_dir)
        return cls(model, prompts, decoder, mesh=mesh, latent_factor=latent_factor)

    def default_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the model's training resolution."""
        side = self.model.config.input_size
        latent = (side, side) if isinstance(side, int) else tuple(side)
        return latent[0] * self.factor, latent[1] * self.factor

    def _latent_shape(self, height: int, width: int) -> tuple[int, int]:
        factor = self.factor
        step = factor * self.model.config.patch_size
        if height % step or width % step:
            raise ValueError(f"image size {height}x{width} must be a multiple of {step} (VAE "
                             f"factor {factor} × patch {self.model.config.patch_size})")
        return height // factor, width // factor

    def _program(self, sampler: str, steps: int, cfg_scale: float, size: tuple[int, int]):
        """The jitted (weights, vae, x_T, key, text, negative) → (latents, images or None)."""
        sig = (sampler, steps, float(cfg_scale), size)
        if sig in self._programs:
            return self._programs[sig]
        process = diff.create_diffusion(pixart_spacing(sampler, steps),
                                        learn_sigma=self.model.config.learn_sigma)
        graphdef, mesh, decoder = self._graphdef, self.mesh, self.decoder
        micro = {}
        if self.model.config.micro_conditions:  # [H, W] in pixels and H / W, as diffusers
            micro = dict(resolution=np.array([size], np.float32),
                         aspect_ratio=np.array([size[0] / size[1]], np.float32))

        def run(weights, vae_weights, x_T, key, text, negative):
            model = nnx.merge(graphdef, *weights)

            def model_fn(x, t, c):
                return model(x, t, c[0], c[1], **micro)

            # All 4 ε channels guided; the variance channels (read by DDPM alone) are the
            # prompts' own. diffusers guides them too, then drops them: same ε, same DPM/DDIM.
            guided = diff.conditional_guidance(model_fn, text, negative, cfg_scale,
                                               guide_channels=None)
            latents = sample_loop(sampler, process, guided, x_T, key)
            if decoder is None:
                return latents, None
            return latents, decoder.decode(nnx.merge(self._vae[0], vae_weights), latents)

        rows2, rows3, rows4 = (batch_sharding(mesh, n) for n in (2, 3, 4))
        text = (rows3, rows2)
        vae_sh = self._vae[1] if self._vae is not None else None
        program = jax.jit(run, in_shardings=(self.weight_shardings, vae_sh, rows4,
                                             replicated(mesh), text, text),
                          out_shardings=(rows4, rows4 if decoder is not None else None))
        self._programs[sig] = program
        return program

    def __call__(self, prompts: Sequence[str], *, negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
                 sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS,
                 cfg_scale: float = DEFAULT_CFG_SCALE, seed: int = 0, chunk: int = 0,
                 height: int | None = None, width: int | None = None,
                 latents: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """One image per prompt: {"latents" float32 (N, h, w, 4), and with a VAE "decoded"
        float32 (the VAE's output, about [-1, 1]) and "images" uint8 (N, H, W, 3)}. The initial
        noise is `latents` if given, else drawn from (seed, chunk) as `dit_jax.sampling` draws a
        chunk's (the same whatever the device count); stochastic samplers draw their step noise
        from it too."""
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts: give at least one")
        default = self.default_size()
        size = (height or default[0], width or default[1])
        latent = self._latent_shape(*size)
        n = len(prompts)
        padded = math.ceil(n / self.mesh.size) * self.mesh.size  # equal slices; pad rows dropped
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), NOISE_STREAM), chunk)
        noise_key, step_key = jax.random.split(key)
        shape = (padded, *latent, self.model.config.in_channels)
        if latents is None:
            x_T = np.asarray(jax.random.normal(noise_key, shape), np.float32)
        else:
            latents = np.asarray(latents, np.float32)
            if latents.shape != (n, *shape[1:]):
                raise ValueError(f"latents must have shape {(n, *shape[1:])}, got "
                                 f"{latents.shape}")
            x_T = np.concatenate([latents, np.zeros((padded - n, *shape[1:]), np.float32)])
        embeddings, mask = self.prompts(prompts + prompts[:1] * (padded - n))
        negative = self.prompts([negative_prompt] * padded)
        program = self._program(sampler, steps, cfg_scale, size)
        rows2, rows3, rows4 = (batch_sharding(self.mesh, k) for k in (2, 3, 4))
        args = place((x_T, (embeddings, mask), negative),
                     (rows4, (rows3, rows2), (rows3, rows2)))
        vae = self._vae[2] if self._vae is not None else None
        with jax.set_mesh(self.mesh):
            out, decoded = program(self.weights, vae, args[0], step_key, args[1], args[2])
        result = {"latents": gather_rows(out)[:n]}
        if decoded is not None:
            decoded = gather_rows(decoded)[:n]
            result["decoded"] = decoded
            result["images"] = np.asarray(to_uint8(decoded))
        return result


@dataclasses.dataclass(frozen=True)
class PixArtRequest:
    """A text-to-image run (sample.py --pixart): prompts repeated in order up to num_samples."""

    pixart: str
    prompts: tuple[str, ...]
    t5: str | None = None
    vae: str | None = None  # None: the pipeline's vae/ or sd-vae-ft-ema; "none": latents
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    num_samples: int | None = None  # None: one per prompt
    batch_size: int = 8
    sampler: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_STEPS
    cfg_scale: float = DEFAULT_CFG_SCALE
    seed: int = 0
    image_size: int | None = None  # square side in pixels (None: the model's)
    dtype: str = "float32"
    t5_dtype: str = "float32"
    prompt_cache: str | None = None
    out: str = "samples"
    npz: str | None = None

    def __post_init__(self):
        pixart_spacing(self.sampler, self.steps)  # a flow sampler or unknown name fails here
        if not self.prompts:
            raise ValueError("--prompt is required with --pixart (repeat it for several)")
        if min(self.batch_size, self.steps, self.total) < 1:
            raise ValueError("batch_size, steps and num_samples must be positive")

    @property
    def total(self) -> int:
        return self.num_samples if self.num_samples is not None else len(self.prompts)


def sample_pixart(request: PixArtRequest, *, mesh: Mesh | None = None,
                  pipeline: PixArtPipeline | None = None) -> dict[str, Any]:
    """Run `request` in chunks of batch_size (resumable, as `dit_jax.sampling.sample`):
    OUT/grid.png, OUT/samples/NNNNNN.png and with npz the .npz (`arr_0` images, `arr_1` prompt
    indices); without a VAE OUT/latents.npz. Returns the paths written and the prompt index of
    every sample."""
    if pipeline is None:
        pipeline = PixArtPipeline.load(request.pixart, t5=request.t5, vae=request.vae, mesh=mesh,
                                       dtype=request.dtype, t5_dtype=request.t5_dtype,
                                       cache_dir=request.prompt_cache)
    settings = {k: v for k, v in dataclasses.asdict(request).items()
                if k not in ("out", "npz", "prompt_cache")}
    settings["prompts"] = list(request.prompts)
    store = ChunkStore(Path(request.out) / "chunks", settings)
    index = np.arange(request.total) % len(request.prompts)
    chunks = range(math.ceil(request.total / request.batch_size))
    size = (request.image_size,) * 2 if request.image_size else (None, None)
    png_dir = Path(request.out) / "samples"
    images = pipeline.decoder is not None
    for chunk in chunks:
        if store.done(chunk):
            continue
        rows = index[chunk * request.batch_size:(chunk + 1) * request.batch_size]
        out = pipeline([request.prompts[i] for i in rows], negative_prompt=request.negative_prompt,
                       sampler=request.sampler, steps=request.steps, cfg_scale=request.cfg_scale,
                       seed=request.seed, chunk=chunk, height=size[0], width=size[1])
        samples = out["images"] if images else out["latents"]
        if images and jax.process_index() == 0:
            png_dir.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(samples, chunk * request.batch_size):
                save_png(png_dir / f"{i:06d}.png", image)
        store.save(chunk, samples, rows)
    written = {"labels": index, "chunks": store.directory}
    if jax.process_index() != 0:
        return written
    if images:
        grid_chunks = chunks[:math.ceil(GRID_MAX / request.batch_size)]
        firsts = np.concatenate([store.load(c)[0] for c in grid_chunks])[:GRID_MAX]
        written["grid"] = Path(request.out) / "grid.png"
        save_png(written["grid"], make_grid(firsts))
        written["samples"] = png_dir
        if request.npz:
            written["npz"] = Path(request.npz)
    else:
        written["npz"] = Path(request.npz) if request.npz else Path(request.out) / "latents.npz"
    if "npz" in written:
        write_npz(written["npz"], store, list(chunks), index)
    return written


__all__ = ["DEFAULT_CFG_SCALE", "DEFAULT_NEGATIVE_PROMPT", "DEFAULT_SAMPLER", "DEFAULT_STEPS",
           "PIXART_VAE", "PixArtPipeline", "PixArtRequest", "PromptEncoder", "pixart_spacing",
           "preprocess_prompt", "sample_pixart"]
