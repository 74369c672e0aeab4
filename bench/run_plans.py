"""The plans of BENCHMARKS.md: `python bench/run_plans.py [--only NAME ...]` runs
`python -m dit_jax.plan` for each row below (one process at a time: only one may load libtpu) and
writes bench/results/plans/NAME.json, then prints the markdown table. Needs the `tpu` extra (and
the `cuda` extra for the GPU rows). Compiler figures, not measurements: see docs/plan.md."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "plans"

# name: (target, model, image size, mesh data, mesh fsdp, extra flags)
SCAN = "--config.model.scan_blocks=True"
ROWS = {
    "xl2_256_v5e-256": ("v5e-256", "XL/2", 256, 16, 16, [SCAN, "--search=batch"]),
    "xl2_256_h100-8": ("h100-8", "XL/2", 256, 1, 8, ["--config.model.attention_impl=xla"]),
    "xl2_256_h100-8_scanned": ("h100-8", "XL/2", 256, 1, 8,
                               [SCAN, "--config.model.attention_impl=xla"]),
    "xl2_256_v5p-128": ("v5p-128", "XL/2", 256, 4, 16, [SCAN]),
    "xl2_256_v6e-256": ("v6e-256", "XL/2", 256, 16, 16, [SCAN]),
    "xl2_256_2xv5e-256": ("2xv5e-256", "XL/2", 256, 32, 16,
                          [SCAN, "--config.global_batch_size=512"]),
    "b2_256_v5e-256": ("v5e-256", "B/2", 256, 16, 16, [SCAN]),
    "xl2_512_v5e-256": ("v5e-256", "XL/2", 512, 16, 16, [SCAN]),
    "b2_512_v5e-256": ("v5e-256", "B/2", 512, 16, 16, [SCAN]),
    "xl2_256_v5e-256_fsdp128": ("v5e-256", "XL/2", 256, 2, 128, [SCAN]),
    "xl2_256_4xh100-8": ("4xh100-8", "XL/2", 256, 4, 8, ["--config.model.attention_impl=xla"]),
}
# Rows without a --search flag of their own are planned at the config's batch only: each compile
# of an XL/2 step took minutes on the 2 shared cores that made BENCHMARKS.md's table. Give a row
# "--search=batch" (or "--search=batch,remat") to add the largest-batch search.
SEARCH_DEFAULT = "--search="


def run(name):
    target, model, size, data, fsdp, extra = ROWS[name]
    extra = list(extra)
    if not any(e.startswith("--search") for e in extra):
        extra.append(SEARCH_DEFAULT)
    cmd = [sys.executable, "-m", "dit_jax.plan", f"--target={target}",
           f"--config=configs/dit.py:{model}", f"--config.data.image_size={size}",
           f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}", "--max_compiles=3",
           f"--json={OUT / (name + '.json')}", *extra]
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=False)


def _estimate(p, unit):
    """The linear estimate of the largest batch from the compiled points (plans made before the
    planner reported it)."""
    points = sorted((int(b), v["peak_bytes_per_device"]) for b, v in p["batch_points"].items())
    (b0, m0), (b1, m1) = points[:2]
    limit = p["memory_fraction"] * p["memory_bytes_per_device"]
    guess = int((limit - m0) / ((m1 - m0) / (b1 - b0)) + b0) // unit * unit
    failing = [b for b, v in p["batch_points"].items() if not v["fits"]]
    return min([guess] + [int(b) - unit for b in failing])


def table():
    header = ["plan", "target", "mesh data×fsdp", "blocks", "batch", "peak / device", "fits",
              "largest batch", "compile s (wall / CPU)", "compute-bound img/s", "collectives ms"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for path in (OUT / f"{name}.json" for name in ROWS):
        if not path.exists():
            continue
        p = json.loads(path.read_text())
        unit, largest = p["mesh"]["data"] * p["mesh"]["fsdp"], p.get("max_global_batch")
        if largest is not None and not p.get("max_global_batch_confirmed"):
            largest = f"≥ {largest}, ~{p.get('max_global_batch_estimate') or _estimate(p, unit)}"
        rows.append("| " + " | ".join(map(str, [
            f"{p['model']} {p['image_size']} px", p["target"],
            f"{p['mesh']['data']}×{p['mesh']['fsdp']}", "scanned" if p["scan_blocks"] else "plain",
            p["global_batch"], f"{p['peak_bytes_per_device'] / 2**30:.2f} of "
            f"{p['memory_bytes_per_device'] / 2**30:.0f} GiB", "yes" if p["fits"] else "no",
            "–" if largest is None else largest,
            f"{p['compile_seconds']:.0f} / {p.get('compile_cpu_seconds') or 0:.0f}",
            f"{p['compute_bound_images_per_second']:.0f}",
            f"{p['collective_seconds_bandwidth_bound'] * 1e3:.1f}"])) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", default=None, help="row names (default: all)")
    parser.add_argument("--table", action="store_true", help="only print the table")
    args = parser.parse_args()
    if not args.table:
        for name in args.only or ROWS:
            run(name)
    print(table())
