"""What the benchmarks share: the device and XLA flags, the run's environment record, timing,
FLOP and peak figures, the PyTorch reference model and loss, and the table / JSON output.

Every benchmark runs each measured configuration in a worker subprocess of its own (the same
script with `--worker ...`): one framework per process, so JAX's and PyTorch's allocators never
share a GPU, the peak memory of a row is that row's alone, and JAX's and PyTorch's thread pools
never compete on a CPU. The parent collects the rows and computes the ratios, so every ratio comes
from one invocation on one machine.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform as pyplatform
import resource
import shutil
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

# XLA:CPU: none. Every flag tried on the 2-core AMD EPYC (Zen 5) of BENCHMARKS.md (oneDNN dots,
# no XNNPACK, XNN graph fusion, 512-bit vectors) moved the times by less than the noise.
CPU_XLA_FLAGS: tuple[str, ...] = ()

# glibc malloc backs large allocations with transparent huge pages. XLA:CPU takes a fresh
# temporary buffer for every execution (hundreds of MB for a train step), and on a VM every 4 KiB
# first-touch page fault is expensive: this cuts the JAX train step by 10-15% and leaves PyTorch
# unchanged or slightly faster. Applied to both frameworks' workers alike.
CPU_GLIBC_TUNABLES = "glibc.malloc.hugetlb=1"

# XLA:GPU, single device. The latency-hiding scheduler overlaps independent work (collectives on
# a mesh, async copies on one device); it is what NVIDIA's JAX containers set by default. Flags
# are kept to ones every jaxlib GPU build knows: an unknown flag aborts the process.
GPU_XLA_FLAGS: tuple[str, ...] = ("--xla_gpu_enable_latency_hiding_scheduler=true",)


def detect_platform() -> str:
    """"gpu" or "cpu", without importing JAX (which would freeze XLA_FLAGS): JAX_PLATFORMS if
    set, else whether an NVIDIA device is visible."""
    requested = os.environ.get("BENCH_PLATFORM") or os.environ.get("JAX_PLATFORMS", "")
    first = requested.split(",")[0].strip().lower()
    if first in ("cuda", "gpu", "rocm"):
        return "gpu"
    if first == "cpu":
        return "cpu"
    if Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists():
        return "gpu"
    if shutil.which("nvidia-smi"):
        try:
            return "gpu" if subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20
                                           ).returncode == 0 else "cpu"
        except (OSError, subprocess.TimeoutExpired):
            return "cpu"
    return "cpu"


def worker_env(platform: str, *, xla_flags: bool = True, mem_fraction: float | None = None
               ) -> dict[str, str]:
    """Environment of a worker: the platform's XLA flags appended to any the user set (the
    user's come last, so they win), and GPU memory settings."""
    env = dict(os.environ)
    env["BENCH_PLATFORM"] = platform
    if xla_flags:
        user = env.get("XLA_FLAGS", "")
        flags = [f for f in (CPU_XLA_FLAGS if platform == "cpu" else GPU_XLA_FLAGS)
                 if f.split("=")[0] not in user]
        env["XLA_FLAGS"] = " ".join([*flags, user]).strip()
    if platform == "cpu":
        # A CPU worker on a GPU machine (the same-function check) must not pick the GPU.
        env.setdefault("JAX_PLATFORMS", "cpu")
    if platform == "cpu" and "glibc.malloc.hugetlb" not in env.get("GLIBC_TUNABLES", ""):
        env["GLIBC_TUNABLES"] = ":".join(
            t for t in (CPU_GLIBC_TUNABLES, env.get("GLIBC_TUNABLES", "")) if t)
    if platform == "gpu" and mem_fraction is not None:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{mem_fraction:.2f}"
    # The parent's thread settings would otherwise leak into the worker's pools.
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(key, None)
    return env


