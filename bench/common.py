"""The harness of the benchmarks: device and XLA flags, the run's environment, the shared command
line, worker dispatch, timing, FLOPs and MFU, the PyTorch DiT, tables and JSON.

Each measured configuration runs in a worker subprocess of its own (the same script with
`--worker ...`): one framework per process, so allocators never share a GPU, a row's peak memory
is its own, and thread pools never compete on a CPU. The parent collects the rows and computes
the ratios, so every ratio comes from one invocation on one machine.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform as pyplatform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # configs/ is a top-level package of the repository

# ----------------------------------------------------------------------------------------------
# Device and XLA flags (decided before JAX is imported: XLA reads XLA_FLAGS once, at start-up)

# XLA:CPU: none (every flag tried in BENCHMARKS.md moved the times by less than the noise).
CPU_XLA_FLAGS: tuple[str, ...] = ()
# Huge pages for glibc malloc: XLA:CPU takes fresh temporaries every execution, and on a VM each
# 4 KiB first-touch page fault is expensive (JAX's step 10-15% faster, PyTorch unchanged or
# faster). Both frameworks' workers get it.
CPU_GLIBC_TUNABLES = "glibc.malloc.hugetlb=1"
# XLA:GPU: the latency-hiding scheduler, as NVIDIA's JAX containers set it; only flags every
# jaxlib GPU build knows (an unknown flag aborts the process).
GPU_XLA_FLAGS: tuple[str, ...] = ("--xla_gpu_enable_latency_hiding_scheduler=true",)


def detect_platform() -> str:
    """"gpu" or "cpu", without importing JAX (which would freeze XLA_FLAGS): BENCH_PLATFORM or
    JAX_PLATFORMS if set, else whether an NVIDIA device is visible."""
    requested = os.environ.get("BENCH_PLATFORM") or os.environ.get("JAX_PLATFORMS", "")
    first = requested.split(",")[0].strip().lower()
    if first in ("cuda", "gpu", "rocm", "cpu"):
        return "cpu" if first == "cpu" else "gpu"
    return "gpu" if Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists() else "cpu"


def worker_env(platform: str, *, mem_fraction: float | None = None) -> dict[str, str]:
    """Environment of a worker: the platform's XLA flags before any the user set (the user's
    come last, so they win), the CPU malloc setting, GPU memory settings."""
    env = dict(os.environ, BENCH_PLATFORM=platform)
    user = env.get("XLA_FLAGS", "")
    flags = [f for f in (CPU_XLA_FLAGS if platform == "cpu" else GPU_XLA_FLAGS)
             if f.split("=")[0] not in user]
    env["XLA_FLAGS"] = " ".join([*flags, user]).strip()
    if platform == "cpu":
        env.setdefault("JAX_PLATFORMS", "cpu")  # a CPU worker on a GPU machine must not pick the GPU
        if "glibc.malloc.hugetlb" not in env.get("GLIBC_TUNABLES", ""):
            env["GLIBC_TUNABLES"] = ":".join(
                t for t in (CPU_GLIBC_TUNABLES, env.get("GLIBC_TUNABLES", "")) if t)
    if platform == "gpu" and mem_fraction is not None:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{mem_fraction:.2f}"
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # would leak into the workers' pools
        env.pop(key, None)
    return env


# ----------------------------------------------------------------------------------------------
# The environment of a run


def git_commit() -> str:
    """Short commit of the repository, with "+dirty" when tracked files differ from it."""
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,  # noqa: E731
                                        check=True).stdout.strip()
        return git("rev-parse", "--short", "HEAD") + (
            "+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
             if line.startswith("model name")] if info.exists() else []
    return names[0] if names else pyplatform.processor() or pyplatform.machine()


def environment() -> dict[str, Any]:
    """Date, commit, host and library versions (read from package metadata, so the parent
    imports neither framework)."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "host": {"cpu": cpu_model(), "cores": os.cpu_count(), "machine": pyplatform.machine(),
                 "load_average_1m": os.getloadavg()[0]},
        "versions": {"python": pyplatform.python_version(), **{name: importlib.metadata.version(
            name) for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "diffusers")}},
        "xla_flags": {"cpu": list(CPU_XLA_FLAGS), "gpu": list(GPU_XLA_FLAGS),
                      "user": os.environ.get("XLA_FLAGS", "")},
        "cpu_glibc_tunables": CPU_GLIBC_TUNABLES,
    }


