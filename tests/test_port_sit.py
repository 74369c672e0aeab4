"""SiT and REPA checkpoints: a SiT file is a DiT read as a velocity model; a REPA file loads with its
projectors dropped and its reversed time folded in, so that SiT-time sampling of the loaded model
equals REPA's own samplers (written here from its sampling code's equations) step for step."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax import nnx

from dit_jax import transport as T
from dit_jax.diffusion import classifier_free_guidance
from dit_jax.models.sit import sit_forward
from dit_jax.port import from_torch, save_torch, to_torch
from dit_jax.port.sit import time_reversal_matrix

from conftest import random_dit

TINY = dict(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, num_classes=10)


def _jit(model, sit=False):
    """model(x, t, y) compiled once (eager DiT calls cost seconds each on CPU)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def apply(state, x, t, y):
        m = nnx.merge(graphdef, state)
        return sit_forward(m, x, t, y) if sit else m(x, t, y)
    return lambda x, t, y: apply(state, x, t, y)


def _inputs(n=3, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, 8, 8, 4)), jnp.float32)
    t = jnp.asarray(np.linspace(0.05, 0.9, n), jnp.float32)
    y = jnp.asarray(np.arange(n) % 10, jnp.int32)
    return x, t, y


def _repa_file(tmp_path, seed=1):
    """A REPA-layout train.py dict: DiT keys without learned sigma, projectors, args."""
    repa = random_dit(seed=seed, learn_sigma=False, **TINY)
    sd = to_torch(repa)
    gen = torch.Generator().manual_seed(seed)
    for i, shape in enumerate([(64, 32), (64,), (64, 64), (64,), (16, 64), (16,)]):
        sd[f"projectors.0.{2 * (i // 2)}.{'weight' if len(shape) == 2 else 'bias'}"] = \
            torch.randn(shape, generator=gen)
    path = tmp_path / "repa.pt"
    torch.save({"ema": sd, "model": sd, "args": argparse.Namespace(num_classes=10), "steps": 7},
               path)
    return repa, path


def test_time_reversal_matrix():
    m = time_reversal_matrix()
    np.testing.assert_allclose(m @ m, np.eye(256), atol=1e-12)
    f = np.exp(-np.log(10000) * np.arange(128) / 128)
    emb = lambda t: np.concatenate([np.cos(t * f), np.sin(t * f)])  # noqa: E731
    np.testing.assert_allclose(m @ emb(0.23), emb(0.77), atol=1e-12)


def test_sit_checkpoint_is_the_dit_read_as_velocity(tmp_path):
    dit = random_dit(seed=0, **TINY)
    path = tmp_path / "sit.pt"
    torch.save(to_torch(dit), path)
    sit = from_torch(path, kind="sit", num_heads=2)
    x, t, y = _inputs()
    got = _jit(sit, sit=True)(x, t, y)
    want = _jit(dit)(x, t, y)[..., :4]
    assert got.shape == x.shape and float(jnp.abs(want).max()) > 1e-2
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="DiT and SiT checkpoints share"):
        from_torch(path, kind="auto", num_heads=2)
    with pytest.raises(ValueError, match="unknown checkpoint kind"):
        from_torch(path, kind="flow", num_heads=2)


