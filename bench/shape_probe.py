"""The measurements behind docs/small_data.md's "where the speckle comes from" section, for a
train.py workdir on the built-in shapes:

    python bench/shape_probe.py denoise W            # x̂0 of real images noised to step t
    python bench/shape_probe.py score W/samples/step_0004800.npz samples.npz ...

`denoise` noises 64 real images to timesteps 0..400 and reports the RMS error of the EMA
model's x̂0, conditional and guided (scale 4), and the template fit (`judge_shape`) of each;
`score` gives shape_score, shape_accuracy and the fit distribution of sample files (a training
grid or sample.py's --npz).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dit_jax.data.builtin import BuiltinShapes, judge_shape


def fits(images_u8: np.ndarray, labels: np.ndarray) -> list[dict]:
    return [judge_shape(x, int(y)) for x, y in zip(images_u8, labels)]


def summary(verdicts: list[dict], labels: np.ndarray) -> str:
    iou = np.array([v["iou"] for v in verdicts])
    q = " / ".join(f"{x:.3f}" for x in np.percentile(iou, [0, 10, 50, 90, 100]))
    score = np.mean([v["ok"] for v in verdicts])
    shapes = np.mean([v["shape"] == y for v, y in zip(verdicts, labels)])
    background = np.median([v["background"] for v in verdicts])
    return (f"n={len(verdicts)} score {score:.3f} shape acc. {shapes:.3f} "
            f"fit min/10%/median/90%/max {q} background median {background:.4f}")


def score(paths: list[str]) -> None:
    for path in paths:
        data = np.load(path)
        images = data["images"] if "images" in data else data["arr_0"]
        labels = data["labels"] if "labels" in data else data["arr_1"]
        print(f"{path}: {summary(fits(images, labels), labels)}")


def denoise(workdir: str, timesteps=(0, 5, 20, 42, 100, 200, 400), scale: float = 4.0) -> None:
    import jax
    import jax.numpy as jnp

    from dit_jax.checkpoint import restore_model
    from dit_jax.diffusion import create_diffusion, output_mean_variance

    config = json.loads((Path(workdir) / "config.json").read_text())
    model = restore_model(workdir)
    diffusion = create_diffusion("", noise_schedule=config["diffusion"]["noise_schedule"],
                                 learn_sigma=model.config.learn_sigma,
                                 prediction=config["diffusion"]["prediction"])
    batch = BuiltinShapes(model.config.input_size, seed=7).get_batch(np.arange(64))
    x0, y = jnp.asarray(batch["x"]), jnp.asarray(batch["y"])
    noise = jax.random.normal(jax.random.key(1), x0.shape)
    forward = jax.jit(lambda x, t, labels: model(x, t, labels))

    def as_u8(x):
        return np.clip(np.round((np.asarray(x) + 1) * 127.5), 0, 255).astype(np.uint8)

    for step in timesteps:
        t = jnp.full((len(x0),), step, jnp.int32)
        x_t = diffusion.q_sample(x0, t, noise)
        cond, uncond = (jnp.clip(output_mean_variance(diffusion, forward(x_t, t, labels), x_t, t)
                                 ["pred_xstart"], -1, 1)
                        for labels in (y, jnp.full_like(y, model.null_label)))
        guided = jnp.clip(uncond + scale * (cond - uncond), -1, 1)
        line = [f"t={step:4d}"]
        for name, x in (("cond.", cond), ("guided", guided)):
            rms = float(jnp.sqrt(jnp.mean((x - x0) ** 2)))
            iou = np.array([v["iou"] for v in fits(as_u8(x), batch["y"])])
            line.append(f"{name} RMS {rms:.4f} fit median {np.median(iou):.3f} "
                        f"10% {np.percentile(iou, 10):.3f}")
        print(" | ".join(line), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("denoise").add_argument("workdir")
    sub.add_parser("score").add_argument("npz", nargs="+")
    args = parser.parse_args()
    if args.command == "denoise":
        denoise(args.workdir)
    else:
        score(args.npz)


if __name__ == "__main__":
    main()
