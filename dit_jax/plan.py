"""Compile/memory plans for accelerators this machine does not have.

    python -m dit_jax.plan --target=v5e-256 --config=configs/dit.py:XL/2 \\
        --config.mesh.fsdp=16 [--config.key=value ...] [--json=plan.json] \\
        [--search=batch,remat] [--sample]

The train step is built exactly as train.py builds it (the same state, optimiser, step and
shardings from dit_jax.train and dit_jax.sharding) and compiled ahead of time for TARGET's
devices, which JAX describes without the hardware: TPU slices through libtpu's compile-only
topologies (the `tpu` extra), NVIDIA GPU nodes through the CUDA plugin's deviceless compiler (the
`cuda` extra). The compiled program then tells, per device: its argument, output and temporary
bytes and so the peak; the collectives XLA put in it. With the analytic model FLOPs
(dit_jax.flops) and the device figures below, a plan gives the compute-bound step time and the
bandwidth-bound time of the collectives. These are compiler figures, not measurements: see
docs/plan.md for what they mean and what they do not.

Targets: v4-N and v5p-N (N counts TensorCores, two per chip: v4-8 is 4 chips), v5e-N and v6e-N
(N counts chips), K×slice as `2xv5e-256`, and GPU nodes of 8: h100-8, h200-8, a100-8, K nodes as
`4xh100-8`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

GiB = 1024 ** 3

# --------------------------------------------------------------------------------------------
# Device figures. Peak dense bf16 FLOP/s per device come from dit_jax.flops (PEAK_TFLOPS).
#
# | device | memory / device | link used by collectives inside a slice or node | between slices or nodes | source |
# |---|---|---|---|---|
# | TPU v4  | 32 GiB  | ICI 6 links × 50 GB/s each way: 300 GB/s per direction | DCN 50 Gb/s per chip (assumed as v5p; not published for v4) | cloud.google.com/tpu/docs/v4; TPU v4 paper (Jouppi et al., ISCA 2023) |
# | TPU v5e | 16 GiB  | ICI 400 GB/s bidirectional: 200 GB/s per direction | DCN 2 × 100 Gb/s per 8-chip host: 25 Gb/s per chip | cloud.google.com/tpu/docs/v5e |
# | TPU v5p | 95 GiB  | ICI 1200 GB/s bidirectional: 600 GB/s per direction | DCN 50 Gb/s per chip | cloud.google.com/tpu/docs/v5p |
# | TPU v6e | 32 GiB  | ICI 800 GB/s bidirectional: 400 GB/s per direction | DCN 25.6 Tb/s per 256-chip pod: 100 Gb/s per chip | cloud.google.com/tpu/docs/v6e |
# | H100 SXM | from the target config (79.1 GiB) | NVLink 4: 900 GB/s bidirectional, 450 GB/s per direction | InfiniBand NDR 400 Gb/s per GPU (DGX H100) | NVIDIA H100 datasheet, DGX H100 user guide |
# | H200 SXM | from the target config (~140 GiB) | NVLink 4: 450 GB/s per direction | InfiniBand NDR 400 Gb/s per GPU | NVIDIA H200 datasheet |
# | A100 SXM 80GB | from the target config (79.2 GiB) | NVLink 3: 600 GB/s bidirectional, 300 GB/s per direction | InfiniBand HDR 200 Gb/s per GPU (DGX A100) | NVIDIA A100 datasheet, DGX A100 user guide |
#
# "Per direction" is the rate one device can send (and at the same time receive) over all its
# links; the estimate assumes a collective keeps every link busy (ring/torus algorithms do, for
# large messages), so it is a lower bound on the time of each collective.


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    topology_prefix: str  # libtpu's topology name prefix
    dims: int  # 2-D (v5e, v6e) or 3-D (v4, v5p) torus
    cores_per_name_unit: int  # v4-8 names 8 TensorCores = 4 chips; v5e-8 names 8 chips
    memory_bytes: int
    link_bytes_per_s: float  # ICI, per direction, per chip
    dcn_bytes_per_s: float  # between slices, per chip
    chip_config_name: str | None = None


TPU_GENERATIONS = {
    "v4": TpuGeneration("v4", 3, 2, 32 * GiB, 300e9, 50e9 / 8, "megacore"),
    "v5p": TpuGeneration("v5", 3, 2, 95 * GiB, 600e9, 50e9 / 8),
    "v5e": TpuGeneration("v5e", 2, 1, 16 * GiB, 200e9, 25e9 / 8),
    "v6e": TpuGeneration("v6e", 2, 1, 32 * GiB, 400e9, 100e9 / 8),
}

# Chip grids of the slice shapes Cloud TPU offers (cloud.google.com/tpu/docs, per generation).
_GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
             256: "16x16"}
_GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
             256: "4x8x8", 512: "8x8x8"}


@dataclasses.dataclass(frozen=True)
class GpuModel:
    description: str  # device_description_str of the XLA target config
    link_bytes_per_s: float  # NVLink, per direction
    network_bytes_per_s: float  # between nodes, per GPU


GPU_MODELS = {
    "h100": GpuModel("NVIDIA H100 80GB HBM3", 450e9, 400e9 / 8),
    "h200": GpuModel("NVIDIA H200 141GB HBM3e", 450e9, 400e9 / 8),
    "a100": GpuModel("NVIDIA A100-SXM4-80GB", 300e9, 200e9 / 8),
}
GPUS_PER_NODE = 8


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "tpu" or "cuda"
    generation: str  # "v5e", ..., "h100", ...
    chips: int  # JAX devices in all
    groups: int  # slices (TPU) or nodes (GPU)
    topology: str  # libtpu topology name of one slice, or the CUDA plugin's "1xNODESxGPUS"


def parse_target(name: str) -> Target:
    """A Target from a name such as v5e-256, v4-8, 2xv5e-256, h100-8 or 4xh100-8."""
    match = re.fullmatch(r"(?:(\d+)x)?([a-z0-9]+)-(\d+)", name.strip().lower())
    if not match:
        raise ValueError(f"--target={name!r}: expected a name such as v5e-256, v4-8, 2xv5e-256, "
                         f"h100-8 or 4xh100-8")
    groups, generation, size = int(match.group(1) or 1), match.group(2), int(match.group(3))
    if generation in TPU_GENERATIONS:
        gen = TPU_GENERATIONS[generation]
        chips, rem = divmod(size, gen.cores_per_name_unit)
        grids = _GRIDS_3D if gen.dims == 3 else _GRIDS_2D
        if rem or chips not in grids:
            unit = "TensorCores (2 per chip)" if gen.cores_per_name_unit == 2 else "chips"
            sizes = sorted(c * gen.cores_per_name_unit for c in grids)
            raise ValueError(f"--target={name!r}: {generation}-N counts {unit}; N must be one of "
                             f"{sizes}")
        return Target(name, "tpu", generation, chips * groups, groups,
                      f"{gen.topology_prefix}:{grids[chips]}")
    if generation in GPU_MODELS:
        if size != GPUS_PER_NODE:
            raise ValueError(f"--target={name!r}: GPU targets are nodes of {GPUS_PER_NODE} "
                             f"({generation}-8, or 4x{generation}-8 for four nodes)")
        return Target(name, "cuda", generation, size * groups, groups, f"1x{groups}x{size}")
    raise ValueError(f"--target={name!r}: unknown device {generation!r}; choose one of "
                     f"{sorted(TPU_GENERATIONS) + sorted(GPU_MODELS)}")


# --------------------------------------------------------------------------------------------
# Compile-only devices


def _missing(extra: str, what: str) -> RuntimeError:
    return RuntimeError(f"{what} is not installed: pip install 'dit_jax[{extra}]' (the `{extra}` "
                        f"extra) to plan for this target")


def target_devices(target: Target) -> list:
    """Compile-only JAX devices of `target` (no hardware needed)."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        if importlib.util.find_spec("libtpu") is None:
            raise _missing("tpu", "libtpu")
        gen = TPU_GENERATIONS[target.generation]
        kwargs = {"num_slices": target.groups} if target.groups > 1 else {}
        if gen.chip_config_name:
            kwargs["chip_config_name"] = gen.chip_config_name
        return list(topologies.get_topology_desc(
            platform="tpu", topology_name=target.topology, **kwargs).devices)
    # The deviceless CUDA compiler would refuse to start without a GPU driver otherwise.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    config = gpu_target_config(GPU_MODELS[target.generation].description)
    return list(topologies.get_topology_desc(
        platform="cuda", target_config=config, topology=target.topology).devices)


