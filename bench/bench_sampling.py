"""Sampler: images/s, TFLOP/s and MFU of whole guided sampling runs (the compiled
`dit_jax.diffusion` loops), against the same sampler written in PyTorch around diffusers'
DiTTransformer2DModel (patched to the official numerics) on the same device, in one run; and the
compile time of the XL/2 sampler.

    python bench/bench_sampling.py                       # the defaults of the device present
    python bench/bench_sampling.py --model DiT-S/2 --batch 4 --ddim-steps 10 --quick

Jobs (GPU defaults): DDIM-50 with classifier-free guidance (scale 4.0), batch 64, bfloat16, JAX and
PyTorch; DDPM-250 with guidance 1.5 (the paper's FID protocol), batch 64, JAX (PyTorch with
--torch-ddpm). Guidance is the released form (a batch of 2N per step, channels 0..2 guided).
JAX: bf16 weights and matmuls, cuDNN flash attention (XLA's if cuDNN fails), scanned layers, the
whole run one jitted lax.scan. PyTorch: the model cast to bf16, SDPA attention, a Python loop over
the steps with the official update rules (no host synchronisation inside the loop). On a CPU the
same jobs run small (DiT-S/2, batch 4, 10 steps, float32) to exercise the code; the goals are GPU
figures.

The per-step loop overhead of the samplers (loop time minus one model call) is measured by
bench/bench_sampler.py.

Writes bench/results/sampling_<platform>.json and prints the tables.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SCRIPT = Path(__file__).resolve()
NULL_LABEL = 1000


def defaults(platform: str) -> dict:
    if platform == "gpu":
        return dict(model="DiT-XL/2", batch=64, dtype="bfloat16", ddim_steps=50, ddpm_steps=250)
    return dict(model="DiT-S/2", batch=4, dtype="float32", ddim_steps=10, ddpm_steps=10)


# ----------------------------------------------------------------------------------------------
# JAX


def _jax_sampler(args, attention: str):
    """(jitted sampler, abstract inputs builder, concrete inputs builder)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import dit_jax
    from dit_jax.samplers import sample_loop
    from dit_jax.sampling import diffusion_for, guided_model_fn

    dtype = getattr(jnp, args.dtype)
    model = nnx.eval_shape(lambda: dit_jax.create_model(
        args.model, image_size=args.image_size, dtype=dtype, attention_impl=attention,
        scan_blocks=args.scan_blocks))
    graphdef, abstract_params, abstract_rest = nnx.split(model, nnx.Param, ...)
    diffusion = diffusion_for(args.sampler, args.steps)

    def apply(model_args, x, t):
        params, rest, labels = model_args
        dit = nnx.merge(graphdef, params, rest)
        return guided_model_fn(dit, labels, args.cfg_scale, "3")(x, t)

    # The sampler by its registry name, as sample.py runs it.
    run = jax.jit(lambda model_args, x_T, key: sample_loop(
        args.sampler, diffusion, lambda x, t: apply(model_args, x, t), x_T, key))
    side = args.image_size // 8

    def abstract():
        sds = lambda a, dt=None: jax.ShapeDtypeStruct(a.shape, dt or a.dtype)  # noqa: E731
        # Weights stored in the compute dtype, as a bf16 PyTorch model holds them.
        params = jax.tree.map(lambda a: sds(a, dtype), abstract_params)
        rest = jax.tree.map(sds, abstract_rest)
        return ((params, rest, jax.ShapeDtypeStruct((args.batch,), jnp.int32)),
                jax.ShapeDtypeStruct((args.batch, side, side, 4), jnp.float32),
                jax.eval_shape(lambda: jax.random.key(0)))

    def concrete():
        real = dit_jax.create_model(args.model, image_size=args.image_size, dtype=dtype,
                                    attention_impl=attention, scan_blocks=args.scan_blocks)
        _, params, rest = nnx.split(real, nnx.Param, ...)
        params = jax.tree.map(lambda a: a.astype(dtype), common.random_params(params))
        labels = jax.random.randint(jax.random.key(3), (args.batch,), 0, 1000, jnp.int32)
        x_T = jax.random.normal(jax.random.key(1), (args.batch, side, side, 4), jnp.float32)
        return (params, rest, labels), x_T, jax.random.key(2)

    return run, abstract, concrete


