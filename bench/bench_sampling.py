"""Sampling: images/s, TFLOP/s and MFU of whole guided sampling runs (the library's compiled
samplers, `dit_jax.samplers`) against diffusers (DiTTransformer2DModel patched to the official
numerics, stepped by its DDIM / DDPM schedulers) on the same device, in one run; the compile time
of the XL/2 samplers; the per-step loop overhead of the compiled samplers.

    python bench/bench_sampling.py                       # the defaults of the device present
    python bench/bench_sampling.py --model DiT-S/2 --batch 4 --ddim-steps 10 --quick
    python bench/bench_sampling.py --tiny --json /tmp/sampling.json   # checks that it runs

Jobs: DDIM guidance 4.0, DDPM guidance 1.5 (the paper's FID protocol; in PyTorch only with
--torch-ddpm), DPM-Solver++ (JAX only), with the released guidance (2N rows per step, channels
0..2 guided); GPU: XL/2, batch 64, bfloat16, 50/250/20 steps; CPU: small (defaults() below).
JAX: the whole run one jitted lax.scan, cuDNN flash attention (XLA's if cuDNN fails). PyTorch:
SDPA, a Python loop over diffusers' scheduler steps. Loop overhead: per-step time of a whole run
minus one jitted call of the same guided model (minima over windows); it can come out slightly
negative, as XLA fuses the update into the model's last ops inside the loop.
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
    compile_job = dict(compile_model="DiT-XL/2", compile_batch=64, iters=(2, 5))
    if platform == "gpu":
        return dict(model="DiT-XL/2", batch=64, dtype="bfloat16", ddim_steps=50, ddpm_steps=250,
                    dpm_steps=20, **compile_job)
    return dict(model="DiT-S/2", batch=4, dtype="float32", ddim_steps=10, ddpm_steps=10,
                dpm_steps=10, **compile_job)


# ----------------------------------------------------------------------------------------------
# JAX


def _jax_sampler(args, attention: str):
    """(jitted whole run, jitted guided model call, abstract inputs, concrete inputs) of sampler
    --sampler by its registry name, as sample.py runs it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import dit_jax
    from dit_jax.samplers import sample_loop
    from dit_jax.sampling import diffusion_for, guided_model_fn

    dtype = getattr(jnp, args.dtype)

    def create():
        return dit_jax.create_model(args.model, image_size=args.image_size, dtype=dtype,
                                    attention_impl=attention, scan_blocks=args.scan_blocks)

    graphdef = nnx.split(nnx.eval_shape(create), nnx.Param, ...)[0]
    diffusion = diffusion_for(args.sampler, args.steps)

    def guided(model_args, x, t):
        params, rest, labels = model_args
        return guided_model_fn(nnx.merge(graphdef, params, rest), labels, args.cfg_scale, "3")(x, t)

    run = jax.jit(lambda model_args, x_T, key: sample_loop(
        args.sampler, diffusion, lambda x, t: guided(model_args, x, t), x_T, key))

    def concrete():
        _, params, rest = nnx.split(create(), nnx.Param, ...)
        # Weights stored in the compute dtype, as a bf16 PyTorch model holds them.
        params = jax.tree.map(lambda a: a.astype(dtype), common.random_params(params))
        labels = jax.random.randint(jax.random.key(3), (args.batch,), 0, 1000, jnp.int32)
        side = args.image_size // 8
        x_T = jax.random.normal(jax.random.key(1), (args.batch, side, side, 4), jnp.float32)
        return (params, rest, labels), x_T, jax.random.key(2)

    return run, jax.jit(guided), lambda: jax.eval_shape(concrete), concrete


def _compile(args, attention: str):
    run, call, abstract, concrete = _jax_sampler(args, attention)
    start = time.perf_counter()
    lowered = run.lower(*abstract())
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    return compiled, call, concrete, lower_s, time.perf_counter() - start - lower_s


def jax_worker(args) -> dict:
    """The whole run; then `steps` back-to-back calls of the guided model alone, whose time per
    call, taken from the run's time per step, is the sampler's loop overhead."""
    import jax
    import jax.numpy as jnp

    row = {"framework": "jax", "variant": f"jax {args.dtype}", "model": args.model,
           "sampler": args.sampler, "steps": args.steps, "batch": args.batch,
           "scan_blocks": args.scan_blocks}
    compiled, call, concrete, lower_s, compile_s = common.with_cudnn_fallback(
        lambda attention: _compile(args, attention), args, row)
    if args.compile_only:  # abstract inputs only: nothing allocated or run (XL/2 on any machine)
        return {**row, "lower_s": lower_s, "compile_s": compile_s, "total_s": lower_s + compile_s,
                **common.jax_row()}
    model_args, x_T, key = concrete()
    timing = common.measure(lambda: compiled(model_args, x_T, key), jax.block_until_ready,
                            iters=args.iters)
    t = jnp.full((args.batch,), 500, jnp.int32)
    single = common.measure(lambda: call(model_args, x_T, t), jax.block_until_ready,
                            iters=args.iters, inner=args.steps)
    per_step = timing["min_s"] / args.steps
    return {**row, "lower_s": lower_s, "compile_s": lower_s + compile_s, "timing": timing,
            "model_call_ms": single["min_s"] * 1e3, "loop_per_step_ms": per_step * 1e3,
            "overhead_per_step_ms": (per_step - single["min_s"]) * 1e3,
            "overhead_pct": 100 * (per_step / single["min_s"] - 1), **common.jax_row(compiled)}


