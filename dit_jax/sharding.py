"""Meshes and the mapping of the model's logical axis names onto mesh axes.

The only place that knows how parameters and batches are laid out over devices. The model file
annotates every parameter with logical names (see `dit_jax.models.dit`); `LOGICAL_AXIS_RULES`
maps them to the mesh axes `data`, `fsdp` and `tensor`:

- batch → (data, fsdp): every device sees a different slice of the global batch;
- embed → fsdp: parameters, gradients and optimiser state are split over the fsdp axis (ZeRO-3
  style; XLA all-gathers each weight where it is used);
- qkv / heads / mlp / modulation → tensor: Megatron-style tensor parallelism.

A dimension that a mesh axis does not divide evenly is replicated instead, so small test models
run on any mesh.

Also here: placing host values as global arrays (`place`), abstract arrays that carry shardings
(restore and compile targets), the rows of the global batch each host loads (`host_batch_rows`)
and their assembly into one global batch (`shard_batch`), the microbatch layout of gradient
accumulation, and the model's placed buffers. Multi-host start-up and agreement live in
`dit_jax.distributed`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dit_jax.models import dit as _dit
from dit_jax.models.dit import DiT, DiTConfig, split_model

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_AXIS_RULES: dict[str, Any] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "qkv": "tensor",
    "heads": "tensor",
    "mlp": "tensor",
    "modulation": "tensor",
    "layers": None,
    "classes": None,
    "freq": None,
    "embed_in": None,
    "patch_out": None,
    "caption": None,  # the text encoder's width at the caption projection's input (PixArt-α)
    # The T5 text encoder (dit_jax.models.t5): its token table splits along embed like every
    # weight; the position-bias table and the norm scales are small and replicated.
    "vocab": None,
    "buckets": None,
    "norm": None,
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: every device of every host) with Auto
    axis types. One size may be -1: it takes whatever the others leave."""
    devices = list(devices) if devices is not None else jax.devices()
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into mesh {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh data={sizes[0]} × fsdp={sizes[1]} × tensor={sizes[2]} needs {math.prod(sizes)} "
            f"devices, but {len(devices)} are available")
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:
        # Several TPU slices joined by the data-centre network: only the data axis crosses
        # slices (its gradient all-reduce is the one collective that tolerates the slow links);
        # fsdp and tensor stay inside a slice, on ICI.
        if sizes[0] % slices:
            raise ValueError(f"the devices span {slices} slices: mesh.data={sizes[0]} must be a "
                             f"multiple of {slices} (fsdp and tensor stay within a slice)")
        grid = mesh_utils.create_hybrid_device_mesh(
            (sizes[0] // slices, sizes[1], sizes[2]), (slices, 1, 1), devices,
            allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_mesh_spec(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                         rules: dict[str, Any] = LOGICAL_AXIS_RULES) -> P:
    """Mesh PartitionSpec for an array of `shape` annotated with logical axis names."""
    if not logical:
        return P()
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical, shape):
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a in mesh.shape and a not in used and mesh.shape[a] > 1)
        if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return P(*spec)


def param_spec(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
               rules: dict[str, Any] = LOGICAL_AXIS_RULES) -> P:
    """PartitionSpec of a parameter (or its EMA and optimiser moments): the logical rules, with
    the fsdp split placed where the shards waste the least memory tiles."""
    return _tile_aligned_fsdp(logical_to_mesh_spec(logical, shape, mesh, rules), shape, mesh)


# TPUs store an array in tiles of 8 rows (sublanes) by 128 columns (lanes), and XLA lays a small
# sharded dimension out as the rows: a shard of 9 rows takes the room of 16.
_TPU_SUBLANES = 8