# ----------------------------------------------------------------------------------------------
# The environment of a run


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    """Short commit of the repository, with "+dirty" when tracked files differ from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return pyplatform.processor() or pyplatform.machine()


def environment() -> dict[str, Any]:
    """Date, commit, host and library versions (read from package metadata, so the parent
    imports neither framework)."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "host": {"cpu": cpu_model(), "cores": os.cpu_count(), "machine": pyplatform.machine(),
                 "load_average_1m": os.getloadavg()[0]},
        "versions": {"python": pyplatform.python_version(),
                     **{name: _version(name) for name in (
                         "jax", "jaxlib", "flax", "optax", "numpy", "torch", "diffusers")}},
        "xla_flags": {"cpu": list(CPU_XLA_FLAGS), "gpu": list(GPU_XLA_FLAGS),
                      "user": os.environ.get("XLA_FLAGS", "")},
        "cpu_glibc_tunables": CPU_GLIBC_TUNABLES,
    }


# ----------------------------------------------------------------------------------------------
# Timing


def measure(run: Callable[[], Any], sync: Callable[[Any], Any], *, warmup: int, iters: int,
            inner: int = 1) -> dict[str, float]:
    """Seconds per call of `run` after `warmup` calls: `iters` windows of `inner` back-to-back
    calls with one synchronisation at the end of each window (so on a GPU the host queues the
    next call while the device works, as in a real loop). Median and minimum over windows; on a
    shared machine noise only ever adds time, so the minimum bounds the quiet-machine figure."""
    for _ in range(warmup):
        sync(run())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        out = None
        for _ in range(inner):
            out = run()
        sync(out)
        times.append((time.perf_counter() - start) / inner)
    return {"median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "iters": iters, "inner": inner}


def max_rss_gb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ----------------------------------------------------------------------------------------------
# FLOPs and peaks


def model_config(name: str, image_size: int = 256, **overrides):
    from dit_jax.models.dit import DIT_CONFIGS, DiTConfig
    return DiTConfig(input_size=image_size // 8, **DIT_CONFIGS[name], **overrides)


def forward_flops_per_image(name: str, image_size: int = 256) -> float:
    """2 × the paper's multiply-accumulates (SPEC §4)."""
    from dit_jax.flops import forward_macs
    return 2.0 * forward_macs(model_config(name, image_size))


def peak_flops(device_kind: str, platform: str, precision: str) -> float | None:
    """Dense peak FLOP/s of one device for `precision` ("bf16", or "tf32": float32 matmuls at
    JAX's and PyTorch-with-TF32's default), or None on a CPU or an unknown device."""
    from dit_jax.flops import peak_flops_per_device
    if precision not in ("bf16", "tf32"):
        return None
    return peak_flops_per_device(device_kind, platform,
                                 dtype="bfloat16" if precision == "bf16" else "float32")


def throughput_fields(images_per_step: float, seconds: float, flops_per_step: float,
                      peak: float | None) -> dict[str, Any]:
    achieved = flops_per_step / seconds
    return {"images_per_s": images_per_step / seconds, "tflops": achieved / 1e12,
            "mfu": None if peak is None else achieved / peak}


# ----------------------------------------------------------------------------------------------
# Workers


def run_worker(script: Path, args: Sequence[str], *, platform: str, timeout: float | None = None,
               mem_fraction: float | None = None) -> dict[str, Any]:
    """Run `script --worker ... --out FILE`, return the JSON it wrote, or {"error": ...} with the
    tail of its output when it failed (one failed row does not end the benchmark)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(script), *args, "--out", str(out)]
        try:
            proc = subprocess.run(cmd, env=worker_env(platform, mem_fraction=mem_fraction),
                                  cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s"}
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stdout + proc.stderr)[-3000:]
            print(f"worker failed ({' '.join(args)}):\n{tail}", file=sys.stderr)
            return {"error": tail.strip().splitlines()[-1] if tail.strip() else f"exit {proc.returncode}"}
        return json.loads(out.read_text())


def write_worker_result(path: str, row: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(row, indent=2, default=_jsonable) + "\n")


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# ----------------------------------------------------------------------------------------------
# The PyTorch reference: diffusers' DiTTransformer2DModel computing the official function


def torch_dit(name: str, *, image_size: int = 256, device: str = "cpu", seed: int = 0,
              weight_std: float | None = 0.02):
    """diffusers' DiTTransformer2DModel in the shape of official `name`, patched to the official
    numerics (SPEC §1), in eval mode (labels are dropped outside the model, once per batch, as
    the JAX step does; in train mode diffusers would drop them independently in every block).

    diffusers keeps a copy of the timestep/label embedders in every block; here every block shares
    block 0's, so the model has exactly the official parameters (AdamW and the EMA update the
    official count) and real checkpoints, which hold identical copies, load unchanged.
    `weight_std`: every parameter N(0, std²), so that no layer outputs zeros (the official init
    zeroes the adaLN and final layers); None keeps diffusers' init."""
    import diffusers
    import torch

    from dit_jax.models.dit import DIT_CONFIGS
    cfg = DIT_CONFIGS[name]
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=cfg["num_heads"], attention_head_dim=cfg["hidden_size"] // cfg["num_heads"],
        in_channels=4, out_channels=8, num_layers=cfg["depth"], sample_size=image_size // 8,
        patch_size=cfg["patch_size"], num_embeds_ada_norm=1000)
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks:
        block.norm1.emb = shared
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        block.norm3.eps = 1e-6
    if weight_std is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():  # pos_embed is a buffer: it keeps its sin-cos table
                param.copy_(torch.randn(param.shape, generator=generator) * weight_std)
    return model.eval().to(device)


