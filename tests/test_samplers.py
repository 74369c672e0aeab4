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
    assert samplers.sampler_names("diffusion") == ("ddpm", "ddim", "dpm++")
    assert samplers.sampler_names("transport") == ("ode-euler", "ode-heun", "ode-dopri5",
                                                   "sde-euler", "sde-heun")
    assert samplers.get_sampler("ode-heun").default_spacing(20) is None
    assert samplers.get_sampler("dpm++2m") is samplers.get_sampler("dpm++")
    assert samplers.get_sampler("dpm++").default_spacing(20) == "logsnr20"
    assert samplers.get_sampler("ddim").default_spacing(50) == "50"
    with pytest.raises(ValueError, match="unknown sampler 'euler'.*ddpm, ddim, dpm\\+\\+"):
        samplers.get_sampler("euler")
    with pytest.raises(ValueError, match="already registered"):
        samplers.register(samplers.get_sampler("ddim"))


def test_transport_samplers_are_the_transport_loops():
    # Each flow-matching entry is the transport's own sampler with the registry's `steps`.
    from dit_jax import transport

    tr = transport.create_transport()
    velocity = lambda x, t: -x + t[:, None]  # noqa: E731  any smooth field
    x = jax.random.normal(jax.random.key(0), (2, 3))
    got = samplers.sample_loop("ode-heun", tr, velocity, x, None, steps=6)
    want = transport.ode_sample_loop(tr, velocity, x, "heun2", 6)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert samplers.get_sampler("sde-euler").stochastic
    assert not samplers.get_sampler("ode-dopri5").stochastic
