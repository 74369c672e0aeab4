"""Training checkpoints in a train.py workdir (orbax CheckpointManager, asynchronous), the run's
config files, and reading a model back out of a workdir.

    WORKDIR/config.json                    the resolved training config (`RUN_CONFIG_FILE`)
    WORKDIR/model_config.json              the DiTConfig (`dit_jax.checkpoint.model.CONFIG_FILE`)

    WORKDIR/checkpoints/<step>/params      orbax pytree: float32 weights
                              /ema         orbax pytree: EMA weights (what samplers use)
                              /opt_state   orbax pytree: optimiser state
                              /meta        JSON: step, RNG key data, the DiTConfig
                              /data        JSON: the data iterator's state

Arrays are saved with their shardings and restored onto whatever mesh the restoring run has (a
different mesh shape, device count or host count is fine): the restore target carries the new
shardings and each host reads only its shards.

A save copies the arrays to host memory and returns; the files are written in the background
and a step directory appears under its final name only once complete, so a run killed mid-save
leaves the previous checkpoints intact (the unfinished temporary directory is removed at the
next start). Retention: the newest `keep` checkpoints plus every `keep_every`-th step forever.

A checkpoint that exists but cannot be read (truncated or corrupt files): restoring falls back to
the next older one, logs a warning, and moves the unreadable ones to WORKDIR/corrupt_checkpoints/
so that the resumed run can save those steps again. When no checkpoint can be read at all (which
is also what a changed model config looks like), restoring raises and nothing is moved.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from dit_jax.checkpoint.model import CONFIG_FILE, config_from_dict, config_to_dict
from dit_jax.distributed import on_every_host, wait_for_every_host
from dit_jax.models.dit import DiT, DiTConfig, split_model
from dit_jax.sharding import (abstract_with_shardings, make_mesh, model_buffers, place,
                              state_shardings)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"
RUN_CONFIG_FILE = "config.json"  # the resolved training config


class Checkpoints:
    """The checkpoints of one workdir."""

    def __init__(self, workdir: str | Path, *, keep: int = 3, keep_every: int = 0,
                 async_save: bool = True, read_only: bool = False):
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / CHECKPOINT_DIR
        pp = ocp.checkpoint_managers.preservation_policy
        policies = [pp.LatestN(max(int(keep), 1))]
        if keep_every and keep_every > 0:
            policies.append(pp.EveryNSteps(int(keep_every)))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only)
        arrays = ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handler_registry())
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"params": arrays, "ema": arrays, "opt_state": arrays,
                           "meta": ocp.JsonCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, state, *, data_state: dict, model_config: DiTConfig) -> int:
        step = int(jax.device_get(state.step))
        meta = {"step": step, "rng": np.asarray(jax.device_get(state.rng)).tolist(),
                "model_config": config_to_dict(model_config), "time": time.time()}
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.PyTreeSave(state.params),
            ema=ocp.args.PyTreeSave(state.ema),
            opt_state=ocp.args.PyTreeSave(state.opt_state),
            meta=ocp.args.JsonSave(meta),
            data=ocp.args.JsonSave(data_state)), force=True)
        return step

    def restore(self, abstract_state, shardings, *, step: int | None = None
                ) -> tuple[Any, dict] | None:
        """(state, data iterator state) of `step` (default: the newest readable checkpoint, see
        the module docstring), laid out with `shardings`; None when there is no checkpoint."""
        steps = self.all_steps()
        if not steps:
            return None
        if step is not None:
            return self._restore_step(step, abstract_state, shardings)
        failures = []
        for candidate in reversed(steps):
            try:
                restored, error = self._restore_step(candidate, abstract_state, shardings), None
            except Exception as err:  # noqa: BLE001 — any unreadable checkpoint is skipped
                restored, error = None, err
            # Each host reads only its own shards: a step counts only if every host read it, or
            # the hosts would resume from different steps. Limit: a host that fails inside
            # orbax's restore, before orbax's own barrier, leaves the others waiting at that
            # barrier until its timeout; the agreement then follows their failure.
            if not on_every_host(error is None):
                error = error or RuntimeError("another host could not read its shards")
                log.warning("checkpoint %d in %s cannot be restored (%s: %s); trying an older one",
                            candidate, self.directory, type(error).__name__, error)
                failures.append((candidate, error))
                continue
            if failures:
                self._set_aside([s for s, _ in failures])
                log.warning("resumed from checkpoint %d; unreadable newer checkpoint(s) %s moved to "
                            "%s", candidate, [s for s, _ in failures], self.workdir / CORRUPT_DIR)
            return restored
        details = "; ".join(f"step {s}: {type(e).__name__}: {e}" for s, e in failures)
        raise RuntimeError(
            f"none of the checkpoints in {self.directory} can be restored into this run (a changed "
            f"model or optimiser config also causes this). {details}")

    def _restore_step(self, step: int, abstract_state, shardings):
        target = abstract_with_shardings(abstract_state, shardings)
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=_restore_args(target.params),
            ema=_restore_args(target.ema),
            opt_state=_restore_args(target.opt_state),
            meta=ocp.args.JsonRestore(),
            data=ocp.args.JsonRestore()))
        meta = out.meta
        if int(meta["step"]) != step:
            raise ValueError(f"checkpoint directory {step} holds step {meta['step']}")
        state = abstract_state.replace(
            step=place(np.asarray(step, np.int32), shardings.step),
            params=out.params, ema=out.ema, opt_state=out.opt_state,
            rng=place(np.asarray(meta["rng"], np.uint32), shardings.rng))
        return state, dict(out.data)

    def _set_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            target = self.workdir / CORRUPT_DIR
            target.mkdir(parents=True, exist_ok=True)
            for step in steps:
                src = self.directory / str(step)
                dst = target / f"{step}-{int(time.time())}"
                if src.exists():
                    shutil.move(str(src), str(dst))
        wait_for_every_host("dit_jax_set_aside_checkpoints")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


# Orbax splits the saving of a replicated array over its replicas ("replica-parallel"), which
# costs one small compiled slice per array shape and device on the first save; worth it only
# for arrays whose slices are big.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def _type_handler_registry():
    th = ocp.type_handlers
    return th.create_type_handler_registry(
        (int, th.ScalarHandler()), (float, th.ScalarHandler()), (bytes, th.ScalarHandler()),
        (np.number, th.ScalarHandler()), (np.ndarray, th.NumpyHandler()),
        (jax.Array, th.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES)),
        (str, th.StringHandler()))


def _restore_args(target):
    return ocp.args.PyTreeRestore(item=target,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target))


# --------------------------------------------------------------------------------------------
# The run's config files


def write_run_config(workdir: str | Path, config, model_config: DiTConfig) -> None:
    """config.json (the resolved training config) and model_config.json (the DiTConfig), written
    by host 0."""
    if jax.process_index() != 0:
        return
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / RUN_CONFIG_FILE).write_text(config.to_json_best_effort(indent=2) + "\n")
    (workdir / CONFIG_FILE).write_text(json.dumps(config_to_dict(model_config), indent=2) + "\n")


def is_train_workdir(path: str | Path) -> bool:
    return (Path(path) / CHECKPOINT_DIR).is_dir()


def read_run_config(workdir: str | Path) -> dict[str, Any] | None:
    """The resolved training config a workdir was run with (config.json), as a dict; None when
    `workdir` is not a train.py workdir or has no config.json."""
    path = Path(workdir) / RUN_CONFIG_FILE
    if not is_train_workdir(workdir) or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore it or delete it") from None


def load_model_config(workdir: str | Path, step: int | None = None) -> DiTConfig:
    """The DiTConfig of a workdir: the one stored with checkpoint `step` when given (a run may
    have been resumed with a changed config file), else WORKDIR/model_config.json."""
    workdir = Path(workdir)
    if step is not None:
        meta = workdir / CHECKPOINT_DIR / str(step) / "meta" / "metadata"
        if meta.is_file():
            return config_from_dict(json.loads(meta.read_text())["model_config"])
    path = workdir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{workdir} is not a training workdir (no {CONFIG_FILE})")
    return config_from_dict(json.loads(path.read_text()))


# --------------------------------------------------------------------------------------------
# A model out of a workdir


def restore_model(workdir: str | Path, *, which: str = "ema", step: int | None = None,
                  mesh: Mesh | None = None) -> DiT:
    """The DiT of a training workdir with the weights `which` ("ema", the default and what the
    paper samples from, or "params", the raw weights) of checkpoint `step` (default: the newest
    readable one). The weights are laid out on `mesh` by the model's annotations (default: the
    first local device)."""
    if which not in ("ema", "params"):
        raise ValueError(f"which must be 'ema' or 'params', got {which!r}")
    workdir = Path(workdir).absolute()
    checkpoints = Checkpoints(workdir, read_only=True)
    try:
        steps = checkpoints.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {checkpoints.directory}")
        candidates = [step] if step is not None else list(reversed(steps))
        if step is not None and step not in steps:
            raise FileNotFoundError(f"no checkpoint {step} in {checkpoints.directory}; have {steps}")
        failures = []
        for candidate in candidates:
            cfg = load_model_config(workdir, candidate)
            if mesh is None:
                mesh = make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
            graphdef, abstract, _ = split_model(cfg)
            target = abstract_with_shardings(abstract, state_shardings(abstract, mesh))
            try:
                weights = checkpoints.manager.restore(candidate, args=ocp.args.Composite(
                    **{which: _restore_args(target)}))[which]
            except Exception as err:  # noqa: BLE001 — fall back as the training restore does
                if step is not None:
                    raise
                log.warning("checkpoint %d in %s cannot be restored (%s); trying an older one",
                            candidate, checkpoints.directory, err)
                failures.append((candidate, err))
                continue
            return nnx.merge(graphdef, weights, model_buffers(cfg, mesh))
        raise RuntimeError(f"no checkpoint in {checkpoints.directory} can be restored: "
                           + "; ".join(f"step {s}: {e}" for s, e in failures))
    finally:
        checkpoints.close()


__all__ = ["CHECKPOINT_DIR", "RUN_CONFIG_FILE", "Checkpoints", "load_model_config", "read_run_config",
           "restore_model", "write_run_config"]

