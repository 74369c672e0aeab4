"""Meshes, logical-axis rules, and the model computing the same function sharded as on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx
from jax.sharding import PartitionSpec as P

from dit_jax import sharding
from dit_jax.models import dit


def test_make_mesh_fills_minus_one_and_uses_auto_axes():
    mesh = sharding.make_mesh(data=-1, fsdp=2)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh(data=4, fsdp=4)
    with pytest.raises(ValueError, match="cannot be split"):
        sharding.make_mesh(data=-1, fsdp=3)


def test_logical_rules_and_indivisible_dims():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), (64, 256), mesh) == P("fsdp", "tensor")
    # 5 rows do not split over fsdp=2: replicated rather than an error.
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), (5, 256), mesh) == P(None, "tensor")
    assert sharding.logical_to_mesh_spec(("layers", "embed", "qkv"), (3, 64, 192), mesh) == P(
        None, "fsdp", "tensor")
    assert sharding.logical_to_mesh_spec(("batch", None), (8, 3), mesh) == P(("data", "fsdp"), None)
    assert sharding.logical_to_mesh_spec(None, (3,), mesh) == P()


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (1, 4, 2), (2, 2, 2)])
def test_sharded_forward_equals_single_device(shape):
    cfg = dit.DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4,
                        num_classes=10)
    model = randomize_params(dit.DiT(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 8, 8, 4)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, 8))
    y = jnp.asarray(rng.integers(0, 11, 8))
    graphdef, state = nnx.split(model)

    def forward(state, x, t, y):
        return nnx.merge(graphdef, state)(x, t, y)

    reference = jax.jit(forward)(state, x, t, y)

    mesh = sharding.make_mesh(*shape)
    state_sh = sharding.state_shardings(state, mesh)
    batch_sh = sharding.batch_sharding(mesh, 4)
    with jax.set_mesh(mesh):
        sharded_state = jax.device_put(state, state_sh)
        kernel = sharded_state["blocks"][0]["mlp"]["fc1"]["kernel"]
        expected = P("fsdp" if shape[1] > 1 else None, "tensor" if shape[2] > 1 else None)
        assert kernel[...].sharding.spec == expected
        label_sh = sharding.batch_sharding(mesh, 1)
        out = jax.jit(forward, in_shardings=(state_sh, batch_sh, label_sh, label_sh),
                      out_shardings=batch_sh)(sharded_state, x, t, y)
    assert out.sharding.spec == P(("data", "fsdp"), None, None, None)
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference), rtol=1e-5, atol=1e-6)
