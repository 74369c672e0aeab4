"""Sample images from a DiT (class-conditional, classifier-free guidance), over every device.

    # the paper's FID-50K samples (DiT-XL/2 256, 250 DDPM steps, guidance 1.5, random labels)
    python sample.py --ckpt DiT-XL-2-256x256.pt --model DiT-XL/2 --image-size 256 \\
        --cfg-scale 1.5 --num-samples 50000 --batch-size 256 --out runs/fid --npz runs/fid.npz \\
        --fid-reference VIRTUAL_imagenet256_labeled.npz  # then FID, sFID, IS, precision, recall
    # a few classes, as the official sample.py
    python sample.py --ckpt DiT-XL-2-256x256.pt --labels 207,360,387,974,88,979,417,279
    # a pixel-space model trained with train.py (its config.json says: no VAE, clip x0)
    python sample.py --ckpt runs/demo --labels 0,1,2,3 --sampler ddim --steps 50
    # labels by the class names the run recorded (classes.json, the latents' manifest, built-in data)
    python sample.py --ckpt runs/demo --labels circle,square,triangle,diamond
    # SiT / REPA weights or a run trained with --config.objective=transport (docs/transport.md)
    python sample.py --ckpt SiT-XL-2-256x256.pt --kind sit --sampler sde-euler --cfg-scale 1.5
    python sample.py --ckpt last.pt --kind repa --sampler sde-euler --cfg-scale 1.8 \\
        --guidance-channels all --guidance-interval 0.3,1
    # PixArt-α with its T5 encoder (docs/pixart.md; diffusers' defaults: dpm++, 20 steps, 4.5)
    python sample.py --pixart PixArt-alpha/PixArt-XL-2-512x512 --prompt "a lighthouse at dusk"
    # a text-to-image run (model.condition=text, docs/text.md): one image per prompt
    python sample.py --ckpt runs/text_demo --prompt "a blue triangle" --prompt "a red square" \\
        --negative-prompt "a red circle"
    # a run on a frozen T5's embeddings (a PixArt-α fine-tune): the T5 it recorded encodes
    python sample.py --ckpt runs/pixart_ft --prompt "a lighthouse at dusk" [--t5 t5-v1_1-xxl/]

--ckpt is anything `dit_jax.port.load_any` reads: an official .pt, a .safetensors file, a diffusers
folder or hub id, a dit_jax model checkpoint directory, or a train.py workdir. A workdir's own
config.json supplies the defaults of --vae (none for a pixel-space run), --image-size,
--clip-denoised, --noise-schedule and --diffusion-steps (and, for a run trained with the
transport objective, --sampler, --path-type and --prediction); flags given explicitly win. Runs resume: chunks
already in OUT/chunks/ are not sampled again (a resume with other weights or settings, or into an OUT
holding files sample.py did not write, is refused). On a pod, run the same command on every host: the
samples are split over all devices of all hosts and host 0 writes the files (OUT must be on a
shared file system). See dit_jax/sampling.py.
"""

import json
from pathlib import Path

import jax
from absl import app, flags, logging
from jax.experimental import multihost_utils

from dit_jax import cli
from dit_jax.checkpoint import read_run_config
from dit_jax.cli import parse_flags
from dit_jax.data import builtin
from dit_jax.data.folder import CLASS_MAPPING_FILE, load_class_mapping
from dit_jax.data.latents import MANIFEST
from dit_jax.distributed import initialize_distributed
from dit_jax.evaluation import resolve_weights
from dit_jax.evaluation.suite import evaluate_files, format_metrics
from dit_jax.port.dit import DOWNLOAD_HELP
from dit_jax.port.paths import close_names, looks_like_hub_id, missing_path_message
from dit_jax.samplers import ALIASES
from dit_jax.sampling import (CHECKPOINT_KINDS, DEFAULT_VAE, GUIDANCE_CHANNELS, RUN_SETTINGS,
                              SAMPLERS, TRANSPORT_SAMPLERS, SampleRequest, run_settings, sample)
from dit_jax.text_sampling import sample_text_run
from dit_jax.pixart_sampling import PixArtRequest, sample_pixart

