"""Run the whole benchmark set on whatever device is present and write a summary.

    python bench/run_all.py            # full set (CPU: about 15 minutes on 2 quiet cores)
    python bench/run_all.py --quick    # fewer iterations, for checking that everything runs
    python bench/run_all.py --jobs forward,train   # a subset; add "data" for the input pipeline

Jobs: forward (bench_forward.py), train (bench_train.py: throughput, XL/2 compile time, and on
a GPU the largest XL/2 batch with and without remat), sampling (bench_sampling.py: throughput and
XL/2 sampler compile time), overhead (bench_sampler.py: per-step loop overhead of the samplers),
data (bench_data.py, opt-in: the input pipeline is not a device benchmark). Each job writes its
JSON under bench/results/; this script adds summary_<platform>.json (environment, job times).
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

    summary = {"benchmark": "summary", "platform": platform, "quick": args.quick,
               **common.environment(), "jobs": timings}
    common.write_report("summary", summary, None)
    failed = [j for j, t in timings.items() if t["returncode"]]
    if failed:
        print(f"failed jobs: {failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
