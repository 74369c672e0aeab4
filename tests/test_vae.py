"""dit_jax.models.vae / dit_jax.port.vae against diffusers' PyTorch AutoencoderKL on random weights:
a small config and the sd-vae-ft-ema/mse layout, through the real file-loading path (safetensors
from save_pretrained, legacy-named .bin), the error messages, and bf16 compute."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dit_jax.models.vae import (SD_VAE_CONFIG, AutoencoderKL, VAEConfig, create_vae,
                                decode_latents, encode_to_latents)
from dit_jax.port import load_vae, vae_from_torch_state_dict
from dit_jax.port.vae import VAEWeightsError, vae_to_torch_state_dict

torch = pytest.importorskip("torch")
from references import perturb_torch  # noqa: E402
diffusers = pytest.importorskip("diffusers")

SMALL_CONFIG = dict(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4,
                    norm_num_groups=32, down_block_types=["DownEncoderBlock2D"] * 2,
                    up_block_types=["UpDecoderBlock2D"] * 2, sample_size=16)
SD_CONFIG = {k: v for k, v in SD_VAE_CONFIG.items() if not k.startswith("_")}
SD_PARAMS = 83_653_863  # stabilityai/sd-vae-ft-ema


def _torch_vae(config, seed):
    """A diffusers AutoencoderKL with every parameter drawn from a seeded normal: conv/linear
    weights with std 1/sqrt(fan_in) (activations stay O(1)), GroupNorm scales N(1, 0.1²), biases
    and GroupNorm shifts N(0, 0.1²): nothing zero, so every weight's mapping is exercised."""
    with torch.device("meta"):  # skip diffusers' own initialisation: everything is overwritten
        model = diffusers.AutoencoderKL(**config)
    return perturb_torch(model.to_empty(device="cpu"), seed)


def _nhwc(t):
    return t.detach().permute(0, 2, 3, 1).numpy()


def _rel(a, b):
    b = np.asarray(b, np.float64)
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


class Case:
    """A random diffusers VAE, its inputs and its PyTorch outputs (NHWC numpy)."""

    def __init__(self, config, seed, batch, side):
        self.config = config
        self.torch = _torch_vae(config, seed)
        generator = torch.Generator().manual_seed(seed + 1)
        x = torch.rand(batch, 3, side, side, generator=generator) * 2 - 1
        with torch.no_grad():
            posterior = self.torch.encode(x).latent_dist
            z = torch.randn(posterior.mean.shape, generator=generator)
            decoded = self.torch.decode(z).sample
        self.x, self.z = _nhwc(x), _nhwc(z)
        self.mean, self.logvar = _nhwc(posterior.mean), _nhwc(posterior.logvar)
        self.decoded = _nhwc(decoded)

    def errors(self, vae):
        posterior = vae.encode(jnp.asarray(self.x))
        return dict(mean=_rel(posterior.mean, self.mean), logvar=_rel(posterior.logvar, self.logvar),
                    decoded=_rel(vae.decode(jnp.asarray(self.z)), self.decoded))


@pytest.fixture(scope="module")
def small():
    return Case(SMALL_CONFIG, seed=0, batch=2, side=16)


@pytest.fixture(scope="module")
def sd():
    return Case(SD_CONFIG, seed=1, batch=1, side=16)


