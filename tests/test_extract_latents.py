"""Latent extraction (dit_jax.extract_latents) and the latents source (dit_jax.data.latents)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dit_jax.data.latents import MANIFEST, LatentSource, sample_latent
from dit_jax.data.pipeline import Loader
from dit_jax.data.transforms import hflip, preprocess
from dit_jax.diffusion import create_diffusion, training_losses
from dit_jax.extract_latents import PLAN, extract, main, shard_record
from dit_jax.models.vae import AutoencoderKL, encode_to_latents
from dit_jax.port.vae import load_vae, vae_to_torch_state_dict
from conftest import random_dit
from imagedata import make_image_folder

# 8× down-sampling like sd-vae (4 blocks), a few channels: 32 px images → 4×4×4 latents.
TINY_VAE = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
            "block_out_channels": [8, 16, 16, 16], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 1,
            "latent_channels": 4, "norm_num_groups": 8, "sample_size": 32,
            "scaling_factor": 0.18215}
SIZE = 32


def random_vae(seed: int = 3):
    """The tiny VAE with random weights drawn in NumPy (eager per-parameter initialisation is
    slow on a busy CPU): kernels ±1/sqrt(fan in) like PyTorch's default, norms near identity."""
    abstract = nnx.eval_shape(lambda: AutoencoderKL(TINY_VAE, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-1].key)
        if leaf.ndim >= 2:
            bound = float(np.prod(leaf.shape[:-1])) ** -0.5
            return rng.uniform(-bound, bound, leaf.shape).astype(np.float32)
        base = 1.0 if name == "scale" else 0.0
        return (base + rng.uniform(-0.1, 0.1, leaf.shape)).astype(np.float32)

    pure = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def write_vae_folder(folder, **config):
    """A diffusers-format VAE folder (config.json + safetensors) with random weights."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    save_file(vae_to_torch_state_dict(random_vae()),
              str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(dict(TINY_VAE, **config)))
    return folder


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """An image folder (2 classes, 11 readable images, 1 truncated), its VAE, and the latents
    extracted through the command line."""
    tmp = tmp_path_factory.mktemp("latents")
    data = make_image_folder(tmp / "images", {"cat": 5, "dog": 6},
                             corrupt={"dog/img_900.jpg": "truncated"})
    vae_dir = write_vae_folder(tmp / "vae")
    out = tmp / "out"
    manifest = main(["--data", str(data), "--out", str(out), "--image-size", str(SIZE),
                     "--vae", str(vae_dir), "--batch-size", "1", "--shard-size", "5",
                     "--num-workers", "0", "--no-progress"])
    return {"data": data, "vae_dir": vae_dir, "out": out, "manifest": manifest,
            "vae": load_vae(vae_dir)}


def test_manifest_describes_the_extraction(extracted):
    m = json.loads((extracted["out"] / MANIFEST).read_text())
    assert m == json.loads(json.dumps(extracted["manifest"]))
    assert m["count"] == 11 and m["files"] == 12 and m["skipped"] == 1
    assert m["skipped_files"][0].endswith("dog/img_900.jpg")
    assert m["image_size"] == SIZE and m["latent_shape"] == [4, 4, 4]
    assert m["class_names"] == ["cat", "dog"] and m["vae"] == str(extracted["vae_dir"])
    assert m["scaling_factor"] == pytest.approx(0.18215) and m["shift_factor"] == 0.0
    assert [s["count"] for s in m["shards"]] == [5, 5, 1]  # 12 files in shards of 5, one bad
    assert "mean" in m["stored"] and "std" in m["stored"] and m["dtype"] == "float32"
    moments = np.load(extracted["out"] / m["shards"][0]["moments"])
    assert moments.shape == (5, 2, 2, 4, 4, 4) and moments.dtype == np.float32


def test_moments_are_the_encoders_for_both_orientations(extracted):
    source = LatentSource(extracted["out"], image_size=SIZE)
    assert len(source) == 11 and source.num_classes == 2 and source.element_shape == (4, 4, 4)
    paths = sorted(str(p) for p in extracted["data"].rglob("img_0*"))  # the readable ones
    images = np.stack([preprocess(p, SIZE) for p in paths])
    vae = extracted["vae"]
    for orientation, batch in enumerate((images, hflip(images))):
        posterior = jax.jit(lambda x: vae.encode(x))(jnp.asarray(batch))
        got = np.stack([source[i]["moments"][orientation] for i in range(len(source))])
        np.testing.assert_allclose(got[:, 0], np.asarray(posterior.mean), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[:, 1], np.asarray(posterior.std), rtol=1e-5, atol=1e-6)
    assert [int(source[i]["y"]) for i in range(11)] == [0] * 5 + [1] * 6
    # The flip matters: the encoder is not mirror-equivariant.
    m0 = source[0]["moments"]
    assert not np.allclose(m0[1, 0], m0[0, 0][:, ::-1], atol=1e-4)


def test_latents_loss_equals_on_the_fly_encoding(extracted):
    """Training from the extracted latents and training with the VAE inside the step give the
    same loss when the posterior noise, timesteps and diffusion noise are the same."""
    source = LatentSource(extracted["out"], image_size=SIZE)
    vae = extracted["vae"]
    paths = sorted(str(p) for p in extracted["data"].rglob("img_0*"))
    n = 8
    orientation = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    pixels = np.stack([preprocess(p, SIZE) for p in paths[:n]])
    pixels = np.where(orientation[:, None, None, None] == 1, hflip(pixels), pixels)
    labels = jnp.asarray([int(source[i]["y"]) for i in range(n)])
    key = jax.random.key(5)
    eps = np.asarray(jax.random.normal(key, (n, 4, 4, 4), jnp.float32))  # the VAE's own draw
    from_store = np.stack([sample_latent(source[i]["moments"], orientation[i], eps[i],
                                         source.scaling_factor, source.shift_factor)
                           for i in range(n)])

    model = random_dit(seed=1, input_size=4, patch_size=2, in_channels=4, hidden_size=32,
                       depth=2, num_heads=2, num_classes=2)
    diffusion = create_diffusion("")
    t = jnp.asarray([3, 100, 250, 400, 600, 750, 900, 999])
    noise = jax.random.normal(jax.random.key(2), (n, 4, 4, 4))

    @jax.jit
    def loss_on_the_fly(images):
        latents = encode_to_latents(vae, images, key)
        terms = training_losses(diffusion, lambda x, tt: model(x, tt, labels, train=False),
                                latents, t, noise)
        return jnp.mean(terms["loss"]), latents

    @jax.jit
    def loss_from_latents(latents):
        terms = training_losses(diffusion, lambda x, tt: model(x, tt, labels, train=False),
                                latents, t, noise)
        return jnp.mean(terms["loss"])

    expected, latents = loss_on_the_fly(jnp.asarray(pixels))
    np.testing.assert_allclose(from_store, np.asarray(latents), rtol=1e-5, atol=1e-6)
    got = loss_from_latents(jnp.asarray(from_store))
    assert float(expected) > 0
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)
    # With other posterior noise the loss differs: the comparison above is not vacuous.
    other = np.stack([sample_latent(source[i]["moments"], orientation[i], -eps[i],
                                    source.scaling_factor) for i in range(n)])
    assert abs(float(loss_from_latents(jnp.asarray(other))) - float(expected)) > 1e-4


def test_augment_draws_orientation_and_fresh_noise(extracted):
    source = LatentSource(extracted["out"], image_size=SIZE)
    record = source[3]
    rng, replay = np.random.default_rng(11), np.random.default_rng(11)
    out = source.augment(record, rng)
    o = int(replay.random() < 0.5)
    eps = replay.standard_normal((4, 4, 4), dtype=np.float32)
    np.testing.assert_array_equal(out["x"], sample_latent(record["moments"], o, eps, 0.18215))
    assert out["y"] == record["y"] and set(out) == {"x", "y"}

    # Through the pipeline (a source whose every index is example 3): each visit draws new
    # noise, and both stored orientations are used.
    loader = Loader(OnlyOne(extracted["out"], image_size=SIZE), global_batch_size=11, seed=0,
                    host_rows=(0, 11))
    draws = np.concatenate([next(loader)["x"] for _ in range(20)])
    assert draws.shape == (220, 4, 4, 4) and draws.dtype == np.float32
    assert len({d.tobytes() for d in draws}) == len(draws)
    means = [record["moments"][o, 0] * np.float32(0.18215) for o in (0, 1)]
    closest = np.asarray([np.argmin([np.abs(d - m).sum() for m in means]) for d in draws])
    assert 60 < closest.sum() < 160  # about half of 220 mirrored
    np.testing.assert_allclose(draws[closest == 0].mean(0), means[0],
                               atol=float(4 * record["moments"][0, 1].max() * 0.18215 / np.sqrt(60)))


class OnlyOne(LatentSource):
    def __getitem__(self, index):
        return super().__getitem__(3)


def test_resolution_mismatch_and_missing_manifest_are_clear_errors(extracted, tmp_path):
    with pytest.raises(ValueError, match=r"extracted at 32 px, but data.image_size is 64"):
        LatentSource(extracted["out"], image_size=64)
    with pytest.raises(FileNotFoundError, match="not a latents folder"):
        LatentSource(tmp_path)


def test_extraction_resumes_and_refuses_other_settings(extracted, tmp_path):
    out = tmp_path / "out"
    kwargs = dict(image_size=SIZE, vae=str(extracted["vae_dir"]), batch_size=1, shard_size=5,
                  num_workers=0, progress=False, vae_module=extracted["vae"])
    first = extract(extracted["data"], out, **kwargs)
    moments0 = np.load(out / "moments_00000.npy")
    stamp = os.stat(out / "moments_00000.npy").st_mtime_ns
    # An interrupted run: shard 1 never finished, no manifest yet.
    for name in ("moments_00001.npy", "labels_00001.npy", shard_record(1), MANIFEST):
        (out / name).unlink()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        LatentSource(out)
    again = extract(extracted["data"], out, **kwargs)
    assert os.stat(out / "moments_00000.npy").st_mtime_ns == stamp  # not redone
    assert (out / "moments_00001.npy").is_file()
    assert {k: v for k, v in again.items() if k != "created"} == \
        {k: v for k, v in first.items() if k != "created"}
    np.testing.assert_array_equal(np.load(out / "moments_00000.npy"), moments0)
    reference = np.load(extracted["out"] / "moments_00001.npy")
    np.testing.assert_allclose(np.load(out / "moments_00001.npy"), reference, rtol=1e-6, atol=1e-7)
    assert json.loads((out / PLAN).read_text())["shard_size"] == 5
    with pytest.raises(ValueError, match="other settings.*shard_size"):
        extract(extracted["data"], out, **dict(kwargs, shard_size=4))


def test_unconditional_folder_and_float16_storage(extracted, tmp_path):
    data = make_image_folder(tmp_path / "flat", flat=3, seed=4)
    manifest = extract(data, tmp_path / "out", image_size=SIZE, vae="tiny", batch_size=1,
                       shard_size=64, dtype="float16", num_workers=0, progress=False,
                       vae_module=extracted["vae"])
    assert manifest["count"] == 3 and manifest["class_names"] == [] and manifest["dtype"] == "float16"
    source = LatentSource(tmp_path / "out")
    assert source.num_classes == 0 and len(source) == 3
    assert np.load(tmp_path / "out" / "moments_00000.npy").dtype == np.float16
    assert source[0]["moments"].dtype == np.float32


def test_layout_flat_ignores_class_subfolders(extracted, tmp_path):
    manifest = main(["--data", str(extracted["data"]), "--out", str(tmp_path / "out"),
                     "--image-size", str(SIZE), "--vae", str(extracted["vae_dir"]),
                     "--batch-size", "1", "--shard-size", "64", "--num-workers", "0",
                     "--no-progress", "--layout", "flat"])
    assert extracted["manifest"]["class_names"] == ["cat", "dog"]  # what "auto" makes of it
    assert manifest["class_names"] == [] and manifest["count"] == 11
    source = LatentSource(tmp_path / "out", image_size=SIZE)
    assert source.num_classes == 0 and {int(source[i]["y"]) for i in range(11)} == {0}


# --- training: extracted latents against the VAE inside the step ---------------------------------

def _pattern(shape):
    h, w, c = shape[-3:]
    return np.cos(0.7 * np.arange(h * w * c, dtype=np.float32)).reshape(h, w, c)


def test_training_on_latents_equals_training_with_on_the_fly_encoding(extracted, tmp_path,
                                                                     monkeypatch):
    """Same images, seed and posterior noise: a run on extracted latents and a run that encodes
    the images inside the jitted step log the same losses, step after step."""
    from configs.demo import get_config
    from dit_jax.train import loop as train_loop
    from dit_jax.train import train
    from dit_jax.train.logging import read_log

    data = make_image_folder(tmp_path / "images", {"cat": 4, "dog": 4}, seed=9, extras=False)
    # A large scaling factor makes the latents, not the diffusion noise, dominate the loss, so a
    # wrong flip or moment would show far above the tolerance.
    vae_dir = write_vae_folder(tmp_path / "vae", scaling_factor=4.0)
    extract(data, tmp_path / "latents", image_size=SIZE, vae=str(vae_dir), batch_size=1,
            shard_size=64, num_workers=0, progress=False)

    # The posterior noise, fixed to one pattern in both paths (the flip stays random, drawn
    # from the same per-example generator in both pipelines).
    encoder_of = train_loop._latent_encoder

    def fixed_noise_encoder(vae_graphdef):
        encoder = encoder_of(vae_graphdef)
        return lambda weights, images, noise: encoder(weights, images, None if noise is None else
                                                      jnp.asarray(_pattern(noise.shape)))

    monkeypatch.setattr(train_loop, "_latent_encoder", fixed_noise_encoder)

    def fixed_augment(self, record, rng):
        orientation = int(rng.random() < 0.5)
        return {"x": sample_latent(record["moments"], orientation, _pattern(self.element_shape),
                                   self.scaling_factor, self.shift_factor), "y": record["y"]}

    monkeypatch.setattr(LatentSource, "augment", fixed_augment)

    def config(source, path):
        c = get_config()
        c.total_steps, c.global_batch_size, c.log_every = 3, 8, 1
        c.checkpoint_every, c.sample_every, c.async_checkpointing = 100, 0, False
        c.model.hidden_size, c.model.depth, c.model.num_heads, c.model.patch_size = 32, 1, 2, 2
        c.optim.warmup_steps, c.optim.schedule = 0, "constant"
        c.data.source, c.data.path, c.data.image_size, c.data.num_workers = source, str(path), SIZE, 0
        c.vae = str(vae_dir)
        return c

    train(config("latents", tmp_path / "latents"), tmp_path / "run_latents")
    train(config("folder", data), tmp_path / "run_folder")
    from_latents = read_log(tmp_path / "run_latents")
    on_the_fly = read_log(tmp_path / "run_folder")
    assert [r["step"] for r in from_latents] == [r["step"] for r in on_the_fly] == [1, 2, 3]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in from_latents], [r[key] for r in on_the_fly],
                                   rtol=1e-6, err_msg=key)
    assert len({round(r["loss"], 6) for r in from_latents}) == 3  # three batches, not one


def test_nan_or_float16_overflowing_moments_are_not_written(extracted, tmp_path):
    data = make_image_folder(tmp_path / "flat", flat=2, seed=5)
    kwargs = dict(image_size=SIZE, vae="tiny", batch_size=1, shard_size=64, num_workers=0,
                  progress=False)
    for name, bias, dtype, message in (
            ("nan", np.nan, "float32", "the VAE encoder gave NaN/Inf moments for .*img_\\d+"),
            ("big", 1e5, "float16", "float16 storage makes NaN/Inf moments for .*--dtype float32")):
        vae = load_vae(extracted["vae_dir"])
        vae.quant_conv.bias[...] = jnp.full(vae.quant_conv.bias.shape, bias, jnp.float32)
        with pytest.raises(ValueError, match=message):
            extract(data, tmp_path / name, dtype=dtype, vae_module=vae, **kwargs)
        assert not list((tmp_path / name).glob("moments_*.npy"))
