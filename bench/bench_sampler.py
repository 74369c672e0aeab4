"""Loop overhead of the compiled samplers: per-step time of a whole sampling run (one lax.scan)
against one jitted call of the same model_fn at the same batch.

    python bench/bench_sampler.py                       # toy conv model on whatever JAX sees
    python bench/bench_sampler.py --model DiT-S/2 --image-size 256 --batch 32 --cfg-scale 4

The per-step overhead (per-step loop time minus one model call, both the minimum over rounds)
is what the sampler adds: the table gathers, the update arithmetic, the step's noise draw (DDPM)
and the scan itself. It can come out slightly negative: XLA fuses the update into the model's
last ops inside the loop. Results are printed as a table and written as JSON (device, versions,
date, results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_jax import diffusion as D  # noqa: E402

LOOPS = {"ddpm": D.p_sample_loop, "ddim": D.ddim_sample_loop, "dpm++2m": D.dpmpp_2m_sample_loop}


def toy_model(channels: int, hidden: int, seed: int = 0):
    """A small conv net (3x3 conv, GELU, 3x3 conv to 2C channels, time and label shifts): enough
    arithmetic per element that the model, not the loop, should dominate a step."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    params = {
        "w1": jax.random.normal(k1, (3, 3, channels, hidden)) * 0.1,
        "w2": jax.random.normal(k2, (3, 3, hidden, 2 * channels)) * 0.1,
        "t": jax.random.normal(k3, (hidden,)) * 0.1,
        "y": jax.random.normal(k4, (1001, hidden)) * 0.1,
    }

    def apply(params, x, t, y):
        conv = lambda a, w: jax.lax.conv_general_dilated(  # noqa: E731
            a, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = conv(x, params["w1"])
        h = h + (t.astype(jnp.float32)[:, None] / 1000.0 * params["t"])[:, None, None, :]
        h = jax.nn.gelu(h + params["y"][y][:, None, None, :])
        return conv(h, params["w2"])

    return params, apply


def dit_model(name: str, image_size: int, dtype: str):
    import dit_jax
    from flax import nnx

    model = dit_jax.create_model(name, image_size=image_size, dtype=getattr(jnp, dtype))
    # A fresh DiT outputs exactly zero (adaLN-Zero); random weights make the samplers do real work.
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    nnx.update(model, jax.tree.unflatten(
        treedef, [jax.random.normal(k, a.shape, a.dtype) * 0.02 for k, a in zip(keys, leaves)]))
    graphdef, params = nnx.split(model)

    def apply(params, x, t, y):
        return nnx.merge(graphdef, params)(x, t, y)

    cfg = model.config
    side = cfg.input_size if isinstance(cfg.input_size, int) else cfg.input_size[0]
    return params, apply, side, cfg.in_channels


def _wall(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def timed_pair(loop_fn, loop_args, call_fn, call_args, steps: int, rounds: int) -> dict:
    """Per-step loop time and single-call model time, in seconds, measured in alternation: each
    round times one whole loop and `steps` separately synchronised model calls, two windows of
    about the same length, so both see the same machine load. Minimum over rounds (noise on a
    shared machine only ever adds time) and median."""
    jax.block_until_ready(loop_fn(*loop_args))  # compile
    jax.block_until_ready(call_fn(*call_args))
    loop_times, call_times = [], []
    for _ in range(rounds):
        loop_times.append(_wall(loop_fn, *loop_args) / steps)
        call_times.append(sum(_wall(call_fn, *call_args) for _ in range(steps)) / steps)
    return {"step_min": min(loop_times), "step_median": statistics.median(loop_times),
            "call_min": min(call_times), "call_median": statistics.median(call_times)}


def bench_one(sampler, steps, params, apply, shape, cfg_scale, rounds):
    diffusion = D.create_diffusion(f"logsnr{steps}" if sampler == "dpm++2m" else str(steps))
    n = shape[0]
    labels = jnp.arange(n, dtype=jnp.int32) % 1000

    def guided(args, x, t):
        params, y = args
        fn = D.classifier_free_guidance(lambda x, t, y: apply(params, x, t, y), y, cfg_scale,
                                        null_label=1000)
        return fn(x, t)

    run = D.jit_sampler(LOOPS[sampler], diffusion, guided)
    call = jax.jit(guided)
    x_T = jax.random.normal(jax.random.key(1), shape)
    t = jnp.full((n,), 500, jnp.int32)
    m = timed_pair(run, ((params, labels), x_T, jax.random.key(2)), call,
                   ((params, labels), x_T, t), diffusion.num_timesteps, rounds)
    return {
        "sampler": sampler, "steps": diffusion.num_timesteps, "batch": n,
        "model_batch": n if cfg_scale == 1.0 else 2 * n, "cfg_scale": cfg_scale,
        "model_call_ms": m["call_min"] * 1e3, "model_call_median_ms": m["call_median"] * 1e3,
        "loop_per_step_ms": m["step_min"] * 1e3,
        "loop_per_step_median_ms": m["step_median"] * 1e3,
        "loop_total_ms": m["step_min"] * diffusion.num_timesteps * 1e3,
        "overhead_per_step_ms": (m["step_min"] - m["call_min"]) * 1e3,
        "overhead_pct": 100.0 * (m["step_min"] - m["call_min"]) / m["call_min"],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a DiT name (e.g. DiT-S/2); default: toy conv")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--dtype", default="float32", help="DiT compute dtype (float32, bfloat16)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--side", type=int, default=32, help="toy model: latent side")
    p.add_argument("--hidden", type=int, default=64, help="toy model: conv width")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--samplers", default="ddpm,ddim,dpm++2m")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=10,
                   help="alternating rounds of (one loop, `steps` model calls)")
    p.add_argument("--json", default="bench/results/bench_sampler.json")
    args = p.parse_args()

    if args.model:
        params, apply, side, channels = dit_model(args.model, args.image_size, args.dtype)
        model_desc = f"{args.model} {args.image_size}px {args.dtype}"
    else:
        params, apply = toy_model(4, args.hidden)
        side, channels = args.side, 4
        model_desc = f"toy conv 3x3 (4->{args.hidden}->8)"
    shape = (args.batch, side, side, channels)

    results = [bench_one(s, args.steps, params, apply, shape, args.cfg_scale, args.rounds)
               for s in args.samplers.split(",")]

    device = jax.devices()[0]
    print(f"{model_desc}, x {shape}, cfg {args.cfg_scale}, on {device.device_kind} "
          f"x{jax.device_count()} ({jax.default_backend()})")
    cols = ("sampler", "steps", "model_batch", "model_call_ms", "loop_per_step_ms",
            "overhead_per_step_ms", "overhead_pct")
    print(" | ".join(f"{c:>20}" for c in cols))
    for r in results:
        print(" | ".join(f"{r[c]:>20.3f}" if isinstance(r[c], float) else f"{r[c]:>20}"
                         for c in cols))

    import flax
    import jaxlib
    report = {
        "benchmark": "sampler loop overhead",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"kind": device.device_kind, "platform": jax.default_backend(),
                   "count": jax.device_count(), "host": platform.processor() or platform.machine()},
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "jaxlib": jaxlib.__version__,
                     "flax": flax.__version__, "numpy": np.__version__},
        "config": {"model": model_desc, "shape": list(shape), "cfg_scale": args.cfg_scale,
                   "rounds": args.rounds},
        "results": results,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
