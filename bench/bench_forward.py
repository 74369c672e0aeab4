"""Model forward: images/s, TFLOP/s and MFU of one DiT forward pass, JAX against diffusers'
DiTTransformer2DModel (patched to the official numerics) on the same device, in one run.

    python bench/bench_forward.py                        # the defaults of the device present
    python bench/bench_forward.py --models DiT-S/2 --batch 8 --dtype float32 --quick
    python bench/bench_forward.py --tiny --json /tmp/forward.json   # checks that it runs

Defaults: on a CPU DiT-S/2 and DiT-B/4 at 256 px (latent 32×32×4), batch 8, float32 on both sides
(the CPU goal); on a GPU DiT-XL/2, DiT-B/4 and DiT-S/2, batch 128 (a guided sampling step of
batch 64), bfloat16: JAX with bf16 weights and matmuls, cuDNN flash attention (XLA's attention
if cuDNN cannot compile it), layers scanned; PyTorch with the model cast to bf16 and SDPA.
That both compute the same function is tests/test_port.py's business, not the benchmark's.

Writes bench/results/forward_<platform>.json and prints a table.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SCRIPT = Path(__file__).resolve()


def defaults(platform: str) -> dict:
    if platform == "gpu":
        return dict(models=["DiT-XL/2", "DiT-B/4", "DiT-S/2"], batch=128, dtype="bfloat16",
                    iters=(3, 20), inner=5)
    return dict(models=["DiT-S/2", "DiT-B/4"], batch=8, dtype="float32", iters=(3, 10), inner=1)


def jax_worker(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import dit_jax

    dtype = getattr(jnp, args.dtype)
    row = {"framework": "jax", "variant": f"jax {args.dtype}", "scan_blocks": args.scan_blocks}

    def build(attention):
        model = dit_jax.create_model(args.model, image_size=args.image_size, dtype=dtype,
                                     attention_impl=attention, scan_blocks=args.scan_blocks)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        # Weights stored in the compute dtype, as a bf16 PyTorch model holds them.
        params = jax.tree.map(lambda a: a.astype(dtype), common.random_params(params))
        side = args.image_size // 8
        inputs = (params, rest,
                  jax.random.normal(jax.random.key(1), (args.batch, side, side, 4), jnp.float32),
                  jax.random.randint(jax.random.key(2), (args.batch,), 0, 1000),
                  jax.random.randint(jax.random.key(3), (args.batch,), 0, 1000))
        start = time.perf_counter()
        compiled = jax.jit(lambda p, r, x, t, y: nnx.merge(graphdef, p, r)(x, t, y)
                           ).lower(*inputs).compile()
        return compiled, inputs, time.perf_counter() - start

    compiled, inputs, compile_s = common.with_cudnn_fallback(build, args, row)
    timing = common.measure(lambda: compiled(*inputs), jax.block_until_ready,
                            iters=args.iters, inner=args.inner)
    return {**row, "compile_s": compile_s, "timing": timing, **common.jax_row(compiled)}


def torch_worker(args) -> dict:
    import torch

    device, sync = common.torch_setup()
    dtype = getattr(torch, args.dtype)
    model = common.torch_dit(args.model, image_size=args.image_size, device=device).to(dtype)
    x, t, y = common.torch_inputs(args.batch, args.image_size, device, dtype)

    def run():
        with torch.inference_mode():
            return model(x, t, y).sample

    timing = common.measure(run, sync, iters=args.iters, inner=args.inner)
    return {"framework": "torch", "variant": f"torch {args.dtype}", "attention": "sdpa",
            "timing": timing, **common.torch_row(device)}


def main(argv=None) -> dict:
    p = common.parser(__doc__, ["jax", "torch"])
    p.add_argument("--models", default=None, help="comma-separated official names")
    if not (started := common.begin(p, argv, {"jax": jax_worker, "torch": torch_worker},
                                    "forward", defaults)):
        return {}
    args, platform, s, report, shared = started
    base = [*shared, "--batch", str(s["batch"]), "--dtype", s["dtype"], "--iters", str(s["iters"]),
            "--inner", str(s["inner"])]
    for model in s["models"]:
        report["rows"] += common.compare(
            SCRIPT, [("jax", ["--worker", "jax"]), ("torch", ["--worker", "torch"])], base,
            platform=platform, images=s["batch"], dtype=s["dtype"], model=model, batch=s["batch"],
            flops=common.forward_flops_per_image(model, s["image_size"]) * s["batch"])
    report["table"] = common.print_table(
        f"Forward, batch {s['batch']}, {s['dtype']}, {common.device_kind(report['rows'], platform)}",
        report["rows"], common.row_columns("model", "ms (median)", ".1f",
                                           ("min_ms", "ms (min)", ".1f")))
    common.write_report("forward", report, args.json)
    return report


if __name__ == "__main__":
    main()