FLAGS = flags.FLAGS
flags.DEFINE_string("ckpt", None, "DiT weights: file, folder, workdir or hub id")
flags.DEFINE_string("model", None, "official model name to check the weights against, e.g. DiT-XL/2")
flags.DEFINE_integer("image_size", None, "image size in pixels (default: from the weights)")
flags.DEFINE_string("vae", DEFAULT_VAE,
                    "VAE folder or hub id ('ema'/'mse' for stabilityai/sd-vae-ft-*); 'none' for "
                    "pixel-space models, or to write latents")
flags.DEFINE_list("labels", None, "class labels, comma-separated: indices, or the class names a "
                  "train.py workdir recorded (default: uniform at random)")
flags.DEFINE_integer("num_samples", None, "number of samples (default: one per label, or 8)")
flags.DEFINE_integer("batch_size", 32, "global batch per chunk, split over all devices")
flags.DEFINE_float("cfg_scale", 4.0, "classifier-free guidance scale (1: none)")
flags.DEFINE_enum("guidance_channels", "3", list(GUIDANCE_CHANNELS),
                  "guide 3 ε channels (the released DiT) or all of them")
flags.DEFINE_list("guidance_interval", None,
                  "lo,hi: guide only for lo <= t <= hi in the model's time (flow models: t in "
                  "[0, 1], 0 noise; REPA's protocol is 0.3,1; DiT: timesteps 0..999)")
flags.DEFINE_enum("sampler", "ddpm", [*SAMPLERS, *TRANSPORT_SAMPLERS, *ALIASES],
                  f"sampler (dit_jax.samplers): {'/'.join(SAMPLERS)} for DiT's diffusion, "
                  f"ode-*/sde-* for flow models; older spellings: {ALIASES}")
flags.DEFINE_integer("steps", 250, "sampling steps")
flags.DEFINE_integer("seed", 0, "random seed")
flags.DEFINE_string("out", "samples", "output directory: grid.png, samples/, chunks/")
flags.DEFINE_string("npz", None, "also write the ADM-evaluator .npz here")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype of the DiT")
flags.DEFINE_enum("numerics", None, ["official", "diffusers"],
                  "numerics of the DiT (default: the weights' own). The hub's facebook/DiT-XL-2-* "
                  "hold the released weights: 'official' computes the paper's function with them")
flags.DEFINE_bool("clip_denoised", False, "clip x0 to [-1, 1] at each step (pixel-space models)")
flags.DEFINE_string("noise_schedule", "linear", "the noise schedule the model was trained with")
flags.DEFINE_integer("diffusion_steps", 1000, "the diffusion steps the model was trained with")
flags.DEFINE_enum("kind", "dit", list(CHECKPOINT_KINDS),
                  "a .pt file's kind: dit, sit or repa (REPA's reversed time is converted)")
flags.DEFINE_enum("path_type", None, ["Linear", "GVP", "VP"],
                  "transport path (default: the workdir's run, else Linear)")
flags.DEFINE_enum("prediction", None, ["epsilon", "start_x", "velocity", "noise", "score"],
                  "what the model was trained to predict (default: the workdir's run, else "
                  "epsilon for DiT's diffusion, velocity for flow models)")
flags.DEFINE_string("fid_reference", None,
                    "after sampling, evaluate the samples (FID, sFID, IS, precision, recall) against "
                    "this ADM reference batch or image folder; results in OUT/metrics.json "
                    "(docs/evaluation.md). The samples .npz is --npz, default OUT/samples.npz")
flags.DEFINE_string("inception_weights", None,
                    "FID Inception weights for --fid-reference (default: cache or download)")
flags.DEFINE_multi_string("prompt", None,
                          "text prompts of a text-to-image run (model.condition=text, or "
                          "--pixart); repeat the flag for several; one image each, in a grid "
                          "(docs/text.md, docs/pixart.md)")
flags.DEFINE_string("negative_prompt", None,
                    "with --prompt: the unconditional branch of guidance (default: the null "
                    "caption; with --pixart the empty prompt, as diffusers)")
flags.DEFINE_string("pixart", None,
                    "PixArt-α text-to-image weights (pipeline or transformer folder, hub id, "
                    ".pth): sample --prompt with T5 and the SD VAE (docs/pixart.md); --sampler, "
                    "--steps, --cfg-scale default to diffusers' dpm++, 20, 4.5")