def torch_to_jax(torch_model, name: str, image_size: int = 256, **overrides):
    """The JAX DiT with the same weights as a `torch_dit` model (official numerics)."""
    import numpy as np
    import torch

    from dit_jax.models.dit import DIT_CONFIGS, sincos_2d
    from dit_jax.port.dit import diffusers_to_official, from_torch
    cfg = DIT_CONFIGS[name]
    state = {k: v.detach().float().cpu().numpy() for k, v in torch_model.state_dict().items()}
    official = diffusers_to_official(state, cfg["depth"])
    grid = (image_size // 8 // cfg["patch_size"],) * 2
    official["pos_embed"] = sincos_2d(cfg["hidden_size"], grid).astype(np.float32)[None]
    return from_torch({k: torch.from_numpy(v) for k, v in official.items()},
                      num_heads=cfg["num_heads"], **overrides)


def torch_diffusion_tables(device: str):
    """The float32 tables of the training diffusion (1000 linear steps), on `device`."""
    import numpy as np
    import torch

    from dit_jax.diffusion import create_diffusion
    diffusion = create_diffusion("")
    names = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
             "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2",
             "posterior_log_variance_clipped", "log_betas")
    return {n: torch.from_numpy(np.array(diffusion.tables32[n])).to(device) for n in names}


def torch_training_loss(model, tables, x0, t, y, noise, *, autocast_dtype=None):
    """The official hybrid loss (MSE on ε + VB in bits on the variance, ε frozen in the VB term),
    batch mean; NCHW. The model runs under autocast when `autocast_dtype` is given; the loss
    arithmetic stays float32, as in the JAX step."""
    import torch

    def gather(name):
        return tables[name][t].view(-1, 1, 1, 1)

    x_t = gather("sqrt_alphas_cumprod") * x0 + gather("sqrt_one_minus_alphas_cumprod") * noise
    if autocast_dtype is None:
        out = model(x_t, t, y).sample
    else:
        with torch.autocast(x0.device.type, dtype=autocast_dtype):
            out = model(x_t, t, y).sample
    out = out.float()
    channels = x0.shape[1]
    eps, values = out[:, :channels], out[:, channels:]

    pred_x0 = (gather("sqrt_recip_alphas_cumprod") * x_t
               - gather("sqrt_recipm1_alphas_cumprod") * eps.detach())
    coef1, coef2 = gather("posterior_mean_coef1"), gather("posterior_mean_coef2")
    model_mean = coef1 * pred_x0 + coef2 * x_t
    min_log, max_log = gather("posterior_log_variance_clipped"), gather("log_betas")
    frac = (values + 1) / 2
    model_log_var = frac * max_log + (1 - frac) * min_log
    true_mean = coef1 * x0 + coef2 * x_t
    kl = 0.5 * (-1.0 + model_log_var - min_log + torch.exp(min_log - model_log_var)
                + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var))
    kl = kl.mean(dim=(1, 2, 3))
    nll = -_discretized_log_likelihood(x0, model_mean, 0.5 * model_log_var).mean(dim=(1, 2, 3))
    vb = torch.where(t == 0, nll, kl) / math.log(2.0)
    mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
    return (mse + vb).mean()


