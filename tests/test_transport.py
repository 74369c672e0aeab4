"""dit_jax.transport against float64 NumPy written from the SiT equations, and its samplers on
Gaussian data, where the exact velocity, noise and score are affine in x and known in closed
form (x1 ~ N(m, s²) per dimension, x0 ~ N(0, 1): x_t ~ N(α m, V), V = α² s² + σ²)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import transport as T
from dit_jax.samplers import sampler_names

PATHS = ("Linear", "GVP", "VP")
PREDICTIONS = ("velocity", "noise", "score")
WEIGHTS = (None, "velocity", "likelihood")


# ------------------------------------------------------------------ float64 NumPy references


def np_coeffs(path_type, t):
    """(α, α′, σ, σ′) in float64."""
    t = np.asarray(t, np.float64)
    if path_type == "Linear":
        return t, np.ones_like(t), 1 - t, -np.ones_like(t)
    if path_type == "GVP":
        h = np.pi / 2
        return np.sin(h * t), h * np.cos(h * t), np.cos(h * t), -h * np.sin(h * t)
    bmin, bmax = 0.1, 20.0
    log_a = -0.25 * (1 - t) ** 2 * (bmax - bmin) - 0.5 * (1 - t) * bmin
    a = np.exp(log_a)
    da = a * (0.5 * (1 - t) * (bmax - bmin) + 0.5 * bmin)
    s = np.sqrt(1 - a ** 2)
    return a, da, s, -a * da / s  # d/dt √(1 − α²) = −α α′ / σ


def np_drift_var(path_type, t):
    a, da, s, ds = np_coeffs(path_type, t)
    return da / a * s ** 2 - s * ds


def np_score_from_velocity(path_type, v, x, t):
    a, da, s, ds = np_coeffs(path_type, t)
    r = a / da
    return (r * v - x) / (s ** 2 - r * ds * s)


def np_loss(path_type, prediction, weight, out, x1, x0, t):
    a, da, s, ds = np_coeffs(path_type, t[:, None])
    if prediction == "velocity":
        return np.mean((out - (da * x1 + ds * x0)) ** 2, axis=1)
    var = np_drift_var(path_type, t[:, None])
    w = {None: 1.0, "velocity": (var / s) ** 2, "likelihood": var / s ** 2}[weight]
    if prediction == "noise":
        return np.mean(w * (out - x0) ** 2, axis=1)
    return np.mean(w * (out * s + x0) ** 2, axis=1)


def toy_model_np(x, t):
    return np.tanh(0.7 * x + np.asarray(t)[:, None]) - 0.3 * x


def toy_model_jax(x, t):
    return jnp.tanh(0.7 * x + t[:, None]) - 0.3 * x


# ------------------------------------------------------------------ paths, eps and losses


def test_create_transport_eps_and_intervals():
    assert T.create_transport() == T.Transport("Linear", "velocity", None, 0.0, 0.0, "uniform")
    # velocity with Linear/GVP ignores given eps (as released)
    assert T.create_transport("GVP", train_eps=0.1).train_eps == 0.0
    vp = T.create_transport("VP", "velocity")
    assert (vp.train_eps, vp.sample_eps) == (1e-5, 1e-3)
    noise = T.create_transport("Linear", "noise", "likelihood")
    assert (noise.train_eps, noise.sample_eps) == (1e-3, 1e-3)
    assert T.interval(T.create_transport()) == (0.0, 1.0)
    assert T.interval(noise) == (1e-3, 1 - 1e-3)
    assert T.interval(vp) == (0.0, 1 - 1e-5)
    assert T.interval(vp, eval=True) == (0.0, 1 - 1e-3)
    assert T.interval(T.create_transport(), sde=True, eval=True, diffusion_form="sigma",
                      last_step_size=0.04) == (0.0, 0.96)
    assert T.interval(noise, sde=True, eval=True, last_step_size=0.04) == (1e-3, 0.96)
    with pytest.raises(ValueError, match="path_type"):
        T.create_transport("Cosine")
    with pytest.raises(ValueError, match="prediction"):
        T.create_transport(prediction="x0")
    with pytest.raises(ValueError, match="loss_weight"):
        T.create_transport(loss_weight="snr")


@pytest.mark.parametrize("path_type", PATHS)
def test_path_coefficients_and_conversions(path_type):
    rng = np.random.default_rng(0)
    t = np.linspace(0.05, 0.95, 7)
    x = rng.standard_normal((7, 5))
    v = rng.standard_normal((7, 5))
    tj, xj, vj = (jnp.asarray(a, jnp.float32) for a in (t, x, v))
    te = T.expand_t_like_x(tj, xj)
    a, da, s, ds = np_coeffs(path_type, t[:, None])
    np.testing.assert_allclose(T.alpha(path_type, te)[0], a, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(T.alpha(path_type, te)[1], da, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(T.sigma(path_type, te)[0], s, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(T.sigma(path_type, te)[1], ds, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(T.drift(path_type, xj, te)[1],
                               np.broadcast_to(np_drift_var(path_type, t[:, None]), (7, 1)),
                               rtol=1e-4)
    score = np_score_from_velocity(path_type, v, x, t[:, None])
    np.testing.assert_allclose(T.score_from_velocity(path_type, vj, xj, te), score, rtol=1e-4,
                               atol=1e-5)
    # noise = −σ·score; velocity back from the score
    np.testing.assert_allclose(T.noise_from_velocity(path_type, vj, xj, te), -s * score,
                               rtol=1e-4, atol=1e-5)
    back = T.velocity_from_score(path_type, T.score_from_velocity(path_type, vj, xj, te), xj, te)
    np.testing.assert_allclose(back, v, rtol=1e-4, atol=1e-4)
    if path_type == "Linear":  # the closed form (t·v − x)/(1 − t)
        np.testing.assert_allclose(score, (t[:, None] * v - x) / (1 - t[:, None]), rtol=1e-12)


@pytest.mark.parametrize("path_type,prediction,weight",
                         list(itertools.product(PATHS, PREDICTIONS, WEIGHTS)))
def test_training_losses_equal_numpy(path_type, prediction, weight):
    tr = T.create_transport(path_type, prediction, weight)
    rng = np.random.default_rng(1)
    x1, x0 = rng.standard_normal((2, 6, 8))
    t0, t1 = T.interval(tr)
    t = np.linspace(max(t0, 0.02), min(t1, 0.98), 6)
    a, _, s, _ = np_coeffs(path_type, t[:, None])
    out = toy_model_np(a * x1 + s * x0, t)
    want = np_loss(path_type, prediction, weight, out, x1, x0, t)
    got = T.training_losses(tr, toy_model_jax, jnp.asarray(x1, jnp.float32),
                            jnp.asarray(t, jnp.float32), jnp.asarray(x0, jnp.float32))["loss"]
    np.testing.assert_allclose(got, want, rtol=2e-4)


def test_sample_t():
    key = jax.random.key(0)
    u = np.asarray(T.sample_t(T.create_transport("Linear", "noise"), key, 20000))
    assert u.min() >= 1e-3 and u.max() < 1 - 1e-3
    assert abs(u.mean() - 0.5) < 0.01
    ln = np.asarray(T.sample_t(T.create_transport(t_sampling="logit_normal"), key, 20000))
    logit = np.log(ln / (1 - ln))
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03
    with pytest.raises(ValueError, match="distribution"):
        T.sample_t(T.create_transport(), key, 4, distribution="beta")


# ------------------------------------------------------------------ exact Gaussian models

M = np.array([0.5, -1.0, 2.0, 0.0])
S = np.array([0.5, 1.5, 0.8, 1.0])


def exact_model(tr, xp=jnp):
    """The exact network output of tr.prediction for x1 ~ N(M, S²), in xp (jnp or np)."""
    coeffs = (lambda t: np_coeffs(tr.path_type, t)) if xp is np else (
        lambda t: T.alpha(tr.path_type, t) + T.sigma(tr.path_type, t))

    def fn(x, t):
        a, da, s, ds = coeffs(t[:, None])
        var = a ** 2 * S ** 2 + s ** 2
        r = x - a * M
        if tr.prediction == "velocity":
            return da * M + (da * a * S ** 2 + ds * s) / var * r
        if tr.prediction == "noise":
            return s / var * r
        return -r / var
    return fn


def standard_normal(n, key=0):
    """N(0, 1) draws standardised per dimension: an affine sampler then maps mean and std
    exactly, leaving only its discretisation error to measure."""
    z = np.random.default_rng(key).standard_normal((n, len(M)))
    return jnp.asarray((z - z.mean(0)) / z.std(0), jnp.float32)


@pytest.mark.parametrize("path_type,prediction,method,num_steps,tol", [
    ("Linear", "velocity", "euler", 100, 0.03),
    ("Linear", "velocity", "heun2", 25, 3e-3),
    ("Linear", "velocity", "dopri5", 0, 1e-2),  # rtol 1e-3 as released
    ("GVP", "score", "heun2", 50, 3e-3),
    ("VP", "noise", "dopri5", 0, 1e-2),
])
def test_ode_samples_gaussian(path_type, prediction, method, num_steps, tol):
    tr = T.create_transport(path_type, prediction)
    x = jax.jit(T.make_ode_sampler(tr, exact_model(tr), method=method,
                                   num_steps=num_steps or 50))(standard_normal(2048))
    x = np.asarray(x)
    np.testing.assert_allclose(x.mean(0), M, atol=tol * 2)
    np.testing.assert_allclose(x.std(0), S, rtol=tol)


def test_dopri5_tolerance_matters():
    tr = T.create_transport()
    x0 = standard_normal(512)
    loose = T.ode_sample_loop(tr, exact_model(tr), x0, "dopri5", atol=1e-2, rtol=1e-1)
    tight = T.ode_sample_loop(tr, exact_model(tr), x0, "dopri5", atol=1e-7, rtol=1e-6)
    err = lambda x: np.abs(np.asarray(x).std(0) - S).max()  # noqa: E731
    assert err(tight) < 1e-4 < err(loose)


@pytest.mark.parametrize("path_type,prediction,method,form,last_step", [
    ("Linear", "velocity", "Euler", "sigma", "Mean"),
    ("Linear", "velocity", "Heun", "linear", "Euler"),
    ("GVP", "noise", "Euler", "SBDM", "Tweedie"),
])
def test_sde_samples_gaussian(path_type, prediction, method, form, last_step):
    tr = T.create_transport(path_type, prediction)
    n = 8192
    x = jax.jit(T.make_sde_sampler(tr, exact_model(tr), method=method, num_steps=250,
                                   diffusion_form=form, last_step=last_step))(
        jnp.asarray(np.random.default_rng(3).standard_normal((n, 4)), jnp.float32),
        jax.random.key(1))
    x = np.asarray(x)
    # 5 standard errors of sampling plus a little discretisation bias
    np.testing.assert_allclose(x.mean(0), M, atol=5 * S.max() / math.sqrt(n) + 0.01)
    np.testing.assert_allclose(x.std(0), S, atol=5 * S.max() / math.sqrt(2 * n) + 0.01)


# ------------------------------------------------------------------ step for step vs NumPy


def np_ode(tr, x, method, num_steps):
    t0, t1 = T.interval(tr, eval=True)
    ts = np.linspace(t0, t1, num_steps)
    f = exact_model(tr, np)
    out = [x]
    for t, t_next in zip(ts[:-1], ts[1:]):
        h = t_next - t
        k1 = f(x, np.full(len(x), t))
        if method == "euler":
            x = x + h * k1
        else:
            k2 = f(x + h * k1, np.full(len(x), t + h))
            x = x + h / 2 * (k1 + k2)
        out.append(x)
    return np.stack(out)


@pytest.mark.parametrize("method", ["euler", "heun2"])
def test_ode_grid_step_for_step(method):
    tr = T.create_transport("GVP", "velocity")
    x = np.random.default_rng(4).standard_normal((3, 4))
    got = T.ode_sample_loop(tr, exact_model(tr), jnp.asarray(x, jnp.float32), method, 9,
                            return_trajectory=True)
    np.testing.assert_allclose(got, np_ode(tr, x, method, 9), rtol=1e-5, atol=1e-5)


def np_sde(tr, x, noises, method, num_steps, form, last_step, size=0.04, norm=1.0):
    """The release's SDE sampler in float64 with given standard-normal draws (one per step)."""
    t0, t1 = T.interval(tr, sde=True, eval=True, diffusion_form=form, last_step_size=size)
    ts = np.linspace(t0, t1, num_steps)
    dt = ts[1] - ts[0]
    f = exact_model(tr, np)

    def parts(x, t):
        tt = np.full((len(x), 1), t)
        a, da, s, ds = np_coeffs(tr.path_type, tt)
        out = f(x, tt[:, 0])
        if tr.prediction == "velocity":
            v = out
            score = np_score_from_velocity(tr.path_type, v, x, tt)
        else:
            score = out if tr.prediction == "score" else -out / s
            v = da / a * x + np_drift_var(tr.path_type, tt) * score
        w = {"sigma": lambda: norm * s, "linear": lambda: norm * (1 - tt),
             "constant": lambda: norm + 0 * tt,
             "SBDM": lambda: norm * np_drift_var(tr.path_type, tt),
             "decreasing": lambda: 0.25 * (norm * np.cos(np.pi * tt) + 1) ** 2}[form]()
        return v + w * score, v, score, w, a, s

    for i, t in enumerate(ts[:-1]):
        dw = noises[i] * np.sqrt(dt)
        w = parts(x, t)[3]
        if method == "Euler":
            x = x + parts(x, t)[0] * dt + np.sqrt(2 * w) * dw
        else:
            xh = x + np.sqrt(2 * w) * dw
            k1 = parts(xh, t)[0]
            k2 = parts(xh + dt * k1, t + dt)[0]
            x = xh + 0.5 * dt * (k1 + k2)
    d, v, score, _, a, s = parts(x, ts[-1])
    return {"Mean": x + d * size, "Euler": x + v * size, "Tweedie": x / a + s ** 2 / a * score}[
        last_step]