flags.DEFINE_string("t5", None, "the T5 encoder + tokenizer folder or hub id: with --pixart "
                    "(default: the pipeline's text_encoder/ and tokenizer/), or with --ckpt of a "
                    "text run trained on a frozen T5's embeddings (default: the T5 its config.json "
                    "records, text.t5)")
flags.DEFINE_string("prompt_cache", None,
                    "with --pixart: a folder caching the T5 embedding of each prompt on disk")
cli.define_distributed_flag()



def request_from_flags() -> SampleRequest:
    if FLAGS.ckpt is None:
        raise app.UsageError(f"--ckpt is required. {DOWNLOAD_HELP}")
    if not Path(FLAGS.ckpt).expanduser().exists() and not looks_like_hub_id(FLAGS.ckpt):
        if close_names(FLAGS.ckpt):  # a typo: name the paths it resembles
            raise FileNotFoundError(missing_path_message(FLAGS.ckpt, "--ckpt"))
        raise FileNotFoundError(f"--ckpt {FLAGS.ckpt} does not exist. {DOWNLOAD_HELP}")
    labels = parse_labels(FLAGS.labels, FLAGS.ckpt) if FLAGS.labels else None
    interval = None
    if FLAGS.guidance_interval:
        try:
            interval = tuple(float(v) for v in FLAGS.guidance_interval)
        except ValueError:
            interval = ()
        if len(interval) != 2 or interval[0] > interval[1]:
            raise app.UsageError(f"--guidance-interval must be lo,hi with lo <= hi, got "
                                 f"{','.join(FLAGS.guidance_interval)}")
    settings = {name: FLAGS[name].value for name in RUN_SETTINGS}
    # A train.py workdir's own settings replace the defaults of the flags not given.
    recorded = {k: v for k, v in run_settings(FLAGS.ckpt).items() if not FLAGS[k].present}
    if recorded:
        logging.info("from %s/config.json: %s", FLAGS.ckpt,
                     ", ".join(f"{k}={v}" for k, v in recorded.items()))
        interval = recorded.pop("guidance_interval", interval)
        settings.update(recorded)
    return SampleRequest(
        ckpt=FLAGS.ckpt, model=FLAGS.model, labels=labels, num_samples=FLAGS.num_samples,
        batch_size=FLAGS.batch_size, cfg_scale=FLAGS.cfg_scale,
        guidance_channels=FLAGS.guidance_channels, steps=FLAGS.steps, seed=FLAGS.seed,
        out=FLAGS.out,
        npz=FLAGS.npz or (str(Path(FLAGS.out) / "samples.npz") if FLAGS.fid_reference else None),
        dtype=FLAGS.dtype, numerics=FLAGS.numerics, kind=FLAGS.kind, guidance_interval=interval,
        **settings)


def run_class_names(ckpt: str) -> tuple[list[str], str] | None:
    """The class names a train.py workdir's run recorded, and where they were found: its
    classes.json (image folders), else its data's: the latents' manifest, the built-in shapes."""
    if (Path(ckpt) / CLASS_MAPPING_FILE).is_file():
        return load_class_mapping(ckpt), str(Path(ckpt) / CLASS_MAPPING_FILE)
    config = read_run_config(ckpt) or {}
    data = config.get("data") or {}
    if data.get("source") == "builtin":
        return builtin.class_names(), "the built-in shapes data (dit_jax.data.builtin)"
    manifest = Path(str(data.get("path"))) / MANIFEST
    if data.get("source") == "latents" and manifest.is_file():
        names = json.loads(manifest.read_text()).get("class_names") or []
        return (list(names), str(manifest)) if names else None
    return None


def parse_labels(values: list[str], ckpt: str) -> tuple[int, ...]:
    """--labels: class indices, or class names of the run (case-insensitive; a word of a name,
    such as `circle` for "red circle", when it names one class only)."""
    if all(v.strip().lstrip("-").isdigit() for v in values):
        return tuple(int(v) for v in values)
    found = run_class_names(ckpt)
    if found is None:
        raise app.UsageError(f"--labels {','.join(values)}: {ckpt} records no class names (no "
                             f"train.py workdir with classes.json, latents or built-in data): "
                             f"pass class indices")
    names, where = found

    def normal(name: str) -> str:  # "Green_Square", "green-square" → "green square"
        return " ".join(name.lower().replace("_", " ").replace("-", " ").split())

    labels = []
    for value in values:
        key = normal(value)
        if key.lstrip("-").isdigit():
            labels.append(int(key))
            continue
        exact = [i for i, n in enumerate(names) if normal(n) == key]
        words = [i for i, n in enumerate(names) if key in normal(n).split()]
        match = exact or words
        if len(match) != 1:
            listed = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
            problem = "names several classes" if match else "is not a class name"
            raise app.UsageError(f"--labels: {value!r} {problem} of {where} ({listed})")
        labels.append(match[0])
    logging.info("labels from %s: %s", where,
                 ", ".join(f"{v}={i}" for v, i in zip(values, labels)))
    return tuple(labels)