@pytest.fixture(scope="module")
def sd_folder(sd, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd-vae")
    sd.torch.save_pretrained(folder)  # safetensors by default, as on the hub
    return folder


@pytest.fixture(scope="module")
def sd_vae(sd_folder):
    return load_vae(sd_folder)


def _assert_close(errors, tol=1e-4):
    assert all(e < tol for e in errors.values()), errors


def test_config_and_parameter_count(sd):
    cfg = VAEConfig.from_dict(json.loads(json.dumps(SD_VAE_CONFIG)))
    assert cfg.block_out_channels == (128, 256, 512, 512) and cfg.scaling_factor == 0.18215
    abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert count == SD_PARAMS == sum(p.numel() for p in sd.torch.parameters())
    assert (abstract.scale_factor, abstract.latent_channels) == (8, 4)
    with pytest.raises(ValueError, match="act_fn"):
        VAEConfig.from_dict(dict(SD_VAE_CONFIG, act_fn="relu"))
    with pytest.raises(ValueError, match="up_block_types"):
        VAEConfig.from_dict(dict(SD_VAE_CONFIG, up_block_types=["UpDecoderBlock2D"] * 3))


def test_small_config_matches_torch(small):
    vae = vae_from_torch_state_dict(small.torch.state_dict(), dict(small.torch.config))
    _assert_close(small.errors(vae))
    # The inverse mapping loads strictly back into diffusers.
    small.torch.load_state_dict({k: torch.tensor(v) for k, v in vae_to_torch_state_dict(vae).items()},
                                strict=True)


def test_sd_layout_from_save_pretrained_matches_torch(sd, sd_folder, sd_vae):
    assert (sd_folder / "diffusion_pytorch_model.safetensors").is_file()
    assert sd_vae.config == VAEConfig.from_dict(SD_CONFIG)
    _assert_close(sd.errors(sd_vae))


def test_latent_helpers_jit(small):
    vae = vae_from_torch_state_dict(small.torch.state_dict(), dict(small.torch.config))
    images, key = jnp.asarray(small.x), jax.random.key(3)
    latents = nnx.jit(encode_to_latents)(vae, images, key)
    posterior = vae.encode(images)
    noise = jax.random.normal(key, posterior.mean.shape)
    expected = (posterior.mean + posterior.std * noise) * 0.18215
    np.testing.assert_allclose(latents, expected, rtol=1e-4, atol=1e-5)
    # The same ε given explicitly (what the train step does per microbatch); none: the mean.
    np.testing.assert_allclose(nnx.jit(encode_to_latents)(vae, images, noise=noise), latents,
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(nnx.jit(encode_to_latents)(vae, images), posterior.mean * 0.18215,
                               rtol=1e-4, atol=1e-5)
    decoded = nnx.jit(decode_latents)(vae, jnp.asarray(small.z) * 0.18215)
    assert decoded.dtype == jnp.float32
    assert _rel(decoded, small.decoded) < 1e-4


def _legacy(state_dict):
    """Old diffusers naming, with attention weights shaped as 1x1 convolutions."""
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for key, value in state_dict.items():
        for new, old in names.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                value = value[:, :, None, None] if value.ndim == 2 else value
        out[key] = value.clone()
    return out


def test_legacy_keys_from_bin(small, tmp_path):
    legacy = _legacy(small.torch.state_dict())
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    assert legacy["decoder.mid_block.attentions.0.query.weight"].shape == (64, 64, 1, 1)
    # Laid out as a pipeline snapshot (the VAE under vae/), which load_vae also accepts.
    folder = tmp_path / "vae"
    folder.mkdir()
    torch.save(legacy, folder / "diffusion_pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(dict(small.torch.config)))
    vae = load_vae(tmp_path)
    reference = vae_from_torch_state_dict(small.torch.state_dict(), dict(small.torch.config))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(vae), nnx.state(reference))
    _assert_close(small.errors(vae))


def test_missing_path_messages(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="stabilityai/sd-vae-ft-ema") as info:
        load_vae(tmp_path / "no-such-vae")
    assert "no-such-vae" in str(info.value)
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        (tmp_path / "config.json").write_text(json.dumps(SMALL_CONFIG))
        load_vae(tmp_path)

    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="some-user/some-vae.*offline.*sd-vae-ft-ema"):
        load_vae("some-user/some-vae")


def test_state_dict_errors_name_the_key(small):
    state_dict = dict(small.torch.state_dict())
    config = dict(small.torch.config)

    dropped = "decoder.up_blocks.1.resnets.0.conv_shortcut.bias"
    missing = {k: v for k, v in state_dict.items() if k != dropped}
    with pytest.raises(VAEWeightsError, match=re.escape(f"missing key(s) ['{dropped}']")):
        vae_from_torch_state_dict(missing, config)

    with pytest.raises(VAEWeightsError, match=re.escape("unexpected key(s) ['encoder.extra.weight']")):
        vae_from_torch_state_dict(dict(state_dict, **{"encoder.extra.weight": torch.zeros(1)}), config)

    wrong = dict(state_dict, **{"encoder.conv_in.weight": torch.zeros(32, 3, 5, 5)})
    with pytest.raises(VAEWeightsError) as info:
        vae_from_torch_state_dict(wrong, config)
    message = str(info.value)
    assert all(part in message for part in ("encoder.conv_in.weight", "(32, 3, 3, 3)", "(32, 3, 5, 5)"))

    # The sd-vae layout's weights do not fit the small config: reported, not silently cropped.
    with pytest.raises(VAEWeightsError, match="block_out_channels=\\[128, 256, 512, 512\\]"):
        vae_from_torch_state_dict(state_dict, SD_CONFIG)


def test_random_init_without_mesh():
    # The constructor itself (no mesh, no sharding metadata needed); an rbg key and one block keep
    # the per-shape compiles of eager random init cheap.
    tiny = AutoencoderKL(dict(block_out_channels=[32], norm_num_groups=8),
                         rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    assert tiny.decode(tiny.encode(jnp.zeros((1, 8, 8, 3))).mode()).shape == (1, 8, 8, 3)

    vae = create_vae(SMALL_CONFIG, seed=0)
    params = jax.tree.leaves(nnx.state(vae, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    assert not any(isinstance(getattr(p, "sharding", None), jax.sharding.NamedSharding) for p in params)
    kernel = vae.encoder.down_blocks[1].resnets[0].conv1.kernel[...]  # fan_in 3·3·32
    assert 0.8 / 288 ** 0.5 < float(jnp.abs(kernel).max()) <= 1 / 288 ** 0.5
    posterior = vae.encode(jnp.zeros((1, 16, 16, 3)))
    assert posterior.mean.shape == (1, 8, 8, 4)
    assert bool(jnp.all((posterior.logvar >= -30) & (posterior.logvar <= 20)))
    assert vae.decode(posterior.mode()).shape == (1, 16, 16, 3)


def test_bf16_decode(sd, sd_vae):
    vae = vae_from_torch_state_dict(sd.torch.state_dict(), SD_CONFIG, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(vae, nnx.Param)))
    z = jnp.asarray(sd.z)
    decoded = vae.decode(z)
    assert decoded.dtype == jnp.float32
    error = _rel(decoded, sd_vae.decode(z))
    assert error < 3e-2, error
