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

Every save records a content checksum of each array item (params, ema, opt_state) in its meta
(`dit_jax.checkpoint.integrity`: computed on the devices, independent of the mesh) and refuses a
state with a non-finite value; every restore recomputes the checksums and checks the values
finite. A checkpoint that exists but cannot be read (truncated or corrupt files, a checksum that
differs, a non-finite value): restoring falls back to the next older one, logs a warning, and
moves the unreadable ones to WORKDIR/corrupt_checkpoints/ so that the resumed run can save those
steps again. When no checkpoint can be read at all, restoring raises and nothing is moved.
Checkpoints never read the run's log. `check_resume` compares the model and optimiser config a
resume asks for with those the newest checkpoint was saved with.
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

from dit_jax.checkpoint.integrity import digests
from dit_jax.checkpoint.model import CONFIG_FILE, config_from_dict, config_to_dict
from dit_jax.distributed import on_every_host, wait_for_every_host
from dit_jax.models.dit import DiT, DiTConfig, split_model
from dit_jax.sharding import (abstract_with_shardings, make_mesh, model_buffers, place,
                              state_shardings)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"
RUN_CONFIG_FILE = "config.json"  # the resolved training config
ARRAY_ITEMS = ("params", "ema", "opt_state")  # the checksummed items of a checkpoint
# DiTConfig fields a resume may change: they change how the model computes, not what its weights
# mean. class_dropout_prob may change too, as long as it stays zero or non-zero (whether the
# label table has the null row).
RESUME_FREE_MODEL_FIELDS = ("dtype", "attention_impl", "remat", "numerics", "class_dropout_prob")
# Optimiser fields the saved state depends on: Adam's moments are averages with these decays. The
# others (lr, schedule, clipping, weight decay and its mask, EMA decay, accumulation) may change
# on a resume, as after a loss spike.
RESUME_FIXED_OPTIM_FIELDS = ("b1", "b2")


class CorruptCheckpointError(ValueError):
    """A checkpoint's arrays were read but are not what was saved (checksum) or not finite."""


class ResumeMismatchError(ValueError):
    """A resume asks for a model or optimiser that differs from the checkpoints'."""


class NonFiniteStateError(FloatingPointError):
    """A state with NaN or infinite values was handed to `Checkpoints.save`; nothing was saved."""


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

    def save(self, state, *, data_state: dict, model_config: DiTConfig,
             optim_config: dict | None = None) -> int:
        """Save `state` (asynchronously), with the checksums of its arrays, the model config
        and `optim_config` (the optimiser settings, for `check_resume`). Raises
        NonFiniteStateError, saving nothing, when a value is not finite."""
        step = int(jax.device_get(state.step))
        sums = digests({name: getattr(state, name) for name in ARRAY_ITEMS})
        bad = [name for name, (_, finite) in sums.items() if not finite]
        if bad:
            raise NonFiniteStateError(
                f"step {step}: {' and '.join(bad)} hold NaN or infinite values; not saved. The "
                f"newest checkpoint in {self.directory} is {self.latest_step()}")
        meta = {"step": step, "rng": np.asarray(jax.device_get(state.rng)).tolist(),
                "model_config": config_to_dict(model_config), "time": time.time(),
                "checksums": {name: checksum for name, (checksum, _) in sums.items()}}
        if optim_config is not None:
            meta["optim"] = dict(optim_config)
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
        verify(step, {name: getattr(out, name) for name in ARRAY_ITEMS}, meta)
        state = abstract_state.replace(
            step=place(np.asarray(step, np.int32), shardings.step),
            params=out.params, ema=out.ema, opt_state=out.opt_state,
            rng=place(np.asarray(meta["rng"], np.uint32), shardings.rng))
        return state, dict(out.data)

    def meta(self, step: int) -> dict:
        """The meta item (JSON) of checkpoint `step`."""
        return dict(self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta)

    def check_resume(self, model_config: DiTConfig, optim_config: dict) -> None:
        """Raise ResumeMismatchError naming every difference between the model and optimiser
        config of a resume and those of the newest checkpoint whose meta can be read (nothing to
        check when there is none: a fresh run, or unreadable checkpoints that `restore` sets
        aside). Changes that leave the weights' meaning alone pass (RESUME_FREE_MODEL_FIELDS, and
        optimiser fields other than RESUME_FIXED_OPTIM_FIELDS)."""
        for step in reversed(self.all_steps()):
            try:
                meta = self.meta(step)
            except Exception:  # noqa: BLE001 — an unreadable checkpoint is restore's business
                continue
            differences = resume_differences(meta, model_config, optim_config)
            if differences:
                raise ResumeMismatchError(
                    f"{self.workdir} holds a run with another model or optimiser (checkpoint "
                    f"{step}): {'; '.join(differences)}. Resume with the run's own values, or "
                    f"start the changed run in a new workdir (init_from=WORKDIR fine-tunes the "
                    f"old weights when the shapes fit)")
            return

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


