"""sample.py and dit_jax.sampling end to end on CPU: files and formats, independence from the
device count and from interruptions, and errors for bad inputs."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from absl import app, flags
from PIL import Image

import sample as sample_script
from dit_jax import sampling
from dit_jax.checkpoint import save_model
from dit_jax.port import save_torch
from dit_jax.sampling import SampleRequest
from dit_jax.sharding import make_mesh

from conftest import random_dit

NUM_CLASSES = 10
LATENT = 8  # latent side of the tiny DiT


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    model = random_dit(seed=0, std=0.05, depth=2, hidden_size=64, num_heads=4, patch_size=2,
                       input_size=LATENT, num_classes=NUM_CLASSES)
    path = tmp_path_factory.mktemp("dit") / "ckpt"
    save_model(path, model)
    return path


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    import torch

    torch.manual_seed(0)
    # Two resolution levels: 2× down-sampling, 4 latent channels like the SD VAE.
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=2 * LATENT)
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return path


def _run_cli(argv):
    flags.FLAGS.unparse_flags()  # absl keeps values from a previous parse
    sample_script.parse_flags(["sample.py", *argv])
    sample_script.main([])


def test_cli_writes_grid_pngs_and_npz(tmp_path, dit_dir, vae_dir):
    out, npz = tmp_path / "out", tmp_path / "samples.npz"
    _run_cli([f"--ckpt={dit_dir}", f"--vae={vae_dir}", "--labels=7,1,4", "--num-samples=5",
              "--batch-size=4", "--steps=4", "--cfg-scale=1.5", f"--out={out}", f"--npz={npz}",
              f"--image-size={2 * LATENT}"])
    side = 2 * LATENT
    with np.load(npz) as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (5, side, side, 3)
    np.testing.assert_array_equal(labels, [7, 1, 4, 7, 1])
    assert len(np.unique(images)) > 32, np.unique(images)  # not a blank or saturated image
    for i in range(5):
        np.testing.assert_array_equal(np.asarray(Image.open(out / "samples" / f"{i:06d}.png")), images[i])
    grid = np.asarray(Image.open(out / "grid.png"))
    # 5 images in 3 columns and 2 rows, 2 px padding
    assert grid.shape == (2 * (side + 2) + 2, 3 * (side + 2) + 2, 3)
    np.testing.assert_array_equal(grid[side + 4:2 * side + 4, 2:side + 2], images[3])

    # The same request on one device (the CLI used all 8), decoder included.
    request = dataclasses.replace(sample_script.request_from_flags(), out=str(tmp_path / "one"),
                                  npz=str(tmp_path / "one.npz"))
    sampling.sample(request, mesh=make_mesh(devices=jax.devices()[:1]))
    with np.load(tmp_path / "one.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], images)


def test_pixel_space_model_from_pt(tmp_path):
    # An official-width (384 → 6 heads) pixel-space model without learned sigma, as a .pt file.
    model = random_dit(seed=1, depth=2, hidden_size=384, num_heads=6, patch_size=4, input_size=8,
                       in_channels=3, num_classes=5, learn_sigma=False)
    save_torch(model, tmp_path / "pixels.pt")
    request = SampleRequest(ckpt=str(tmp_path / "pixels.pt"), vae="none", labels=(4, 0),
                            sampler="dpm++", steps=5, cfg_scale=2.0, image_size=8,
                            out=str(tmp_path / "out"), npz=str(tmp_path / "pixels.npz"))
    written = sampling.sample(request)
    with np.load(written["npz"]) as data:
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (2, 8, 8, 3)
        np.testing.assert_array_equal(data["arr_1"], [4, 0])
        np.testing.assert_array_equal(np.asarray(Image.open(written["samples"] / "000001.png")),
                                      data["arr_0"][1])
    assert written["grid"].is_file()


def _latents(dit_dir, out, mesh, **kw):
    request = SampleRequest(ckpt=str(dit_dir), vae="none", out=str(out), steps=6, **kw)
    written = sampling.sample(request, mesh=mesh)
    with np.load(written["npz"]) as data:
        return data["arr_0"], data["arr_1"]


def test_same_samples_on_8_and_1_devices(tmp_path, dit_dir):
    assert len(jax.devices()) == 8
    # 6 per chunk: padded to 8 rows on 8 devices, not padded on 1.
    kw = dict(labels=(3, 9, 0), num_samples=6, batch_size=6, cfg_scale=3.0)
    sharded, labels = _latents(dit_dir, tmp_path / "eight", make_mesh(), **kw)
    single, _ = _latents(dit_dir, tmp_path / "one", make_mesh(devices=jax.devices()[:1]), **kw)
    assert sharded.shape == (6, LATENT, LATENT, 4) and sharded.dtype == np.float32
    np.testing.assert_array_equal(labels, [3, 9, 0, 3, 9, 0])
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5 * np.abs(single).max())
    # every sample differs: noise is not repeated across rows or devices
    assert len({s.tobytes() for s in sharded}) == 6


def test_numerics_and_the_trained_process_reach_the_sampler(tmp_path, dit_dir):
    kw = dict(labels=(3, 5), batch_size=2, cfg_scale=1.0)
    mesh = make_mesh(devices=jax.devices()[:1])
    official, _ = _latents(dit_dir, tmp_path / "official", mesh, **kw)
    scale = np.abs(official).max()
    for name, change in (("diffusers", dict(numerics="diffusers")),
                         ("cosine", dict(noise_schedule="squaredcos_cap_v2")),
                         ("clipped", dict(clip_denoised=True)),
                         ("velocity", dict(prediction="velocity"))):
        other, _ = _latents(dit_dir, tmp_path / name, mesh, **kw, **change)
        assert np.abs(other - official).max() > 1e-3 * scale, name
    with pytest.raises(ValueError, match="numerics"):
        SampleRequest(ckpt=str(dit_dir), numerics="fast")


@pytest.mark.parametrize("prediction", ["epsilon", "start_x", "velocity"])
def test_samplers_receive_eps_whatever_the_model_predicts(prediction):
    # x_t = a·x0 + b·ε (float64 NumPy); the model returns its prediction of x0 / ε / v (plus
    # variance channels); the wrapped function must return ε, from x̂0 clipped to [-1, 1] when
    # asked.
    from dit_jax.diffusion import create_diffusion

    d = create_diffusion("", noise_schedule="squaredcos_cap_v2")
    rng = np.random.default_rng(0)
    t = np.array([3, 400, 990])
    a = d.sqrt_alphas_cumprod[t][:, None, None, None]
    b = d.sqrt_one_minus_alphas_cumprod[t][:, None, None, None]
    x0, eps = rng.uniform(-1.5, 1.5, (3, 4, 4, 3)), rng.standard_normal((3, 4, 4, 3))
    x_t = a * x0 + b * eps
    predicted = {"epsilon": eps, "start_x": x0, "velocity": a * eps - b * x0}[prediction]
    extra = rng.standard_normal((3, 4, 4, 3))
    out = np.concatenate([predicted, extra], -1).astype(np.float32)
    model_fn = lambda x, s: jax.numpy.asarray(out)
    x32 = jax.numpy.asarray(x_t, np.float32)
    plain = sampling.clip_denoised_fn(model_fn, d, 3, limit=None, prediction=prediction)
    np.testing.assert_allclose(plain(x32, t)[..., :3], eps, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(plain(x32, t)[..., 3:], extra.astype(np.float32))
    clipped = sampling.clip_denoised_fn(model_fn, d, 3, prediction=prediction)
    want = (x_t - a * np.clip(x0, -1, 1)) / b
    np.testing.assert_allclose(clipped(x32, t)[..., :3], want, rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="unknown prediction"):
        sampling.clip_denoised_fn(model_fn, d, 3, prediction="score")


def test_resume_equals_uninterrupted(tmp_path, dit_dir, monkeypatch):
    kw = dict(num_samples=10, batch_size=4, sampler="ddim", cfg_scale=2.0, guidance_channels="all",
              seed=3)  # random labels
    mesh = make_mesh()
    full, full_labels = _latents(dit_dir, tmp_path / "full", mesh, **kw)

    save = sampling.ChunkStore.save

    def save_then_stop(self, chunk, samples, labels):
        save(self, chunk, samples, labels)
        if chunk == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(sampling.ChunkStore, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _latents(dit_dir, tmp_path / "resumed", mesh, **kw)
    monkeypatch.undo()

    calls = []
    run_chunk = sampling.ChunkSampler.__call__
    monkeypatch.setattr(sampling.ChunkSampler, "__call__",
                        lambda self, chunk, labels, weights:
                        calls.append(chunk) or run_chunk(self, chunk, labels, weights))
    resumed, resumed_labels = _latents(dit_dir, tmp_path / "resumed", mesh, **kw)
    assert calls == [2]  # chunks 0 and 1 were kept
    np.testing.assert_array_equal(resumed, full)
    np.testing.assert_array_equal(resumed_labels, full_labels)
    assert len(set(full_labels.tolist())) > 1 and full_labels.max() < NUM_CLASSES
    with pytest.raises(ValueError, match=r"different run \(settings \['seed'\] differ"):
        _latents(dit_dir, tmp_path / "resumed", mesh, **dict(kw, seed=4))


def test_bad_inputs(tmp_path, dit_dir):
    with pytest.raises(FileNotFoundError, match="dl.fbaipublicfiles.com.*--ckpt PATH"):
        _run_cli([f"--ckpt={tmp_path / 'DiT-XL-2-256x256.pt'}", f"--out={tmp_path / 'out'}"])
    with pytest.raises(ValueError, match="unknown DiT model 'DiT-XXL/2'"):
        _run_cli([f"--ckpt={dit_dir}", "--model=DiT-XXL/2", "--vae=none",
                  f"--out={tmp_path / 'out'}"])
    with pytest.raises(ValueError, match="not DiT-S/2"):
        _run_cli([f"--ckpt={dit_dir}", "--model=DiT-S/2", "--vae=none",
                  f"--out={tmp_path / 'out'}"])
    with pytest.raises(ValueError, match="--image-size 256 does not match the model"):
        _run_cli([f"--ckpt={dit_dir}", "--image-size=256", "--vae=none",
                  f"--out={tmp_path / 'out'}"])
    with pytest.raises(ValueError, match="label 10 is out of range"):
        _run_cli([f"--ckpt={dit_dir}", "--labels=1,10", "--vae=none",
                  f"--out={tmp_path / 'out'}"])
    no_null = random_dit(seed=2, depth=1, hidden_size=64, num_heads=4, patch_size=2,
                         input_size=LATENT, num_classes=NUM_CLASSES, class_dropout_prob=0.0)
    save_model(tmp_path / "no_null", no_null)
    with pytest.raises(ValueError, match="needs a null class.*--cfg-scale=1"):
        _run_cli([f"--ckpt={tmp_path / 'no_null'}", "--vae=none", "--cfg-scale=4",
                  f"--out={tmp_path / 'out'}"])
    with pytest.raises(app.UsageError, match="--ckpt is required.*DiT-XL-2-256x256.pt"):
        _run_cli([f"--out={tmp_path / 'out'}"])
    with pytest.raises(app.UsageError, match=r"flag --sampler=euler: value should be one of"):
        _run_cli([f"--ckpt={dit_dir}", "--sampler=euler"])


def test_cli_takes_a_train_workdirs_own_settings(tmp_path, monkeypatch):
    # A pixel-space train.py run (no VAE, clipped x̂0 as in configs/demo.py) samples with
    # `--ckpt=W --labels=...` alone: no VAE download, its own image size and process.
    from configs import demo
    from dit_jax.train import train

    config = demo.get_config()
    config.total_steps, config.global_batch_size, config.checkpoint_every = 1, 8, 1
    config.sample_every, config.log_every = 0, 1
    config.model.hidden_size, config.model.depth, config.model.num_heads = 32, 1, 2
    config.data.image_size, config.diffusion.diffusion_steps = 16, 500
    # A v-prediction model one step from its (zero) init still draws x̂0 = √ᾱ·x_t, not a blank:
    # what the grid check below needs; and the prediction must come from the workdir too.
    config.diffusion.prediction = "velocity"
    workdir = tmp_path / "run"
    train(config, workdir)

    monkeypatch.chdir(tmp_path)
    _run_cli([f"--ckpt={workdir}", "--labels=0,1"])
    # The chunks record which weights they came from: the EMA of checkpoint 1.
    run = json.loads((tmp_path / "samples" / "chunks" / "run.json").read_text())
    assert run["weights"]["checkpoint_step"] == 1
    grid = np.asarray(Image.open(tmp_path / "samples" / "grid.png"))
    assert grid.dtype == np.uint8 and grid.shape == (2 + 18, 2 + 2 * 18, 3)  # 16 px + padding
    assert len(np.unique(grid)) > 8  # drawn, not blank
    request = sample_script.request_from_flags()
    assert (request.vae, request.image_size, request.clip_denoised, request.diffusion_steps,
            request.prediction) == ("none", 16, True, 500, "velocity")
    # The run's grids guided only at high noise (configs/demo.py): so do its samples.
    assert request.guidance_interval == tuple(float(v) for v in config.sample.guidance_interval)

    # Flags given explicitly win over the workdir's settings.
    flags.FLAGS.unparse_flags()
    sample_script.parse_flags(["sample.py", f"--ckpt={workdir}", "--clip-denoised=false",
                               "--diffusion-steps=1000"])
    request = sample_script.request_from_flags()
    assert (request.vae, request.clip_denoised, request.diffusion_steps) == ("none", False, 1000)
    flags.FLAGS.unparse_flags()
    sample_script.parse_flags(["sample.py", f"--ckpt={workdir}", "--guidance-interval=0,999"])
    assert sample_script.request_from_flags().guidance_interval == (0.0, 999.0)


def test_resume_refuses_other_weights_and_foreign_outputs(tmp_path, dit_dir):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(dit_dir, ckpt)
    kw = dict(num_samples=2, batch_size=2, sampler="ddim")
    _latents(ckpt, tmp_path / "out", make_mesh(), **kw)
    recorded = json.loads((tmp_path / "out" / "chunks" / "run.json").read_text())["weights"]
    assert recorded["checkpoint_step"] is None and len(recorded["params_hash"]) == 16
    # The same path now holds other weights (a workdir trained on): no mixing of two models.
    save_model(ckpt, random_dit(seed=1, std=0.05, depth=2, hidden_size=64, num_heads=4,
                                patch_size=2, input_size=LATENT, num_classes=NUM_CLASSES))
    with pytest.raises(ValueError, match=f"holds samples of other weights \\(params hash "
                                         f"{recorded['params_hash']}\\) .*would mix two models"):
        _latents(ckpt, tmp_path / "out", make_mesh(), **kw)

    # Files sample.py did not write: refused up front, before the weights are read.
    foreign = tmp_path / "foreign"
    (foreign / "chunks").mkdir(parents=True)
    np.savez(foreign / "chunks" / "000000.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    missing = str(tmp_path / "no_such_ckpt")
    with pytest.raises(ValueError, match=r"--out .*foreign holds files sample.py did not write "
                                         r"\(chunks\)"):
        sampling.sample(SampleRequest(ckpt=missing, vae="none", out=str(foreign)))
    shutil.copytree(tmp_path / "out", tmp_path / "extra")
    (tmp_path / "extra" / "notes.txt").write_text("mine")
    (tmp_path / "extra" / "chunks" / "keep.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"did not write \(chunks/keep.npz, notes.txt\)"):
        sampling.sample(SampleRequest(ckpt=missing, vae="none", out=str(tmp_path / "extra")))