# ----------------------------------------------------------------------------------------------
# The command line every device benchmark shares, its workers, and the comparison of their rows

# --tiny: the smallest run that still exercises every code path (a DiT-S/2 at 32 px is 4 tokens).
TINY = {"models": ["DiT-S/2"], "model": "DiT-S/2", "batch": 2, "image_size": 32,
        "compile_model": "DiT-S/2", "compile_batch": 2}


def parser(doc: str, workers: Sequence[str]) -> argparse.ArgumentParser:
    """The options of every device benchmark, and the hidden ones its workers are called with."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype (default: bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--image-size", type=int, default=None, help="pixels (default 256)")
    p.add_argument("--scan-blocks", type=int, default=1, help="1: scanned layers, 0: unrolled")
    p.add_argument("--attention", default=None, choices=["xla", "cudnn"],
                   help="JAX attention (default: cudnn on a GPU, xla on a CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed windows")
    p.add_argument("--quick", action="store_true", help="fewer iterations")
    p.add_argument("--tiny", action="store_true",
                   help="DiT-S/2 at 32 px, batch 2, one window: checks that the script runs")
    p.add_argument("--json", default=None, help="output path (default bench/results/)")
    p.add_argument("--compile-model", default=None, help="of the compile section (default DiT-XL/2)")
    p.add_argument("--compile-batch", type=int, default=None, help="of the compile section")
    p.add_argument("--worker", choices=workers, help=argparse.SUPPRESS)
    p.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    for flag, kind in (("--model", str), ("--inner", int), ("--out", str)):
        p.add_argument(flag, type=kind, help=argparse.SUPPRESS)
    return p


def begin(p: argparse.ArgumentParser, argv, workers: dict[str, Callable], benchmark: str,
          defaults: Callable[[str], dict], **config):
    """Parse the command line; in a worker (--worker NAME) run it, write its row and return None.
    In the parent: (args, platform, settings, report, the worker flags every row shares).
    Settings: the device's `defaults` (with "iters": (quick, full) windows), then --tiny's, then
    the flags given."""
    args = p.parse_args(argv)
    if args.worker:
        args.scan_blocks = bool(args.scan_blocks)
        row = workers[args.worker](args)
        Path(args.out).write_text(json.dumps(row, indent=2, default=_jsonable))
        return None
    platform = detect_platform()
    s = {**defaults(platform), "image_size": 256}
    quick, full = s.pop("iters")
    s.update({k: v for k, v in TINY.items() if args.tiny and k in s})
    for key in s:
        given = None if key == "inner" else getattr(args, key, None)
        if given is not None:
            s[key] = given.split(",") if isinstance(s[key], list) else given
    s["iters"] = args.iters or (1 if args.tiny else quick if args.quick else full)
    report = {"benchmark": benchmark, "platform": platform, **environment(),
              "config": {**s, "scan_blocks": bool(args.scan_blocks), **config}, "rows": []}
    shared = ["--image-size", str(s["image_size"]), "--scan-blocks",
              str(args.scan_blocks), *(["--attention", args.attention] if args.attention else [])]
    return args, platform, s, report, shared


def run_worker(script: Path, args: Sequence[str], *, platform: str,
               mem_fraction: float | None = None) -> dict[str, Any]:
    """Run `script --worker ... --out FILE`, return the JSON it wrote, or {"error": ...} with the
    tail of its output when it failed (one failed row does not end the benchmark)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        proc = subprocess.run([sys.executable, str(script), *args, "--out", str(out)],
                              env=worker_env(platform, mem_fraction=mem_fraction), cwd=ROOT,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stdout + proc.stderr)[-3000:].strip()
            print(f"worker failed ({' '.join(args)}):\n{tail}", file=sys.stderr)
            return {"error": tail.splitlines()[-1] if tail else f"exit {proc.returncode}"}
        return json.loads(out.read_text())