def _compile(run, abstract):
    start = time.perf_counter()
    lowered = run.lower(*abstract())
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    return compiled, lower_s, time.perf_counter() - start - lower_s


def jax_worker(args) -> dict:
    import jax

    platform = jax.default_backend()
    attention = args.attention or ("cudnn" if platform == "gpu" else "xla")
    row = {"framework": "jax", "variant": f"jax {args.dtype}", "attention": attention}
    try:
        run, abstract, concrete = _jax_sampler(args, attention)
        compiled, lower_s, compile_s = _compile(run, abstract)
    except Exception as error:  # noqa: BLE001 - cuDNN may reject a shape or be missing
        if attention != "cudnn" or common.is_oom(error):
            raise
        row["attention"] = "xla"
        row["attention_fallback"] = f"cudnn failed: {str(error).splitlines()[0][:200]}"
        run, abstract, concrete = _jax_sampler(args, "xla")
        compiled, lower_s, compile_s = _compile(run, abstract)
    inputs = concrete()
    timing = common.measure(lambda: compiled(*inputs), jax.block_until_ready,
                            warmup=args.warmup, iters=args.iters)
    row.update(lower_s=lower_s, compile_s=lower_s + compile_s, timing=timing,
               device=common.jax_device_info(), peak_memory_gb=common.jax_peak_memory_gb(),
               compiled_memory=common.compiled_memory_gb(compiled))
    return row


def compile_worker(args) -> dict:
    """Lower + compile with abstract inputs: nothing allocated or run."""
    import jax

    attention = args.attention or ("cudnn" if jax.default_backend() == "gpu" else "xla")
    run, abstract, _ = _jax_sampler(args, attention)
    _, lower_s, compile_s = _compile(run, abstract)
    return {"model": args.model, "sampler": args.sampler, "steps": args.steps,
            "batch": args.batch, "dtype": args.dtype, "attention": attention,
            "scan_blocks": args.scan_blocks, "lower_s": lower_s, "compile_s": compile_s,
            "total_s": lower_s + compile_s, "device": common.jax_device_info()}


# ----------------------------------------------------------------------------------------------
# PyTorch


def torch_sampler(model, *, sampler: str, steps: int, cfg_scale: float, dtype, device: str):
    """`sample(x_T, labels)`: the official DDPM / DDIM (eta 0) loop with the released guidance
    around a diffusers model, NCHW. Per-step constants are Python floats: no device gathers and
    no host round trips inside the loop."""
    import numpy as np
    import torch

    from dit_jax.sampling import diffusion_for

    diffusion = diffusion_for(sampler, steps)
    tables = {name: [float(v) for v in np.asarray(getattr(diffusion, name))] for name in (
        "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "alphas_cumprod_prev",
        "posterior_mean_coef1", "posterior_mean_coef2", "posterior_log_variance_clipped")}
    tables["log_betas"] = [float(v) for v in np.log(diffusion.betas)]
    timesteps = [int(v) for v in diffusion.timestep_map]

    def guided(x, y, i):
        n = x.shape[0]
        t = torch.full((2 * n,), timesteps[i], device=device)
        out = model(torch.cat([x, x]).to(dtype), t, y).sample.float()
        cond, uncond = out[:n], out[n:]
        eps = uncond[:, :3] + cfg_scale * (cond[:, :3] - uncond[:, :3])  # the released guidance
        return torch.cat([eps, cond[:, 3:4]], dim=1), cond[:, 4:]

    def sample(x_T, labels):
        y = torch.cat([labels, torch.full_like(labels, NULL_LABEL)])
        x = x_T
        with torch.inference_mode():
            for i in reversed(range(steps)):
                eps, values = guided(x, y, i)
                pred_x0 = (tables["sqrt_recip_alphas_cumprod"][i] * x
                           - tables["sqrt_recipm1_alphas_cumprod"][i] * eps)
                if sampler == "ddim":
                    eps = ((tables["sqrt_recip_alphas_cumprod"][i] * x - pred_x0)
                           / tables["sqrt_recipm1_alphas_cumprod"][i])
                    prev = tables["alphas_cumprod_prev"][i]
                    x = pred_x0 * prev ** 0.5 + (1 - prev) ** 0.5 * eps
                else:
                    frac = (values + 1) / 2
                    log_var = (frac * tables["log_betas"][i]
                               + (1 - frac) * tables["posterior_log_variance_clipped"][i])
                    x = (tables["posterior_mean_coef1"][i] * pred_x0
                         + tables["posterior_mean_coef2"][i] * x)
                    if i > 0:
                        x = x + torch.exp(0.5 * log_var) * torch.randn_like(x)
        return x

    return sample


