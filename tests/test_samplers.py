"""The sampler registry: one name per sampler, old spellings as aliases, clear errors, and the
registered samplers are exactly the diffusion's own loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import diffusion as D
from dit_jax import samplers


def model_fn(x, t):
    # Not zero, depends on t: an ε prediction that makes every step do something.
    return 0.3 * x + 0.001 * t.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


@pytest.mark.parametrize("name, loop", [("ddpm", D.p_sample_loop), ("ddim", D.ddim_sample_loop),
                                        ("dpm++", D.dpmpp_2m_sample_loop)])
def test_registered_samplers_are_the_diffusion_loops(name, loop):
    spec = samplers.get_sampler(name)
    diffusion = D.create_diffusion(spec.default_spacing(5), learn_sigma=False)
    x_T = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    key = jax.random.key(1)
    got = samplers.sample_loop(name, diffusion, model_fn, x_T, key)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(loop(diffusion, model_fn, x_T, key)))
    assert spec.stochastic == (name == "ddpm") and spec.family == "diffusion"


def test_names_aliases_and_errors():
    assert samplers.sampler_names() == ("ddpm", "ddim", "dpm++")
    assert samplers.get_sampler("dpm++2m") is samplers.get_sampler("dpm++")
    assert samplers.get_sampler("dpm++").default_spacing(20) == "logsnr20"
    assert samplers.get_sampler("ddim").default_spacing(50) == "50"
    with pytest.raises(ValueError, match="unknown sampler 'euler'.*ddpm, ddim, dpm\\+\\+"):
        samplers.get_sampler("euler")
    with pytest.raises(ValueError, match="already registered"):
        samplers.register(samplers.get_sampler("ddim"))


def test_a_transport_sampler_registers_with_one_entry(monkeypatch):
    # The shape of the flow-matching samplers: built from a transport object, returning a callable.
    monkeypatch.setattr(samplers, "SAMPLERS", dict(samplers.SAMPLERS))

    class Line:  # x_t = (1 - t) x0 + t ε: the velocity field of a point mass at 0 is -x / t
        steps = 4

    def euler(transport, velocity, **_):
        def sample(x, key):
            dt = 1.0 / transport.steps
            for i in range(transport.steps, 0, -1):
                x = x - dt * velocity(x, jnp.full((x.shape[0],), i * dt))
            return x
        return sample

    samplers.register(samplers.SamplerSpec("ode-euler", "transport", euler,
                                           default_spacing=lambda steps: None, stochastic=False))
    assert samplers.sampler_names("transport") == ("ode-euler",)
    x = jnp.ones((2, 3))
    out = samplers.sample_loop("ode-euler", Line(), lambda x, t: x / t[:, None], x)
    np.testing.assert_allclose(np.asarray(out), 0.0, atol=1e-6)