def compare(script: Path, sides: Sequence[tuple[str, list[str]]], base: list[str], *,
            platform: str, images: int, flops: float, dtype: str, model: str, **fields
            ) -> list[dict]:
    """One worker per side (label, worker args) for `model`, all given `base`; each row gets
    `fields`, its throughput (`images` and model `flops` per timed call; MFU against the device's
    dense peak for the row's precision, float32 meaning TF32 on NVIDIA GPUs; none on a CPU) and
    the first row's (JAX's) speedup over it."""
    from dit_jax.flops import peak_flops_per_device
    rows = []
    for label, side in sides:
        row = run_worker(script, [*side, *base, "--model", model], platform=platform)
        row.setdefault("variant", label)
        row.update(fields, model=model, side=label, dtype=dtype)
        if "timing" in row:
            seconds, precision = row["timing"]["median_s"], row.get("precision", "")
            peak = None if precision == "fp32" else peak_flops_per_device(  # fp32: TF32 off
                row["device"]["kind"], row["device"]["platform"],
                dtype="float32" if precision == "fp32+tf32" else dtype)
            row.update(ms=seconds * 1e3, min_ms=row["timing"]["min_s"] * 1e3,
                       images_per_s=images / seconds, tflops=flops / seconds / 1e12,
                       mfu=None if peak is None else flops / seconds / peak)
        rows.append(row)
    for row in rows[1:]:
        if "images_per_s" in row and "images_per_s" in rows[0]:
            row["jax_speedup"] = rows[0]["images_per_s"] / row["images_per_s"]
            rows[0]["jax_speedup_vs_" + row["side"].replace(" ", "_")] = row["jax_speedup"]
    return rows


def compile_section(script: Path, jobs: Sequence[tuple[dict, list[str]]], shared: list[str], s,
                    platform: str, what: str, columns=()) -> tuple[list[dict], str]:
    """The compile-time rows: per job (fields, worker flags) a --compile-only JAX worker of the
    compile model and batch in bfloat16 (abstract inputs: nothing allocated or run, so XL/2
    compiles on any machine); returns the rows and their table."""
    rows = []
    for fields, flags in jobs:
        row = run_worker(script, ["--worker", "jax", "--compile-only", *shared, "--model",
                                  s["compile_model"], "--batch", str(s["compile_batch"]),
                                  "--dtype", "bfloat16", *flags], platform=platform)
        rows.append({"model": s["compile_model"], **row, **fields,
                     "device_kind": device_kind([row], platform)})
    return rows, print_table(f"{what} compile time (lower + compile, abstract inputs), batch "
                             f"{s['compile_batch']}, bfloat16", rows, [*columns, *COMPILE_COLUMNS])


def forward_flops_per_image(name: str, image_size: int = 256, **overrides) -> float:
    """2 × the paper's multiply-accumulates (dit_jax/flops.py)."""
    from dit_jax.flops import forward_macs
    from dit_jax.models.dit import DIT_CONFIGS, DiTConfig
    return 2.0 * forward_macs(DiTConfig(input_size=image_size // 8, **DIT_CONFIGS[name],
                                        **overrides))


# ----------------------------------------------------------------------------------------------
# Timing and memory