def gpu_target_config(description: str) -> str:
    """The XLA GpuTargetConfigProto text of a GPU model, as the installed CUDA plugin embeds it.

    The plugin is compiled with XLA's table of GPU specifications (one text proto per model:
    core counts, memory, cuDNN version...); reading it from the installed plugin keeps the text
    in step with the plugin's own XLA version, so the project ships no copy that could go stale.
    """
    spec = (importlib.util.find_spec("jax_plugins.xla_cuda12")
            or importlib.util.find_spec("jax_plugins.xla_cuda13"))
    if spec is None or not spec.submodule_search_locations:
        raise _missing("cuda", "the JAX CUDA plugin (jax-cuda12-plugin)")
    libraries = sorted(Path(spec.submodule_search_locations[0]).glob("*.so"))
    key = f'device_description_str: "{description}"'.encode()
    for library in libraries:
        data = library.read_bytes()
        at = data.find(key)
        if at >= 0:
            # Each embedded proto is one NUL-terminated string in the library's data.
            start, end = data.rfind(b"\0", 0, at) + 1, data.find(b"\0", at)
            text = data[start:end].decode("utf-8", "replace")
            if "gpu_device_info" in text:
                return text
    raise RuntimeError(f"the installed CUDA plugin ({', '.join(map(str, libraries))}) has no "
                       f"target config for {description!r}; upgrade jax-cuda12-plugin")


