"""The measurement behind docs/small_data.md's table for configs/small.py: a real image set that a
package ships (scikit-learn's 1797 handwritten digits, 8×8, 10 classes; no download), written as
a class-folder dataset at 32 px; a classifier trained on the real images; then the class accuracy
of a trained run's guided samples beside the real images' held-out accuracy.

    python bench/small_data.py write /tmp/digits          # the folder dataset
    python train.py --config=configs/small.py --workdir=W --config.data.path=/tmp/digits
    python sample.py --ckpt=W --labels=0,1,2,3,4,5,6,7,8,9 --num-samples=100 --npz=W/eval.npz
    python bench/small_data.py score W/eval.npz           # accuracy of the samples

(or score a training grid, W/samples/step_*.npz). Results: docs/small_data.md.
Needs scikit-learn (`pip install -e ".[bench]"`); not a dependency of dit_jax itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32


def real_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32) uint8, labels): the 8×8 digits (0..16) upsampled bicubically."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.stack([
        np.asarray(Image.fromarray((d * 255.0 / 16).astype(np.uint8)).resize(
            (SIZE, SIZE), Image.BICUBIC)) for d in digits.images])
    return images, digits.target.astype(np.int64)


def write(folder: Path) -> None:
    images, labels = real_digits()
    for i, (image, label) in enumerate(zip(images, labels)):
        path = folder / str(label) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).convert("RGB").save(path)
    print(f"{len(images)} images of {len(set(labels.tolist()))} classes in {folder}")


def features(images: np.ndarray) -> np.ndarray:
    """Grey images (N, H, W) in 0..255, any H = W, back to the 8×8 grid the classifier reads."""
    small = [np.asarray(Image.fromarray(im.astype(np.uint8)).resize((8, 8), Image.BOX),
                        np.float32) / 255.0 for im in images]
    return np.stack(small).reshape(len(images), -1)


def classifier():
    """Logistic regression on 80% of the real digits; its accuracy on the held-out 20%."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    images, labels = real_digits()
    x_train, x_test, y_train, y_test = train_test_split(features(images), labels, test_size=0.2,
                                                        random_state=0, stratify=labels)
    model = LogisticRegression(max_iter=2000, C=1.0).fit(x_train, y_train)
    return model, float(model.score(x_test, y_test))


def score(npz: Path) -> dict:
    with np.load(npz) as data:
        arrays = [data[k] for k in data.files]
    images, labels = arrays[0], arrays[1]
    grey = images.astype(np.float32).mean(axis=-1)
    model, held_out = classifier()
    predicted = model.predict(features(grey))
    result = {"samples": len(labels), "sample_accuracy": float(np.mean(predicted == labels)),
              "real_held_out_accuracy": held_out,
              "per_class": [float(np.mean(predicted[labels == k] == k)) for k in range(10)]}
    print(json.dumps(result))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("write").add_argument("folder", type=Path)
    sub.add_parser("score").add_argument("npz", type=Path)
    args = parser.parse_args()
    write(args.folder) if args.command == "write" else score(args.npz)


if __name__ == "__main__":
    main()