def evaluate_samples(npz: str) -> dict:
    """--fid-reference: the ADM metrics of the samples in `npz`, written to OUT/metrics.json."""
    multihost_utils.sync_global_devices("sample.py: samples written")  # host 0 wrote the .npz
    results, samples = evaluate_files(FLAGS.fid_reference, npz,
                                      inception_weights=FLAGS.inception_weights,
                                      batch_size=FLAGS.batch_size, progress=True)
    if jax.process_index() == 0:
        print(format_metrics(results))
        path = Path(FLAGS.out) / "metrics.json"
        path.write_text(json.dumps({**results, "reference": FLAGS.fid_reference, "samples": npz,
                                    "num_samples": samples.count}, indent=2) + "\n")
        logging.info("metrics: %s", path)
    return results


def sample_text() -> Path:
    """--prompt: one image per prompt from a text run's EMA weights, as OUT/grid.png (the run's
    config.json sets the sampler, steps, guidance, clipping, VAE and T5 unless flags are given;
    dit_jax.text_sampling.sample_text_run)."""
    given = {name: FLAGS[name].value for name in ("sampler", "steps", "cfg_scale",
                                                  "clip_denoised", "image_size")
             if FLAGS[name].present}
    return sample_text_run(FLAGS.ckpt, FLAGS.prompt, out=FLAGS.out,
                           negative_prompt=FLAGS.negative_prompt, seed=FLAGS.seed, t5=FLAGS.t5,
                           vae=FLAGS.vae if FLAGS["vae"].present else None, **given)


def sample_pixart_flags() -> dict:
    """--pixart: the PixArt-α pipeline on --prompt (diffusers' defaults for flags not given)."""
    given = {name: FLAGS[name].value for name in ("sampler", "steps", "cfg_scale", "vae")
             if FLAGS[name].present}
    return sample_pixart(PixArtRequest(
        pixart=FLAGS.pixart, prompts=tuple(FLAGS.prompt or ()), t5=FLAGS.t5,
        negative_prompt=FLAGS.negative_prompt or "", num_samples=FLAGS.num_samples,
        batch_size=FLAGS.batch_size, seed=FLAGS.seed, image_size=FLAGS.image_size,
        dtype=FLAGS.dtype, prompt_cache=FLAGS.prompt_cache, out=FLAGS.out, npz=FLAGS.npz,
        **given))


def main(argv):
    del argv
    if FLAGS.pixart:
        initialize_distributed(FLAGS.distributed)
        for name, path in sample_pixart_flags().items():
            if name != "labels":
                logging.info("%s: %s", name, path)
        return
    if FLAGS.prompt:
        if FLAGS.ckpt is None:
            raise app.UsageError("--prompt needs --ckpt: a train.py workdir of a text run")
        logging.info("grid: %s", sample_text())
        return
    request = request_from_flags()
    if FLAGS.fid_reference:
        if not Path(FLAGS.fid_reference).expanduser().exists():
            raise app.UsageError(f"--fid-reference {FLAGS.fid_reference} does not exist: pass an "
                                 "ADM reference batch .npz or an image folder")
        resolve_weights(FLAGS.inception_weights)  # a missing file fails now, not after sampling
    initialize_distributed(FLAGS.distributed)  # before JAX picks its devices
    written = sample(request)
    for name in ("grid", "samples", "npz", "chunks"):
        if name in written:
            logging.info("%s: %s", name, written[name])
    if FLAGS.fid_reference:  # (samples of latents fail here: the .npz holds no uint8 images)
        evaluate_samples(request.npz)


if __name__ == "__main__":
    cli.run(main)