def device_memory_bytes(target: Target, devices) -> int:
    if target.platform == "tpu":
        return TPU_GENERATIONS[target.generation].memory_bytes
    text = gpu_target_config(GPU_MODELS[target.generation].description)
    return int(re.search(r"device_memory_size:\s*(\d+)", text).group(1))


# --------------------------------------------------------------------------------------------
# The train step of a config, compiled for a mesh


def run_model_config(config):
    """The DiTConfig train.py would build for `config`, without reading the data: latents of the
    VAE (image_size / 8, 4 channels) or pixels when vae is "none"; num_classes -1 means 1000."""
    from dit_jax.train.state import model_config_from

    pixel = config.vae == "none"
    side = config.data.image_size if pixel else config.data.image_size // 8
    classes = config.model.num_classes if config.model.num_classes >= 0 else 1000
    return model_config_from(config, num_classes=classes, in_channels=3 if pixel else 4,
                             input_size=side)


def compile_train_step(config, mesh, global_batch: int):
    """(compiled executable, model config, seconds to compile) of the train step of `config`
    for `global_batch` examples on `mesh`, built as train.py builds it (`lower_train_step`)."""
    import jax

    from dit_jax.models.dit import split_model
    from dit_jax.train.loop import _check_batch, make_objective
    from dit_jax.train.state import abstract_train_state, make_optimizer
    from dit_jax.train.step import StepConfig, lower_train_step

    config = config.copy_and_resolve_references()
    config.global_batch_size = global_batch
    _check_batch(config, mesh)
    model_cfg = run_model_config(config)
    tx, schedule = make_optimizer(config.optim, int(config.total_steps))
    with jax.set_mesh(mesh):
        graphdef, _, abstract_buffers = split_model(model_cfg)
        step_config = StepConfig(ema_decay=float(config.optim.ema_decay),
                                 accum_steps=int(config.optim.accum_steps))
        side, channels = model_cfg.input_size, model_cfg.in_channels
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            lowered, _, _ = lower_train_step(
                graphdef, make_objective(config, model_cfg), tx, schedule, step_config, mesh,
                abstract_state=abstract_train_state(model_cfg, tx), buffers=abstract_buffers,
                element_shape=(side, side, channels), global_batch=global_batch)
            lower_seconds = time.perf_counter() - start
            compiled = lowered.compile()
        except RuntimeError as err:
            if "cuDNN" not in str(err):
                raise
            raise RuntimeError(
                f"cuDNN attention cannot be lowered here ({err}): install the cuDNN library "
                f"(pip install 'jax[cuda12]') or plan with --config.model.attention_impl=xla"
                ) from None
        seconds = time.perf_counter() - start
        # CPU time of all of this process's threads: what the compile costs on an idle machine
        # (the wall time above also counts other programs sharing the cores).
        compiled._plan_cpu_seconds = time.process_time() - start_cpu
        compiled._plan_lower_seconds = lower_seconds  # of `seconds`: tracing and lowering
    return compiled, model_cfg, seconds


def compile_sampler(config, mesh, batch_size: int):
    """(compiled executable, seconds) of the guided sampler of `config` (sample.sampler,
    sample.steps, sample.cfg_scale) drawing `batch_size` latents on `mesh`: the program of
    sample.py and of the training sample grids, without the VAE decoder."""
    import jax
    import jax.numpy as jnp

    from dit_jax.models.dit import split_model
    from dit_jax.sampling import ChunkSampler
    from dit_jax.sharding import abstract_with_shardings, batch_sharding, state_shardings

    model_cfg = run_model_config(config)
    s = config.sample
    cfg_scale = float(s.cfg_scale) if model_cfg.class_dropout_prob > 0 else 1.0
    with jax.set_mesh(mesh):
        graphdef, params, buffers = split_model(model_cfg)
        sampler = ChunkSampler(graphdef, (params, buffers), mesh=mesh, batch_size=batch_size,
                               seed=0, sampler=s.sampler, steps=int(s.steps), cfg_scale=cfg_scale,
                               noise_schedule=config.diffusion.noise_schedule,
                               diffusion_steps=int(config.diffusion.diffusion_steps))
        weights = abstract_with_shardings((params, buffers),
                                          state_shardings((params, buffers), mesh))
        labels = jax.ShapeDtypeStruct((sampler.padded,), jnp.int32,
                                      sharding=batch_sharding(mesh, 1))
        start = time.perf_counter()
        # The sampler's jitted program itself (what its __call__ runs), traced abstractly.
        compiled = sampler._run.trace(weights, None, jax.ShapeDtypeStruct((), jnp.int32),
                                      labels).lower().compile()
        seconds = time.perf_counter() - start
    return compiled, seconds


