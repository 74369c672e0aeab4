"""Train step: images/s, TFLOP/s and MFU of one full DiT training step (forward, backward, AdamW,
EMA), JAX against PyTorch on the same device in one run; the compile time of the XL/2 step; on a
GPU the largest XL/2 batch that trains, with and without remat.

    python bench/bench_train.py                          # the defaults of the device present
    python bench/bench_train.py --models DiT-S/2 --batch 8 --quick
    python bench/bench_train.py --only memory            # just the largest-batch search (GPU)
    python bench/bench_train.py --tiny --json /tmp/train.json   # checks that it runs

JAX: the library's step as train.py builds it (compiled by the planner,
`dit_jax.plan.compile_train_step`), configs/dit.py's recipe (AdamW lr 1e-4, no weight decay, EMA
0.9999). PyTorch: diffusers' DiTTransformer2DModel with the official numerics, the same per-step
draws (timesteps, noise, 10% label dropout) on the device, as "torch fast" (bf16 autocast on a
GPU, SDPA, fused AdamW, foreach EMA) and "torch official" (train.py's: float32, TF32 on a GPU,
AdamW, EMA loop). Throughput compares the ε-MSE objective (learn_sigma=False on both sides): the
official hybrid loss only adds element-wise work (the VB term). The compile and memory sections
build the full step (hybrid loss). GPU batch 32 is the official 256 over 8 GPUs; float32 master
weights, layers scanned. Writes bench/results/train_<platform>.json and prints the tables.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SCRIPT = Path(__file__).resolve()
EMA_DECAY = 0.9999


# On a CPU the step is bound by memory traffic as much as by the matmuls: saving only the
# matmul outputs and recomputing the element-wise work is fastest (BENCHMARKS.md).
CPU_REMAT = "dots_with_no_batch_dims_saveable"


def defaults(platform: str) -> dict:
    if platform == "gpu":
        return dict(models=["DiT-XL/2"], batch=32, dtype="bfloat16", remat="none", iters=(3, 10),
                    inner=5, compile_model="DiT-XL/2", compile_batch=32)
    return dict(models=["DiT-S/2", "DiT-B/4"], batch=8, dtype="float32", remat=CPU_REMAT,
                iters=(3, 10), inner=1, compile_model="DiT-XL/2", compile_batch=32)


# ----------------------------------------------------------------------------------------------
# JAX


def _compile_step(args, *, batch: int, attention: str | None = None):
    """The library's train step compiled for abstract inputs by the planner
    (`dit_jax.plan.compile_train_step`: built as train.py builds it, configs/dit.py's recipe) on
    this machine's devices: (compiled, model config, mesh, lower seconds, compile seconds).
    --mse: the ε-MSE objective (learn_sigma=False)."""
    from configs import dit as dit_configs
    from dit_jax.plan import compile_train_step
    from dit_jax.sharding import make_mesh

    config = dit_configs.get_config(args.model)
    config.total_steps = 1_000_000
    config.data.image_size = args.image_size
    config.model.update(dtype=args.dtype, attention_impl=attention or common.jax_attention(args),
                        scan_blocks=args.scan_blocks, remat=args.remat,
                        learn_sigma=not args.mse)
    mesh = make_mesh()
    compiled, cfg, seconds = compile_train_step(config, mesh, batch)
    return compiled, cfg, mesh, compiled._plan_lower_seconds, seconds - compiled._plan_lower_seconds


def _concrete_inputs(cfg, mesh, batch, seed=0):
    import jax
    import jax.numpy as jnp

    from dit_jax.sharding import batch_sharding, model_buffers
    from dit_jax.train.state import create_train_state, make_optimizer
    from configs import dit as dit_configs
    tx, _ = make_optimizer(dit_configs.base_config().optim, total_steps=1_000_000)
    state = create_train_state(cfg, tx, mesh, seed=seed)
    # Random weights (the official init zeroes the adaLN and output layers); EMA a copy of them.
    params = jax.jit(common.random_params, out_shardings=jax.tree.map(
        lambda a: a.sharding, state.params))(state.params)
    state = state.replace(params=params, ema=jax.tree.map(jnp.copy, params))
    x = jax.random.normal(jax.random.key(seed + 1), (batch, cfg.input_size, cfg.input_size, 4))
    y = jax.random.randint(jax.random.key(seed + 2), (batch,), 0, 1000, jnp.int32)
    data = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in {"x": x, "y": y}.items()}
    return state, model_buffers(cfg, mesh), data


def jax_worker(args) -> dict:
    import jax

    from dit_jax.train.state import parse_remat
    remat = parse_remat(args.remat)
    suffix = {False: "", True: ", remat"}.get(remat, f", remat {remat}")
    row = {"framework": "jax", "scan_blocks": args.scan_blocks, "remat": remat,
           "variant": f"jax {args.dtype} ({'scan' if args.scan_blocks else 'unrolled'}{suffix})"}
    compiled, cfg, mesh, lower_s, compile_s = common.with_cudnn_fallback(
        lambda attention: _compile_step(args, batch=args.batch, attention=attention), args, row)
    row.update(model=args.model, batch=args.batch, lower_s=lower_s, compile_s=lower_s + compile_s)
    if args.compile_only:  # abstract inputs only: nothing allocated or run (XL/2 on any machine)
        return {**row, "compile_s": compile_s, "total_s": lower_s + compile_s, **common.jax_row()}
    with jax.set_mesh(mesh):
        state, buffers, data = _concrete_inputs(cfg, mesh, args.batch)
        holder = [state]  # the state is donated: each step feeds the next

        def run():
            holder[0], metrics = compiled(holder[0], buffers, data)
            return metrics

        timing = common.measure(run, jax.block_until_ready, iters=args.iters, inner=args.inner)
        loss = float(jax.device_get(run()["loss"]))
    return {**row, "timing": timing, "loss": loss, **common.jax_row(compiled)}


def memory_worker(args) -> dict:
    """The largest batch (a multiple of 8) whose train step compiles and runs. XLA's
    memory analysis of two small compiled steps gives the fixed cost (state, buffers) and the cost
    per image; the batch predicted to fill the device is then run, and the batch lowered by one
    granularity until a step runs (or raised while it does). Each probe builds a fresh state."""
    import gc

    import jax

    from dit_jax.train.state import parse_remat
    gran, max_probes, probes = 8, 8, []
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    if limit is None:
        return {"error": "the device reports no memory limit (CPU?)"}

    def fits(batch) -> bool:
        state = buffers = data = compiled = None
        try:
            compiled, cfg, mesh = _compile_step(args, batch=batch)[:3]
            with jax.set_mesh(mesh):
                state, buffers, data = _concrete_inputs(cfg, mesh, batch)
                for _ in range(2):
                    state, metrics = compiled(state, buffers, data)
                jax.block_until_ready(metrics)
            ok = True
        except Exception as error:  # noqa: BLE001
            if not common.is_oom(error):
                raise
            ok = False
        del state, buffers, data, compiled
        gc.collect()
        jax.clear_caches()
        probes.append({"batch": batch, "fits": ok})
        print(f"batch {batch}: {'fits' if ok else 'out of memory'}", flush=True)
        return ok

    totals = [common.compiled_memory_gb(_compile_step(args, batch=b)[0])["total_gb"] * 2**30
              for b in (gran, 2 * gran)]
    per_image = (totals[1] - totals[0]) / gran
    fixed = totals[0] - gran * per_image
    predicted = max(gran, int((limit - fixed) / per_image) // gran * gran)
    batch = predicted
    if fits(batch):
        while len(probes) < max_probes and fits(batch + gran):
            batch += gran
    else:
        batch = next((b for b in range(predicted - gran, 0, -gran)[:max_probes - 1]
                      if fits(b)), None)
    return {"model": args.model, "dtype": args.dtype, "scan_blocks": args.scan_blocks,
            "remat": parse_remat(args.remat), "largest_batch": batch, "predicted_batch": predicted,
            "smallest_failing_batch": min((q["batch"] for q in probes if not q["fits"]), default=None),
            "per_image_gb": per_image / 2**30, "fixed_gb": fixed / 2**30,
            "device_limit_gb": limit / 2**30, "probes": probes, **common.jax_row()}


# ----------------------------------------------------------------------------------------------
# PyTorch


def torch_worker(args) -> dict:
    import numpy as np
    import torch

    from dit_jax.diffusion import create_diffusion

    official = args.variant == "official"
    device, sync = common.torch_setup(tf32=official)
    autocast = torch.bfloat16 if (args.dtype == "bfloat16" and not official) else None
    model = common.torch_dit(args.model, image_size=args.image_size, device=device,
                             learn_sigma=False)
    ema = copy.deepcopy(model).requires_grad_(False)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0, fused=not official)
    # The linear training schedule's √ᾱ_t and √(1 − ᾱ_t), as the JAX step uses them.
    diffusion = create_diffusion("", learn_sigma=False)
    sqrt_a, sqrt_1ma = (torch.from_numpy(np.asarray(diffusion.tables32[name])).to(device)
                        for name in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"))
    x, _, y = common.torch_inputs(args.batch, args.image_size, device)

    def mse_loss(t, labels, noise):
        x_t = sqrt_a[t].view(-1, 1, 1, 1) * x + sqrt_1ma[t].view(-1, 1, 1, 1) * noise
        with torch.autocast(device, dtype=autocast) if autocast else contextlib.nullcontext():
            eps = model(x_t, t, labels).sample
        return ((noise - eps.float()) ** 2).mean()

    def update_ema():
        if official:  # train.py's update_ema: a Python loop over the parameters
            for e, q in zip(ema_params, params):
                e.mul_(EMA_DECAY).add_(q.data, alpha=1 - EMA_DECAY)
        else:
            torch._foreach_mul_(ema_params, EMA_DECAY)
            torch._foreach_add_(ema_params, params, alpha=1 - EMA_DECAY)

    def step():
        t = torch.randint(0, 1000, (args.batch,), device=device)
        noise = torch.randn_like(x)
        labels = torch.where(torch.rand(args.batch, device=device) < 0.1, 1000, y)
        loss = mse_loss(t, labels, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            update_ema()
        return loss

    timing = common.measure(step, sync, iters=args.iters, inner=args.inner)
    precision = ("bf16 autocast" if autocast else
                 ("fp32+tf32" if official and device == "cuda" else "fp32"))
    return {"framework": "torch", "variant": f"torch {args.variant} ({precision})", "precision": precision,
            "attention": "sdpa", "optimizer": "AdamW" + ("" if official else " fused"),
            "ema": "python loop" if official else "foreach",
            "timing": timing, "loss": float(step().detach()), **common.torch_row(device)}


# ----------------------------------------------------------------------------------------------
# Parent


def main(argv=None) -> dict:
    p = common.parser(__doc__, ["jax", "torch", "memory"])
    p.add_argument("--models", default=None, help="comma-separated official names")
    p.add_argument("--remat", default=None,
                   help="none, full (recompute everything) or a jax.checkpoint_policies name; default: "
                        f"{CPU_REMAT} on a CPU (fastest there, see BENCHMARKS.md), none on a GPU")
    p.add_argument("--only", default="throughput,compile,memory",
                   help="sections to run: throughput, compile, memory (memory: GPU only)")
    p.add_argument("--compile-unrolled", action="store_true",
                   help="also compile the unrolled (scan_blocks=0) XL/2 step, for comparison")
    p.add_argument("--no-official", action="store_true", help="skip the official-recipe variant")
    p.add_argument("--mse", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="fast", help=argparse.SUPPRESS)
    if not (started := common.begin(
            p, argv, {"jax": jax_worker, "torch": torch_worker, "memory": memory_worker},
            "train_step", defaults, objective="eps MSE (learn_sigma=False) on both sides",
            ema_decay=EMA_DECAY, optimizer="AdamW lr 1e-4 (0.9, 0.999) wd 0")):
        return {}
    args, platform, s, report, shared = started
    report.update(compile=[], memory=[])
    sections, tables = set(args.only.split(",")), []

    if "throughput" in sections:
        base = [*shared, "--batch", str(s["batch"]), "--dtype", s["dtype"], "--iters",
                str(s["iters"]), "--inner", str(s["inner"]), "--remat", s["remat"]]
        sides = [("jax", ["--worker", "jax"]), ("torch fast", ["--worker", "torch"])]
        if not args.no_official:
            sides.append(("torch official", ["--worker", "torch", "--variant", "official"]))
        for model in s["models"]:
            flops = 3 * s["batch"] * common.forward_flops_per_image(model, s["image_size"],
                                                                    learn_sigma=False)
            report["rows"] += common.compare(SCRIPT, sides, base, platform=platform,
                                             images=s["batch"], flops=flops, dtype=s["dtype"],
                                             model=model, batch=s["batch"])
        tables.append(common.print_table(
            f"Train step (ε-MSE), batch {s['batch']}, {s['dtype']}, "
            f"{common.device_kind(report['rows'], platform)}", report["rows"], common.row_columns(
                "model", "ms/step (median)", ".1f", ("min_ms", "ms (min)", ".1f"))))

    # The compile and memory sections build the library's full step (hybrid loss, --mse 0) in
    # the GPU configuration (bfloat16), whatever compiles it.
    if "compile" in sections:
        report["compile"], table = common.compile_section(SCRIPT, [
            ({"scan_blocks": bool(scan)}, ["--mse", "0", "--scan-blocks", str(scan), "--remat",
                                           "none"])
            for scan in ([1, 0] if args.compile_unrolled else [1])], shared, s, platform,
            "Train-step")
        tables.append(table)

    if "memory" in sections and platform == "gpu":  # XLA:CPU has no memory limit to fill
        for remat in ("none", "full"):
            report["memory"].append({"remat": remat == "full", **common.run_worker(SCRIPT, [
                "--worker", "memory", *shared, "--mse", "0", "--model", s["compile_model"],
                "--dtype", s["dtype"], "--remat", remat], platform=platform, mem_fraction=0.95)})
        tables.append(common.print_table(
            f"Largest {s['compile_model']} batch that trains ({s['dtype']})", report["memory"],
            [("remat", "remat", ""), ("largest_batch", "largest batch", ""),
             ("smallest_failing_batch", "fails at", ""), ("predicted_batch", "predicted", ""),
             ("per_image_gb", "GB/image", ".3f"), ("fixed_gb", "fixed GB", ".1f"),
             ("device_limit_gb", "limit GB", ".1f")]))

    report["tables"] = tables
    common.write_report("train", report, args.json)
    return report


if __name__ == "__main__":
    main()
