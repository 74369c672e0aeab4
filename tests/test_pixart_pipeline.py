"""PixArt-α text-to-image sampling (dit_jax.pixart_sampling) against diffusers' PixArtAlphaPipeline
on tiny random models: same latents and decoded images from the same noise, the prompt-embedding
cache, the negative prompt's guidance, and sample.py --pixart end to end."""


import jax

import numpy as np
import pytest
from absl import flags
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

import sample as sample_script  # noqa: E402
from references import perturb_torch, sentencepiece_model  # noqa: E402
from dit_jax import diffusion as diff  # noqa: E402
from dit_jax.pixart_sampling import PixArtPipeline, PromptEncoder  # noqa: E402
from dit_jax.sharding import make_mesh  # noqa: E402

PROMPTS = ["A photo of a CAT sitting on a red chair ", "an astronaut riding a horse"]
T5_CONFIG = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=40, num_layers=3, num_heads=4,
                 feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
PIXART_CONFIG = dict(num_layers=2, attention_head_dim=8, num_attention_heads=3,
                     caption_channels=32, in_channels=4, out_channels=8, cross_attention_dim=24,
                     attention_bias=True, activation_fn="gelu-approximate",
                     num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                     norm_elementwise_affine=False, norm_eps=1e-6)
VAE_CONFIG = dict(block_out_channels=[16, 32], layers_per_block=1, latent_channels=4,
                  norm_num_groups=8, down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, sample_size=16)


def _perturb(model, seed):
    """Every parameter redrawn (std 1/sqrt(fan_in) for matrices, N(0, 0.1²) for vectors, norm
    scales N(1, 0.1²)): a fresh PixArt outputs zero and ignores the text."""
    return perturb_torch(model, seed)


def _tokenizer(folder):
    sentences = ["a photo of a cat sitting on a red chair", "an astronaut riding a horse",
                 "a lighthouse at dusk", "a red square and a blue circle"] * 5
    folder.mkdir()
    (folder / "spiece.model").write_bytes(sentencepiece_model(sentences, 60))
    return transformers.T5TokenizerFast.from_pretrained(folder)


