"""Run the whole benchmark set on whatever device is present, then check the figures against the
goals of issue #7 and write a summary.

    python bench/run_all.py            # full set (CPU: about 15 minutes on 2 quiet cores)
    python bench/run_all.py --quick    # fewer iterations, for checking that everything runs
    python bench/run_all.py --jobs forward,train   # a subset; add "data" for the input pipeline

Jobs: forward (bench_forward.py), train (bench_train.py: throughput, XL/2 compile time, and on
a GPU the largest XL/2 batch with and without remat), sampling (bench_sampling.py: throughput and
XL/2 sampler compile time), overhead (bench_sampler.py: per-step loop overhead of the samplers),
data (bench_data.py, opt-in: the input pipeline is not a device benchmark). Each job writes its
JSON under bench/results/; this script adds summary_<platform>.json with the goal table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_JOBS = ("forward", "train", "sampling", "overhead")


def job_commands(platform: str, quick: bool) -> dict[str, list[str]]:
    q = ["--quick"] if quick else []
    if platform == "gpu":
        overhead = ["--model", "DiT-XL/2", "--dtype", "bfloat16", "--batch", "64",
                    "--cfg-scale", "4", "--steps", "50", "--samplers", "ddim,ddpm",
                    "--rounds", "2" if quick else "5"]
    else:
        overhead = ["--model", "DiT-S/2", "--batch", "2", "--steps", "10",
                    "--rounds", "2" if quick else "5"]
    return {
        "forward": ["bench_forward.py", *q],
        "train": ["bench_train.py", *q, *(["--compile-unrolled"] if not quick else [])],
        "sampling": ["bench_sampling.py", *q],
        "overhead": ["bench_sampler.py", *overhead,
                     "--json", str(common.RESULTS / f"sampler_overhead_{platform}.json")],
        "data": ["bench_data.py", *(["--images", "96", "--windows", "2"] if quick else [])],
    }


def load(name: str, platform: str) -> dict | None:
    path = common.RESULTS / f"{name}_{platform}.json"
    return json.loads(path.read_text()) if path.exists() else None


def goal(name: str, value, target: str, met, note: str = "") -> dict:
    return {"goal": name, "measured": value, "target": target,
            "status": "not measured" if met is None else ("met" if met else "NOT met"),
            "note": note}


def _row(report, **match):
    for row in (report or {}).get("rows", []):
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def evaluate(platform: str) -> list[dict]:
    """The goals of issue #7 against this platform's results."""
    forward, train, sampling = (load(n, platform) for n in ("forward", "train", "sampling"))
    goals = []
    gpu = platform == "gpu"
    no_gpu = "needs an H100/H200; not measured on this machine"

    # GPU training, DiT-XL/2 256 px bf16.
    jax_train = _row(train, model="DiT-XL/2", framework="jax") if gpu else None
    mfu = jax_train.get("mfu") if jax_train else None
    goals.append(goal("XL/2 train step MFU (bf16, 1 GPU)", mfu, "≥ 50%",
                      None if mfu is None else mfu >= 0.5, "" if gpu else no_gpu))
    for key, target, label in (("jax_speedup_vs_torch_official", 4.0, "official recipe (fp32+TF32)"),
                               ("jax_speedup_vs_torch_fast", 1.3, "PyTorch bf16 autocast + SDPA")):
        value = jax_train.get(key) if jax_train else None
        goals.append(goal(f"XL/2 train step vs {label}", value, f"≥ {target}×",
                          None if value is None else value >= target, "" if gpu else no_gpu))

    # GPU sampling.
    ddim = _row(sampling, framework="jax", sampler="ddim") if gpu else None
    ddpm = _row(sampling, framework="jax", sampler="ddpm") if gpu else None
    value = ddim.get("mfu") if ddim else None
    goals.append(goal("XL/2 DDIM-50 + guidance, batch 64, MFU", value, "≥ 50%",
                      None if value is None else value >= 0.5, "" if gpu else no_gpu))
    value = ddim.get("speedup_vs_torch") if ddim else None
    goals.append(goal("XL/2 DDIM-50 + guidance vs diffusers bf16 + SDPA", value, "≥ 2×",
                      None if value is None else value >= 2.0, "" if gpu else no_gpu))
    value = ddpm.get("images_per_s") if ddpm else None
    goals.append(goal("XL/2 DDPM-250 + guidance, images/s", value, "≥ 4",
                      None if value is None else value >= 4.0, "" if gpu else no_gpu))

    # CPU: DiT-S/2 and DiT-B/4, batch 8, float32.
    for model in ("DiT-S/2", "DiT-B/4"):
        if gpu:
            goals.append(goal(f"{model} CPU train step / forward vs PyTorch", None, "≥ 1.2×", None,
                              "a CPU goal: run on a CPU machine"))
            continue
        row = _row(train, model=model, framework="jax")
        for key, label in (("jax_speedup_vs_torch_fast", "fast PyTorch (fused AdamW, foreach EMA)"),
                           ("jax_speedup_vs_torch_official", "official-recipe PyTorch")):
            value = row.get(key) if row else None
            goals.append(goal(f"{model} CPU train step vs {label}", value, "≥ 1.2×",
                              None if value is None else value >= 1.2))
        row = _row(forward, model=model, framework="jax")
        value = row.get("speedup_vs_torch") if row else None
        goals.append(goal(f"{model} CPU forward vs PyTorch", value, "≥ 1.2×",
                          None if value is None else value >= 1.2))

    # Compile time: whatever device compiled it.
    for report, label in ((train, "XL/2 train step"), (sampling, "XL/2 sampler")):
        rows = [r for r in (report or {}).get("compile", []) if r.get("scan_blocks", True)
                and "total_s" in r]
        worst = max((r["total_s"] for r in rows), default=None)
        where = rows[0]["device"]["kind"] if rows else platform
        goals.append(goal(f"{label} compile time", worst, "< 60 s",
                          None if worst is None else worst < 60.0,
                          f"compiled for {where}" + ("" if gpu else
                                                     "; the GPU compile adds autotuning, not measured")))

    # Memory: reported, no threshold.
    mem = (train or {}).get("memory", [])
    for remat in (False, True):
        row = next((r for r in mem if r.get("remat") == remat), None)
        value = row.get("largest_batch") if row else None
        goals.append({"goal": f"largest XL/2 batch on one 80 GB GPU, remat={remat}",
                      "measured": value, "target": "report", "status":
                      "measured" if value else "not measured", "note": "" if gpu else no_gpu})
    return goals


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--jobs", default=",".join(DEFAULT_JOBS))
    args = p.parse_args(argv)

    platform = common.detect_platform()
    commands = job_commands(platform, args.quick)
    jobs = args.jobs.split(",")
    unknown = [j for j in jobs if j not in commands]
    if unknown:
        p.error(f"unknown job(s) {unknown}; choose from {sorted(commands)}")
    print(f"platform {platform}; jobs {jobs}; load average {common.environment()['host']['load_average_1m']:.2f}")
    timings = {}
    for job in jobs:
        script, *rest = commands[job]
        print(f"\n=== {job}: {script} {' '.join(rest)}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(HERE / script), *rest],
                              env=common.worker_env(platform), cwd=common.ROOT)
        timings[job] = {"seconds": time.perf_counter() - start, "returncode": proc.returncode}

    goals = evaluate(platform)
    summary = {"benchmark": "summary", "platform": platform, "quick": args.quick,
               **common.environment(), "jobs": timings, "goals": goals}
    summary["table"] = common.print_table(
        f"Goals of issue #7 ({platform})", goals,
        [("goal", "goal", ""), ("measured", "measured", ".3g"), ("target", "target", ""),
         ("status", "status", ""), ("note", "note", "")])
    common.write_report("summary", summary, None)
    failed = [j for j, t in timings.items() if t["returncode"]]
    if failed:
        print(f"failed jobs: {failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
