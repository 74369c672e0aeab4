"""FID, sFID, Inception Score, precision and recall of a sample set against a reference, as
OpenAI's ADM evaluator computes them, in JAX over every device (docs/evaluation.md).

    # the paper's FID-50K: samples from sample.py --npz, ADM's ImageNet 256 reference batch
    python -m dit_jax.evaluate VIRTUAL_imagenet256_labeled.npz runs/fid.npz --json=runs/fid.json
    # image folders work too; --image-size center-crops (ADM's crop) every image first
    python -m dit_jax.evaluate /data/imagenet/val samples/ --image-size=256
    # write a reference batch of your own (ADM format) from a folder of training images
    python -m dit_jax.evaluate --write-reference=ref.npz /data/train --image-size=256

REF and SAMPLES are ADM-format .npz files (uint8 N×H×W×3 under arr_0; REF may also hold mu,
sigma, mu_s, sigma_s, which are then used as they are) or image folders. The FID Inception
weights (pt_inception-2015-12-05-6726825d.pth) come from --inception-weights, the cache
(~/.cache/dit_jax, torch's hub cache) or a download. On a pod, run the same command on every
host; host 0 prints and writes the results.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
from absl import app, flags
from tqdm import tqdm

from dit_jax import cli
from dit_jax.distributed import initialize_distributed
from dit_jax.evaluation import FeatureExtractor, load_inception
from dit_jax.evaluation.suite import evaluate_files, format_metrics, write_reference

FLAGS = flags.FLAGS
flags.DEFINE_string("inception_weights", None,
                    "FID Inception weights (.pth, .safetensors or .npz with torch's names); "
                    "default: the cache, else downloaded")
flags.DEFINE_string("json", None, "also write the results to this JSON file")
flags.DEFINE_integer("batch_size", 64, "images per Inception batch, split over all devices")
flags.DEFINE_integer("image_size", None,
                     "center-crop (ADM's crop) folder images to this size; default: use them as "
                     "they are (they must share one size)")
flags.DEFINE_string("write_reference", None,
                    "instead of evaluating, write an ADM-format reference batch of the one image "
                    "set given (statistics of every image, --reference-images of them as arr_0)")
flags.DEFINE_integer("reference_images", 10000, "images kept in a written reference batch")
cli.define_distributed_flag()



def main(argv):
    paths = argv[1:]
    expected = 1 if FLAGS.write_reference else 2
    if len(paths) != expected:
        raise app.UsageError("usage: python -m dit_jax.evaluate REF SAMPLES [flags], or "
                             "--write-reference=OUT.npz SOURCE")
    initialize_distributed(FLAGS.distributed)  # before JAX picks its devices
    extractor = FeatureExtractor(load_inception(FLAGS.inception_weights),
                                 batch_size=FLAGS.batch_size)
    chief = jax.process_index() == 0
    if FLAGS.write_reference:
        with tqdm(desc=f"reference {paths[0]}", unit="img", disable=not chief) as bar:
            out = write_reference(FLAGS.write_reference, paths[0], extractor,
                                  image_size=FLAGS.image_size, num_images=FLAGS.reference_images,
                                  progress=bar)
        if chief:
            print(f"wrote {out}")
        return
    results, samples = evaluate_files(paths[0], paths[1], extractor=extractor,
                                      image_size=FLAGS.image_size, progress=True)
    if chief:
        print(format_metrics(results))
        if FLAGS.json:
            path = Path(FLAGS.json).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({**results, "reference": paths[0], "samples": paths[1],
                                        "num_samples": samples.count}, indent=2) + "\n")


if __name__ == "__main__":
    cli.run(main)
