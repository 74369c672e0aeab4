"""Sample images from a DiT (class-conditional, classifier-free guidance), over every device.

    # the paper's FID-50K samples (DiT-XL/2 256, 250 DDPM steps, guidance 1.5, random labels)
    python sample.py --ckpt DiT-XL-2-256x256.pt --model DiT-XL/2 --image-size 256 \\
        --cfg-scale 1.5 --num-samples 50000 --batch-size 256 --out runs/fid --npz runs/fid.npz
    # a few classes, as the official sample.py
    python sample.py --ckpt DiT-XL-2-256x256.pt --labels 207,360,387,974,88,979,417,279
    # a pixel-space model trained with train.py
    python sample.py --ckpt runs/demo --vae none --labels 0,1,2,3 --sampler ddim --steps 50

--ckpt is anything `dit_jax.port.load_any` reads: an official .pt, a .safetensors file, a diffusers
folder or hub id, a dit_jax model checkpoint directory, or a train.py workdir. Runs resume: chunks
already in OUT/chunks/ are not sampled again. On a pod, run the same command on every host: the
samples are split over all devices of all hosts and host 0 writes the files (OUT must be on a
shared file system). See dit_jax/sampling.py.
"""

from absl import app, flags, logging

from dit_jax.sampling import (DEFAULT_VAE, GUIDANCE_CHANNELS, SAMPLERS, SampleRequest,
                              sample)

FLAGS = flags.FLAGS
flags.DEFINE_string("ckpt", None, "DiT weights: file, folder, workdir or hub id")
flags.DEFINE_string("model", None, "official model name to check the weights against, e.g. DiT-XL/2")
flags.DEFINE_integer("image_size", None, "image size in pixels (default: from the weights)")
flags.DEFINE_string("vae", DEFAULT_VAE,
                    "VAE folder or hub id ('ema'/'mse' for stabilityai/sd-vae-ft-*); 'none' for "
                    "pixel-space models, or to write latents")
flags.DEFINE_list("labels", None, "class labels, comma-separated (default: uniform at random)")
flags.DEFINE_integer("num_samples", None, "number of samples (default: one per label, or 8)")
flags.DEFINE_integer("batch_size", 32, "global batch per chunk, split over all devices")
flags.DEFINE_float("cfg_scale", 4.0, "classifier-free guidance scale (1: none)")
flags.DEFINE_enum("guidance_channels", "3", list(GUIDANCE_CHANNELS),
                  "guide 3 ε channels (the released DiT) or all of them")
flags.DEFINE_enum("sampler", "ddpm", list(SAMPLERS), "sampler")
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
flags.DEFINE_enum("prediction", "epsilon", ["epsilon", "start_x", "velocity"],
                  "what the model was trained to predict (train.py's diffusion.prediction)")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "call jax.distributed.initialize: auto = when launched as several processes")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flags, also spelled with dashes (--image-size as --image_size)."""
    def underscored(arg):
        if not arg.startswith("--"):
            return arg
        name, eq, value = arg.partition("=")
        return "--" + name[2:].replace("-", "_") + eq + value
    return FLAGS([argv[0], *map(underscored, argv[1:])])


def request_from_flags() -> SampleRequest:
    if FLAGS.ckpt is None:
        from dit_jax.port.dit import DOWNLOAD_HELP
        raise app.UsageError(f"--ckpt is required. {DOWNLOAD_HELP}")
    labels = None
    if FLAGS.labels:
        try:
            labels = tuple(int(label) for label in FLAGS.labels)
        except ValueError:
            raise app.UsageError(f"--labels must be integers, got {','.join(FLAGS.labels)}")
    return SampleRequest(
        ckpt=FLAGS.ckpt, model=FLAGS.model, image_size=FLAGS.image_size, vae=FLAGS.vae,
        labels=labels, num_samples=FLAGS.num_samples, batch_size=FLAGS.batch_size,
        cfg_scale=FLAGS.cfg_scale, guidance_channels=FLAGS.guidance_channels,
        sampler=FLAGS.sampler, steps=FLAGS.steps, seed=FLAGS.seed, out=FLAGS.out, npz=FLAGS.npz,
        dtype=FLAGS.dtype, numerics=FLAGS.numerics, clip_denoised=FLAGS.clip_denoised,
        noise_schedule=FLAGS.noise_schedule, diffusion_steps=FLAGS.diffusion_steps,
        prediction=FLAGS.prediction)


def main(argv):
    del argv
    request = request_from_flags()
    if FLAGS.distributed != "off":
        from dit_jax.train.loop import initialize_distributed  # before JAX picks its devices
        initialize_distributed(FLAGS.distributed)
    written = sample(request)
    for name in ("grid", "samples", "npz", "chunks"):
        if name in written:
            logging.info("%s: %s", name, written[name])


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
