"""dit_jax.evaluation against independent references: torch-fidelity's FID Inception (the
TensorFlow graph ported to PyTorch) with the same random weights, NumPy/SciPy transcriptions of
the ADM evaluator's formulas, and `python -m dit_jax.evaluate` end to end."""

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from scipy import linalg

from dit_jax.evaluation import (FeatureExtractor, FIDStatistics, frechet_distance,
                                inception_score, load_inception, precision_recall,
                                resolve_weights)
from dit_jax.evaluation.inception import read_state_dict, resize_bilinear_tf1
from dit_jax.evaluation.metrics import manifold_radii, pairwise_distances
from dit_jax.evaluation.suite import read_set, write_reference
from dit_jax.sharding import make_mesh

from imagedata import draw_image

ROOT = Path(__file__).resolve().parents[1]
REL_TOL = 1e-5


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


# --------------------------------------------------------------------------- the reference network


def import_torch_fidelity_inception():
    """torch_fidelity.feature_extractor_inceptionv3 without the package's __init__, which imports
    torchvision (absent here: it does not load with the CPU torch wheel)."""
    pytest.importorskip("torch")
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        pytest.skip("torch-fidelity is not installed (pip install --no-deps torch-fidelity)")
    if "torch_fidelity" not in sys.modules:
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = package
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")


@pytest.fixture(scope="module")
def tf_inception():
    return import_torch_fidelity_inception()


@pytest.fixture(scope="module")
def weights_file(tf_inception, tmp_path_factory):
    """A random-weights FID Inception file in pytorch-fid's format (torch names, .pth), made by
    torch-fidelity's own module: He-scaled convolutions and batch-norm statistics around 1 keep
    activations O(1) through the 94 layers."""
    import torch

    m = tf_inception
    marker = object()
    generator = torch.Generator().manual_seed(0)

    class RandomInception(m.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True):
            assert state_dict is marker
            with torch.no_grad():
                for name, p in self.named_parameters():
                    r = torch.randn(p.shape, generator=generator)
                    if name.endswith("conv.weight"):
                        p.copy_(r * math.sqrt(2 / p[0].numel()))
                    elif name.endswith("bn.weight"):
                        p.copy_(0.5 + torch.rand(p.shape, generator=generator))
                    elif name == "fc.weight":
                        p.copy_(r / math.sqrt(p.shape[1]))
                    else:  # bn.bias, fc.bias
                        p.copy_(0.1 * r if name.endswith("bn.bias") else r)
                for name, b in self.named_buffers():
                    if name.endswith("running_mean"):
                        b.copy_(0.1 * torch.randn(b.shape, generator=generator))
                    elif name.endswith("running_var"):
                        b.copy_(0.5 + torch.rand(b.shape, generator=generator))

    original = m.load_state_dict_from_url
    m.load_state_dict_from_url = lambda *args, **kwargs: marker  # no download
    try:
        model = RandomInception("inception-v3-compat", ["2048"])
    finally:
        m.load_state_dict_from_url = original
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def torch_features(tf_inception, weights_file):
    """images (N, H, W, 3) uint8 → {pool_3, spatial, logits_unbiased, logits} from torch-fidelity's
    network; spatial is the output of Mixed_6d.branch1x1 (the graph's mixed_6/conv), first 7
    channels, flattened in (H, W, C) order as the ADM evaluator does."""
    import torch

    net = tf_inception.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased", "logits"],
        feature_extractor_weights_path=str(weights_file))
    captured = []
    net.Mixed_6d.branch1x1.register_forward_hook(lambda mod, inp, out: captured.append(out))

    def features(images):
        captured.clear()
        with torch.no_grad():
            pool, unbiased, logits = net(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
        spatial = captured[0].permute(0, 2, 3, 1)[..., :7].reshape(len(images), -1)
        return {"pool_3": pool.numpy(), "spatial": spatial.numpy(),
                "logits_unbiased": unbiased.numpy(), "logits": logits.numpy()}

    return features


@pytest.fixture(scope="module")
def model(weights_file):
    return load_inception(weights_file)


def image_set(seed, n, size=32):
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(draw_image(rng, size, size)) for _ in range(n)])