@pytest.mark.parametrize("path_type,prediction,method,form,last_step", [
    ("Linear", "velocity", "Euler", "sigma", "Mean"),
    ("Linear", "velocity", "Heun", "constant", "Euler"),
    ("VP", "score", "Euler", "SBDM", "Tweedie"),
    ("GVP", "noise", "Heun", "decreasing", "Mean"),
])
def test_sde_step_for_step(path_type, prediction, method, form, last_step):
    tr = T.create_transport(path_type, prediction)
    steps, key = 6, jax.random.key(7)
    x = np.random.default_rng(5).standard_normal((3, 4))
    noises = [np.asarray(jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32),
                         np.float64) for i in range(steps - 1)]
    got = T.sde_sample_loop(tr, exact_model(tr), jnp.asarray(x, jnp.float32), key, method, steps,
                            form, 1.0, last_step)
    want = np_sde(tr, x, noises, method, steps, form, last_step)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_sampler_errors():
    tr = T.create_transport()
    f = exact_model(tr)
    with pytest.raises(ValueError, match="ODE method"):
        T.make_ode_sampler(tr, f, method="rk4")
    with pytest.raises(ValueError, match="diffusion_form"):
        T.make_sde_sampler(tr, f, diffusion_form="cubic")
    with pytest.raises(ValueError, match="num_steps"):
        T.make_sde_sampler(tr, f, num_steps=1)
    with pytest.raises(ValueError, match="PRNG key"):
        T.sde_sample_loop(tr, f, jnp.zeros((2, 4)), None)
    assert set(sampler_names("transport")) == {"ode-euler", "ode-heun", "ode-dopri5",
                                               "sde-euler", "sde-heun"}


