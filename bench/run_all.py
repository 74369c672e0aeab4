"""Run the whole benchmark set on whatever device is present and write a summary.

    python bench/run_all.py            # full set (CPU: about 15 minutes on 2 quiet cores)
    python bench/run_all.py --quick    # fewer iterations, for checking that everything runs
    python bench/run_all.py --jobs forward,train   # a subset; add "data" for the input pipeline
    python bench/run_all.py --tiny --jobs forward,train,sampling,data --results /tmp/bench

Jobs: forward (bench_forward.py), train (bench_train.py: throughput, XL/2 compile time, and on a
GPU the largest XL/2 batch with and without remat), sampling (bench_sampling.py: throughput, XL/2
sampler compile time, per-step loop overhead of the samplers), data (bench_data.py, opt-in: the
input pipeline is not a device benchmark). Each job writes its JSON under --results
(bench/results/); this script adds summary_<platform>.json (environment, job times).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

HERE = Path(__file__).resolve().parent
SCRIPTS = ("forward", "train", "sampling", "data")  # bench_<job>.py


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tiny", action="store_true", help="every job in its smallest configuration")
    p.add_argument("--jobs", default="forward,train,sampling")
    p.add_argument("--results", default=str(common.RESULTS), help="folder of the JSON files")
    args = p.parse_args(argv)

    platform = common.detect_platform()
    jobs = args.jobs.split(",")
    if unknown := [j for j in jobs if j not in SCRIPTS]:
        p.error(f"unknown job(s) {unknown}; choose from {sorted(SCRIPTS)}")
    results = Path(args.results)
    print(f"platform {platform}; jobs {jobs}; load average {common.environment()['host']['load_average_1m']:.2f}")
    timings = {}
    for job in jobs:
        flags = ["--tiny"] if args.tiny else ["--quick"] if args.quick and job != "data" else []
        if job == "train" and not (args.quick or args.tiny):
            flags.append("--compile-unrolled")
        if job == "data" and args.quick:
            flags += ["--images", "96", "--windows", "2"]
        json_path = results / ("bench_data_cpu.json" if job == "data" else f"{job}_{platform}.json")
        print(f"\n=== {job}: bench_{job}.py {' '.join(flags)}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(HERE / f"bench_{job}.py"), *flags, "--json",
                               str(json_path)], env=common.worker_env(platform), cwd=common.ROOT)
        timings[job] = {"seconds": time.perf_counter() - start, "returncode": proc.returncode}

    summary = {"benchmark": "summary", "platform": platform, "quick": args.quick, "tiny": args.tiny,
               **common.environment(), "jobs": timings}
    common.write_report("summary", summary, str(results / f"summary_{platform}.json"))
    if failed := [j for j, t in timings.items() if t["returncode"]]:
        print(f"failed jobs: {failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