def measure(run: Callable[[], Any], sync: Callable[[Any], Any], *, iters: int,
            inner: int | None = 1, warmup: int = 1) -> dict[str, float]:
    """Seconds per call of `run` after `warmup` calls: `iters` windows of `inner` calls, one
    synchronisation per window (on a GPU the host queues ahead, as in a real loop). Median and
    minimum over windows (noise only ever adds time)."""
    inner = inner or 1
    for _ in range(warmup):
        sync(run())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        sync([run() for _ in range(inner)][-1])
        times.append((time.perf_counter() - start) / inner)
    return {"median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "iters": iters, "inner": inner}


def max_rss_gb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def is_oom(error: BaseException) -> bool:
    text = str(error).lower()
    return "resource_exhausted" in text or "out of memory" in text


# ----------------------------------------------------------------------------------------------
# The PyTorch side: diffusers' DiTTransformer2DModel computing the official function


def torch_dit(name: str, *, image_size: int = 256, device: str = "cpu", seed: int = 0,
              weight_std: float = 0.02, learn_sigma: bool = True):
    """diffusers' DiTTransformer2DModel in the shape of official `name`, patched to the official
    numerics (as tests/test_model.py does), in eval mode (labels are dropped outside the model,
    once per batch, as the JAX step does; in train mode diffusers would drop them independently
    in every block). learn_sigma=False: ε only (4 output channels).

    Every block shares block 0's timestep/label embedders (diffusers keeps a copy per block), so
    AdamW and the EMA update the official parameter count. Every parameter N(0, weight_std²), so
    that no layer outputs zeros (the official init zeroes the adaLN and final layers)."""
    import diffusers
    import torch

    from dit_jax.models.dit import DIT_CONFIGS
    cfg = DIT_CONFIGS[name]
    heads = cfg["num_heads"]
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=cfg["hidden_size"] // heads, in_channels=4,
        out_channels=8 if learn_sigma else 4, num_layers=cfg["depth"], sample_size=image_size // 8,
        patch_size=cfg["patch_size"], num_embeds_ada_norm=1000)
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks:
        block.norm1.emb = shared
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        block.norm3.eps = 1e-6
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():  # pos_embed is a buffer: it keeps its sin-cos table
            param.copy_(torch.randn(param.shape, generator=generator) * weight_std)
    return model.eval().to(device)


def torch_setup(*, tf32: bool = False) -> tuple[str, Callable[[Any], None]]:
    """Threads = cores on a CPU (PyTorch's default may be fewer); TF32 matmuls on a GPU only when
    asked (the official train.py turns them on). Returns the torch device and its `sync`."""
    import torch
    if detect_platform() == "gpu":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        return "cuda", lambda _: torch.cuda.synchronize()
    torch.set_num_threads(os.cpu_count() or 1)
    return "cpu", lambda _: None


def torch_inputs(batch: int, image_size: int, device: str, dtype=None):
    """Latents x (NCHW), timesteps t and labels y, drawn on the host with a fixed seed."""
    import torch
    generator = torch.Generator().manual_seed(1)
    side = image_size // 8
    x = torch.randn(batch, 4, side, side, generator=generator).to(device, dtype)
    t, y = (torch.randint(0, 1000, (batch,), generator=generator).to(device) for _ in range(2))
    return x, t, y


def torch_row(device: str) -> dict[str, Any]:
    """The device and the peak memory (allocator peak on a GPU, RSS on a CPU) of a torch row."""
    import torch
    if device == "cuda":
        return {"device": {"kind": torch.cuda.get_device_name(), "platform": "gpu", "count": 1},
                "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30}
    return {"device": {"kind": cpu_model(), "platform": "cpu", "count": 1,
                       "threads": torch.get_num_threads()}, "peak_memory_gb": max_rss_gb()}


# ----------------------------------------------------------------------------------------------
# The JAX side


def jax_row(compiled=None) -> dict[str, Any]:
    """The device, the peak memory (allocator peak on an accelerator, RSS on a CPU: XLA:CPU keeps
    no allocator statistics) and XLA's memory analysis of `compiled` for a JAX row."""
    import jax
    stats, platform = jax.devices()[0].memory_stats() or {}, jax.default_backend()
    row = {"device": {"kind": cpu_model() if platform == "cpu" else jax.devices()[0].device_kind,
                      "platform": platform, "count": jax.device_count()},
           "peak_memory_gb": stats.get("peak_bytes_in_use", 0) / 2**30 or max_rss_gb()}
    if compiled is not None:
        row["compiled_memory"] = compiled_memory_gb(compiled)
    return row


def compiled_memory_gb(compiled) -> dict[str, float] | None:
    """XLA's own account of a compiled program's memory: arguments, outputs, temporaries (the
    activations), minus what donation lets outputs reuse."""
    try:
        a = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if a is None:
        return None
    sizes = {"arguments_gb": a.argument_size_in_bytes, "outputs_gb": a.output_size_in_bytes,
             "temporaries_gb": a.temp_size_in_bytes, "aliased_gb": a.alias_size_in_bytes}
    sizes["total_gb"] = sum(sizes.values()) - 2 * a.alias_size_in_bytes
    return {k: v / 2**30 for k, v in sizes.items()}


def random_params(params, seed: int = 0, std: float = 0.02):
    """Every floating parameter N(0, std²): a fresh DiT outputs exactly zero (adaLN-Zero), which
    would let a benchmark measure a degenerate model."""
    import jax
    import jax.numpy as jnp
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [
        jax.random.normal(k, a.shape, a.dtype) * std if jnp.issubdtype(a.dtype, jnp.floating)
        else a for k, a in zip(keys, leaves)])