def memory_of(compiled) -> dict[str, int]:
    """Bytes per device of the compiled program. The peak is what the program holds at once at
    worst: its arguments, its outputs that do not reuse a donated argument, and its temporaries."""
    stats = compiled.memory_analysis()
    out = {
        "argument_bytes_per_device": int(stats.argument_size_in_bytes),
        "output_bytes_per_device": int(stats.output_size_in_bytes),
        "alias_bytes_per_device": int(stats.alias_size_in_bytes),
        "temp_bytes_per_device": int(stats.temp_size_in_bytes),
        "code_bytes_per_device": int(stats.generated_code_size_in_bytes),
    }
    out["peak_bytes_per_device"] = (out["argument_bytes_per_device"]
                                    + out["output_bytes_per_device"]
                                    - out["alias_bytes_per_device"]
                                    + out["temp_bytes_per_device"]
                                    + out["code_bytes_per_device"])
    return out


def ideal_state_bytes_per_device(config, mesh, *, params_only: bool = False) -> int:
    """Bytes per device of the train state (or of its parameters alone) if each array's shards
    were exactly its size divided by the devices it is split over (no padding to memory tiles)."""
    import jax

    from dit_jax.sharding import state_shardings
    from dit_jax.train.state import abstract_train_state, make_optimizer

    model_cfg = run_model_config(config)
    tx, _ = make_optimizer(config.optim, int(config.total_steps))
    abstract = abstract_train_state(model_cfg, tx)
    shardings = state_shardings(abstract, mesh)
    if params_only:
        abstract, shardings = abstract.params, shardings.params
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        shard = sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