# ------------------------------------------------------------------ guidance in transport time


def test_guidance_in_transport_time():
    from dit_jax.diffusion import classifier_free_guidance

    batches = []

    def conditional(x, t, y):  # records the batch of each traced call
        batches.append(x.shape[0])
        return x * (1 + t[:, None]) + 0.1 * y[:, None].astype(x.dtype)

    y = jnp.array([2, 5])
    x = jnp.ones((2, 4))
    unguided = classifier_free_guidance(conditional, y, 1.0, null_label=10, time_dtype=None)
    tr = T.create_transport()
    jax.jit(T.make_sde_sampler(tr, unguided, num_steps=5))(x, jax.random.key(0))
    jax.jit(T.make_ode_sampler(tr, unguided, method="heun2", num_steps=5))(x)
    assert batches and set(batches) == {2}  # scale 1: never a doubled batch
    batches.clear()
    # REPA's "t ≤ 0.7" of its reversed time is t ≥ 0.3 here; float t must stay float.
    g = jax.jit(classifier_free_guidance(conditional, y, 1.8, null_label=10, guide_channels=None,
                                         interval=(0.3, 1.0), time_dtype=None))
    cond = lambda t: conditional(x, t, y)  # noqa: E731
    full = lambda t: (conditional(x, t, jnp.full_like(y, 10))  # noqa: E731
                      + 1.8 * (cond(t) - conditional(x, t, jnp.full_like(y, 10))))
    inside, outside, mixed = jnp.array([0.3, 0.65]), jnp.array([0.0, 0.29]), jnp.array([0.2, 0.5])
    np.testing.assert_allclose(g(x, inside), full(inside), rtol=1e-6)
    np.testing.assert_allclose(g(x, outside), cond(outside), rtol=1e-6)
    np.testing.assert_allclose(g(x, mixed), jnp.stack([cond(mixed)[0], full(mixed)[1]]),
                               rtol=1e-6)
    assert not np.allclose(full(inside), cond(inside))