def jax_attention(args) -> str:
    import jax
    return args.attention or ("cudnn" if jax.default_backend() == "gpu" else "xla")


def with_cudnn_fallback(build: Callable[[str], Any], args, row: dict[str, Any]):
    """build(the attention of `args`), or build("xla") when cuDNN cannot compile it (a shape it
    rejects, a missing library); the fallback is recorded in `row`."""
    row["attention"] = attention = jax_attention(args)
    try:
        return build(attention)
    except Exception as error:  # noqa: BLE001
        if attention != "cudnn" or is_oom(error):
            raise
        row["attention"] = "xla"
        row["attention_fallback"] = f"cudnn failed: {str(error).splitlines()[0][:200]}"
        return build("xla")


# ----------------------------------------------------------------------------------------------
# Output

# The columns of a throughput table after its row labels, and of a compile-time section.
THROUGHPUT_COLUMNS = [("images_per_s", "images/s", ".2f"), ("tflops", "TFLOP/s", ".3f"),
                      ("mfu", "MFU", ".1%"), ("jax_speedup", "JAX ×", ".2f"),
                      ("compile_s", "compile s", ".1f"), ("peak_memory_gb", "peak mem GB", ".2f")]
COMPILE_COLUMNS = [("model", "model", ""), ("device_kind", "compiled on", ""),
                   ("scan_blocks", "scan", ""), ("attention", "attention", ""),
                   ("lower_s", "lower s", ".1f"), ("compile_s", "compile s", ".1f"),
                   ("total_s", "total s", ".1f")]


def row_columns(label: str, ms_header: str, ms_spec: str, *extra) -> list[tuple[str, str, str]]:
    """The columns of a throughput table: the row's `label` key, its implementation, the median
    time (`ms_header`), `extra` columns, then THROUGHPUT_COLUMNS."""
    return [(label, label, ""), ("variant", "implementation", ""), ("ms", ms_header, ms_spec),
            *extra, *THROUGHPUT_COLUMNS]


def device_kind(rows: Sequence[dict], platform: str) -> str:
    return next((r["device"]["kind"] for r in rows if "device" in r), platform)


def print_table(title: str, rows: list[dict[str, Any]], columns: Sequence[tuple[str, str, str]]
                ) -> str:
    """A Markdown table of `rows`; columns are (key, header, format spec). Returns the text."""
    def cell(value, spec):
        return "-" if value is None else format(value, spec) if isinstance(value, float) else str(value)

    lines = [f"### {title}", "", "| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(k), spec) for k, _, spec in columns) + " |"
              for row in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    return text


def _jsonable(value):
    return value.item() if hasattr(value, "item") else str(value)


def write_report(name: str, report: dict[str, Any], json_path: str | None) -> Path:
    """bench/results/<name>_<platform>.json unless a path is given."""
    path = Path(json_path) if json_path else RESULTS / f"{name}_{report.get('platform', 'cpu')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path