# ----------------------------------------------------------------------------------------------
# PyTorch


def torch_worker(args) -> dict:
    """diffusers' schedulers with the official linear betas, stepped in a Python loop around the
    diffusers model with the released guidance (channels 0..2 guided), NCHW."""
    import diffusers
    import torch

    device, sync = common.torch_setup()
    dtype = getattr(torch, args.dtype)
    model = common.torch_dit(args.model, image_size=args.image_size, device=device).to(dtype)
    if args.sampler == "ddim":
        scheduler = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False,
                                            set_alpha_to_one=False)
    else:
        scheduler = diffusers.DDPMScheduler(beta_schedule="linear", clip_sample=False,
                                            variance_type="learned_range")
    scheduler.set_timesteps(args.steps)  # on the host, as DiTPipeline keeps them
    x_T, _, labels = common.torch_inputs(args.batch, args.image_size, device)
    y = torch.cat([labels, torch.full_like(labels, NULL_LABEL)])

    @torch.inference_mode()
    def sample():
        x = x_T
        for t in scheduler.timesteps:
            t_in = t.to(device).expand(2 * args.batch)
            out = model(torch.cat([x, x]).to(dtype), t_in, y).sample.float()
            cond, uncond = out.chunk(2)
            eps = uncond[:, :3] + args.cfg_scale * (cond[:, :3] - uncond[:, :3])
            out = torch.cat([eps, cond[:, 3:]], dim=1)
            x = scheduler.step(out if args.sampler == "ddpm" else out[:, :4], t, x).prev_sample
        return x

    timing = common.measure(sample, sync, iters=args.iters)
    return {"framework": "torch", "variant": f"torch {args.dtype} (diffusers {args.sampler})",
            "attention": "sdpa", "compile_s": None, "timing": timing,
            **common.torch_row(device)}


# ----------------------------------------------------------------------------------------------
# Parent


def main(argv=None) -> dict:
    p = common.parser(__doc__, ["jax", "torch"])
    p.add_argument("--ddim-steps", type=int, default=None)
    p.add_argument("--ddim-cfg", type=float, default=4.0)
    p.add_argument("--ddpm-steps", type=int, default=None)
    p.add_argument("--ddpm-cfg", type=float, default=1.5)
    p.add_argument("--torch-ddpm", action="store_true", help="also run DDPM in PyTorch")
    p.add_argument("--only", default="throughput,compile")
    p.add_argument("--dpm-steps", type=int, default=None, help="DPM-Solver++ (JAX only)")
    p.add_argument("--sampler", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cfg-scale", type=float, help=argparse.SUPPRESS)
    if not (started := common.begin(p, argv, {"jax": jax_worker, "torch": torch_worker},
                                    "sampling", defaults, guidance="released (3 channels)")):
        return {}
    args, platform, s, report, shared = started
    if args.tiny:
        s.update(ddim_steps=2, ddpm_steps=2, dpm_steps=2)
        report["config"].update(ddim_steps=2, ddpm_steps=2, dpm_steps=2)
    model, batch, dtype = s["model"], s["batch"], s["dtype"]
    jobs = [("ddim", s["ddim_steps"], args.ddim_cfg, True),
            ("ddpm", s["ddpm_steps"], args.ddpm_cfg, args.torch_ddpm),
            ("dpm++", s["dpm_steps"], args.ddim_cfg, False)]
    sections, tables = set(args.only.split(",")), []
    report["compile"] = []

    def job(sampler, steps, cfg_scale):
        return ["--sampler", sampler, "--steps", str(steps), "--cfg-scale", str(cfg_scale)]

    if "throughput" in sections:
        for sampler, steps, cfg_scale, with_torch in jobs:
            sides = [("jax", ["--worker", "jax"])] + ([("torch", ["--worker", "torch"])] * with_torch)
            rows = common.compare(
                SCRIPT, sides, [*shared, "--batch", str(batch), "--dtype", dtype, "--iters",
                                str(s["iters"]), *job(sampler, steps, cfg_scale)],
                platform=platform, images=batch, dtype=dtype, model=model, batch=batch,
                flops=steps * common.forward_flops_per_image(model, s["image_size"]) * batch
                * (2 if cfg_scale != 1.0 else 1), job=f"{sampler.upper()}-{steps} cfg {cfg_scale}")
            report["rows"] += [{**r, "ms_per_step": r["ms"] / steps} if "ms" in r else r for r in rows]
        tables.append(common.print_table(
            f"Sampling {model}, batch {batch}, {dtype}, "
            f"{common.device_kind(report['rows'], platform)}", report["rows"], common.row_columns(
                "job", "ms/run (median)", ".0f", ("ms_per_step", "ms/step", ".1f"))
            + [("overhead_per_step_ms", "loop overhead ms/step", ".2f"),
               ("overhead_pct", "overhead %", ".1f")]))

    if "compile" in sections:
        report["compile"], table = common.compile_section(SCRIPT, [
            ({"job": f"{sampler.upper()}-{steps} cfg {cfg_scale}"}, job(sampler, steps, cfg_scale))
            for sampler, steps, cfg_scale in (("ddim", 50, args.ddim_cfg), ("ddpm", 250, args.ddpm_cfg))
        ], shared, s, platform, "Sampler", [("job", "job", "")])
        tables.append(table)

    report["tables"] = tables
    common.write_report("sampling", report, args.json)
    return report


if __name__ == "__main__":
    main()
