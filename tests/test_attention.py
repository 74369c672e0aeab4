"""Attention implementations: splash (the TPU flash kernel, in Pallas interpret mode on CPU)
against float64 NumPy and XLA's attention, alone and inside the model, with and without a mesh;
what "auto" picks per platform."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_dit
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dit_jax import sharding
from dit_jax.models import dit


def attention_f64(q, k, v):
    """softmax(q·kᵀ/√d)·v per example and head, in float64, from the equation."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def qkv(tokens, head_dim, dtype, heads=2, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((batch, tokens, heads, head_dim)), dtype)
                 for _ in range(3))


# 128 tokens: one kernel block, no padding; 64: padded to 128 and kept apart by segment ids.
@pytest.mark.parametrize("head_dim,tokens,dtype,tol", [
    (64, 128, jnp.float32, 1e-5), (72, 64, jnp.float32, 1e-5), (72, 128, jnp.bfloat16, 3e-2)])
def test_splash_matches_reference_forward_and_gradients(head_dim, tokens, dtype, tol):
    q, k, v = qkv(tokens, head_dim, dtype)
    out = jax.jit(dit.splash_attention)(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    expected = attention_f64(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    assert np.abs(np.asarray(out, np.float64) - expected).max() < tol * np.abs(expected).max()

    weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

    def loss(fn):  # a loss that weighs every output element differently
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)
    got = jax.jit(jax.grad(loss(dit.splash_attention), argnums=(0, 1, 2)))(q, k, v)
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    want = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(*f32)
    for name, g, w in zip("qkv", got, want):
        err = np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)).max()
        assert err < tol * 10 * np.abs(np.asarray(w)).max(), (name, err)


@pytest.fixture(scope="module")
def models():
    # 16 tokens of head dim 16 (hidden 64, 4 heads): the kernel pads the sequence to 128.
    xla = random_dit(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4,
                     num_classes=10)
    splash = dit.DiT(dataclasses.replace(xla.config, attention_impl="splash"),
                     rngs=nnx.Rngs(0))
    nnx.update(splash, nnx.state(xla))
    rng = np.random.default_rng(2)
    inputs = (jnp.asarray(rng.standard_normal((4, 8, 8, 4)), jnp.float32),
              jnp.asarray(rng.integers(0, 1000, 4), jnp.int32),
              jnp.asarray(rng.integers(0, 10, 4), jnp.int32))
    return xla, splash, inputs


def test_model_with_splash_equals_model_with_xla(models):
    xla, splash, (x, t, y) = models
    expected = np.asarray(xla(x, t, y))
    np.testing.assert_allclose(np.asarray(splash(x, t, y)), expected, atol=2e-5 * np.abs(expected).max())


def test_splash_inside_a_sharded_program_runs_per_shard(models):
    """Under a (fsdp 4, tensor 2) mesh the kernel runs in shard_map: examples over the batch
    axes, heads over tensor; the jitted model equals the unsharded XLA model."""
    xla, splash, (x, t, y) = models
    spec = sharding.attention_spec((4, 16, 4, 16), sharding.make_mesh(data=2, fsdp=2, tensor=2))
    assert spec == P(("data", "fsdp"), None, "tensor", None)
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    assert sharding.attention_spec((4, 16, 4, 16), mesh) == P("fsdp", None, "tensor", None)
    assert sharding.attention_spec((3, 16, 4, 16), mesh) == P(None, None, "tensor", None)
    graphdef, state = nnx.split(splash)
    with jax.set_mesh(mesh):
        state = jax.device_put(state, sharding.state_shardings(state, mesh))
        batch = NamedSharding(mesh, P(sharding.BATCH_AXES))
        run = jax.jit(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y))
        text = run.lower(state, *(jax.device_put(a, batch) for a in (x, t, y))).as_text()
        assert "shard_map" in text or "sdy.manual_computation" in text
        out = run(state, *(jax.device_put(a, batch) for a in (x, t, y)))
    expected = np.asarray(xla(x, t, y))
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5 * np.abs(expected).max())


def test_auto_picks_by_platform():
    assert dit.resolve_attention_impl("auto", jnp.bfloat16, "tpu") == "splash"
    assert dit.resolve_attention_impl("auto", jnp.float32, "tpu") == "splash"
    assert dit.resolve_attention_impl("auto", jnp.bfloat16, "gpu") == "cudnn"
    assert dit.resolve_attention_impl("auto", jnp.float32, "gpu") == "xla"  # cuDNN: 16-bit only
    assert dit.resolve_attention_impl("auto", jnp.bfloat16, "cpu") == "xla"
    assert dit.resolve_attention_impl("xla", jnp.bfloat16, "tpu") == "xla"
    with jax.set_mesh(sharding.make_mesh()):
        assert dit.resolve_attention_impl("auto", jnp.float32) == "xla"  # this CPU mesh
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        dit.DiTConfig(attention_impl="flash")
