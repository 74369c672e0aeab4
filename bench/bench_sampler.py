"""Loop overhead of the compiled samplers: per-step time of a whole sampling run (one lax.scan)
against one jitted call of the same guided model_fn at the same batch.

    python bench/bench_sampler.py --model DiT-S/2 --image-size 256 --batch 32 --cfg-scale 4

The per-step overhead (per-step loop time minus one model call, both the minimum over rounds)
is what the sampler adds: the table gathers, the update arithmetic, the step's noise draw (DDPM)
and the scan itself. It can come out slightly negative: XLA fuses the update into the model's
last ops inside the loop. Samplers by their `dit_jax.samplers` names, each on its default grid.
Writes bench/results/sampler_overhead_<platform>.json (or --json) and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def _wall(fn, *args) -> float:
    import jax

    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def timed_pair(loop_fn, loop_args, call_fn, call_args, steps: int, rounds: int) -> dict:
    """Per-step loop time and single-call model time, in seconds, measured in alternation: each
    round times one whole loop and `steps` separately synchronised model calls, two windows of
    about the same length, so both see the same machine load. Minimum over rounds (noise on a
    shared machine only ever adds time) and median."""
    import jax

    jax.block_until_ready(loop_fn(*loop_args))  # compile
    jax.block_until_ready(call_fn(*call_args))
    loop_times, call_times = [], []
    for _ in range(rounds):
        loop_times.append(_wall(loop_fn, *loop_args) / steps)
        call_times.append(sum(_wall(call_fn, *call_args) for _ in range(steps)) / steps)
    return {"step_min": min(loop_times), "step_median": statistics.median(loop_times),
            "call_min": min(call_times), "call_median": statistics.median(call_times)}


def bench_one(sampler: str, steps: int, model, shape, cfg_scale: float, rounds: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dit_jax import diffusion as D
    from dit_jax.samplers import get_sampler, sample_loop
    from dit_jax.sampling import guided_model_fn

    diffusion = D.create_diffusion(get_sampler(sampler).default_spacing(steps))
    n = shape[0]
    graphdef, weights = nnx.split(model)

    def guided(weights, labels, x, t):
        return guided_model_fn(nnx.merge(graphdef, weights), labels, cfg_scale, "3")(x, t)

    run = jax.jit(lambda w, y, x, key: sample_loop(
        sampler, diffusion, lambda x, t: guided(w, y, x, t), x, key))
    call = jax.jit(guided)
    labels = jnp.arange(n, dtype=jnp.int32) % 1000
    x_T = jax.random.normal(jax.random.key(1), shape)
    m = timed_pair(run, (weights, labels, x_T, jax.random.key(2)), call,
                   (weights, labels, x_T, jnp.full((n,), 500, jnp.int32)),
                   diffusion.num_timesteps, rounds)
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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--dtype", default="float32", help="DiT compute dtype (float32, bfloat16)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--samplers", default="ddpm,ddim,dpm++")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=10,
                   help="alternating rounds of (one loop, `steps` model calls)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    import dit_jax

    model = dit_jax.create_model(args.model, image_size=args.image_size,
                                 dtype=getattr(jnp, args.dtype))
    # A fresh DiT outputs exactly zero (adaLN-Zero); random weights make the samplers do real work.
    nnx.update(model, common.random_params(nnx.state(model, nnx.Param)))
    cfg = model.config
    shape = (args.batch, cfg.input_size, cfg.input_size, cfg.in_channels)
    rows = [bench_one(s, args.steps, model, shape, args.cfg_scale, args.rounds)
            for s in args.samplers.split(",")]
    report = {"benchmark": "sampler loop overhead", "platform": jax.default_backend(),
              **common.environment(), "device": common.jax_device_info(),
              "config": {"model": f"{args.model} {args.image_size}px {args.dtype}",
                         "shape": list(shape), "cfg_scale": args.cfg_scale,
                         "rounds": args.rounds},
              "results": rows}
    report["table"] = common.print_table(
        f"Sampler loop overhead: {args.model}, x {shape}, cfg {args.cfg_scale}", rows,
        [("sampler", "sampler", ""), ("steps", "steps", ""), ("model_batch", "model batch", ""),
         ("model_call_ms", "model call ms", ".3f"), ("loop_per_step_ms", "loop/step ms", ".3f"),
         ("overhead_per_step_ms", "overhead/step ms", ".3f"), ("overhead_pct", "overhead %", ".1f")])
    common.write_report("sampler_overhead", report, args.json)
    return report


if __name__ == "__main__":
    main()