def _discretized_log_likelihood(x, means, log_scales):
    import torch

    def cdf(v):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))

    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def torch_setup(platform: str, *, tf32: bool = False) -> str:
    """Threads = cores on a CPU (PyTorch's default may be fewer); TF32 matmuls on a GPU only when
    asked (the official train.py turns them on). Returns the torch device."""
    import torch
    if platform == "gpu":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        return "cuda"
    torch.set_num_threads(os.cpu_count() or 1)
    return "cpu"


def torch_sync(device: str) -> Callable[[Any], None]:
    import torch
    if device == "cuda":
        return lambda _: torch.cuda.synchronize()
    return lambda _: None


def torch_device_info(device: str) -> dict[str, Any]:
    import torch
    if device == "cuda":
        return {"kind": torch.cuda.get_device_name(), "platform": "gpu", "count": 1}
    return {"kind": cpu_model(), "platform": "cpu", "count": 1,
            "threads": torch.get_num_threads()}


def torch_peak_memory_gb(device: str) -> float:
    import torch
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return max_rss_gb()


# ----------------------------------------------------------------------------------------------
# JAX helpers


def jax_device_info() -> dict[str, Any]:
    import jax
    device = jax.devices()[0]
    info = {"kind": device.device_kind, "platform": jax.default_backend(),
            "count": jax.device_count()}
    if info["platform"] == "cpu":
        info["kind"] = cpu_model()
    return info


def jax_peak_memory_gb() -> float:
    """Peak device memory of this process on an accelerator, peak RSS on a CPU (XLA:CPU keeps
    no allocator statistics)."""
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30
    return max_rss_gb()


def device_memory_limit() -> int | None:
    """Bytes XLA's allocator may use on the first device; None on a CPU."""
    import jax
    return (jax.devices()[0].memory_stats() or {}).get("bytes_limit")


def compiled_memory_gb(compiled) -> dict[str, float] | None:
    """XLA's own account of a compiled program's memory: arguments, outputs, temporaries (the
    activations), minus what donation lets outputs reuse."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if analysis is None:
        return None
    gb = lambda b: b / 2**30  # noqa: E731
    return {"arguments_gb": gb(analysis.argument_size_in_bytes),
            "outputs_gb": gb(analysis.output_size_in_bytes),
            "temporaries_gb": gb(analysis.temp_size_in_bytes),
            "aliased_gb": gb(analysis.alias_size_in_bytes),
            "total_gb": gb(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                           + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)}


def random_params(params, seed: int = 0, std: float = 0.02):
    """Every floating parameter N(0, std²): a fresh DiT outputs exactly zero (adaLN-Zero), which
    would let a benchmark measure a degenerate model."""
    import jax
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [
        jax.random.normal(k, a.shape, a.dtype) * std if jax.numpy.issubdtype(a.dtype, jax.numpy.floating)
        else a for k, a in zip(keys, leaves)])


def is_oom(error: BaseException) -> bool:
    text = str(error).lower()
    return "resource_exhausted" in text or "out of memory" in text


# ----------------------------------------------------------------------------------------------
# Output


def fmt(value, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return format(value, spec)
    return str(value)


def print_table(title: str, rows: list[dict[str, Any]], columns: Sequence[tuple[str, str, str]]
                ) -> str:
    """A Markdown table of `rows`; columns are (key, header, format spec). Returns the text."""
    lines = [f"### {title}", "", "| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k), spec) for k, _, spec in columns) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    return text


def write_report(name: str, report: dict[str, Any], json_path: str | None) -> Path:
    """bench/results/<name>_<platform>.json unless a path is given."""
    platform = report.get("platform", "cpu")
    path = Path(json_path) if json_path else RESULTS / f"{name}_{platform}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path