# --------------------------------------------------------------------------------------------
# Collectives in the compiled program

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_COMP = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*[\({]")


def _bytes_of(shape_text: str) -> int:
    return sum(_DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dt, dims in _SHAPE.findall(shape_text))


_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")


def _group_members(attrs: str, num_devices: int) -> list[int]:
    """Device (partition) ids of the first group of a collective, in any of XLA's notations:
    explicit lists {{0,1},{2,3}}, iota [groups,size]<=[dims]T(perm), or mesh axes
    mesh['data'=2,'fsdp'=4] {'fsdp'} (groups vary along the named axes, row-major ids)."""
    import numpy as np

    mesh = _MESH_GROUPS.search(attrs)
    if mesh:
        axes = [(name.strip().strip("'\""), int(size)) for name, size in
                (item.split("=") for item in mesh.group(1).split(",") if item.strip())]
        varying = {name.strip().strip("'\"") for name in mesh.group(2).split(",") if name.strip()}
        ids = np.arange(math.prod(size for _, size in axes)).reshape([size for _, size in axes])
        index = tuple(slice(None) if name in varying else 0 for name, _ in axes)
        return ids[index].reshape(-1).tolist()
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if iota:
        dims = [int(d) for d in iota.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if iota.group(4):
            ids = ids.transpose([int(p) for p in iota.group(4).split(",")])
        return ids.reshape(int(iota.group(1)), int(iota.group(2)))[0].tolist()
    groups = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    if groups and groups.group(1):
        return [int(i) for i in groups.group(1).split(",")]
    pairs = re.search(r"source_target_pairs=\{\{(\d+),(\d+)\}", attrs)
    if pairs:
        return [int(pairs.group(1)), int(pairs.group(2))]
    return list(range(num_devices))  # no groups: all devices


def _trip_count(line: str, computations: dict[str, list[str]]) -> int | None:
    """Iterations of a while loop: XLA's known_trip_count where given, else the integer bound its
    condition compares the counter with (what a scan lowers to: i < N from 0)."""
    count = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    if count:
        return int(count.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", line)
    body = computations.get(cond.group(1), []) if cond else []
    bounds = [int(c) for text in body for c in re.findall(r"s32\[\][^=]*constant\((\d+)\)", text)]
    if len(bounds) == 1 and any("direction=LT" in text for text in body):
        return bounds[0]
    return None


def collectives_of(hlo_text: str, num_devices: int, group_of_device=None) -> dict[str, Any]:
    """Count and bytes per device of each kind of collective in a compiled HLO module, each
    weighted by how often it runs (the trip count of the loops around it, e.g. scanned blocks).

    bytes: the size of the collective's result on one device (for all-reduce and
    collective-permute the data exchanged; for all-gather the gathered array; for reduce-scatter
    the scattered result). traffic: what one device sends over its links with ring algorithms:
    all-gather and reduce-scatter (n−1)/n of the full array, all-reduce twice that, all-to-all
    (n−1)/n of its data, collective-permute all of it. `group_of_device(i)` (the slice or node
    of device i) marks collectives whose group spans several of them (slow links)."""
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _COMP.match(line)
        if header and line.rstrip().endswith("{") and "=" not in line.split("{")[0].split("(")[0]:
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        if current is not None:
            computations[current].append(line)
    # How often each computation runs: the entry once, a while body trip-count times per run.
    runs = {name: 0 for name in computations}
    unknown_trips = False

    def visit(name, times, depth=0):
        nonlocal unknown_trips
        if name not in computations or depth > 64:
            return
        runs[name] += times
        for line in computations[name]:
            for callee in re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line):
                trips = 1
                if f"body={callee}" in line.replace("%", ""):
                    trips = _trip_count(line, computations)
                    if trips is None:
                        trips, unknown_trips = 1, True
                visit(callee, times * trips, depth + 1)
            branches = re.search(r"branch_computations=\{([^}]*)\}", line)
            if branches:
                for callee in branches.group(1).replace("%", "").split(","):
                    visit(callee.strip(), times, depth + 1)

    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    visit(entry, 1)
    kinds = {k: {"count": 0, "bytes": 0, "traffic_bytes": 0, "cross_group_traffic_bytes": 0}
             for k in COLLECTIVES}
    for name, lines in computations.items():
        if not runs[name]:
            continue
        for line in lines:
            instr = _INSTR.match(line)
            if not instr:
                continue
            shape_text, opcode, rest = instr.groups()
            kind = opcode.removesuffix("-start")
            if kind not in COLLECTIVES or opcode.endswith("-done"):
                continue
            size = _bytes_of(shape_text)
            if opcode.endswith("-start") and shape_text.lstrip().startswith("("):
                # Async start: (operands, results[, scratch]); the result is the second part.
                parts = _SHAPE.findall(shape_text)
                size = _bytes_of(" ".join(f"{d}[{s}]" for d, s in parts[len(parts) // 2:]))
            members = _group_members(rest, num_devices)
            n = len(members)
            if kind == "reduce-scatter":
                full = size * n
            else:
                full = size
            if kind in ("all-gather", "reduce-scatter", "all-to-all"):
                traffic = full * (n - 1) / n
            elif kind == "all-reduce":
                traffic = 2 * full * (n - 1) / n
            else:
                traffic = full
            entry_ = kinds[kind]
            entry_["count"] += runs[name]
            entry_["bytes"] += size * runs[name]
            entry_["traffic_bytes"] += traffic * runs[name]
            if group_of_device and len({group_of_device(i) for i in members}) > 1:
                entry_["cross_group_traffic_bytes"] += traffic * runs[name]
    for entry_ in kinds.values():
        entry_["traffic_bytes"] = int(entry_["traffic_bytes"])
        entry_["cross_group_traffic_bytes"] = int(entry_["cross_group_traffic_bytes"])
    return {"by_kind": kinds, "unknown_trip_counts": unknown_trips}


def dcn_gradient_all_reduce(param_bytes_per_device: int, slices: int,
                            bytes_per_second: float) -> dict[str, float]:
    """The gradient all-reduce between TPU slices, estimated from the parameters' shard size: a
    multi-slice program's compiled text holds only the collectives within a slice (the runtime
    adds those over the data-centre network), so they cannot be counted there. Each device
    reduces its float32 gradient shard with its counterparts in the other slices (ring:
    2(K−1)/K of the shard sent)."""
    traffic = 2 * (slices - 1) / slices * param_bytes_per_device
    return {"traffic_bytes": int(traffic), "seconds": traffic / bytes_per_second}


def link_speeds(target: Target) -> tuple[float, float]:
    """(bytes/s per device within a slice or node, bytes/s per device between them)."""
    if target.platform == "tpu":
        gen = TPU_GENERATIONS[target.generation]
        return gen.link_bytes_per_s, gen.dcn_bytes_per_s
    gpu = GPU_MODELS[target.generation]
    return gpu.link_bytes_per_s, gpu.network_bytes_per_s


# --------------------------------------------------------------------------------------------
# A plan


def batch_unit(config, mesh) -> int:
    """The step of valid global batch sizes: every microbatch splits over data × fsdp."""
    return mesh.shape["data"] * mesh.shape["fsdp"] * int(config.optim.accum_steps)


def plan_point(config, mesh, target: Target, global_batch: int, memory_bytes: int,
               memory_fraction: float) -> dict[str, Any]:
    compiled, model_cfg, seconds = compile_train_step(config, mesh, global_batch)
    point = {"global_batch": global_batch, "compile_seconds": round(seconds, 2),
             "compile_cpu_seconds": round(getattr(compiled, "_plan_cpu_seconds", 0.0), 2),
             **memory_of(compiled)}
    point["fits"] = point["peak_bytes_per_device"] <= memory_fraction * memory_bytes
    return point, compiled, model_cfg


def search_max_batch(config, mesh, target: Target, memory_bytes: int, memory_fraction: float,
                     known: dict[int, dict], *, max_compiles: int = 8, log=print) -> dict:
    """The largest global batch (a multiple of `batch_unit`) whose step fits, found by compiling:
    the peak grows linearly with the batch, so two points predict the boundary, and compiles on
    both sides of it confirm it (bisection where the prediction is off). `known` maps batch →
    point of compiles already made. Returns {"max_global_batch", "compiles", "points"}."""
    unit = batch_unit(config, mesh)
    limit = memory_fraction * memory_bytes

    compiles = 0

    def at(b):
        nonlocal compiles
        if b not in known:
            compiles += 1
            known[b] = plan_point(config, mesh, target, b, memory_bytes, memory_fraction)[0]
            log(f"  batch {b}: peak {known[b]['peak_bytes_per_device'] / GiB:.2f} GiB "
                f"({'fits' if known[b]['fits'] else 'does not fit'}, "
                f"{known[b]['compile_seconds']:.0f} s to compile)")
        return known[b]

    lo, hi = 0, None  # largest known fitting, smallest known non-fitting (batch sizes)
    for b, p in known.items():
        if p["fits"]:
            lo = max(lo, b)
        else:
            hi = b if hi is None else min(hi, b)
    # Two points for the line: the unit and twice it when nothing else is known.
    for b in (unit, 2 * unit):
        if len(known) >= 2 or compiles >= max_compiles:
            break
        p = at(b)
        lo, hi = (max(lo, b), hi) if p["fits"] else (lo, b if hi is None else min(hi, b))
    while compiles < max_compiles:
        if hi is not None and hi - lo <= unit:
            break
        fitting = sorted((b, p["peak_bytes_per_device"]) for b, p in known.items())
        (b0, m0), (b1, m1) = fitting[0], fitting[-1]
        slope = (m1 - m0) / (b1 - b0) if b1 != b0 else 0
        if lo == 0 and hi is not None:  # even the smallest batch does not fit
            if hi == unit:
                break
            guess = unit
        elif slope <= 0:
            guess = (lo * 2) if hi is None else (lo + hi) // 2
        else:
            guess = int((limit - m0) / slope + b0)
        guess = max(unit, guess // unit * unit)
        if hi is not None:
            guess = min(guess, hi - unit)
        guess = max(guess, lo + unit)
        if hi is None and guess > 64 * max(lo, unit):
            guess = 64 * max(lo, unit)  # keep far predictions within reach
        if guess in known:  # prediction exhausted: bisect
            guess = (lo + hi) // 2 // unit * unit if hi is not None else 2 * lo
            if guess in known or guess <= lo:
                break
        p = at(guess)
        if p["fits"]:
            lo = max(lo, guess)
        else:
            hi = guess if hi is None else min(hi, guess)
    exact = hi is not None and hi - lo <= unit
    # The line through the two smallest batches compiled, where the search stopped short.
    (b0, m0), (b1, m1) = (sorted((b, p["peak_bytes_per_device"]) for b, p in known.items())
                          + [(0, 0)] * 2)[:2]
    estimate = lo
    if b1 > b0 and m1 > m0:
        estimate = max(lo, int((limit - m0) / ((m1 - m0) / (b1 - b0)) + b0) // unit * unit)
        if hi is not None:
            estimate = min(estimate, hi - unit)
    return {"max_global_batch": lo, "boundary_confirmed": exact, "compiles": compiles,
            "estimate": estimate, "points": sorted(known)}


def make_plan(config, target_name: str, *, search: tuple[str, ...] = ("batch", "remat"),
              memory_fraction: float = 0.95, max_compiles: int = 8, sample: bool = False,
              dump_hlo: str | None = None, log=print) -> dict[str, Any]:
    """Compile the train step of `config` (and with `sample` the guided sampler) for
    `target_name` and report what it needs."""
    import jax

    from dit_jax import __version__
    from dit_jax.flops import peak_flops_per_device, train_flops_per_image
    from dit_jax.sharding import make_mesh

    target = parse_target(target_name)
    devices = target_devices(target)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    memory = device_memory_bytes(target, devices)
    batch = int(config.global_batch_size)
    log(f"{target.name}: {len(devices)} × {devices[0].device_kind}, mesh {dict(mesh.shape)}, "
        f"{memory / GiB:.1f} GiB per device; compiling the train step for batch {batch}")
    point, compiled, model_cfg = plan_point(config, mesh, target, batch, memory, memory_fraction)

    flops_per_step = train_flops_per_image(model_cfg) * batch
    peak = peak_flops_per_device(devices[0].device_kind, "tpu" if target.platform == "tpu"
                                 else "gpu", dtype=model_cfg.dtype)
    step_seconds = flops_per_step / (len(devices) * peak) if peak else None
    intra, inter = link_speeds(target)
    per_group = len(devices) // target.groups
    flat = list(mesh.devices.flat)
    if target.platform == "tpu":
        group_of = lambda i: getattr(flat[i], "slice_index", 0)  # noqa: E731
    else:
        group_of = lambda i: flat[i].id // per_group  # noqa: E731
    colls = collectives_of(compiled.as_text(), len(devices),
                           group_of if target.groups > 1 else None)
    seconds = 0.0
    for entry in colls["by_kind"].values():
        cross = entry["cross_group_traffic_bytes"]
        entry["seconds"] = (entry["traffic_bytes"] - cross) / intra + cross / inter
        seconds += entry["seconds"]
    ideal = ideal_state_bytes_per_device(config, mesh)
    dcn = None
    if target.platform == "tpu" and target.groups > 1:
        dcn = dcn_gradient_all_reduce(ideal_state_bytes_per_device(config, mesh, params_only=True),
                                      target.groups, inter)
        seconds += dcn["seconds"]
    plan = {
        "target": target.name,
        "platform": target.platform,
        "topology": target.topology,
        "slices_or_nodes": target.groups,
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape),
        "model": config.model.name or "custom",
        "image_size": int(config.data.image_size),
        "attention_impl": config.model.attention_impl,
        "remat": str(config.model.remat),
        "scan_blocks": bool(config.model.scan_blocks),
        "global_batch": batch,
        "memory_bytes_per_device": memory,
        "memory_fraction": memory_fraction,
        **{k: v for k, v in point.items() if k != "global_batch"},
        "state_bytes_per_device_unpadded": ideal,
        "model_flops_per_step": flops_per_step,
        "peak_flops_per_device": peak,
        "compute_bound_step_seconds": step_seconds,
        "compute_bound_images_per_second": batch / step_seconds if step_seconds else None,
        "collectives": colls["by_kind"],
        "collective_seconds_bandwidth_bound": seconds,
        "collective_trip_counts_unknown": colls["unknown_trip_counts"],
        "dcn_gradient_all_reduce": dcn,
        "link_bytes_per_second": {"within": intra, "between": inter},
        "versions": {"jax": jax.__version__, "dit_jax": __version__, **_backend_versions()},
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    if dump_hlo:
        Path(dump_hlo).write_text(compiled.as_text())
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    if cost and cost.get("flops"):
        # XLA's own count per device (Pallas kernels count none), for comparison only.
        plan["xla_flops_per_device"] = float(cost["flops"])
    known = {batch: point}
    if "batch" in search:
        log("searching the largest global batch that fits")
        found = search_max_batch(config, mesh, target, memory, memory_fraction, known,
                                 max_compiles=max_compiles, log=log)
        plan["max_global_batch"] = found["max_global_batch"]
        plan["max_global_batch_confirmed"] = found["boundary_confirmed"]
        # Linear in the batch from the compiles made: the answer where the search stopped short.
        plan["max_global_batch_estimate"] = found["estimate"]
        plan["batch_points"] = {str(b): {"peak_bytes_per_device": p["peak_bytes_per_device"],
                                         "fits": p["fits"]} for b, p in sorted(known.items())}
    else:
        plan["max_global_batch"] = None
    if sample:
        samples = int(config.sample.num_images)
        log(f"compiling the guided sampler ({config.sample.sampler}, {config.sample.steps} steps) "
            f"for {samples} images")
        compiled_sampler, seconds = compile_sampler(config, mesh, samples)
        memory_sample = memory_of(compiled_sampler)
        plan["sample"] = {"images": samples, "sampler": config.sample.sampler,
                          "steps": int(config.sample.steps),
                          "cfg_scale": float(config.sample.cfg_scale),
                          "compile_seconds": round(seconds, 2), **memory_sample,
                          "fits": memory_sample["peak_bytes_per_device"]
                          <= memory_fraction * memory}
    if "remat" in search:
        other = config.copy_and_resolve_references()
        remat = str(config.model.remat).lower()
        other.model.remat = "none" if remat not in ("none", "false", "0", "") else "full"
        log(f"searching again with model.remat={other.model.remat}")
        found = search_max_batch(other, mesh, target, memory, memory_fraction, {},
                                 max_compiles=max_compiles, log=log)
        plan[f"max_global_batch_remat_{other.model.remat}"] = found["max_global_batch"]
    return plan


def _backend_versions() -> dict[str, str]:
    from importlib import metadata
    out = {}
    for dist in ("jaxlib", "libtpu", "jax-cuda12-plugin", "jax-cuda12-pjrt"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def format_plan(plan: dict[str, Any]) -> str:
    g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    lines = [
        f"target {plan['target']}: {plan['devices']} × {plan['device_kind']} "
        f"({plan['slices_or_nodes']} slice(s)/node(s)), mesh {plan['mesh']}",
        f"model {plan['model']} at {plan['image_size']} px, attention {plan['attention_impl']}, "
        f"remat {plan['remat']}, scan_blocks {plan['scan_blocks']}, global batch "
        f"{plan['global_batch']}",
        f"per device: arguments {g(plan['argument_bytes_per_device'])} (state unpadded "
        f"{g(plan['state_bytes_per_device_unpadded'])}), outputs "
        f"{g(plan['output_bytes_per_device'])} (aliased {g(plan['alias_bytes_per_device'])}), "
        f"temporaries {g(plan['temp_bytes_per_device'])}",
        f"peak {g(plan['peak_bytes_per_device'])} of {g(plan['memory_bytes_per_device'])} "
        f"({plan['memory_fraction']:.0%} usable): {'fits' if plan['fits'] else 'DOES NOT FIT'}",
        f"compile {plan['compile_seconds']:.1f} s on this host ({plan['compile_cpu_seconds']:.1f} s "
        f"of CPU time)",
        f"model FLOPs per step {plan['model_flops_per_step']:.3e}",
    ]
    if plan["compute_bound_step_seconds"]:
        lines.append(f"compute-bound at peak ({plan['peak_flops_per_device'] / 1e12:.0f} TFLOP/s "
                     f"per device): {plan['compute_bound_step_seconds'] * 1e3:.1f} ms per step, "
                     f"{plan['compute_bound_images_per_second']:.0f} images/s")
    lines.append(f"collectives (bandwidth-bound {plan['collective_seconds_bandwidth_bound'] * 1e3:.1f}"
                 f" ms per step if not overlapped):")
    for kind, c in plan["collectives"].items():
        if c["count"]:
            lines.append(f"  {kind:18s} {c['count']:6d} × per step, {c['bytes'] / 2**20:10.1f} MiB, "
                         f"sends {c['traffic_bytes'] / 2**20:10.1f} MiB "
                         f"({c['cross_group_traffic_bytes'] / 2**20:.1f} across slices/nodes), "
                         f"{c['seconds'] * 1e3:.2f} ms")
    if "sample" in plan:
        sp = plan["sample"]
        lines.append(f"sampler ({sp['sampler']}, {sp['steps']} steps, guidance {sp['cfg_scale']}, "
                     f"{sp['images']} images): peak {g(sp['peak_bytes_per_device'])}, "
                     f"{'fits' if sp['fits'] else 'DOES NOT FIT'}, compile {sp['compile_seconds']:.1f} s")
    if plan.get("dcn_gradient_all_reduce"):
        d = plan["dcn_gradient_all_reduce"]
        lines.append(f"  gradient all-reduce between slices (estimated, not in the compiled text): "
                     f"sends {d['traffic_bytes'] / 2**20:.1f} MiB, {d['seconds'] * 1e3:.2f} ms")
    if plan.get("max_global_batch") is not None:
        lines.append(f"largest global batch that fits: {plan['max_global_batch']}"
                     + ("" if plan.get("max_global_batch_confirmed") else
                        f" (compiled; boundary not confirmed: about "
                        f"{plan['max_global_batch_estimate']} by the peak's slope)"))
    for key in ("max_global_batch_remat_full", "max_global_batch_remat_none"):
        if key in plan:
            lines.append(f"  with model.remat={key.rsplit('_', 1)[1]}: {plan[key]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line


def main(argv):
    del argv
    from absl import flags

    FLAGS = flags.FLAGS
    config = FLAGS.config
    search = tuple(s for s in FLAGS.search.split(",") if s)
    unknown = set(search) - {"batch", "remat"}
    if unknown:
        raise SystemExit(f"--search: unknown {sorted(unknown)}; use batch, remat, both or ''")
    try:
        plan = make_plan(config, FLAGS.target, search=search,
                         memory_fraction=FLAGS.memory_fraction, max_compiles=FLAGS.max_compiles,
                         sample=FLAGS.sample, dump_hlo=FLAGS.dump_hlo, log=lambda s: print(s, file=sys.stderr, flush=True))
    except (ValueError, RuntimeError) as err:
        raise SystemExit(f"dit_jax.plan: {err}") from None
    print(format_plan(plan))
    if FLAGS.json:
        Path(FLAGS.json).parent.mkdir(parents=True, exist_ok=True)
        Path(FLAGS.json).write_text(json.dumps(plan, indent=2) + "\n")


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "training config (e.g. configs/dit.py:XL/2)",
                                    lock_config=False)
    flags.DEFINE_string("target", None, "v5e-256, v4-8, v5p-128, v6e-64, 2xv5e-256, h100-8, "
                        "4xh100-8, ...")
    flags.DEFINE_string("json", None, "write the plan as JSON to this file")
    flags.DEFINE_string("search", "batch,remat", "what to search besides the config's batch: "
                        "'batch' (largest global batch that fits), 'remat' (the same with remat "
                        "toggled), both, or '' for none")
    flags.DEFINE_float("memory_fraction", 0.95, "share of device memory the program may use")
    flags.DEFINE_integer("max_compiles", 8, "compiles per batch search at most")
    flags.DEFINE_string("dump_hlo", None, "write the compiled train step's HLO text here")
    flags.DEFINE_bool("sample", False, "also compile the guided sampler (config.sample: sampler, "
                      "steps, cfg_scale, num_images) without the VAE decoder")
    flags.mark_flags_as_required(["config", "target"])


if __name__ == "__main__":
    # Plans compile for other devices: keep JAX itself on the CPU (and libtpu free for the
    # compile-only TPU topology, which loads it on its own).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # With the CUDA plugin installed but no GPU here, its start-up version checks only fail noisily.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    from dit_jax import cli
    _define_flags()
    cli.run(main)