@pytest.fixture(scope="module")
def sample_images():
    images = image_set(1, 6)
    images[0] = np.random.default_rng(0).integers(0, 256, images[0].shape)  # pure noise too
    return images


@pytest.fixture(scope="module")
def torch_sample_features(torch_features, sample_images):
    return torch_features(sample_images)


@pytest.fixture(scope="module")
def single_device_extractor(model):
    return FeatureExtractor(model, mesh=make_mesh(devices=jax.devices()[:1]), batch_size=4)


@pytest.fixture(scope="module")
def single_device_features(single_device_extractor, sample_images):
    batches = [single_device_extractor(sample_images[:4]), single_device_extractor(sample_images[4:])]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# --------------------------------------------------------------------------- the network


def test_resize_matches_tensorflow_compatible_bilinear(tf_inception):
    import torch
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    rng = np.random.default_rng(0)
    for h, w in [(32, 32), (17, 45), (320, 301)]:  # up, mixed, down-sampling
        x = rng.uniform(0, 255, (2, h, w, 3)).astype(np.float32)
        ref = interpolate_bilinear_2d_like_tensorflow1x(
            torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), align_corners=False)
        ours = np.asarray(jax.jit(resize_bilinear_tf1)(x))
        np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-4)


def test_inception_matches_torch_fidelity(single_device_features, torch_sample_features):
    ours, ref = single_device_features, torch_sample_features
    n = len(ref["pool_3"])
    assert ours["pool_3"].shape == (n, 2048) and ours["spatial"].shape == (n, 7 * 17 * 17)
    assert ours["logits_unbiased"].shape == ours["logits"].shape == (n, 1008)
    for name in ("pool_3", "spatial", "logits_unbiased", "logits"):
        assert np.abs(ref[name]).max() > 0.1, name  # a real signal, not a dead network
        err = rel_err(ours[name], ref[name])
        print(f"{name}: max relative error {err:.2e}")
        assert err < REL_TOL, name


def test_sharded_extraction_equals_one_device(model, sample_images, single_device_features):
    extractor = FeatureExtractor(model, batch_size=8)  # 8 devices, one image each
    assert extractor.mesh.size == 8
    sharded = extractor(sample_images)  # 6 images: the batch is padded to 8
    for name, single in single_device_features.items():
        assert sharded[name].shape == single.shape
        assert rel_err(sharded[name], single) < REL_TOL, name


def test_weights_files_and_errors(model, weights_file, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        resolve_weights(tmp_path / "missing.pth")
    # The download path: from a URL into the cache dir, then found there without a download.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "cache"
    url = weights_file.as_uri()
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        resolve_weights(cache_dir=cache, download=False, url=url)
    got = resolve_weights(cache_dir=cache, url=url)
    assert got == cache / weights_file.name and got.read_bytes() == weights_file.read_bytes()
    assert resolve_weights(cache_dir=cache, url="file:///nonexistent/" + weights_file.name) == got
    with pytest.raises(FileNotFoundError, match="could not download"):
        resolve_weights(cache_dir=tmp_path / "other", url=(tmp_path / "nope.pth").as_uri())
    # The same tensors from .npz load to the same model; a foreign state dict is refused.
    state = read_state_dict(weights_file)
    np.savez(tmp_path / "w.npz", **state)
    a, b = jax.tree.leaves(model), jax.tree.leaves(load_inception(tmp_path / "w.npz"))
    assert len(a) == len(b) == 566 - 94  # the file's tensors less num_batches_tracked
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    del state["fc.bias"]
    state["head.weight"] = np.zeros(3, np.float32)
    np.savez(tmp_path / "bad.npz", **state)
    with pytest.raises(ValueError, match=r"bad.npz is not an FID Inception-v3.*fc.bias.*head"):
        load_inception(tmp_path / "bad.npz")


# --------------------------------------------------------------------------- metrics


def adm_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """The ADM evaluator's FIDStatistics.frechet_distance (= pytorch-fid's), transcribed."""
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def eig_frechet(mu1, sigma1, mu2, sigma2):
    """The same distance without sqrtm: tr((Σ1Σ2)^½) = Σ √λ(Σ1^½ Σ2 Σ1^½)."""
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(root @ sigma2 @ root)
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(lam, 0, None)).sum()