def torch_worker(args) -> dict:
    import torch

    device = common.torch_setup("gpu" if args.platform == "gpu" else "cpu")
    dtype = getattr(torch, args.dtype)
    model = common.torch_dit(args.model, image_size=args.image_size, device=device).to(dtype)
    sample = torch_sampler(model, sampler=args.sampler, steps=args.steps,
                           cfg_scale=args.cfg_scale, dtype=dtype, device=device)
    side = args.image_size // 8
    generator = torch.Generator().manual_seed(1)
    x_T = torch.randn(args.batch, 4, side, side, generator=generator).to(device)
    labels = torch.randint(0, 1000, (args.batch,), generator=generator).to(device)
    timing = common.measure(lambda: sample(x_T, labels), common.torch_sync(device),
                            warmup=args.warmup, iters=args.iters)
    return {"framework": "torch", "variant": f"torch {args.dtype}", "attention": "sdpa",
            "compile_s": None, "timing": timing, "device": common.torch_device_info(device),
            "peak_memory_gb": common.torch_peak_memory_gb(device)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--ddim-steps", type=int, default=None)
    p.add_argument("--ddim-cfg", type=float, default=4.0)
    p.add_argument("--ddpm-steps", type=int, default=None)
    p.add_argument("--ddpm-cfg", type=float, default=1.5)
    p.add_argument("--torch-ddpm", action="store_true", help="also run DDPM in PyTorch")
    p.add_argument("--scan-blocks", type=int, default=1)
    p.add_argument("--attention", default=None, choices=["xla", "cudnn"])
    p.add_argument("--only", default="throughput,compile")
    p.add_argument("--compile-model", default="DiT-XL/2")
    p.add_argument("--compile-batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="fewer iterations")
    p.add_argument("--json", default=None)
    # worker mode
    p.add_argument("--worker", choices=["jax", "torch", "compile"], help=argparse.SUPPRESS)
    p.add_argument("--sampler", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cfg-scale", type=float, help=argparse.SUPPRESS)
    p.add_argument("--platform", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        args.scan_blocks = bool(args.scan_blocks)
        worker = {"jax": jax_worker, "torch": torch_worker, "compile": compile_worker}[args.worker]
        common.write_worker_result(args.out, worker(args))
        return {}

    platform = common.detect_platform()
    d = defaults(platform)
    model = args.model or d["model"]
    batch = args.batch or d["batch"]
    dtype = args.dtype or d["dtype"]
    iters = args.iters or (2 if args.quick else 5)
    jobs = [("ddim", args.ddim_steps or d["ddim_steps"], args.ddim_cfg, True),
            ("ddpm", args.ddpm_steps or d["ddpm_steps"], args.ddpm_cfg, args.torch_ddpm)]
    sections = set(args.only.split(","))
    report = {"benchmark": "sampling", "platform": platform, **common.environment(),
              "config": {"model": model, "batch": batch, "dtype": dtype,
                         "image_size": args.image_size, "iters": iters,
                         "scan_blocks": bool(args.scan_blocks), "guidance": "released (3 channels)",
                         "jobs": [{"sampler": s, "steps": n, "cfg_scale": c} for s, n, c, _ in jobs]},
              "rows": [], "compile": []}
    extra = ["--attention", args.attention] if args.attention else []
    tables = []

    if "throughput" in sections:
        macs = common.forward_flops_per_image(model, args.image_size) / 2
        for sampler, steps, cfg_scale, with_torch in jobs:
            model_batch = 2 * batch if cfg_scale != 1.0 else batch
            flops = steps * 2 * macs * model_batch
            base = ["--model", model, "--batch", str(batch), "--dtype", dtype, "--image-size",
                    str(args.image_size), "--sampler", sampler, "--steps", str(steps),
                    "--cfg-scale", str(cfg_scale), "--platform", platform, "--iters", str(iters),
                    "--scan-blocks", str(args.scan_blocks), *extra]
            sides = [("jax", ["--worker", "jax"])] + ([("torch", ["--worker", "torch"])]
                                                     if with_torch else [])
            rows = []
            for label, side in sides:
                row = common.run_worker(SCRIPT, [*side, *base], platform=platform)
                row.setdefault("variant", label)
                row.update(model=model, batch=batch, dtype=dtype, sampler=sampler, steps=steps,
                           cfg_scale=cfg_scale, job=f"{sampler.upper()}-{steps} cfg {cfg_scale}")
                if "timing" in row:
                    seconds = row["timing"]["median_s"]
                    peak = common.peak_flops(row["device"]["kind"], row["device"]["platform"],
                                             "bf16" if dtype == "bfloat16" else "fp32")
                    row.update(s_per_run=seconds, ms_per_step=seconds / steps * 1e3,
                               **common.throughput_fields(batch, seconds, flops, peak))
                rows.append(row)
            if len(rows) == 2 and all("images_per_s" in r for r in rows):
                rows[0]["speedup_vs_torch"] = rows[0]["images_per_s"] / rows[1]["images_per_s"]
            report["rows"] += rows
        device = next((r["device"]["kind"] for r in report["rows"] if "device" in r), platform)
        tables.append(common.print_table(
            f"Sampling {model}, batch {batch}, {dtype}, {device}", report["rows"],
            [("job", "job", ""), ("variant", "implementation", ""),
             ("s_per_run", "s/run (median)", ".2f"), ("ms_per_step", "ms/step", ".1f"),
             ("images_per_s", "images/s", ".3f"), ("tflops", "TFLOP/s", ".3f"),
             ("mfu", "MFU", ".1%"), ("speedup_vs_torch", "× PyTorch", ".2f"),
             ("compile_s", "compile s", ".1f"), ("peak_memory_gb", "peak mem GB", ".2f")]))

    if "compile" in sections:
        for sampler, steps, cfg_scale in (("ddim", 50, args.ddim_cfg), ("ddpm", 250, args.ddpm_cfg)):
            row = common.run_worker(SCRIPT, [
                "--worker", "compile", "--model", args.compile_model, "--batch",
                str(args.compile_batch), "--dtype", "bfloat16", "--image-size",
                str(args.image_size), "--sampler", sampler, "--steps", str(steps),
                "--cfg-scale", str(cfg_scale), "--platform", platform,
                "--scan-blocks", str(args.scan_blocks), *extra], platform=platform)
            row.setdefault("model", args.compile_model)
            row.setdefault("sampler", sampler)
            row["job"] = f"{sampler.upper()}-{steps} cfg {cfg_scale}"
            row["device_kind"] = row.get("device", {}).get("kind", platform)
            report["compile"].append(row)
        tables.append(common.print_table(
            f"Sampler compile time (lower + compile, abstract inputs), {args.compile_model}, "
            f"batch {args.compile_batch}, bfloat16", report["compile"],
            [("job", "job", ""), ("device_kind", "compiled on", ""),
             ("scan_blocks", "scan", ""), ("attention", "attention", ""),
             ("lower_s", "lower s", ".1f"), ("compile_s", "compile s", ".1f"),
             ("total_s", "total s", ".1f")]))

    report["tables"] = tables
    common.write_report("sampling", report, args.json)
    return report


if __name__ == "__main__":
    main()