def test_repa_checkpoint_loads_in_sit_time(tmp_path):
    repa, path = _repa_file(tmp_path)
    model = from_torch(path, kind="repa", num_heads=2)
    assert not model.config.learn_sigma
    auto = from_torch(path, kind="auto", num_heads=2)
    x, t, y = _inputs()
    v_sit = _jit(model, sit=True)(x, t, y)
    v_repa = _jit(repa)(x, 1 - t, y)  # REPA's network at its own time
    assert float(jnp.abs(v_repa).max()) > 1e-2
    np.testing.assert_allclose(v_sit, -v_repa, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(_jit(auto, sit=True)(x, t, y), v_sit)
    with pytest.raises(ValueError, match="kind='repa'"):
        from_torch(path, kind="dit", num_heads=2)
    with pytest.raises(ValueError, match="kind='repa'"):
        from_torch(path, kind="sit", num_heads=2)
    # Export undoes the fold: REPA's tensors come back (without the projectors).
    back = to_torch(model, kind="repa")
    original = torch.load(path, weights_only=False)["ema"]
    assert set(back) == {k for k in original if not k.startswith("projectors.")}
    for key, value in back.items():
        np.testing.assert_allclose(value.numpy(), original[key].numpy(), rtol=1e-5, atol=1e-6)


def test_repa_export_of_a_learned_sigma_model_keeps_the_velocity(tmp_path):
    sit = random_dit(seed=2, **TINY)
    path = save_torch(sit, tmp_path / "as_repa.safetensors", kind="repa")
    again = from_torch(path, kind="repa", num_heads=2)
    x, t, y = _inputs()
    np.testing.assert_allclose(_jit(again, sit=True)(x, t, y), _jit(sit, sit=True)(x, t, y),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no learned"):
        from_torch(save_torch(sit, tmp_path / "sit.pt"), kind="repa", num_heads=2)


# REPA's samplers, transcribed from its equations: time from 1 (noise) to 0, v = ε − x, guidance on
# all channels for t ≤ guidance_high, the SDE's drift v − ½·2t·score and noise √(2t)·√|dt|.

def _repa_velocity(repa, x, t, y, cfg, high):
    tt = jnp.full((x.shape[0],), t, jnp.float32)
    v = np.asarray(repa(jnp.asarray(x, jnp.float32), tt, y), np.float64)
    if cfg > 1 and t <= high:
        u = np.asarray(repa(jnp.asarray(x, jnp.float32), tt, jnp.full_like(y, 10)), np.float64)
        v = u + cfg * (v - u)
    return v


def _repa_euler(repa, x, y, num_steps, cfg=1.0, high=1.0):
    ts = np.linspace(1, 0, num_steps + 1)
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * _repa_velocity(repa, x, t, y, cfg, high)
    return x


def _repa_euler_maruyama(repa, x, y, num_steps, noises, cfg=1.0, high=1.0):
    ts = np.concatenate([np.linspace(1, 0.04, num_steps), [0.0]])
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        v = _repa_velocity(repa, x, t, y, cfg, high)
        score = -(x + (1 - t) * v) / t  # Linear path in REPA time: α = 1 − t, σ = t
        drift = v - t * score
        x = x + drift * (t_next - t)
        if i < num_steps - 1:  # the last step is the mean
            x = x + np.sqrt(2 * t) * np.sqrt(abs(t_next - t)) * noises[i]
    return x


def test_repa_sampling_equals_sit_time_sampling(tmp_path):
    repa_model, path = _repa_file(tmp_path)
    repa = _jit(repa_model)
    model = _jit(from_torch(path, kind="repa", num_heads=2), sit=True)
    x, _, y = _inputs(seed=3)
    x64 = np.asarray(x, np.float64)
    tr = T.create_transport()
    # ODE Euler, unguided: REPA's N steps are SiT's grid of N + 1 points.
    ours = jax.jit(T.make_ode_sampler(tr, lambda z, t: model(z, t, y), method="euler",
                                      num_steps=6))(x)
    np.testing.assert_allclose(ours, _repa_euler(repa, x64, y, 5), rtol=1e-4, atol=1e-4)
    # SDE Euler–Maruyama with REPA's guidance (1.8 on all channels for t ≤ 0.7 in its time)
    # = sde-euler with σ_t diffusion, the "Mean" last step of 0.04, guidance for t ≥ 0.3 here.
    key, steps = jax.random.key(5), 6
    noises = [np.asarray(jax.random.normal(jax.random.fold_in(key, i), x.shape), np.float64)
              for i in range(steps - 1)]
    guided = classifier_free_guidance(model, y, 1.8, null_label=10, guide_channels=None,
                                      interval=(0.3, 1.0), time_dtype=None)
    ours = jax.jit(T.make_sde_sampler(tr, guided, method="Euler", num_steps=steps))(x, key)
    want = _repa_euler_maruyama(repa, x64, y, steps, noises, cfg=1.8, high=0.7)
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4)
    unguided = _repa_euler_maruyama(repa, x64, y, steps, noises)
    assert np.abs(want - unguided).max() > 1e-3  # the guidance really acted


def test_sample_py_reads_a_repa_file(tmp_path):
    from dit_jax.sampling import SampleRequest, sample

    # hidden 384: a width whose head count the loader knows (the file does not say it)
    repa = random_dit(seed=4, learn_sigma=False, depth=1, hidden_size=384, patch_size=2,
                      input_size=8, num_classes=10)
    sd = to_torch(repa)
    sd["projectors.0.0.weight"] = torch.ones(8, 384)
    torch.save(sd, tmp_path / "last.pt")
    request = dict(ckpt=str(tmp_path / "last.pt"), vae="none", labels=(1, 2), steps=3,
                   cfg_scale=1.8, guidance_channels="all")
    written = sample(SampleRequest(**request, kind="repa", sampler="sde-euler",
                                   guidance_interval=(0.3, 1.0), out=str(tmp_path / "out")))
    latents = np.load(written["chunks"] / "000000.npz")["samples"]
    assert latents.shape == (2, 8, 8, 4) and np.isfinite(latents).all() and latents.std() > 0.1
    assert written["labels"].tolist() == [1, 2]
    with pytest.raises(ValueError, match="kind='repa'"):
        sample(SampleRequest(**request, sampler="sde-euler", out=str(tmp_path / "as_dit")))
    with pytest.raises(ValueError, match="transport sampler"):
        SampleRequest(**request, kind="repa", sampler="ddpm")


def test_port_cli_repa_round_trip(tmp_path):
    from dit_jax.port.__main__ import main as port_main

    _, path = _repa_file(tmp_path)
    assert port_main(["to-jax", str(path), str(tmp_path / "jax"), "--kind", "repa",
                      "--num-heads", "2"]) == 0
    assert port_main(["to-torch", str(tmp_path / "jax"), str(tmp_path / "back.pt"), "--kind",
                      "repa"]) == 0
    back = torch.load(tmp_path / "back.pt")
    original = torch.load(path, weights_only=False)["ema"]
    for key, value in back.items():
        np.testing.assert_allclose(value.numpy(), original[key].numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="kind='repa'"):
        port_main(["to-jax", str(path), str(tmp_path / "as_dit"), "--num-heads", "2"])