def test_frechet_distance_matches_transcriptions():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32))
    b = rng.normal(0.3, 1.0, size=(300, 32)) @ rng.normal(size=(32, 32))
    sa, sb = FIDStatistics.of(a), FIDStatistics.of(b)
    fid = sa.frechet_distance(sb)
    np.testing.assert_allclose(fid, adm_frechet(sa.mu, sa.sigma, sb.mu, sb.sigma), rtol=1e-10)
    np.testing.assert_allclose(fid, eig_frechet(sa.mu, sa.sigma, sb.mu, sb.sigma), rtol=1e-8)
    assert abs(sa.frechet_distance(sa)) < 1e-8
    np.testing.assert_allclose(sa.mu, a.mean(0)), np.testing.assert_allclose(sa.sigma, np.cov(a.T))


def test_frechet_distance_near_singular_covariance(monkeypatch):
    rng = np.random.default_rng(1)
    # Fewer samples than dimensions: rank-deficient covariances, a (near-)singular product.
    a, b = rng.normal(size=(20, 64)), rng.normal(0.1, 1.2, size=(25, 64))
    sa, sb = FIDStatistics.of(a), FIDStatistics.of(b)
    fid = frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    np.testing.assert_allclose(fid, adm_frechet(sa.mu, sa.sigma, sb.mu, sb.sigma), rtol=1e-8)
    np.testing.assert_allclose(fid, eig_frechet(sa.mu, sa.sigma, sb.mu, sb.sigma), rtol=1e-4)
    # Where the square root of the product comes out non-finite (SciPy versions differ on when),
    # it is retried with eps·I added to both covariances, with a warning.
    from dit_jax.evaluation import metrics

    calls, sqrtm = [], linalg.sqrtm

    def first_call_fails(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else sqrtm(m)

    monkeypatch.setattr(metrics.linalg, "sqrtm", first_call_fails)
    with pytest.warns(UserWarning, match="singular"):
        retried = frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma, eps=1e-3)
    monkeypatch.undo()
    offset = np.eye(64) * 1e-3
    np.testing.assert_array_equal(calls[1], (sa.sigma + offset) @ (sb.sigma + offset))
    np.testing.assert_allclose(retried, eig_frechet(sa.mu, sa.sigma + offset, sb.mu, sb.sigma + offset)
                               - 2 * 64e-3, rtol=1e-4)
    # A product whose square root is imaginary (not covariances) is an error, as in ADM.
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(np.zeros(2), np.diag([1.0, 1.0]), np.zeros(2), np.diag([-1.0, 1.0]))
    with pytest.raises(ValueError, match="different feature sizes"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def adm_inception_score(logits, split_size):
    """The evaluator's compute_inception_score on softmax(logits), float64."""
    z = logits - logits.max(1, keepdims=True)
    preds = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return np.mean(scores)


def test_inception_score():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (23, 1008))
    for split in (5000, 7):  # one split; uneven splits (7, 7, 7, 2)
        np.testing.assert_allclose(inception_score(logits, split), adm_inception_score(logits, split),
                                   rtol=1e-12)
    np.testing.assert_allclose(inception_score(np.tile(logits[:1], (10, 1))), 1.0, rtol=1e-12)
    # Confident predictions spread evenly over 8 classes: IS → 8.
    confident = np.full((40, 1008), -30.0)
    confident[np.arange(40), np.arange(40) % 8] = 30.0
    np.testing.assert_allclose(inception_score(confident), 8.0, rtol=1e-9)


