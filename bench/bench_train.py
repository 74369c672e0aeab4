"""Train step: images/s, TFLOP/s and MFU of one full DiT training step (hybrid loss, forward,
backward, AdamW, EMA), JAX against PyTorch on the same device in one run; the compile time of the
XL/2 step; on a GPU the largest XL/2 batch that trains, with and without remat.

    python bench/bench_train.py                          # the defaults of the device present
    python bench/bench_train.py --models DiT-S/2 --batch 8 --quick
    python bench/bench_train.py --only memory            # just the largest-batch search (GPU)

The JAX step is the library's (`dit_jax.train.step`, jitted over a one-device mesh, state
donated, EMA inside the step, no host round trip), with the official recipe of configs/dit.py:
AdamW lr 1e-4, betas (0.9, 0.999), no weight decay, EMA 0.9999. The PyTorch step is
diffusers' DiTTransformer2DModel patched to the official numerics, the same loss (MSE + VB,
written out in common.py), the same per-step random draws (timesteps, noise, label dropout) made
on the device, in two variants:

- "torch fast": what a performance-minded user writes: bf16 autocast on a GPU (float32 on a CPU),
  SDPA attention (diffusers' default), fused AdamW, EMA as torch._foreach_mul_/_foreach_add_;
- "torch official": the official train.py recipe: float32 weights and activations, TF32 matmuls
  on a GPU, default AdamW, EMA as a Python loop over named parameters.

Defaults: on a CPU DiT-S/2 and DiT-B/4, batch 8, float32 (the CPU goal), scanned layers, remat
saving only the matmul outputs; on a GPU DiT-XL/2, batch 32 (the official global batch of 256 over
8 GPUs), bfloat16 compute with float32 master weights, cuDNN flash attention, scanned layers, no
remat.

Writes bench/results/train_<platform>.json and prints the tables.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SCRIPT = Path(__file__).resolve()
EMA_DECAY = 0.9999


# On a CPU the step is bound by memory traffic as much as by the matmuls: saving only the
# matmul outputs and recomputing the element-wise work is faster than saving everything (and
# than recomputing everything). Measured in BENCHMARKS.md.
CPU_REMAT = "dots_with_no_batch_dims_saveable"


def defaults(platform: str) -> dict:
    if platform == "gpu":
        return dict(models=["DiT-XL/2"], batch=32, dtype="bfloat16", remat="none")
    return dict(models=["DiT-S/2", "DiT-B/4"], batch=8, dtype="float32", remat=CPU_REMAT)


# ----------------------------------------------------------------------------------------------
# JAX


def _compile_step(args, *, batch: int, remat, attention: str):
    """The library's train step (`dit_jax.train.step.lower_train_step`, as the train loop builds
    it) compiled for abstract inputs: (compiled, model config, mesh, tx, state shardings,
    lower seconds, compile seconds)."""
    import jax
    import jax.numpy as jnp

    from configs import dit as dit_configs
    from dit_jax.diffusion import create_diffusion
    from dit_jax.models.dit import split_model
    from dit_jax.sharding import make_mesh
    from dit_jax.train.state import abstract_train_state, make_optimizer
    from dit_jax.train.step import StepConfig, lower_train_step

    cfg = common.model_config(args.model, args.image_size, dtype=getattr(jnp, args.dtype),
                              attention_impl=attention, scan_blocks=args.scan_blocks, remat=remat)
    tx, schedule = make_optimizer(dit_configs.base_config().optim, total_steps=1_000_000)
    mesh = make_mesh()
    graphdef, _, abstract_buffers = split_model(cfg)
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        lowered, shardings, _ = lower_train_step(
            graphdef, create_diffusion(""), tx, schedule, StepConfig(ema_decay=EMA_DECAY), mesh,
            abstract_state=abstract_train_state(cfg, tx), buffers=abstract_buffers,
            element_shape=(cfg.input_size, cfg.input_size, cfg.in_channels), global_batch=batch)
        lower_s = time.perf_counter() - start
        compiled = lowered.compile()
    return compiled, cfg, mesh, tx, shardings, lower_s, time.perf_counter() - start - lower_s


def _concrete_inputs(cfg, mesh, tx, shardings, batch, side, seed=0):
    import jax
    import jax.numpy as jnp

    from dit_jax.sharding import batch_sharding, model_buffers
    from dit_jax.train.state import create_train_state
    state = create_train_state(cfg, tx, mesh, seed=seed)
    # Random weights (the official init zeroes the adaLN and output layers); EMA a copy of them.
    params = jax.jit(common.random_params, out_shardings=shardings.params)(state.params)
    state = state.replace(params=params, ema=jax.tree.map(jnp.copy, params))
    data = {"x": jax.random.normal(jax.random.key(seed + 1), (batch, side, side, 4), jnp.float32),
            "y": jax.random.randint(jax.random.key(seed + 2), (batch,), 0, 1000, jnp.int32)}
    data = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in data.items()}
    return state, model_buffers(cfg, mesh), data


def jax_worker(args) -> dict:
    import jax

    platform = jax.default_backend()
    attention = args.attention or ("cudnn" if platform == "gpu" else "xla")
    side = args.image_size // 8
    remat = {False: "", True: ", remat"}.get(args.remat, f", remat {args.remat}")
    row = {"framework": "jax", "attention": attention, "scan_blocks": args.scan_blocks,
           "remat": args.remat,
           "variant": f"jax {args.dtype} ({'scan' if args.scan_blocks else 'unrolled'}{remat})"}

    def build(attention_impl):
        return _compile_step(args, batch=args.batch, remat=args.remat, attention=attention_impl)

    try:
        compiled, cfg, mesh, tx, shardings, lower_s, compile_s = build(attention)
    except Exception as error:  # noqa: BLE001 - cuDNN may reject a shape or be missing
        if attention != "cudnn" or common.is_oom(error):
            raise
        row["attention"] = "xla"
        row["attention_fallback"] = f"cudnn failed: {str(error).splitlines()[0][:200]}"
        compiled, cfg, mesh, tx, shardings, lower_s, compile_s = build("xla")

    with jax.set_mesh(mesh):
        state, buffers, data = _concrete_inputs(cfg, mesh, tx, shardings, args.batch, side)
        holder = {"state": state}

        def run():
            holder["state"], metrics = compiled(holder["state"], buffers, data)
            return metrics

        timing = common.measure(run, jax.block_until_ready, warmup=args.warmup, iters=args.iters,
                                inner=args.inner)
        loss = float(jax.device_get(run()["loss"]))
    row.update(lower_s=lower_s, compile_s=lower_s + compile_s, timing=timing, loss=loss,
               device=common.jax_device_info(), peak_memory_gb=common.jax_peak_memory_gb(),
               compiled_memory=common.compiled_memory_gb(compiled))
    return row


def compile_worker(args) -> dict:
    """Lower + compile with abstract inputs only: nothing is allocated or run, so the XL/2 step
    can be compiled on any machine."""
    import jax

    attention = args.attention or ("cudnn" if jax.default_backend() == "gpu" else "xla")
    *_, lower_s, compile_s = _compile_step(args, batch=args.batch, remat=args.remat,
                                           attention=attention)
    return {"model": args.model, "batch": args.batch, "dtype": args.dtype, "attention": attention,
            "scan_blocks": args.scan_blocks, "remat": args.remat, "lower_s": lower_s,
            "compile_s": compile_s, "total_s": lower_s + compile_s,
            "device": common.jax_device_info()}


def memory_worker(args) -> dict:
    """The largest batch (a multiple of --granularity) whose train step compiles and runs.

    XLA's memory analysis of two small compiled steps gives the fixed cost (state, buffers) and
    the cost per image; the prediction for the device's limit is then verified by running the
    step and refined by a binary search between the largest batch that ran and the smallest that
    did not. Each probe builds a fresh state, so a failed one leaves nothing behind."""
    import gc

    import jax

    side = args.image_size // 8
    attention = args.attention or ("cudnn" if jax.default_backend() == "gpu" else "xla")
    gran = args.granularity
    limit = common.device_memory_limit()
    if limit is None:
        return {"error": "the device reports no memory limit (CPU?)"}
    probes = []

    def analysed(batch):
        return _compile_step(args, batch=batch, remat=args.remat, attention=attention)[:5]

    def fits(batch) -> bool:
        try:
            compiled, cfg, mesh, tx, shardings = analysed(batch)
            with jax.set_mesh(mesh):
                state, buffers, data = _concrete_inputs(cfg, mesh, tx, shardings, batch, side)
                for _ in range(2):
                    state, metrics = compiled(state, buffers, data)
                jax.block_until_ready(metrics)
            ok = True
        except Exception as error:  # noqa: BLE001
            if not common.is_oom(error):
                raise
            ok = False
        finally:
            state = buffers = data = compiled = metrics = None  # noqa: F841
            gc.collect()
            jax.clear_caches()
        probes.append({"batch": batch, "fits": ok})
        print(f"batch {batch}: {'fits' if ok else 'out of memory'}", flush=True)
        return ok

    small = [gran, 2 * gran]
    totals = []
    for b in small:
        compiled = analysed(b)[0]
        totals.append(common.compiled_memory_gb(compiled)["total_gb"] * 2**30)
        del compiled
    per_image = (totals[1] - totals[0]) / (small[1] - small[0])
    fixed = totals[0] - small[0] * per_image
    predicted = max(gran, int((limit - fixed) / per_image) // gran * gran)

    def down(value):
        return max(gran, value // gran * gran)

    lo, hi = 0, None  # the largest batch known to fit, the smallest known not to
    guess = predicted
    while len(probes) < args.max_probes:
        if fits(guess):
            lo = guess
        else:
            hi = guess
        if hi is None:
            guess = lo + down(lo // 8)  # grow by about 1/8 until a batch fails
        elif lo == 0:
            if hi <= gran:
                break
            guess = down(hi * 3 // 4)
        elif hi - lo <= gran:
            break
        else:
            guess = down((lo + hi) // 2)
    return {"model": args.model, "dtype": args.dtype, "attention": attention,
            "scan_blocks": args.scan_blocks, "remat": args.remat, "largest_batch": lo or None,
            "smallest_failing_batch": hi, "predicted_batch": predicted,
            "per_image_gb": per_image / 2**30, "fixed_gb": fixed / 2**30,
            "device_limit_gb": limit / 2**30, "probes": probes, "device": common.jax_device_info()}


# ----------------------------------------------------------------------------------------------
# PyTorch


def torch_worker(args) -> dict:
    import torch

    official = args.variant == "official"
    platform = "gpu" if args.platform == "gpu" else "cpu"
    device = common.torch_setup(platform, tf32=official)
    autocast = torch.bfloat16 if (args.dtype == "bfloat16" and not official) else None
    model = common.torch_dit(args.model, image_size=args.image_size, device=device)
    ema = copy.deepcopy(model).requires_grad_(False)
    params = list(model.parameters())
    if official:
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0)
    else:
        try:
            opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0, fused=True)
        except (RuntimeError, ValueError):
            opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0, foreach=True)
    ema_list = list(ema.parameters())
    model_named = dict(model.named_parameters())
    ema_named = dict(ema.named_parameters())
    forward = torch.compile(model) if args.torch_compile else model
    tables = common.torch_diffusion_tables(device)
    side = args.image_size // 8
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, side, side, generator=generator).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=generator).to(device)

    def update_ema():
        if official:
            # train.py's update_ema, verbatim in effect.
            for name, param in model_named.items():
                ema_named[name].mul_(EMA_DECAY).add_(param.data, alpha=1 - EMA_DECAY)
        else:
            torch._foreach_mul_(ema_list, EMA_DECAY)
            torch._foreach_add_(ema_list, params, alpha=1 - EMA_DECAY)

    def step():
        t = torch.randint(0, 1000, (args.batch,), device=device)
        noise = torch.randn_like(x)
        labels = torch.where(torch.rand(args.batch, device=device) < 0.1, 1000, y)
        loss = common.torch_training_loss(forward, tables, x, t, labels, noise,
                                          autocast_dtype=autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            update_ema()
        return loss

    compile_s = None
    if args.torch_compile:
        start = time.perf_counter()
        step()
        common.torch_sync(device)(None)
        compile_s = time.perf_counter() - start
    timing = common.measure(step, common.torch_sync(device), warmup=args.warmup,
                            iters=args.iters, inner=args.inner)
    precision = ("bf16 autocast" if autocast else
                 ("fp32+tf32" if official and platform == "gpu" else "fp32"))
    name = f"torch {args.variant} ({precision})" + (" compile" if args.torch_compile else "")
    return {"framework": "torch", "variant": name, "precision": precision,
            "attention": "sdpa", "optimizer": type(opt).__name__ + (
                " fused" if opt.defaults.get("fused") else (
                    " foreach" if opt.defaults.get("foreach") else "")),
            "ema": "python loop" if official else "foreach", "compile_s": compile_s,
            "timing": timing, "loss": float(step().detach()), "device": common.torch_device_info(device),
            "peak_memory_gb": common.torch_peak_memory_gb(device)}


# ----------------------------------------------------------------------------------------------
# Parent


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="comma-separated official names")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="JAX compute dtype; bfloat16 also selects PyTorch's bf16 autocast")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--scan-blocks", type=int, default=1, help="1: scanned layers, 0: unrolled")
    p.add_argument("--remat", default=None,
                   help="none, full (recompute everything) or a jax.checkpoint_policies name; default: "
                        f"{CPU_REMAT} on a CPU (fastest there, see BENCHMARKS.md), none on a GPU")
    p.add_argument("--attention", default=None, choices=["xla", "cudnn"])
    p.add_argument("--only", default="throughput,compile,memory",
                   help="sections to run: throughput, compile, memory (memory: GPU only)")
    p.add_argument("--compile-model", default="DiT-XL/2")
    p.add_argument("--compile-batch", type=int, default=32)
    p.add_argument("--compile-unrolled", action="store_true",
                   help="also compile the unrolled (scan_blocks=0) XL/2 step, for comparison")
    p.add_argument("--torch-compile", action="store_true",
                   help="add a torch.compile row of the fast variant (not part of the goals)")
    p.add_argument("--no-official", action="store_true", help="skip the official-recipe variant")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="fewer iterations")
    p.add_argument("--json", default=None)
    # worker mode
    p.add_argument("--worker", choices=["jax", "torch", "compile", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="fast", help=argparse.SUPPRESS)
    p.add_argument("--platform", help=argparse.SUPPRESS)
    p.add_argument("--granularity", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--max-probes", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--inner", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        from dit_jax.train.state import parse_remat
        args.scan_blocks, args.remat = bool(args.scan_blocks), parse_remat(args.remat or "none")
        worker = {"jax": jax_worker, "torch": torch_worker, "compile": compile_worker,
                  "memory": memory_worker}[args.worker]
        common.write_worker_result(args.out, worker(args))
        return {}

    platform = common.detect_platform()
    d = defaults(platform)
    models = args.models.split(",") if args.models else d["models"]
    batch = args.batch or d["batch"]
    dtype = args.dtype or d["dtype"]
    iters = args.iters or (3 if args.quick else 10)
    inner = 1 if platform == "cpu" else 5
    sections = set(args.only.split(","))
    remat = args.remat or d["remat"]
    report = {"benchmark": "train_step", "platform": platform, **common.environment(),
              "config": {"models": models, "batch": batch, "dtype": dtype,
                         "image_size": args.image_size, "iters": iters, "inner": inner,
                         "scan_blocks": bool(args.scan_blocks), "remat": remat,
                         "ema_decay": EMA_DECAY, "optimizer": "AdamW lr 1e-4 (0.9, 0.999) wd 0"},
              "rows": [], "compile": [], "memory": []}
    common_args = ["--image-size", str(args.image_size), "--platform", platform,
                   "--scan-blocks", str(args.scan_blocks), "--remat", remat]
    if args.attention:
        common_args += ["--attention", args.attention]
    tables = []

    if "throughput" in sections:
        base = [*common_args, "--batch", str(batch), "--dtype", dtype, "--iters", str(iters),
                "--inner", str(inner)]
        sides = [("jax", ["--worker", "jax"]), ("torch fast", ["--worker", "torch"])]
        if not args.no_official:
            sides.append(("torch official", ["--worker", "torch", "--variant", "official"]))
        if args.torch_compile:
            sides.append(("torch fast compile", ["--worker", "torch", "--torch-compile"]))
        for model in models:
            flops = 3 * common.forward_flops_per_image(model, args.image_size) * batch
            rows = []
            for label, side in sides:
                row = common.run_worker(SCRIPT, [*side, "--model", model, *base],
                                        platform=platform)
                row.setdefault("variant", label)
                row.update(model=model, batch=batch, dtype=dtype, side=label)
                if "timing" in row:
                    seconds = row["timing"]["median_s"]
                    precision = ("tf32" if row.get("precision") == "fp32+tf32" else
                                 "bf16" if dtype == "bfloat16" and "fp32" not in row.get("precision", "")
                                 else "fp32")
                    peak = common.peak_flops(row["device"]["kind"], row["device"]["platform"],
                                             precision)
                    row.update(ms=seconds * 1e3, min_ms=row["timing"]["min_s"] * 1e3,
                               **common.throughput_fields(batch, seconds, flops, peak))
                rows.append(row)
            jax_row = rows[0]
            for row in rows[1:]:
                if "images_per_s" in row and "images_per_s" in jax_row:
                    key = "jax_speedup_vs_" + row["side"].replace(" ", "_")
                    jax_row[key] = jax_row["images_per_s"] / row["images_per_s"]
                    row["jax_speedup"] = jax_row["images_per_s"] / row["images_per_s"]
            report["rows"] += rows
        device = next((r["device"]["kind"] for r in report["rows"] if "device" in r), platform)
        tables.append(common.print_table(
            f"Train step, batch {batch}, {dtype}, {device}", report["rows"],
            [("model", "model", ""), ("variant", "implementation", ""),
             ("ms", "ms/step (median)", ".1f"), ("min_ms", "ms (min)", ".1f"),
             ("images_per_s", "images/s", ".2f"), ("tflops", "TFLOP/s", ".3f"),
             ("mfu", "MFU", ".1%"), ("jax_speedup", "JAX ×", ".2f"),
             ("compile_s", "compile s", ".1f"), ("peak_memory_gb", "peak mem GB", ".2f")]))

    if "compile" in sections:
        compile_dtype = "bfloat16"  # the GPU configuration, whatever compiles it
        variants = [1, 0] if args.compile_unrolled else [1]
        for scan in variants:
            row = common.run_worker(SCRIPT, [
                "--worker", "compile", "--model", args.compile_model, "--batch",
                str(args.compile_batch), "--dtype", compile_dtype, "--image-size",
                str(args.image_size), "--platform", platform, "--scan-blocks", str(scan),
                "--remat", "none"] + (["--attention", args.attention] if args.attention else []),
                platform=platform)
            row.setdefault("model", args.compile_model)
            row.setdefault("scan_blocks", bool(scan))
            row["device_kind"] = row.get("device", {}).get("kind", platform)
            report["compile"].append(row)
        tables.append(common.print_table(
            f"Train-step compile time (lower + compile, abstract inputs), batch "
            f"{args.compile_batch}, bfloat16", report["compile"],
            [("model", "model", ""), ("device_kind", "compiled on", ""),
             ("scan_blocks", "scan", ""), ("attention", "attention", ""),
             ("lower_s", "lower s", ".1f"), ("compile_s", "compile s", ".1f"),
             ("total_s", "total s", ".1f")]))

    if "memory" in sections:
        if platform != "gpu":
            report["memory_note"] = "the largest-batch search needs a GPU (XLA:CPU has no limit)"
            print(report["memory_note"])
        else:
            for remat in ("none", "full"):
                row = common.run_worker(SCRIPT, [
                    "--worker", "memory", "--model", args.compile_model, "--dtype", dtype,
                    "--image-size", str(args.image_size), "--platform", platform,
                    "--scan-blocks", str(args.scan_blocks), "--remat", remat]
                    + (["--attention", args.attention] if args.attention else []),
                    platform=platform, mem_fraction=0.95)
                row.setdefault("remat", remat == "full")
                report["memory"].append(row)
            tables.append(common.print_table(
                f"Largest {args.compile_model} batch that trains ({dtype})", report["memory"],
                [("remat", "remat", ""), ("largest_batch", "largest batch", ""),
                 ("smallest_failing_batch", "fails at", ""), ("predicted_batch", "predicted", ""),
                 ("per_image_gb", "GB/image", ".3f"), ("fixed_gb", "fixed GB", ".1f"),
                 ("device_limit_gb", "limit GB", ".1f")]))

    report["tables"] = tables
    common.write_report("train", report, args.json)
    return report


if __name__ == "__main__":
    main()