def _pipeline(root, sample_size=8, patch_size=2, seed=0):
    torch.manual_seed(seed)
    text_encoder = _perturb(transformers.T5EncoderModel(transformers.T5Config(**T5_CONFIG)), seed)
    transformer = _perturb(diffusers.PixArtTransformer2DModel(
        sample_size=sample_size, patch_size=patch_size, **PIXART_CONFIG), seed + 1)
    vae = _perturb(diffusers.AutoencoderKL(**VAE_CONFIG), seed + 2)
    pipe = diffusers.PixArtAlphaPipeline(
        tokenizer=_tokenizer(root / "spiece"), text_encoder=text_encoder, vae=vae,
        transformer=transformer, scheduler=diffusers.DPMSolverMultistepScheduler())
    pipe.save_pretrained(root / "pipeline")
    return pipe, root / "pipeline"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny PixArtAlphaPipeline folder and our pipeline loaded from it on 2 devices."""
    pipe, folder = _pipeline(tmp_path_factory.mktemp("pixart"))
    ours = PixArtPipeline.load(str(folder), mesh=make_mesh(2, devices=jax.devices()[:2]))
    return pipe, folder, ours


def _reference(pipe, latents, **kwargs):
    with torch.no_grad():
        out = pipe(PROMPTS, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
                   use_resolution_binning=False, clean_caption=False, return_dict=False,
                   **kwargs)[0]
    return out.numpy().transpose(0, 2, 3, 1)


def _assert_close(ours, want, rel):
    err = np.max(np.abs(ours - want)) / np.max(np.abs(want))
    assert err < rel, err


def test_pipeline_matches_diffusers(tiny):
    """Both sides float32. The tolerance is loose (2e-4 of the largest value) because the steps
    compound rounding: the T5 encoder (~1e-6), the transformer's -10000 mask bias against a
    dropped token, and the solver's coefficients (float64-derived here, float32 sigmas in
    diffusers) each differ in the last bits, and 20 steps of guidance at 4.5 amplify them."""
    pipe, _, ours = tiny
    latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    got = ours(PROMPTS, latents=latents)  # diffusers' defaults: dpm++, 20 steps, 4.5, ""
    want = _reference(pipe, latents, output_type="latent")
    assert np.abs(want - latents).max() > 0.1  # the sampler moved
    _assert_close(got["latents"], want, 2e-4)
    image = _reference(pipe, latents, output_type="pt")  # decoded, then (x / 2 + 0.5) in [0, 1]
    _assert_close(np.clip(got["decoded"] / 2 + 0.5, 0, 1), image, 2e-4)
    assert got["images"].dtype == np.uint8 and got["images"].shape == (2, 16, 16, 3)


def test_prompt_embeddings_are_cached(tiny, tmp_path):
    _, folder, ours = tiny
    encoder = PromptEncoder.load(str(folder), cache_dir=tmp_path)
    first = encoder(PROMPTS + [""])
    assert encoder.encoded == 3
    again = encoder([p.upper() for p in PROMPTS])  # lower-cased and stripped: the same prompts
    assert encoder.encoded == 3
    np.testing.assert_array_equal(again[0], first[0][:2])
    assert len(list(tmp_path.glob("*.npz"))) == 3

    def fail(ids, mask):
        raise AssertionError("encoded again")

    disk = PromptEncoder(encoder.tokenizer, fail, identity=encoder.identity, cache_dir=tmp_path)
    np.testing.assert_array_equal(disk(PROMPTS)[0], first[0][:2])
    other = PromptEncoder(encoder.tokenizer, lambda i, m: np.zeros((len(i), 120, 32)),
                          identity="another encoder", cache_dir=tmp_path)
    assert other(PROMPTS)[0].max() == 0 and other.encoded == 2  # keyed by the encoder too
    # The pipeline's own encoder: a second call encodes nothing new.
    ours(PROMPTS, steps=2)
    count = ours.prompts.encoded
    ours(PROMPTS, steps=2)
    assert ours.prompts.encoded == count


def test_negative_prompt_guidance(tiny):
    """Two DPM-Solver++ steps (t = 999, then 500 and the data), written out in float64 from the
    equations with the model called by hand on the prompts' and the negative prompt's
    embeddings: ε = ε_neg + s·(ε_prompt - ε_neg) on the 4 ε channels."""
    import jax.numpy as jnp

    _, _, ours = tiny
    x = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    negative, scale = "a red square", 3.0
    got = ours(PROMPTS, latents=x, steps=2, cfg_scale=scale, negative_prompt=negative)["latents"]
    plain = ours(PROMPTS, latents=x, steps=2, cfg_scale=scale)["latents"]
    emb, mask = ours.prompts(PROMPTS)
    neg_emb, neg_mask = ours.prompts([negative] * 2)

    def guided(x, t):
        x, t = jnp.asarray(x, jnp.float32), jnp.full((2,), t)
        eps_p = np.asarray(ours.model(x, t, emb, mask))[..., :4].astype(np.float64)
        eps_n = np.asarray(ours.model(x, t, neg_emb, neg_mask))[..., :4].astype(np.float64)
        return eps_n + scale * (eps_p - eps_n)

    abar = diff.create_diffusion("").alphas_cumprod
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    x0 = (x - sigma[999] * guided(x, 999)) / alpha[999]
    h = np.log(alpha[500] / sigma[500]) - np.log(alpha[999] / sigma[999])
    x1 = sigma[500] / sigma[999] * x + alpha[500] * -np.expm1(-h) * x0
    want = (x1 - sigma[500] * guided(x1, 500)) / alpha[500]  # the last step: x̂0, first order
    _assert_close(got, want, 1e-4)
    assert np.abs(got - plain).max() > 1e-2 * np.abs(plain).max()


def test_micro_conditions_match_diffusers(tmp_path):
    """A 1024-MS-like model (sample_size 128, so diffusers passes resolution and aspect ratio);
    patch 8 keeps it to 256 tokens; the tiny VAE's factor 2 makes the resolution [256, 256].
    Latents only, 3 steps."""
    pipe, folder = _pipeline(tmp_path, sample_size=128, patch_size=8, seed=3)
    ours = PixArtPipeline.load(str(folder), vae="none", latent_factor=2,  # the tiny VAE's
                               mesh=make_mesh(1, devices=jax.devices()[:1]))
    assert ours.model.config.micro_conditions
    latents = np.random.default_rng(2).standard_normal((2, 128, 128, 4)).astype(np.float32)
    got = ours(PROMPTS, latents=latents, steps=3)["latents"]
    want = _reference(pipe, latents, output_type="latent", num_inference_steps=3,
                      height=256, width=256)
    _assert_close(got, want, 2e-4)


def test_sample_py_pixart_writes_pngs(tiny, tmp_path):
    _, folder, _ = tiny
    out = tmp_path / "out"
    flags.FLAGS.unparse_flags()
    sample_script.parse_flags(["sample.py", f"--pixart={folder}", "--prompt=a lighthouse at dusk",
                               "--prompt=a red square", "--num-samples=3", "--batch-size=2",
                               "--steps=4", f"--out={out}", f"--prompt-cache={tmp_path / 'cache'}",
                               f"--npz={tmp_path / 's.npz'}"])
    sample_script.main([])
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 + 2 * 18, 2 + 2 * 18, 3)
    pngs = sorted((out / "samples").glob("*.png"))
    assert len(pngs) == 3
    with np.load(tmp_path / "s.npz") as data:
        assert data["arr_0"].shape == (3, 16, 16, 3) and list(data["arr_1"]) == [0, 1, 0]
        assert data["arr_0"].std() > 1  # not a flat image
        assert np.abs(data["arr_0"][0].astype(int) - data["arr_0"][1]).max() > 0  # prompts differ
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3  # two prompts and ""


@pytest.mark.parametrize("steps", [2, 20, 25, 50])
def test_linspace_grid_is_diffusers(steps):
    scheduler = diffusers.DPMSolverMultistepScheduler()
    scheduler.set_timesteps(steps)
    process = diff.create_diffusion(f"linspace{steps}")
    np.testing.assert_array_equal(process.timestep_map[::-1], scheduler.timesteps.numpy())


def test_request_errors():
    from dit_jax.pixart_sampling import PixArtRequest

    with pytest.raises(ValueError, match="flow-model sampler"):
        PixArtRequest(pixart="x", prompts=("a",), sampler="ode-euler")
    with pytest.raises(ValueError, match="--prompt is required"):
        PixArtRequest(pixart="x", prompts=())