def adm_radii(features, k=3):
    d = adm_distances(features, features)
    return np.partition(d, np.arange(k + 1), axis=1)[:, k]


def adm_distances(u, v):
    u, v = u.astype(np.float32), v.astype(np.float32)
    nu = (u ** 2).sum(1)[:, None]
    nv = (v ** 2).sum(1)[None, :]
    return np.maximum(nu - 2 * u @ v.T + nv, 0.0)


def adm_precision_recall(ref, samples, k=3):
    """ManifoldEstimator.evaluate_pr with the radii of manifold_radii, one block."""
    r_ref, r_samples = adm_radii(ref, k), adm_radii(samples, k)
    d = adm_distances(ref, samples)
    ref_in = (d[..., None] <= r_samples[:, None]).any(axis=1)
    sample_in = (d[..., None] <= r_ref[:, None, None]).any(axis=0)
    return sample_in.mean(), ref_in.mean()


def test_precision_recall_matches_adm_formula():
    rng = np.random.default_rng(0)
    # Small integers: float16 and float32 distances are then exact, so the float16 pass of the
    # evaluator and a float32 transcription must agree to the last decision.
    ref = rng.integers(0, 5, (24, 8)).astype(np.float32)
    samples = (rng.integers(0, 5, (18, 8)) + (np.arange(18) % 3 == 0)[:, None] * 6).astype(np.float32)
    expected = adm_precision_recall(ref, samples)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a case that can fail either way
    for rows, cols in [(10000, 10000), (8, 10)]:  # one block; several, some of them shorter
        np.testing.assert_array_equal(manifold_radii(ref, 3, rows, cols), adm_radii(ref))
        assert precision_recall(ref, samples, row_batch_size=rows, col_batch_size=cols) == expected
    assert precision_recall(ref, ref) == (1.0, 1.0)
    # Hand-made, in 4 dimensions: references at 0, 1, ..., 9 (squared 3rd-neighbour radius
    # 4·3² = 36 at the ends); samples shifted by 0.25 cover them and are covered: (1, 1).
    line = np.arange(10.0)[:, None] * np.ones((1, 4))
    assert precision_recall(line, line + 0.25) == (1.0, 1.0)
    # Four samples at 0.5 (inside the references' balls) and four at 100 (outside): precision
    # 1/2; each sample cluster is 4 coincident points, radius 0, covering no reference: recall 0.
    clusters = np.concatenate([np.full((4, 4), 0.5), np.full((4, 4), 100.0)])
    assert precision_recall(line, clusters) == (0.5, 0.0)


def test_pairwise_distances_fall_back_to_float32_on_overflow():
    rng = np.random.default_rng(0)
    u, v = rng.uniform(200, 300, (5, 8)), rng.uniform(200, 300, (6, 8))  # ‖u‖² > 65504
    np.testing.assert_allclose(np.asarray(pairwise_distances(u, v)), adm_distances(u, v),
                               rtol=1e-4, atol=1.0)
    small = rng.uniform(0, 1, (5, 8))
    np.testing.assert_allclose(np.asarray(pairwise_distances(small, small)),
                               adm_distances(small, small), atol=1e-2)  # float16 rounding


# --------------------------------------------------------------------------- end to end


