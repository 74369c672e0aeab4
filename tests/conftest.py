"""Shared test set-up: 8 virtual CPU devices (set before JAX starts) and small shared models."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# train.py, sample.py and configs/ live at the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402


def randomize_params(model: nnx.Module, seed: int = 0, std: float = 0.05) -> nnx.Module:
    """Give every parameter random values (a fresh DiT outputs exactly zero: never test on that)."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [jax.random.normal(k, x.shape, x.dtype) * std for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


def random_dit(seed: int = 0, std: float = 0.05, **config):
    """A DiT (create_model(**config)) with N(0, std²) parameters drawn by NumPy: no random
    initialisation run op by op, which costs seconds per new shape on CPU."""
    from dit_jax.models.dit import create_model, sincos_2d

    model = nnx.eval_shape(lambda: create_model(**config))
    state = nnx.state(model)
    rng = np.random.default_rng(seed)
    values = jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32) * std,
                          nnx.to_pure_dict(state))
    cfg = model.config
    values["pos_embed"] = sincos_2d(cfg.hidden_size, cfg.grid_size)[None].astype(np.float32)
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, values))
    nnx.update(model, state)
    return model


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(0)
