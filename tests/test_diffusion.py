"""dit_jax.diffusion against float64 NumPy transcriptions of the equations (written here, not
imported) and against closed forms for Gaussian data."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dit_jax import diffusion as D
from dit_jax import editing

T = 1000
BASE_BETAS = np.linspace(1e-4, 0.02, T, dtype=np.float64)
BASE_ABAR = np.cumprod(1.0 - BASE_BETAS)


# ------------------------------------------------------------------------------------------------
# Schedules and respacing


def test_named_schedules():
    np.testing.assert_array_equal(D.get_named_beta_schedule("linear", 1000), BASE_BETAS)
    # "linear" keeps the schedule's shape for other T by scaling both ends by 1000/T.
    np.testing.assert_allclose(D.get_named_beta_schedule("linear", 250),
                               np.linspace(4e-4, 0.08, 250), rtol=1e-15)
    f = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
    i = np.arange(T)
    cos = np.minimum(1 - f((i + 1) / T) / f(i / T), 0.999)
    got = D.get_named_beta_schedule("squaredcos_cap_v2", T)
    np.testing.assert_allclose(got, cos, rtol=1e-12)
    assert got[-1] == 0.999  # the cap binds at the end of the cosine schedule
    d = D.create_diffusion("")
    assert d.betas.dtype == np.float64 and d.alphas_cumprod.dtype == np.float64
    np.testing.assert_array_equal(d.alphas_cumprod, BASE_ABAR)
    np.testing.assert_array_equal(d.timestep_map, np.arange(T))


def _round_stride(count, size, start=0):
    # No x.5 ties occur for these counts (size-1 and count-1 make odd denominators), so the
    # closed form i*stride agrees with the official accumulated stride.
    return [start + round(i * (size - 1) / (count - 1)) for i in range(count)]


# "25" has exact .5 ties (stride 41.625), resolved by Python's round-half-to-even.
EXPECTED_25 = [0, 42, 83, 125, 166, 208, 250, 291, 333, 375, 416, 458, 500, 541, 583, 624, 666,
               708, 749, 791, 832, 874, 916, 957, 999]
EXPECTED_STEPS = {
    "": list(range(T)),
    "250": _round_stride(250, 1000),
    "100": _round_stride(100, 1000),
    "25": EXPECTED_25,
    "ddim50": list(range(0, 1000, 20)),
    "ddim30": list(range(0, 1000, 34)),
    "10,20,30": (_round_stride(10, 334) + _round_stride(20, 333, 334)
                 + _round_stride(30, 333, 667)),
}


@pytest.mark.parametrize("spec", list(EXPECTED_STEPS))
def test_respacing(spec):
    expected = EXPECTED_STEPS[spec]
    d = D.create_diffusion(spec)
    np.testing.assert_array_equal(d.timestep_map, expected)
    assert d.num_timesteps == len(expected) and d.original_num_steps == T
    # The respaced process has the original ᾱ at its kept steps, and β'_i = 1 - ᾱ[t_i]/ᾱ[t_{i-1}].
    abar = BASE_ABAR[expected]
    np.testing.assert_allclose(d.alphas_cumprod, abar, rtol=1e-12)
    np.testing.assert_allclose(d.betas, 1 - abar / np.append(1.0, abar[:-1]), rtol=1e-12)
    np.testing.assert_allclose(d.posterior_variance,
                               d.betas * (1 - np.append(1.0, abar[:-1])) / (1 - abar),
                               rtol=1e-12)


def test_respacing_literal_values_and_errors():
    s250 = sorted(D.space_timesteps(1000, "250"))
    assert s250[:4] == [0, 4, 8, 12] and s250[-2:] == [995, 999]
    assert sorted(D.space_timesteps(1000, "ddim30"))[1] == 34
    assert 999 not in D.space_timesteps(1000, "ddim50")
    s = sorted(D.space_timesteps(1000, "10,20,30"))
    assert len(s) == 60 and s[:10] == list(range(0, 334, 37)) and s[10] == 334 and s[-1] == 999
    with pytest.raises(ValueError):
        D.space_timesteps(1000, "ddim600")  # ceil(1000/k) jumps from 1000 to 500
    with pytest.raises(ValueError):
        D.space_timesteps(1000, "400,400,400")  # sections of 334 steps


def test_logsnr_respacing():
    d = D.create_diffusion("logsnr20")
    ts = d.timestep_map
    assert len(ts) == 20 and ts[0] == 0 and ts[-1] == 999 and np.all(np.diff(ts) > 0)
    lam = np.log(BASE_ABAR / (1 - BASE_ABAR))
    targets = lam[0] + (lam[-1] - lam[0]) * np.arange(20) / 19
    # Each step is the one nearest its target in λ, except where that step was already taken.
    for k, (t, target) in enumerate(zip(ts, targets)):
        nearest = np.abs(lam - target).min()
        assert abs(lam[t] - target) == nearest or t == ts[k - 1] + 1
    # Uniform in λ away from the first few steps, where consecutive t are taken.
    steps = np.diff(lam[ts[5:]])
    assert np.all(np.abs(steps / steps.mean() - 1) < 0.03)


# ------------------------------------------------------------------------------------------------
# float64 reference of the official equations


def ref_tables(timestep_map):
    abar = BASE_ABAR[np.asarray(timestep_map)]
    abar_prev = np.append(1.0, abar[:-1])
    betas = 1 - abar / abar_prev
    post_var = betas * (1 - abar_prev) / (1 - abar)
    return dict(abar=abar, abar_prev=abar_prev, betas=betas, post_var=post_var,
                post_logvar=np.log(np.append(post_var[1], post_var[1:])),
                coef1=betas * np.sqrt(abar_prev) / (1 - abar),
                coef2=(1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar))


def ref_p(tb, x_t, t, eps_hat, v):
    """Mean, log-variance and x̂0 of p(x_{t-1}|x_t), learned range (v) or fixed large (v None)."""
    b = lambda a: a[t][:, None, None, None]
    x0_hat = (x_t - np.sqrt(1 - b(tb["abar"])) * eps_hat) / np.sqrt(b(tb["abar"]))
    mean = b(tb["coef1"]) * x0_hat + b(tb["coef2"]) * x_t
    if v is None:
        large = np.append(tb["post_var"][1], tb["betas"][1:])
        logvar = np.broadcast_to(b(np.log(large)), x_t.shape)
    else:
        frac = (v + 1) / 2
        logvar = frac * b(np.log(tb["betas"])) + (1 - frac) * b(tb["post_logvar"])
    return mean, logvar, x0_hat


def ref_losses(timestep_map, x0, t, noise, out, learned=True):
    tb = ref_tables(timestep_map)
    b = lambda a: a[t][:, None, None, None]
    x_t = np.sqrt(b(tb["abar"])) * x0 + np.sqrt(1 - b(tb["abar"])) * noise
    c = x0.shape[-1]
    eps_hat = out[..., :c]
    mse = ((noise - eps_hat) ** 2).mean(axis=(1, 2, 3))
    if not learned:
        return {"mse": mse, "loss": mse}
    mean, logvar, _ = ref_p(tb, x_t, t, eps_hat, out[..., c:])
    true_mean = b(tb["coef1"]) * x0 + b(tb["coef2"]) * x_t
    true_logvar = b(tb["post_logvar"])
    kl = 0.5 * (-1 + logvar - true_logvar + np.exp(true_logvar - logvar)
                + (true_mean - mean) ** 2 * np.exp(-logvar))
    cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
    inv_std = np.exp(-0.5 * logvar)
    cdf_plus = cdf(inv_std * (x0 - mean + 1 / 255))
    cdf_min = cdf(inv_std * (x0 - mean - 1 / 255))
    log_p = np.where(x0 < -0.999, np.log(np.maximum(cdf_plus, 1e-12)),
                     np.where(x0 > 0.999, np.log(np.maximum(1 - cdf_min, 1e-12)),
                              np.log(np.maximum(cdf_plus - cdf_min, 1e-12))))
    vb = np.where(t == 0, -log_p.mean(axis=(1, 2, 3)), kl.mean(axis=(1, 2, 3))) / np.log(2)
    return {"mse": mse, "vb": vb, "loss": mse + vb}


def _loss_inputs(n, seed=0, c=4):
    rng = np.random.default_rng(seed)
    # On the 8-bit grid of [-1, 1] like images, with both end bins present (their likelihood
    # has its own branch).
    x0 = rng.integers(0, 256, size=(n, 4, 4, c)) / 127.5 - 1.0
    x0[:, 0, 0, 0], x0[:, 0, 0, 1] = -1.0, 1.0
    noise = rng.standard_normal((n, 4, 4, c))
    out = np.concatenate([rng.standard_normal((n, 4, 4, c)),
                          rng.uniform(-1, 1, (n, 4, 4, c))], axis=-1)
    return x0, noise, out


@pytest.mark.parametrize("spec,learned,steps", [
    ("", True, [0, 1, 500, 999]),
    ("250", True, [0, 1, 125, 249]),
    ("", False, [0, 500, 999]),
])
def test_training_losses_match_float64_reference(spec, learned, steps):
    d = D.create_diffusion(spec, learn_sigma=learned)
    t = np.array(steps)
    x0, noise, out = _loss_inputs(len(t))
    if not learned:
        out = out[..., :4]
    seen = []

    def model_fn(x_t, t_orig):
        seen.append(np.asarray(t_orig))
        return jnp.asarray(out, jnp.float32)

    f32 = lambda a: jnp.asarray(a, jnp.float32)
    got = D.training_losses(d, model_fn, f32(x0), jnp.asarray(t), f32(noise))
    # Reference on the float32-rounded inputs, so only the arithmetic differs.
    r32 = lambda a: np.asarray(f32(a), np.float64)
    ref = ref_losses(d.timestep_map, r32(x0), t, r32(noise), r32(out), learned)
    assert set(got) == set(ref)
    np.testing.assert_array_equal(seen[0], d.timestep_map[t])  # the model sees original t
    np.testing.assert_allclose(got["mse"], ref["mse"], rtol=1e-5)
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-4)
    if learned:
        # t = 0 is the decoder likelihood (bits), t > 0 the KL; both checked elementwise.
        np.testing.assert_allclose(got["vb"], ref["vb"], rtol=1e-4)
        assert ref["vb"][0] > 1.0  # the likelihood branch was exercised


@pytest.mark.parametrize("prediction", ["start_x", "velocity"])
@pytest.mark.parametrize("learned", [True, False])
def test_other_predictions_match_float64_reference(prediction, learned):
    # Not official (off by default): the model predicts x0 or v = sqrt(ᾱ)ε - sqrt(1-ᾱ)x0. Its
    # target, and the ε̂ / x̂0 it implies, written from those equations in float64.
    d = D.create_diffusion("", learn_sigma=learned, prediction=prediction)
    assert d.model_mean_type == prediction
    t = np.array([0, 1, 500, 999])
    x0, noise, out = _loss_inputs(len(t), seed=3)
    if not learned:
        out = out[..., :4]
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    r32 = lambda a: np.asarray(f32(a), np.float64)
    x0, noise, out = r32(x0), r32(noise), r32(out)
    got = D.training_losses(d, lambda x_t, s: f32(out), f32(x0), jnp.asarray(t), f32(noise))

    a = np.sqrt(BASE_ABAR[t])[:, None, None, None]
    b = np.sqrt(1 - BASE_ABAR[t])[:, None, None, None]
    x_t = a * x0 + b * noise
    target = x0 if prediction == "start_x" else a * noise - b * x0
    np.testing.assert_allclose(got["mse"], ((target - out[..., :4]) ** 2).mean(axis=(1, 2, 3)),
                               rtol=1e-5)
    x0_hat = out[..., :4] if prediction == "start_x" else a * x_t - b * out[..., :4]
    eps_hat = (x_t - a * x0_hat) / b
    if learned:  # the VB term sees the ε̂ this prediction implies
        ref = ref_losses(d.timestep_map, x0, t, noise,
                         np.concatenate([eps_hat, out[..., 4:]], -1), learned)
        # atol: at t = 999 the KL is ~1e-6 bits, below float32's resolution of its terms.
        np.testing.assert_allclose(got["vb"], ref["vb"], rtol=1e-4, atol=1e-6)
    p = D.output_mean_variance(d, f32(out), f32(x_t), jnp.asarray(t))
    np.testing.assert_allclose(p["pred_xstart"], x0_hat, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(p["eps"][1:], eps_hat[1:], rtol=1e-4, atol=1e-4)
    mean, _, _ = ref_p(ref_tables(d.timestep_map), x_t, t, eps_hat, None)
    np.testing.assert_allclose(p["mean"], mean, rtol=1e-4, atol=1e-5)
    # The official path is untouched: without `prediction`, ε as before.
    assert D.create_diffusion("").model_mean_type == "epsilon"
    with pytest.raises(ValueError, match="unknown model_mean_type"):
        D.create_diffusion("", prediction="score")


@pytest.mark.parametrize("prediction", ["epsilon", "start_x", "velocity"])
def test_min_snr_weighting_matches_float64_reference(prediction):
    # Not official (off by default). In x0 terms the weight is min(SNR, γ); an ε error is an x0
    # error × sqrt(SNR), a v error × sqrt(SNR + 1), so the weight of the target's MSE is
    # min(SNR, γ)/SNR, min(SNR, γ)/(SNR + 1) or min(SNR, γ).
    gamma = 5.0
    plain = D.create_diffusion("", learn_sigma=False, prediction=prediction)
    weighted = D.create_diffusion("", learn_sigma=False, prediction=prediction,
                                  min_snr_gamma=gamma)
    t = np.array([0, 30, 200, 999])
    snr = BASE_ABAR[t] / (1 - BASE_ABAR[t])
    in_x0 = np.minimum(snr, gamma)
    want = {"epsilon": in_x0 / snr, "velocity": in_x0 / (snr + 1), "start_x": in_x0}[prediction]
    np.testing.assert_allclose(D.min_snr_weights(BASE_ABAR, gamma, prediction)[t], want,
                               rtol=1e-12)
    x0, noise, out = (jnp.asarray(a, jnp.float32) for a in _loss_inputs(len(t), seed=4))
    model_fn = lambda x_t, s: out[..., :4]
    a = D.training_losses(plain, model_fn, x0, jnp.asarray(t), noise)["mse"]
    b = D.training_losses(weighted, model_fn, x0, jnp.asarray(t), noise)
    np.testing.assert_allclose(b["mse"], np.asarray(a, np.float64) * want, rtol=1e-5)
    np.testing.assert_array_equal(b["loss"], b["mse"])
    assert plain.min_snr_gamma == 0.0 and "mse_weight" not in plain.tables32
    with pytest.raises(ValueError, match="min_snr_gamma"):
        D.create_diffusion("", min_snr_gamma=-1)


def implied_x0(abar, x0, noise, out, prediction):
    """float64: the x̂0 that a model output `out` implies at ᾱ = abar (one per row), from
    x_t = a·x0 + b·ε, x̂0 = (x_t - b·ε̂)/a (ε model), x̂0 = a·x_t - b·v̂ (v model)."""
    a = np.sqrt(abar)[:, None, None, None]
    b = np.sqrt(1 - abar)[:, None, None, None]
    x_t = a * x0 + b * noise
    return {"epsilon": (x_t - b * out) / a, "start_x": out,
            "velocity": a * x_t - b * out}[prediction]


@pytest.mark.parametrize("prediction", ["epsilon", "start_x", "velocity"])
def test_start_x_loss_space_is_the_mse_of_the_implied_x0(prediction):
    # Not official (off by default): whatever the model predicts, the loss is the MSE of the x̂0
    # it implies, from the float64 equations x_t = a·x0 + b·ε, x̂0 = (x_t - b·ε̂)/a (ε model),
    # x̂0 = a·x_t - b·v̂ (v model).
    spaced = D.create_diffusion("", learn_sigma=False, prediction=prediction,
                                loss_space="start_x")
    t = np.array([0, 30, 200, 700])
    x0, noise, out = _loss_inputs(len(t), seed=5)
    out = out[..., :4]
    want = ((implied_x0(BASE_ABAR[t], x0, noise, out, prediction) - x0) ** 2).mean(axis=(1, 2, 3))
    got = D.training_losses(spaced, lambda x, s: jnp.asarray(out, jnp.float32),
                            jnp.asarray(x0, jnp.float32), jnp.asarray(t),
                            jnp.asarray(noise, jnp.float32))
    np.testing.assert_allclose(got["mse"], want, rtol=2e-4)
    np.testing.assert_array_equal(got["loss"], got["mse"])
    assert ("mse_weight" in spaced.tables32) == (prediction != "start_x")
    with pytest.raises(ValueError, match="loss_space"):
        D.create_diffusion("", loss_space="x0")
    with pytest.raises(ValueError, match="choose one"):
        D.create_diffusion("", loss_space="start_x", min_snr_gamma=5.0)


@pytest.mark.parametrize("prediction", ["epsilon", "start_x", "velocity"])
def test_snr_plus_one_cap_weighs_the_implied_x0_error(prediction):
    # Not official (off by default): the loss is min(SNR + 1, cap) × the MSE of the x̂0 the model
    # implies, from the float64 equations x_t = a·x0 + b·ε, SNR = a²/b², x̂0 = (x_t - b·ε̂)/a
    # (ε model), x̂0 = a·x_t - b·v̂ (v model).
    cap = 10.0
    weighted = D.create_diffusion("", learn_sigma=False, prediction=prediction,
                                  noise_schedule="squaredcos_cap_v2", snr_plus_one_cap=cap)
    abar = np.cumprod(1 - D.get_named_beta_schedule("squaredcos_cap_v2", 1000))
    t = np.array([0, 30, 150, 200, 400, 999])  # capped at 0 and 30, not from 200 on
    x0, noise, out = _loss_inputs(len(t), seed=6)
    out = out[..., :4]
    x0_hat = implied_x0(abar[t], x0, noise, out, prediction)
    weight = np.minimum(abar[t] / (1 - abar[t]) + 1, cap)
    assert weight[0] == weight[1] == cap and 1 < weight[3] < cap and weight[-1] < 1 + 1e-6
    want = weight * ((x0_hat - x0) ** 2).mean(axis=(1, 2, 3))
    got = D.training_losses(weighted, lambda x, s: jnp.asarray(out, jnp.float32),
                            jnp.asarray(x0, jnp.float32), jnp.asarray(t),
                            jnp.asarray(noise, jnp.float32))
    np.testing.assert_allclose(got["mse"], want, rtol=2e-4)
    np.testing.assert_array_equal(got["loss"], got["mse"])
    with pytest.raises(ValueError, match="snr_plus_one_cap must be > 1"):
        D.create_diffusion("", snr_plus_one_cap=0.5)
    with pytest.raises(ValueError, match="min_snr_gamma and snr_plus_one_cap .* choose one"):
        D.create_diffusion("", snr_plus_one_cap=5.0, min_snr_gamma=5.0)


def test_vb_gradient_reaches_only_variance_channels():
    d = D.create_diffusion("")
    x0, noise, out = (jnp.asarray(a, jnp.float32) for a in _loss_inputs(4, seed=1))
    t = jnp.array([0, 10, 500, 999])

    def term(name):
        return jax.grad(lambda o: D.training_losses(d, lambda x, s: o, x0, t, noise)[name].sum())

    g_vb, g_mse, g_loss = term("vb")(out), term("mse")(out), term("loss")(out)
    assert jnp.all(g_vb[..., :4] == 0) and jnp.all(jnp.abs(g_vb[..., 4:]).sum((1, 2, 3)) > 0)
    assert jnp.all(g_mse[..., 4:] == 0)
    np.testing.assert_allclose(g_loss, g_mse + g_vb, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("learned", [True, False])
def test_single_steps_match_float64_reference(learned):
    d = D.create_diffusion("250", learn_sigma=learned)
    t = np.array([0, 1, 100, 249])
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 4, 4, 4))
    z = rng.standard_normal(x.shape)
    out = np.concatenate([rng.standard_normal(x.shape), rng.uniform(-1, 1, x.shape)], -1)
    if not learned:
        out = out[..., :4]
    r32 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    x, z, out = r32(x), r32(z), r32(out)
    model_fn = lambda x_t, s: jnp.asarray(out, jnp.float32)
    tb = ref_tables(d.timestep_map)
    mean, logvar, x0_hat = ref_p(tb, x, t, out[..., :4], out[..., 4:] if learned else None)
    nonzero = (t != 0)[:, None, None, None]
    ddpm = mean + nonzero * np.exp(0.5 * logvar) * z
    got = D.p_sample(d, model_fn, jnp.asarray(x, jnp.float32), jnp.asarray(t),
                     jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(got["pred_xstart"], x0_hat, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["sample"], ddpm, rtol=1e-4, atol=1e-4)
    eta = 0.7
    b = lambda a: a[t][:, None, None, None]
    ab, abp = b(tb["abar"]), b(tb["abar_prev"])
    eps = (x / np.sqrt(ab) - x0_hat) / np.sqrt(1 / ab - 1)
    sigma = eta * np.sqrt((1 - abp) / (1 - ab) * (1 - ab / abp))
    ddim = np.sqrt(abp) * x0_hat + np.sqrt(1 - abp - sigma ** 2) * eps + nonzero * sigma * z
    got = D.ddim_sample(d, model_fn, jnp.asarray(x, jnp.float32), jnp.asarray(t),
                        jnp.asarray(z, jnp.float32), eta=eta)
    np.testing.assert_allclose(got["sample"], ddim, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Samplers on Gaussian data with the exact model
#
# Data x0 ~ N(μ_c, s_c²) independently per element (per-channel μ, s). Then x_t = a·x0 + b·ε with
# a = sqrt(ᾱ), b = sqrt(1-ᾱ) is Gaussian, and E[ε | x_t] = Cov(ε, x_t)/Var(x_t)·(x_t - aμ)
#   ε*(x_t) = b·(x_t - aμ) / (a²s² + b²).
# Every reverse conditional is Gaussian too: x_{t-1} | x_t has mean = the posterior mean at
# x̂0 = E[x0|x_t], variance V = β̃_t + coef1_t²·Var(x0|x_t), Var(x0|x_t) = s²b²/(a²s² + b²).
# A model returning ε* and the v that makes the learned-range variance equal V makes DDPM exact
# at any step count (up to x_T ~ N(0, 1) instead of N(aμ, a²s²+b²) at ᾱ_999 = 4e-5).

MU = np.array([0.5, -0.3, 0.0, 1.0])
SD = np.array([0.5, 1.0, 0.3, 0.8])


def gaussian_oracle(d, mu=MU, sd=SD):
    """model_fn(x_t, t_orig) -> [ε*, v*] for diffusion d (t_orig: original timesteps)."""
    tb = ref_tables(d.timestep_map)
    a2, b2 = tb["abar"][:, None], 1 - tb["abar"][:, None]
    var_x0 = sd ** 2 * b2 / (a2 * sd ** 2 + b2)
    v_true = tb["post_var"][:, None] + tb["coef1"][:, None] ** 2 * var_x0
    lo, hi = tb["post_logvar"][:, None], np.log(tb["betas"])[:, None]
    v = 2 * (np.log(v_true) - lo) / (hi - lo) - 1
    v[0] = 0.0  # step 0 adds no noise
    step_of = np.full(T, -1)
    step_of[d.timestep_map] = np.arange(d.num_timesteps)
    base_abar = jnp.asarray(BASE_ABAR, jnp.float32)
    mu32, sd32 = jnp.asarray(mu, jnp.float32), jnp.asarray(sd, jnp.float32)

    def model_fn(x, t_orig):
        ab = base_abar[t_orig][:, None, None, None]
        eps = jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * mu32) / (ab * sd32 ** 2 + 1 - ab)
        var_vals = jnp.asarray(v, jnp.float32)[jnp.asarray(step_of)[t_orig]]
        return jnp.concatenate([eps, jnp.broadcast_to(var_vals[:, None, None, :], x.shape)], -1)

    return model_fn


def standardized_normal(key, shape):
    """N(0, 1) draws rescaled to exactly mean 0, variance 1 per channel: a deterministic sampler is
    an affine map per element here, so the sample moments then carry no Monte-Carlo error."""
    z = np.asarray(jax.random.normal(key, shape), np.float64)
    z = (z - z.mean(axis=(0, 1, 2))) / z.std(axis=(0, 1, 2))
    return jnp.asarray(z, jnp.float32)


def channel_moments(x):
    x = np.asarray(x, np.float64)
    return x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))


@functools.lru_cache(maxsize=None)
def diffusion(spec):
    return D.create_diffusion(spec)


@functools.lru_cache(maxsize=None)
def compiled(kind, spec, **options):
    """One compiled sampler per (kind, spec, options), shared between tests."""
    d = diffusion(spec)
    loop = {"ddpm": D.p_sample_loop, "ddim": D.ddim_sample_loop,
            "dpm": D.dpmpp_2m_sample_loop}[kind]
    oracle = gaussian_oracle(d)
    return jax.jit(lambda x, key: loop(d, oracle, x, key, **options))


def test_ddpm_samples_gaussian_data():
    n = 4096  # 16384 draws per channel
    x = compiled("ddpm", "25")(jax.random.normal(jax.random.key(0), (n, 2, 2, 4)),
                                jax.random.key(1))
    mean, var = channel_moments(x)
    m = n * 4
    # 5 standard errors of the sample mean and of the sample variance.
    np.testing.assert_array_less(np.abs(mean - MU), 5 * SD / math.sqrt(m))
    np.testing.assert_array_less(np.abs(var / SD ** 2 - 1), 5 * math.sqrt(2 / m))


def ddim_affine_map(d, mu=MU, sd=SD):
    """float64 closed form of deterministic DDIM with ε*: x_out = A + G·x_T per channel."""
    tb = ref_tables(d.timestep_map)
    A, G = np.zeros_like(mu), np.ones_like(mu)
    for i in reversed(range(d.num_timesteps)):
        a, b = np.sqrt(tb["abar"][i]), np.sqrt(1 - tb["abar"][i])
        k = b / (a ** 2 * sd ** 2 + b ** 2)  # ε* = k·(x - aμ)
        a_prev = np.sqrt(tb["abar_prev"][i])
        b_prev = np.sqrt(1 - tb["abar_prev"][i])
        # x̂0 = (x - b·ε*)/a; x_prev = a_prev·x̂0 + b_prev·ε*: affine in x with slope g.
        g = a_prev * (1 - b * k) / a + b_prev * k
        c = a_prev * (b * k * a * mu) / a - b_prev * k * a * mu
        A, G = g * A + c, g * G
    return A, G


def test_ddim_matches_closed_form_and_is_deterministic():
    d = diffusion("25")
    x_T = standardized_normal(jax.random.key(2), (1024, 2, 2, 4))
    run = compiled("ddim", "25")
    x = run(x_T, jax.random.key(3))
    A, G = ddim_affine_map(d)
    np.testing.assert_allclose(x, A + G * np.asarray(x_T, np.float64), rtol=0, atol=2e-4)
    np.testing.assert_array_equal(x, run(x_T, jax.random.key(4)))  # eta 0 ignores the key
    # Jitted as a whole vs the loop's own compilation: equal up to float32 fusion order.
    np.testing.assert_allclose(x, D.ddim_sample_loop(d, gaussian_oracle(d), x_T), rtol=1e-6, atol=1e-6)
    noisy = jax.jit(lambda x, k: D.ddim_sample_loop(d, gaussian_oracle(d), x, k, eta=1.0))
    assert not np.allclose(noisy(x_T, jax.random.key(3)), noisy(x_T, jax.random.key(4)))


# Mean tolerance of the deterministic samplers: x_T ~ N(0, 1) instead of N(sqrt(ᾱ_999)·μ, ·)
# shifts the sample mean by about sqrt(ᾱ_999)·|μ| ≈ 0.006·|μ|.
MEAN_ATOL = 0.01


def test_ddim_250_steps_samples_gaussian_data():
    # DDIM is first order: on this data its variance error is ~ -1.5..-3.5 % at 250 steps
    # (-14..-31 % at 25), so the moment check uses the paper's 250 steps.
    x_T = standardized_normal(jax.random.key(2), (1024, 2, 2, 4))
    mean, var = channel_moments(compiled("ddim", "250")(x_T, None))
    np.testing.assert_allclose(mean, MU, atol=MEAN_ATOL)
    np.testing.assert_allclose(var, SD ** 2, rtol=0.05)


def test_dpm_solver_20_steps_samples_gaussian_data():
    # Second order on the log-SNR grid: the variance error is ~3 % at 20 steps for every s.
    x_T = standardized_normal(jax.random.key(5), (1024, 2, 2, 4))
    mean, var = channel_moments(compiled("dpm", "logsnr20")(x_T, None))
    np.testing.assert_allclose(mean, MU, atol=MEAN_ATOL)
    np.testing.assert_allclose(var, SD ** 2, rtol=0.05)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' own NumPy 2 warning
def test_dpm_solver_matches_diffusers():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    d = diffusion("20")
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")
    scheduler.set_timesteps(timesteps=[int(t) for t in d.timestep_map[::-1]])
    x_T = standardized_normal(jax.random.key(5), (64, 2, 2, 4))
    oracle = gaussian_oracle(d)
    x = torch.tensor(np.asarray(x_T), dtype=torch.float64)
    for t in scheduler.timesteps:
        out = oracle(jnp.asarray(x.numpy(), jnp.float32), jnp.full((64,), int(t)))
        x = scheduler.step(torch.tensor(np.asarray(out[..., :4], np.float64)), t, x).prev_sample
    np.testing.assert_allclose(compiled("dpm", "20")(x_T, None), x.numpy(), atol=1e-4)


def test_dpm_solver_matches_float64_transcription():
    d = D.create_diffusion("6")
    rng = np.random.default_rng(3)
    x_T = rng.standard_normal((3, 2, 2, 2))
    w = rng.standard_normal((2, 2)) * 0.5

    def eps_np(x, t_orig):  # a nonlinear toy ε-model
        return np.tanh(x @ w) + t_orig[:, None, None, None] / 1000.0

    def model_fn(x, t_orig):
        eps = jnp.tanh(x @ jnp.asarray(w, jnp.float32)) + t_orig[:, None, None, None] / 1000.0
        return jnp.concatenate([eps, jnp.zeros_like(eps)], -1)

    tb = ref_tables(d.timestep_map)
    alpha, sigma = np.sqrt(tb["abar"]), np.sqrt(1 - tb["abar"])
    lam = np.log(alpha / sigma)
    x, prev_x0, h_prev, traj = x_T.copy(), None, None, []
    for i in reversed(range(d.num_timesteps)):
        t_orig = np.full(3, d.timestep_map[i])
        x0 = (x - sigma[i] * eps_np(x, t_orig)) / alpha[i]
        if i == 0:
            x = x0  # lower-order final step into σ = 0
        else:
            h = lam[i - 1] - lam[i]
            if prev_x0 is None:
                dd = x0
            else:
                r = h_prev / h
                dd = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev_x0
            x = sigma[i - 1] / sigma[i] * x - alpha[i - 1] * (np.exp(-h) - 1) * dd
            h_prev = h
        prev_x0 = x0
        traj.append(x)
    got = D.dpmpp_2m_sample_loop(d, model_fn, jnp.asarray(x_T, jnp.float32),
                                 return_trajectory=True)
    np.testing.assert_allclose(got["trajectory"], np.stack(traj), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got["sample"], got["trajectory"][-1])


def test_loop_options_and_jit_helper():
    d = diffusion("25")
    traces = []

    def apply_fn(args, x, t):
        traces.append(x.shape)
        return gaussian_oracle(d)(x, t) * args

    run = D.jit_sampler(D.ddim_sample_loop, d, apply_fn, return_pred_x0=True,
                        return_trajectory=True)
    x_T = jax.random.normal(jax.random.key(0), (8, 2, 2, 4))
    out = run(jnp.float32(1.0), x_T, None)
    assert out["trajectory"].shape == (25, 8, 2, 2, 4) and out["pred_x0"].shape == (25, 8, 2, 2, 4)
    np.testing.assert_array_equal(out["sample"], out["trajectory"][-1])
    # The last DDIM step goes to ᾱ_prev = 1, where the sample is x̂0 itself.
    np.testing.assert_allclose(out["sample"], out["pred_x0"][-1], atol=1e-6)
    run(jnp.float32(1.0), x_T + 1, None)
    assert len(traces) == 1  # one trace (and compile) per shape, the model traced once in a scan
    jaxpr = jax.make_jaxpr(lambda x: D.p_sample_loop(d, gaussian_oracle(d), x,
                                                     jax.random.key(0)))(x_T)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == 25


# ------------------------------------------------------------------------------------------------
# Guidance


def toy_conditional(calls=None):
    def model_fn(x, t, y):
        if calls is not None:
            jax.debug.callback(lambda n: calls.append(int(n)), x.shape[0])
        yy = y.astype(jnp.float32)[:, None, None, None]
        tt = t.astype(jnp.float32)[:, None, None, None] / 1000.0
        return jnp.concatenate([x * (1 + yy) + tt, x ** 2 - yy * tt], axis=-1)
    return model_fn


def test_guidance_matches_hand_computation():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((3, 2, 2, 4)), jnp.float32)
    t = jnp.array([10, 500, 990])
    y = jnp.array([1, 7, 3])
    s = 4.0
    f = toy_conditional()
    cond, uncond = np.asarray(f(x, t, y)), np.asarray(f(x, t, jnp.full_like(y, 1000)))
    released = cond.copy()
    released[..., :3] = uncond[..., :3] + s * (cond[..., :3] - uncond[..., :3])
    everything = cond.copy()
    everything[..., :4] = uncond[..., :4] + s * (cond[..., :4] - uncond[..., :4])
    calls = []
    g = D.classifier_free_guidance(toy_conditional(calls), y, s, null_label=1000)
    np.testing.assert_allclose(g(x, t), released, rtol=1e-6)
    jax.effects_barrier()
    assert calls == [6]  # one batched 2N forward
    g_all = D.classifier_free_guidance(f, y, s, null_label=1000, guide_channels=None)
    np.testing.assert_allclose(g_all(x, t), everything, rtol=1e-6)
    calls.clear()
    g1 = D.classifier_free_guidance(toy_conditional(calls), y, 1.0, null_label=1000)
    np.testing.assert_allclose(g1(x, t), cond, rtol=1e-6)
    jax.effects_barrier()
    assert calls == [3]  # scale 1: no doubled batch


def test_guidance_interval():
    x = jnp.ones((2, 2, 2, 4))
    y = jnp.array([2, 5])
    f = toy_conditional()
    calls = []
    g = jax.jit(D.classifier_free_guidance(toy_conditional(calls), y, 3.0, null_label=1000,
                                           interval=(100, 600)))
    full = D.classifier_free_guidance(f, y, 3.0, null_label=1000)
    inside, outside = jnp.array([100, 600]), jnp.array([99, 601])
    np.testing.assert_allclose(g(x, inside), full(x, inside), rtol=1e-6)
    np.testing.assert_allclose(g(x, outside), f(x, outside, y), rtol=1e-6)
    mixed = jnp.array([300, 900])
    got = g(x, mixed)
    np.testing.assert_allclose(got[0], full(x, mixed)[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], f(x, mixed, y)[1], rtol=1e-6)
    jax.effects_barrier()
    assert calls == [4, 2, 4]  # outside the interval only the conditional batch runs


def test_guidance_takes_the_models_null_label():
    from conftest import random_dit

    with pytest.raises(TypeError, match="null_label"):
        D.classifier_free_guidance(toy_conditional(), jnp.array([1]), 2.0)
    with pytest.raises(TypeError, match="null_label must be an int"):
        D.classifier_free_guidance(toy_conditional(), jnp.array([1]), 2.0, null_label=None)
    model = random_dit(depth=1, hidden_size=32, num_heads=2, patch_size=2, input_size=4,
                       num_classes=10)
    assert model.null_label == 10
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((2, 4, 4, 4)), jnp.float32)
    t, y = jnp.array([20, 700]), jnp.array([3, 9])
    cond, uncond = np.asarray(model(x, t, y)), np.asarray(model(x, t, jnp.full_like(y, 10)))
    expected = cond.copy()
    expected[..., :3] = uncond[..., :3] + 2.5 * (cond[..., :3] - uncond[..., :3])
    guided = D.classifier_free_guidance(model, y, 2.5, null_label=model.null_label)
    np.testing.assert_allclose(guided(x, t), expected, rtol=1e-5, atol=1e-6)
    assert np.abs(expected - cond).max() > 1e-3  # the null row really changes the output
    # The old default, 1000, is past this 11-row table: a clear error rather than NaN rows.
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 11\)"):
        D.classifier_free_guidance(model, y, 2.5, null_label=1000)(x, t)
    without_null = random_dit(depth=1, hidden_size=32, num_heads=2, patch_size=2, input_size=4,
                              num_classes=10, class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="no null-label row"):
        D.classifier_free_guidance(without_null, y, 2.5, null_label=without_null.null_label)


# ------------------------------------------------------------------------------------------------
# Editing


@pytest.mark.parametrize("sampler,spec",
                         [("ddpm", "25"), ("ddim", "250"), ("dpm++2m", "logsnr20")])
def test_inpainting_keeps_known_region_and_samples_the_rest(sampler, spec):
    d = diffusion(spec)
    n = 1024
    known = jnp.asarray(np.random.default_rng(5).standard_normal((n, 2, 2, 4)) * 3 + 7,
                        jnp.float32)  # far from the data: a leak would show
    mask = jnp.zeros((1, 2, 2, 1), bool).at[:, 0].set(True)
    x_T = jax.random.normal(jax.random.key(6), known.shape)
    run = jax.jit(lambda k, m, x, key: editing.inpaint(d, gaussian_oracle(d), k, m, x, key,
                                                 sampler=sampler, return_pred_x0=True))
    out = run(known, mask, x_T, jax.random.key(7))
    x = np.asarray(out["sample"])
    np.testing.assert_array_equal(x[:, 0], known[:, 0])
    # With independent elements the unknown half is plain data: 5 standard errors (2048 draws
    # per channel) plus the step error of the deterministic samplers (mean 0.01, variance 5 %).
    mean, var = channel_moments(x[:, 1:])
    np.testing.assert_array_less(np.abs(mean - MU), 5 * SD / math.sqrt(2 * n) + MEAN_ATOL)
    np.testing.assert_array_less(np.abs(var / SD ** 2 - 1), 5 * math.sqrt(1 / n) + 0.05)
    # The model saw the noised original in the known region: its x̂0 there is close to it early.
    assert np.abs(out["pred_x0"][0][:, 0] - known[:, 0]).mean() > 1.0
    assert np.abs(out["pred_x0"][-1][:, 0] - known[:, 0]).mean() < 0.1


@pytest.mark.parametrize("sampler,spec",
                         [("ddpm", "25"), ("ddim", "250"), ("dpm++2m", "logsnr20")])
def test_img2img(sampler, spec):
    d = diffusion(spec)
    x0 = jnp.asarray(np.random.default_rng(6).standard_normal((512, 2, 2, 4)) * SD + MU,
                     jnp.float32)
    same = editing.img2img(d, gaussian_oracle(d), x0, jax.random.key(0), strength=0.0, sampler=sampler)
    np.testing.assert_array_equal(same, x0)
    run = jax.jit(lambda x, key: editing.img2img(d, gaussian_oracle(d), x, key, strength=0.4,
                                           sampler=sampler, return_pred_x0=True))
    out = run(x0, jax.random.key(1))
    n_steps = round(0.4 * d.num_timesteps)
    assert out["pred_x0"].shape[0] == n_steps
    x = np.asarray(out["sample"], np.float64)
    # Data in, data out (forward noising then the exact reverse model): 5 standard errors (2048
    # draws per channel) plus the deterministic samplers' step error.
    mean, var = channel_moments(x)
    np.testing.assert_array_less(np.abs(mean - MU), 5 * SD / math.sqrt(2048) + MEAN_ATOL)
    np.testing.assert_array_less(np.abs(var / SD ** 2 - 1), 5 * math.sqrt(2 / 2048) + 0.05)
    # The edit keeps the closed-form correlation with its input. With x_t0 = a·x0 + b·ε:
    # corr(x0, x_t0) = as/sqrt(a²s² + b²) for a deterministic sampler (a monotone affine map of
    # x_t0), and its square for DDPM (a fresh draw from p(x0 | x_t0)).
    abar = d.alphas_cumprod[n_steps - 1]
    rho = np.sqrt(abar) * SD / np.sqrt(abar * SD ** 2 + 1 - abar)
    expected = rho ** 2 if sampler == "ddpm" else rho
    x0 = np.asarray(x0, np.float64)
    corr = [np.corrcoef(x[..., c].ravel(), x0[..., c].ravel())[0, 1] for c in range(4)]
    np.testing.assert_allclose(corr, expected, atol=0.08)


# ------------------------------------------------------------------------------------------------
# Sharding


def test_sharded_sampling_equals_single_device():
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py sets 8 virtual CPU devices"
    d = diffusion("25")
    kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 8)) * 0.1
    table = jax.random.normal(jax.random.key(1), (1001, 8)) * 0.1

    def apply_fn(args, x, t):  # conv over the image, label embedding added: a toy DiT
        params, y = args
        cond = D.classifier_free_guidance(
            lambda x, t, y: jax.lax.conv_general_dilated(
                x, params["kernel"], (1, 1), "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
            + params["table"][y][:, None, None, :] + t[:, None, None, None] / 1000.0,
            y, 2.0, null_label=1000)
        return cond(x, t)

    run = D.jit_sampler(D.p_sample_loop, d, apply_fn)
    params = {"kernel": kernel, "table": table}
    x_T = jax.random.normal(jax.random.key(2), (16, 4, 4, 4))
    y = jnp.arange(16) * 7
    key = jax.random.key(3)
    single = run((params, y), x_T, key)
    mesh = Mesh(np.array(devices), ("data",))
    batch = NamedSharding(mesh, P("data"))
    sharded = run((jax.device_put(params, NamedSharding(mesh, P())), jax.device_put(y, batch)),
                  jax.device_put(x_T, batch), key)
    assert len(sharded.sharding.device_set) == 8
    assert sharded.sharding.is_equivalent_to(batch, sharded.ndim)
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)


def test_official_method_names_delegate_to_the_functions():
    diffusion = D.create_diffusion("10")
    rng = np.random.default_rng(5)
    x0 = jnp.asarray(rng.standard_normal((2, 4, 4, 4)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((2, 4, 4, 4)), jnp.float32)
    t = jnp.array([0, 7])

    def model_fn(x, t):
        return jnp.concatenate([0.5 * x, jnp.tanh(x)], axis=-1)

    np.testing.assert_array_equal(diffusion.q_sample(x0, t, noise), D.q_sample(diffusion, x0, t, noise))
    method = diffusion.training_losses(model_fn, x0, t, noise)
    function = D.training_losses(diffusion, model_fn, x0, t, noise)
    for name in ("loss", "mse", "vb"):
        np.testing.assert_array_equal(method[name], function[name])
    key = jax.random.key(0)
    np.testing.assert_array_equal(diffusion.p_sample_loop(model_fn, noise, key),
                                  D.p_sample_loop(diffusion, model_fn, noise, key))
    np.testing.assert_array_equal(diffusion.ddim_sample_loop(model_fn, noise, eta=0.0),
                                  D.ddim_sample_loop(diffusion, model_fn, noise))