def _tile_aligned_fsdp(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Move the fsdp split of a matrix to another, unsplit dimension when that wastes less of
    the TPU's memory tiles. Which dimension fsdp splits changes nothing in what is computed (the
    weight is gathered whole before use), only the padding of the shards: DiT-XL's width 1152
    over 128 devices leaves 9-row shards padded to 16 (1.78×), while its MLP width 4608 leaves 36
    (1.11×)."""
    spec = list(spec) + [None] * (len(shape) - len(spec))
    if "fsdp" not in spec or len(shape) < 2:
        return P(*spec)
    n = mesh.shape["fsdp"]

    def waste(local: int) -> float:
        return -(-local // _TPU_SUBLANES) * _TPU_SUBLANES / local

    at = spec.index("fsdp")
    best = at
    for i, (entry, dim) in enumerate(zip(spec, shape)):
        if entry is None and dim % n == 0 and waste(dim // n) < waste(shape[best] // n):
            best = i
    spec[at], spec[best] = spec[best], spec[at]
    return P(*spec)


def state_shardings(state: Any, mesh: Mesh, rules: dict[str, Any] = LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for an nnx State (or any tree of Variables), from their logical names.
    Leaves that are plain arrays (e.g. optimiser counters) are replicated."""

    def sharding(leaf):
        if isinstance(leaf, nnx.Variable):
            logical = leaf.get_metadata().get("out_sharding")
            return leaf.replace(NamedSharding(mesh, param_spec(logical, leaf.shape, mesh, rules)))
        return NamedSharding(mesh, P())

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """The leading (batch) axis split over data × fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def microbatch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """(microbatches, rows, ...): every microbatch split over data × fsdp like a full batch."""
    return NamedSharding(mesh, P(None, BATCH_AXES, *([None] * (ndim - 2))))


def shard_batch(local_batch: Any, mesh: Mesh, global_batch: int | None = None) -> Any:
    """Global arrays from this host's rows of the batch (every host passes its own rows, those of
    `host_batch_rows`); `global_batch` is the global row count (default: inferred)."""
    def assemble(x):
        x = np.asarray(x)
        shape = None if global_batch is None else (global_batch,) + x.shape[1:]
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x, shape)
    return jax.tree.map(assemble, local_batch)


def host_batch_rows(mesh: Mesh, global_batch: int) -> tuple[int, int]:
    """The rows [lo, hi) of the global batch that this host's devices hold."""
    index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((global_batch,))
    ranges = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop)
                     for s in index_map.values()})
    lo, hi = ranges[0][0], ranges[-1][1]
    if sum(b - a for a, b in ranges) != hi - lo:
        raise ValueError(f"this host's batch rows {ranges} are not contiguous for mesh {mesh.shape}")
    return lo, hi


def default_host_rows(global_batch_size: int, process_index: int | None = None,
                      process_count: int | None = None) -> tuple[int, int]:
    """Rows [lo, hi) of the global batch that host `process_index` of `process_count` loads
    without a mesh at hand: equal contiguous blocks in process order (what `host_batch_rows`
    gives for a batch split over every device)."""
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} hosts")
    per_host = global_batch_size // process_count
    return process_index * per_host, (process_index + 1) * per_host


def place(tree: Any, shardings: Any) -> Any:
    """Host (or device) values → global arrays with `shardings`; every host passes the same full
    values and keeps only its shards (works across processes, unlike a plain device_put)."""
    def put(value, sharding):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
    return jax.tree.map(put, tree, shardings)


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `abstract` carrying `shardings`: restore and compile targets."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def model_buffers(cfg: DiTConfig, mesh: Mesh) -> nnx.State:
    """The model's non-trained variables, replicated on `mesh`. The construction is jitted and
    returns only the buffers, so XLA drops the (unused) random initialisation of the weights."""
    _, _, abstract = split_model(cfg)
    shardings = state_shardings(abstract, mesh)
    return jax.jit(lambda: nnx.split(DiT(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)[2],
                   out_shardings=shardings)()


def activation_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh | None = None,
                    rules: dict[str, Any] = LOGICAL_AXIS_RULES) -> P:
    """PartitionSpec of an activation the model annotates with logical axis names, on `mesh`
    (default: the mesh being traced for). The model's `constrain` and its splash kernel ask
    this, through the hook installed below."""
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    return logical_to_mesh_spec(logical, shape, mesh, rules)


def attention_spec(shape: Sequence[int], mesh: Mesh | None = None,
                   rules: dict[str, Any] = LOGICAL_AXIS_RULES) -> P:
    """PartitionSpec of the (batch, tokens, heads, head_dim) operands and output of a kernel that
    XLA cannot partition (splash attention): examples split like the batch, heads like the
    attention's tensor-parallel columns. The kernel runs inside `jax.shard_map` with this spec
    for its inputs and its output."""
    return activation_spec(_dit.ATTENTION_AXES, shape, mesh, rules)


# The model lays out its activation constraints and its splash kernel's operands with this (see
# dit_jax.models.dit).
_dit.set_partitioning(activation_spec)
