"""Transport sampling of a DiT sharded over 8 (virtual CPU) devices equals one device: the
adaptive dopri5 ODE (its step size comes from a norm over the whole sharded batch) and the
Euler–Maruyama SDE (its noise drawn inside the program, whatever the sharding)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dit_jax import transport as T
from dit_jax.models.sit import sit_forward
from dit_jax.samplers import make_solver
from dit_jax.sharding import batch_sharding, make_mesh, state_shardings

from conftest import random_dit


def _sample(model, mesh, name, x, y, key, **options):
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh)
    tr = T.create_transport()

    def run(state, x, y, key):
        m = nnx.merge(graphdef, state)
        sampler = make_solver(name, tr, lambda z, t: sit_forward(m, z, t, y), **options)
        return sampler(x, key)

    with jax.set_mesh(mesh):
        fn = jax.jit(run, in_shardings=(shardings, batch_sharding(mesh, 4),
                                        batch_sharding(mesh, 1), NamedSharding(mesh, P())),
                     out_shardings=batch_sharding(mesh, 4))
        out = fn(jax.device_put(state, shardings), x, y, key)
    assert len(out.sharding.device_set) == mesh.size
    return np.asarray(out)


@pytest.mark.parametrize("name,options", [("ode-dopri5", dict(steps=2)),
                                          ("sde-euler", dict(steps=8))])
def test_sharded_sampling_equals_one_device(name, options):
    assert jax.device_count() == 8
    model = random_dit(seed=3, depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8,
                       num_classes=10)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 8, 8, 4)), jnp.float32)
    y = jnp.arange(8, dtype=jnp.int32)
    key = jax.random.key(4)
    eight = _sample(model, make_mesh(), name, x, y, key, **options)
    one = _sample(model, make_mesh(devices=jax.devices()[:1]), name, x, y, key, **options)
    assert np.abs(eight - np.asarray(x)).max() > 1e-2  # the sampler moved the state
    np.testing.assert_allclose(eight, one, rtol=1e-5, atol=1e-5)
