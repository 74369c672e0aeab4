"""Several hosts: starting JAX's multi-process runtime, and the small agreements between hosts.

Every function here is a collective when more than one process runs: every process must call it
at the same point of the program. With one process they are plain local operations.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize_distributed(mode: str = "auto", *, coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Call `jax.distributed.initialize` when this process is one of several.

    mode "on": always (arguments left None are auto-detected by JAX: SLURM, Open MPI, Cloud TPU,
    Kubernetes); "off": never; "auto": when arguments are given or the environment shows a
    multi-process launch (JAX_COORDINATOR_ADDRESS, SLURM with more than one task, Open MPI with
    more than one rank, a multi-worker TPU slice). Returns whether it initialised. Call it before
    anything asks JAX for its devices.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed mode must be auto, on or off, got {mode!r}")
    if mode == "off":
        return False
    env = os.environ
    launched_as_many = (
        coordinator_address is not None or (num_processes or 1) > 1
        or "JAX_COORDINATOR_ADDRESS" in env
        or int(env.get("SLURM_NTASKS", env.get("SLURM_STEP_NUM_TASKS", "1"))) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or "MEGASCALE_COORDINATOR_ADDRESS" in env)
    if mode == "auto" and not launched_as_many:
        return False
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True


def split_cpu(devices: int, global_batch_size: int) -> int:
    """Run this CPU-only process as `devices` single-threaded JAX devices instead of JAX's one
    multi-threaded device, so that the mesh's data axis spreads each batch over the cores: for a
    small model, XLA's threading inside each operation uses a second core poorly, and one device
    per core trains 1.4-1.6x faster on 2 cores (docs/small_data.md). Returns the device count
    set, or 0 when left to JAX.

    devices: 0 leaves JAX's default; N > 0 asks for N; -1 for one per core this process may use,
    lowered to the largest count that divides `global_batch_size`. It only acts on the CPU
    backend, so a machine with a GPU or TPU trains there as before, and it leaves alone a device
    count already forced in XLA_FLAGS (the tests' 8). Call it before anything asks JAX for its
    devices (after that JAX raises).
    """
    if devices == 0 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return 0
    if devices < -1:
        raise ValueError(f"cpu_devices must be -1 (one per core), 0 (JAX's default) or a count, "
                         f"got {devices}")
    if devices == -1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        devices = max(n for n in range(1, (cores or 1) + 1) if global_batch_size % n == 0)
    if devices == 1:
        return 0  # one core: JAX's default device is that already
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false").strip()
    jax.config.update("jax_num_cpu_devices", devices)
    return devices


def on_every_host(ok: bool) -> bool:
    """Whether `ok` holds on every process."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def sum_over_hosts(value: int) -> int:
    """The sum of every process's `value`."""
    if jax.process_count() == 1:
        return int(value)
    return int(np.sum(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def union_over_hosts(values: set[int]) -> set[int]:
    """The union of every process's set of non-negative integers."""
    if jax.process_count() == 1:
        return set(values)
    longest = int(np.max(multihost_utils.process_allgather(np.asarray(len(values), np.int64))))
    padded = np.full(max(longest, 1), -1, np.int64)  # the same shape on every process
    padded[:len(values)] = sorted(values)
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(-1)
    return {int(v) for v in gathered if v >= 0}


def wait_for_every_host(name: str) -> None:
    """A barrier named `name` (the same name on every process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def gather_rows(array: jax.Array) -> np.ndarray:
    """A batch-sharded global array as one NumPy array on every host."""
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


__all__ = ["gather_rows", "initialize_distributed", "on_every_host", "sum_over_hosts",
           "union_over_hosts", "wait_for_every_host"]