def test_write_reference_and_read_it_back(single_device_extractor, sample_images,
                                         single_device_features, tmp_path):
    extractor = single_device_extractor
    np.savez(tmp_path / "set.npz", arr_0=sample_images)
    out = write_reference(tmp_path / "ref.npz", tmp_path / "set.npz", extractor, num_images=4)
    with np.load(out) as ref:
        assert sorted(ref.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
        kept = ref["arr_0"]
        assert kept.shape == (4, 32, 32, 3)
        assert all((sample_images == im).all(axis=(1, 2, 3)).any() for im in kept)
        for key, name in [("mu", "pool_3"), ("mu_s", "spatial")]:
            np.testing.assert_allclose(ref[key], single_device_features[name].mean(0),
                                       rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ref["sigma"], np.cov(single_device_features["pool_3"].T),
                                   rtol=1e-3, atol=1e-5)
    back = read_set(out, extractor)
    np.testing.assert_array_equal(back.stats.mu, np.load(out)["mu"])  # stored stats, as they are
    assert back.pool_3.shape == (4, 2048)  # features of arr_0 for precision/recall
    stats_only = read_set(out, extractor, per_image=False)  # FID alone: arr_0 is not read
    assert stats_only.pool_3 is None and stats_only.count == 0
    np.testing.assert_array_equal(stats_only.spatial_stats.sigma, np.load(out)["sigma_s"])


@pytest.mark.slow  # the CLI's two float64 matrix square roots of 2048² matrices
def test_cli_matches_torch_fidelity_and_pytorch_fid_formula(weights_file, torch_features,
                                                           torch_sample_features, sample_images,
                                                           tmp_path):
    ref_images = image_set(2, 8)
    np.savez(tmp_path / "ref.npz", arr_0=ref_images)
    folder = tmp_path / "samples"  # SAMPLES as an image folder (lossless PNGs)
    folder.mkdir()
    for i, image in enumerate(sample_images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    out = tmp_path / "metrics.json"
    proc = subprocess.run(
        [sys.executable, "-m", "dit_jax.evaluate", str(tmp_path / "ref.npz"), str(folder),
         f"--inception-weights={weights_file}", f"--json={out}", "--batch-size=8"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert "FID:" in proc.stdout and got["num_samples"] == len(sample_images)

    r, s = torch_features(ref_images), torch_sample_features
    # pytorch-fid's statistics (np.mean, np.cov) of torch-fidelity's features; the distance by
    # eigenvalues, tr((Σ1Σ2)^½) = Σ√λ(Σ1^½Σ2Σ1^½): the same number as pytorch-fid's sqrtm formula
    # (test_frechet_distance_* check that), without two more 2048² Schur decompositions.
    expected = {name: eig_frechet(np.mean(s[key], 0), np.cov(s[key], rowvar=False),
                                  np.mean(r[key], 0), np.cov(r[key], rowvar=False))
                for name, key in [("fid", "pool_3"), ("sfid", "spatial")]}
    print("CLI", {k: got[k] for k in expected}, "reference", expected)
    assert expected["fid"] > 1.0
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4)
    np.testing.assert_allclose(got["inception_score"],
                               adm_inception_score(s["logits_unbiased"].astype(np.float64), 5000),
                               rtol=1e-5)
    assert (got["precision"], got["recall"]) == precision_recall(r["pool_3"], s["pool_3"])


def test_cli_errors(tmp_path):
    run = [sys.executable, "-m", "dit_jax.evaluate"]
    proc = subprocess.run([*run, str(tmp_path / "missing.npz"), str(tmp_path),
                           f"--inception-weights={tmp_path / 'none.pth'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode != 0
    assert "none.pth not found" in proc.stderr and "pt_inception-2015-12-05" in proc.stderr


@pytest.mark.slow  # a DiT sampling program, then the two 2048² matrix square roots
def test_sample_py_fid_reference(weights_file, single_device_extractor, tmp_path):
    from absl import flags

    import sample as sample_script
    from dit_jax.checkpoint import save_model

    from conftest import random_dit

    model = random_dit(seed=1, depth=1, hidden_size=64, num_heads=2, patch_size=4, input_size=8,
                       in_channels=3, num_classes=5, learn_sigma=False)
    save_model(tmp_path / "ckpt", model)
    ref_images = image_set(3, 8, size=8)
    np.savez(tmp_path / "ref.npz", arr_0=ref_images)
    out = tmp_path / "out"
    flags.FLAGS.unparse_flags()  # absl keeps values from a previous parse
    sample_script.parse_flags([
        "sample.py", f"--ckpt={tmp_path / 'ckpt'}", "--vae=none", "--num-samples=6",
        "--batch-size=8", "--steps=3", "--cfg-scale=1", f"--out={out}",
        f"--fid-reference={tmp_path / 'ref.npz'}", f"--inception-weights={weights_file}"])
    sample_script.main([])
    got = json.loads((out / "metrics.json").read_text())
    with np.load(out / "samples.npz") as data:  # the default --npz with --fid-reference
        samples = data["arr_0"]
    assert samples.shape == (6, 8, 8, 3) and got["num_samples"] == 6

    def features(images):
        return np.concatenate([single_device_extractor(images[i:i + 4])["pool_3"]
                               for i in range(0, len(images), 4)])

    s, r = features(samples), features(ref_images)
    expected = eig_frechet(s.mean(0), np.cov(s, rowvar=False), r.mean(0), np.cov(r, rowvar=False))
    np.testing.assert_allclose(got["fid"], expected, rtol=1e-4)
    for key in ("sfid", "inception_score", "precision", "recall"):
        assert got[key] is not None and np.isfinite(got[key])
    flags.FLAGS.unparse_flags()


def test_sample_py_fid_reference_checks_inputs_before_sampling(weights_file, tmp_path):
    from absl import app, flags

    import sample as sample_script

    (tmp_path / "never-loaded").mkdir()  # it exists (a missing --ckpt fails first)

    def run(*argv):
        flags.FLAGS.unparse_flags()
        sample_script.parse_flags(["sample.py", f"--ckpt={tmp_path / 'never-loaded'}",
                                   f"--out={tmp_path}", *argv])
        sample_script.main([])

    try:
        with pytest.raises(app.UsageError, match="--fid-reference .*missing.npz does not exist"):
            run(f"--fid-reference={tmp_path / 'missing.npz'}", f"--inception-weights={weights_file}")
        np.savez(tmp_path / "ref.npz", arr_0=image_set(0, 4, size=8))
        with pytest.raises(FileNotFoundError, match="none.pth not found.*pt_inception-2015-12-05"):
            run(f"--fid-reference={tmp_path / 'ref.npz'}", f"--inception-weights={tmp_path / 'none.pth'}")
    finally:
        flags.FLAGS.unparse_flags()


@pytest.mark.slow  # a few train steps, sampling, then one 2048² matrix square root
def test_training_fid_is_logged(weights_file, single_device_extractor, tmp_path, monkeypatch):
    from configs import demo
    from dit_jax.train import loop

    drawn = []
    samples = loop.TrainingFID.samples

    def spy(self, ema, buffers):  # the real sampler; keeps a copy of what it drew
        for batch in samples(self, ema, buffers):
            drawn.append(batch)
            yield batch

    monkeypatch.setattr(loop.TrainingFID, "samples", spy)
    ref_images = image_set(4, 8, size=16)
    np.savez(tmp_path / "ref.npz", arr_0=ref_images)
    c = demo.get_config()
    c.model.hidden_size, c.model.depth, c.model.num_heads, c.model.patch_size = 64, 1, 4, 4
    c.data.image_size, c.global_batch_size, c.total_steps = 16, 16, 2
    c.log_every, c.sample_every, c.checkpoint_every = 1, 0, 2
    c.sample.steps = 2
    c.eval.every, c.eval.num_samples, c.eval.batch_size = 2, 6, 8
    c.eval.reference, c.eval.inception_weights = str(tmp_path / "ref.npz"), str(weights_file)
    loop.train(c, tmp_path / "run")

    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().split("\n")
               if line]
    logged = [r["fid"] for r in records if "fid" in r]
    assert len(logged) == 1 and [r["step"] for r in records if "fid" in r] == [2]
    images = np.concatenate(drawn)
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8

    def pool(x):
        return np.concatenate([single_device_extractor(x[i:i + 4])["pool_3"]
                               for i in range(0, len(x), 4)])

    s, r = pool(images), pool(ref_images)
    expected = eig_frechet(s.mean(0), np.cov(s, rowvar=False), r.mean(0), np.cov(r, rowvar=False))
    np.testing.assert_allclose(logged[0], expected, rtol=1e-4)