def verify(step: int, items: dict[str, Any], meta: dict) -> None:
    """Raise CorruptCheckpointError unless the restored `items` are finite and match the
    checksums in `meta` (checkpoints saved before checksums existed are checked finite only)."""
    stored = meta.get("checksums", {})
    for name, (checksum, finite) in digests(items).items():
        if name in stored and stored[name] != checksum:
            raise CorruptCheckpointError(
                f"checkpoint {step}: the {name} read back have checksum {checksum}, saved with "
                f"{stored[name]} (the files changed after they were written)")
        if not finite:
            raise CorruptCheckpointError(f"checkpoint {step}: the {name} hold NaN or infinite "
                                         f"values")


def resume_differences(meta: dict, model_config: DiTConfig, optim_config: dict) -> list[str]:
    """'key old → new' for every difference that a resume from the checkpoint of `meta` cannot
    take (see `Checkpoints.check_resume`)."""
    out = []
    stored = meta.get("model_config", {})
    wanted = config_to_dict(model_config)
    for key in sorted(set(stored) | set(wanted)):
        old, new = stored.get(key), wanted.get(key)
        if key in RESUME_FREE_MODEL_FIELDS:
            if key == "class_dropout_prob" and old is not None and (old > 0) != (new > 0):
                out.append(f"model.{key} {old} → {new} (the null class row)")
            continue
        if old != new:
            out.append(f"model.{key} {old} → {new}")
    stored_optim = meta.get("optim")
    if stored_optim is not None:
        for key in RESUME_FIXED_OPTIM_FIELDS:
            if key in stored_optim and stored_optim[key] != optim_config.get(key):
                out.append(f"optim.{key} {stored_optim[key]} → {optim_config.get(key)}")
    return out


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


def step_with_checksum(workdir: str | Path, checksum: str) -> int | None:
    """The newest checkpoint of `workdir` one of whose items was saved with `checksum` (how
    sample.py names the step of weights read out of a workdir); None when there is none."""
    directory = Path(workdir) / CHECKPOINT_DIR
    steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True) \
        if directory.is_dir() else []
    for step in steps:
        try:
            meta = json.loads((directory / str(step) / "meta" / "metadata").read_text())
        except (OSError, ValueError):
            continue
        if checksum in meta.get("checksums", {}).values():
            return step
    return None


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
                out = checkpoints.manager.restore(candidate, args=ocp.args.Composite(
                    **{which: _restore_args(target)}, meta=ocp.args.JsonRestore()))
                weights = out[which]
                verify(candidate, {which: weights}, dict(out.meta))
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


__all__ = ["CHECKPOINT_DIR", "RUN_CONFIG_FILE", "Checkpoints", "CorruptCheckpointError",
           "NonFiniteStateError", "ResumeMismatchError", "load_model_config", "read_run_config",
           "restore_model", "resume_differences", "step_with_checksum", "verify", "write_run_config"]

