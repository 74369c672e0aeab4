"""Nothing lost, nothing silently wrong: checkpoint checksums and finite checks, the workdir lock,
the training config checked before anything is built, and a torn log line. (Resumes from changed
checkpoints are in test_train.py; sample.py's output checks in test_sample.py.)"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from dit_jax.checkpoint import (Checkpoints, CorruptCheckpointError, NonFiniteStateError,
                                WorkdirLock, WorkdirLockedError, digest, digests)
from dit_jax.checkpoint.workdir import verify
from dit_jax.models.dit import DiTConfig
from dit_jax.sharding import make_mesh
from dit_jax.train import train
from dit_jax.train.logging import read_log
from dit_jax.train.loop import ConfigError, validate_config
from dit_jax.train.state import TrainState

ROOT = Path(__file__).resolve().parents[1]
TINY = DiTConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2,
                 num_classes=4)


def tree():
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.normal(size=(64, 24)), jnp.float32),
            "h": jnp.asarray(rng.normal(size=(16,)), jnp.bfloat16),
            "count": jnp.asarray(7, jnp.int32)}


def test_checksum_sees_every_bit_and_not_the_layout():
    base = tree()
    reference = digest(base)
    assert len(reference) == 16 and digest(tree()) == reference  # deterministic
    mesh = make_mesh(8, 1, 1)
    sharded = dict(base, w=jax.device_put(
        base["w"], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))))
    assert digest(sharded) == reference  # any mesh, any split of the reduction
    changed = set()
    for bit in (0, 13, 31):  # one bit of one element
        w = np.asarray(base["w"]).copy()
        w.view(np.uint32)[5, 7] ^= np.uint32(1 << bit)
        changed.add(digest(dict(base, w=jnp.asarray(w))))
    w = np.asarray(base["w"]).copy()
    w[[0, 1]] = w[[1, 0]]  # the same values in other places
    changed.add(digest(dict(base, w=jnp.asarray(w))))
    changed.add(digest(dict(base, h=base["h"].at[3].set(-base["h"][3]))))
    changed.add(digest(dict(base, count=jnp.asarray(8, jnp.int32))))
    assert len(changed) == 6 and reference not in changed
    (_, finite), = digests({"t": base}).values()
    (_, nan_free), = digests({"t": dict(base, h=base["h"].at[0].set(jnp.inf))}).values()
    assert finite and not nan_free


def tiny_state(step, ema=None):
    return TrainState(step=jnp.asarray(step, jnp.int32), params={"w": jnp.full(3, float(step))},
                      ema={"w": jnp.zeros(3) if ema is None else ema},
                      opt_state={"m": jnp.zeros(3)}, rng=jnp.zeros(2, jnp.uint32))


def test_save_refuses_non_finite_values_and_restore_checks_them(tmp_path):
    checkpoints = Checkpoints(tmp_path, async_save=False)
    checkpoints.save(tiny_state(1), data_state={"next_batch": 1}, model_config=TINY)
    with pytest.raises(NonFiniteStateError,
                       match="step 2: ema hold NaN.*newest checkpoint .* is 1"):
        checkpoints.save(tiny_state(2, ema=jnp.array([0.0, jnp.nan, 0.0])),
                         data_state={"next_batch": 2}, model_config=TINY)
    assert checkpoints.all_steps() == [1]
    meta = checkpoints.meta(1)
    checkpoints.close()
    assert set(meta["checksums"]) == {"params", "ema", "opt_state"}
    good = {"params": {"w": jnp.full(3, 1.0)}}
    verify(1, good, meta)
    with pytest.raises(CorruptCheckpointError, match="checkpoint 1: the params read back have "
                                                     "checksum"):
        verify(1, {"params": {"w": jnp.full(3, 1.5)}}, meta)
    # A checkpoint from before checksums: still checked finite.
    with pytest.raises(CorruptCheckpointError, match="the ema hold NaN or infinite"):
        verify(1, {"ema": {"w": jnp.array([1.0, jnp.inf])}}, {})


def test_workdir_lock(tmp_path):
    lock = WorkdirLock(tmp_path)
    with lock:
        owner = json.loads(lock.path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()} on this host.*"
                                                     f"{lock.path} is its lock"):
            WorkdirLock(tmp_path).acquire()
    assert not lock.path.exists()
    # A lock from another host cannot be checked from here: the error says how to clear it.
    lock.path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "time": 0}))
    with pytest.raises(WorkdirLockedError, match="host elsewhere.*if that process is gone, delete"):
        WorkdirLock(tmp_path).acquire()
    # A second trainer stops before it builds anything.
    with pytest.raises(WorkdirLockedError, match="another trainer"):
        train(small_config(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.lock"]


def small_config(**top_level):
    c = demo.get_config()
    c.model.hidden_size, c.model.depth, c.model.num_heads = 32, 1, 2
    c.data.image_size, c.global_batch_size = 8, 8
    for key, value in top_level.items():
        setattr(c, key, value)
    return c


@pytest.mark.parametrize("key, value, match", [
    ("checkpoint_every", 0, r"config.checkpoint_every=0: must be a positive integer"),
    ("log_every", -5, r"config.log_every=-5"),
    ("total_steps", 0, r"config.total_steps=0"),
    ("sample_every", -1, r"config.sample_every=-1: must be an integer >= 0"),
    ("optim.ema_decay", 1.5, r"config.optim.ema_decay=1.5"),
    ("optim.accum_steps", 0, r"config.optim.accum_steps=0"),
    ("mesh.fsdp", 0, r"config.mesh.fsdp=0"),
    ("sample.steps", 0, r"config.sample.steps=0"),
])
def test_config_values_are_checked_before_anything_is_built(tmp_path, key, value, match):
    config = small_config()
    section, _, name = key.rpartition(".")
    setattr(config[section] if section else config, name, value)
    with pytest.raises(ConfigError, match=match):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    validate_config(small_config())  # the shipped values pass


def test_train_py_reports_a_bad_value_in_one_line(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config=configs/demo.py",
                           f"--workdir={tmp_path / 'run'}", "--config.checkpoint_every=0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "config.checkpoint_every=0: must be a positive integer" in proc.stderr.splitlines()[-1]


def test_a_bad_log_line_before_the_last_is_an_error(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"log.jsonl line 2 is not JSON.*delete that line"):
        read_log(tmp_path)
