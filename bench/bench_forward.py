"""Model forward: images/s, TFLOP/s and MFU of one DiT forward pass, JAX against diffusers'
DiTTransformer2DModel (patched to the official numerics) on the same device, in one run.

    python bench/bench_forward.py                        # the defaults of the device present
    python bench/bench_forward.py --models DiT-S/2 --batch 8 --dtype float32 --quick

Defaults: on a CPU DiT-S/2 and DiT-B/4 at 256 px (latent 32×32×4), batch 8, float32 on both sides
(the CPU goal); on a GPU DiT-XL/2, DiT-B/4 and DiT-S/2, batch 128 (a guided sampling step of
batch 64), bfloat16: JAX with bf16 weights and matmuls, cuDNN flash attention (XLA's attention
if cuDNN cannot compile it), layers scanned; PyTorch with the model cast to bf16 and SDPA.
That both compute the same function is tests/test_port.py's business, not the benchmark's.

Writes bench/results/forward_<platform>.json and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SCRIPT = Path(__file__).resolve()


def defaults(platform: str) -> dict:
    if platform == "gpu":
        return dict(models=["DiT-XL/2", "DiT-B/4", "DiT-S/2"], batch=128, dtype="bfloat16")
    return dict(models=["DiT-S/2", "DiT-B/4"], batch=8, dtype="float32")


# ----------------------------------------------------------------------------------------------
# Workers


def jax_worker(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import dit_jax

    platform = jax.default_backend()
    dtype = getattr(jnp, args.dtype)
    attention = args.attention or ("cudnn" if platform == "gpu" else "xla")
    row = {"framework": "jax", "variant": f"jax {args.dtype}", "attention": attention,
           "scan_blocks": args.scan_blocks}

    def build(attention_impl):
        model = dit_jax.create_model(args.model, image_size=args.image_size, dtype=dtype,
                                     attention_impl=attention_impl, scan_blocks=args.scan_blocks)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        # Weights stored in the compute dtype, as a bf16 PyTorch model holds them.
        params = jax.tree.map(lambda a: a.astype(dtype), common.random_params(params))

        def forward(params, rest, x, t, y):
            return nnx.merge(graphdef, params, rest)(x, t, y)

        side = args.image_size // 8
        x = jax.random.normal(jax.random.key(1), (args.batch, side, side, 4), jnp.float32)
        t = jax.random.randint(jax.random.key(2), (args.batch,), 0, 1000)
        y = jax.random.randint(jax.random.key(3), (args.batch,), 0, 1000)
        start = time.perf_counter()
        compiled = jax.jit(forward).lower(params, rest, x, t, y).compile()
        return compiled, (params, rest, x, t, y), time.perf_counter() - start

    try:
        compiled, inputs, compile_s = build(attention)
    except Exception as error:  # noqa: BLE001 - cuDNN may reject a shape or be missing
        if attention != "cudnn":
            raise
        row["attention"] = "xla"
        row["attention_fallback"] = f"cudnn failed: {str(error).splitlines()[0][:200]}"
        compiled, inputs, compile_s = build("xla")
    timing = common.measure(lambda: compiled(*inputs), jax.block_until_ready,
                            warmup=args.warmup, iters=args.iters, inner=args.inner)
    row.update(compile_s=compile_s, timing=timing, device=common.jax_device_info(),
               peak_memory_gb=common.jax_peak_memory_gb(),
               compiled_memory=common.compiled_memory_gb(compiled))
    return row


def torch_worker(args) -> dict:
    import torch

    device = common.torch_setup("gpu" if args.platform == "gpu" else "cpu")
    dtype = getattr(torch, args.dtype)
    model = common.torch_dit(args.model, image_size=args.image_size, device=device).to(dtype)
    side = args.image_size // 8
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, side, side, generator=generator).to(device, dtype)
    t = torch.randint(0, 1000, (args.batch,), generator=generator).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=generator).to(device)
    variant = f"torch {args.dtype}"
    fn = model
    compile_s = None
    if args.torch_compile:
        variant += " compile"
        fn = torch.compile(model)

    def run():
        with torch.inference_mode():
            return fn(x, t, y).sample

    if args.torch_compile:
        start = time.perf_counter()
        run()
        common.torch_sync(device)(None)
        compile_s = time.perf_counter() - start
    timing = common.measure(run, common.torch_sync(device), warmup=args.warmup, iters=args.iters,
                            inner=args.inner)
    return {"framework": "torch", "variant": variant, "attention": "sdpa", "compile_s": compile_s,
            "timing": timing, "device": common.torch_device_info(device),
            "peak_memory_gb": common.torch_peak_memory_gb(device)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="comma-separated official names")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--scan-blocks", type=int, default=1,
                   help="1: scan one stacked block over the layers (see BENCHMARKS.md), 0: unrolled")
    p.add_argument("--attention", default=None, choices=["xla", "cudnn"],
                   help="JAX attention (default: cudnn on a GPU, xla on a CPU)")
    p.add_argument("--torch-compile", action="store_true",
                   help="add a torch.compile row (not part of the goals; slow to compile)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="fewer iterations")
    p.add_argument("--json", default=None)
    # worker mode
    p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--platform", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--inner", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        args.scan_blocks = bool(args.scan_blocks)
        worker = {"jax": jax_worker, "torch": torch_worker}[args.worker]
        common.write_worker_result(args.out, worker(args))
        return {}

    platform = common.detect_platform()
    d = defaults(platform)
    models = args.models.split(",") if args.models else d["models"]
    batch = args.batch or d["batch"]
    dtype = args.dtype or d["dtype"]
    iters = args.iters or (3 if args.quick else (10 if platform == "cpu" else 20))
    inner = 1 if platform == "cpu" else 5
    report = {"benchmark": "forward", "platform": platform, **common.environment(),
              "config": {"models": models, "batch": batch, "dtype": dtype,
                         "image_size": args.image_size, "iters": iters, "inner": inner,
                         "scan_blocks": bool(args.scan_blocks)},
              "rows": []}
    base = ["--batch", str(batch), "--dtype", dtype, "--image-size", str(args.image_size),
            "--platform", platform, "--iters", str(iters), "--inner", str(inner),
            "--scan-blocks", str(args.scan_blocks)]
    if args.attention:
        base += ["--attention", args.attention]
    for model in models:
        flops = common.forward_flops_per_image(model, args.image_size) * batch
        sides = [("jax", ["--worker", "jax"]), ("torch", ["--worker", "torch"])]
        if args.torch_compile:
            sides.append(("torch compile", ["--worker", "torch", "--torch-compile"]))
        rows = []
        for label, side in sides:
            row = common.run_worker(SCRIPT, [*side, "--model", model, *base], platform=platform)
            row.setdefault("variant", label)
            row.update(model=model, batch=batch, dtype=dtype)
            if "timing" in row:
                seconds = row["timing"]["median_s"]
                peak = common.peak_flops(row["device"]["kind"], row["device"]["platform"],
                                         "bf16" if dtype == "bfloat16" else "fp32")
                row.update(ms=seconds * 1e3, min_ms=row["timing"]["min_s"] * 1e3,
                           **common.throughput_fields(batch, seconds, flops, peak))
            rows.append(row)
        reference = next((r for r in rows if r["variant"].startswith("torch")
                          and "compile" not in r["variant"] and "images_per_s" in r), None)
        for row in rows:
            if reference and "images_per_s" in row:
                row["speedup_vs_torch"] = row["images_per_s"] / reference["images_per_s"]
        report["rows"] += rows

    device = next((r["device"]["kind"] for r in report["rows"] if "device" in r), platform)
    report["table"] = common.print_table(
        f"Forward, batch {batch}, {dtype}, {device}", report["rows"],
        [("model", "model", ""), ("variant", "implementation", ""), ("ms", "ms (median)", ".1f"),
         ("min_ms", "ms (min)", ".1f"), ("images_per_s", "images/s", ".2f"),
         ("tflops", "TFLOP/s", ".3f"), ("mfu", "MFU", ".1%"),
         ("speedup_vs_torch", "× PyTorch", ".2f"), ("compile_s", "compile s", ".1f"),
         ("peak_memory_gb", "peak mem GB", ".2f")])
    common.write_report("forward", report, args.json)
    return report


if __name__ == "__main__":
    main()
