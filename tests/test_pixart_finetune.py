"""Fine-tuning PixArt-α with train.py (docs/pixart.md#fine-tuning-with-trainpy), end to end on tiny
random models: a captioned image folder → `extract_latents --captions` (a tiny diffusers VAE, a
tiny transformers T5) → train.py from a tiny diffusers PixArtTransformer2DModel (the initial
weights give diffusers' outputs) → sample.py --prompt, whose T5 comes from the run's record."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

import sample as sample_script  # noqa: E402
import train as train_script  # noqa: E402
from configs.pixart_finetune import get_config  # noqa: E402
from dit_jax.data.folder import scan_folder  # noqa: E402
from dit_jax.extract_latents import main as extract_main  # noqa: E402
from dit_jax.models.text import TextToImage  # noqa: E402
from dit_jax.sharding import make_mesh  # noqa: E402
from dit_jax.text_sampling import text_model_buffers  # noqa: E402
from dit_jax.train.text import (load_init_pixart, pixart_init_params, text_model_config,  # noqa: E402
                                text_source)
from imagedata import make_image_folder  # noqa: E402
from references import perturb_torch  # noqa: E402
from test_cli import run_command  # noqa: E402
from test_extract_latents import write_vae_folder  # noqa: E402
from test_text import t5_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red circle", "a green square on a light background", "two cats on a sofa",
            "a blue triangle"]
# The tiny T5 of test_text (width 16) and the tiny VAE of the latents tests (32 px → 4×4×4).
PIXART = dict(num_layers=2, attention_head_dim=8, num_attention_heads=3, caption_channels=16,
              in_channels=4, out_channels=8, cross_attention_dim=24, attention_bias=True,
              activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
              norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
              patch_size=2)


def save_pixart(folder, seed=0, **config):
    torch.manual_seed(seed)
    model = perturb_torch(diffusers.PixArtTransformer2DModel(**dict(PIXART, **config)), seed)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pixart_ft")
    data = make_image_folder(tmp / "images", flat=8, extras=False)
    for i, path in enumerate(scan_folder(data, class_folders=False)[0]):
        Path(path).with_suffix(".txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    t5 = t5_folder(tmp / "t5", CAPTIONS)
    vae = write_vae_folder(tmp / "vae")
    latents = tmp / "latents"
    extract_main(["--data", str(data), "--out", str(latents), "--image-size", "32",
                  "--vae", str(vae), "--batch-size", "4", "--num-workers", "0", "--no-progress",
                  "--captions", "--text-encoder", str(t5), "--max-text-length", "24"])
    reference = save_pixart(tmp / "pixart", sample_size=4)
    return {"tmp": tmp, "t5": t5, "vae": vae, "latents": latents, "pixart": tmp / "pixart",
            "reference": reference}


def config_for(setup, pixart=None):
    c = get_config()
    c.data.path = str(setup["latents"])
    c.data.image_size = 32
    c.vae = str(setup["vae"])
    c.init_from = str(pixart or setup["pixart"])
    c.model.dtype = "float32"
    return c


def diffusers_out(model, x, t, emb, mask, **added):
    with torch.no_grad():
        out = model(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()),
                    encoder_hidden_states=torch.from_numpy(np.asarray(emb)),
                    encoder_attention_mask=torch.from_numpy(np.asarray(mask)),
                    timestep=torch.from_numpy(np.asarray(t)),
                    added_cond_kwargs=added or {"resolution": None, "aspect_ratio": None},
                    return_dict=False)[0]
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("micro", [False, True])
def test_initial_weights_are_the_loaded_pixart(setup, micro):
    """What train.py starts from, as a model: diffusers' output on the extracted embeddings (a
    padded mask) and random latents, to float32 rounding; with micro-conditions (1024-MS style),
    the resolution is the decoded size of the latents (4 × 8 = 32 px), aspect ratio 1."""
    src = setup["pixart"]
    reference = setup["reference"]
    if micro:
        src = setup["tmp"] / "pixart_micro"
        if not src.exists():
            save_pixart(src, seed=1, sample_size=4, use_additional_conditions=True)
        reference = diffusers.PixArtTransformer2DModel.from_pretrained(src).eval()
    config = config_for(setup, src).copy_and_resolve_references()
    source, tokenizer = text_source(config)
    assert (config.text.max_length, config.text.caption_channels) == (24, 16)  # from the data
    assert config.text.t5 == str(setup["t5"])  # recorded for sample.py
    pixart = load_init_pixart(config)
    model_cfg = text_model_config(config, tokenizer, 4, 4, pixart=pixart, latent_scale=8)
    assert model_cfg.micro_conditions is micro and (model_cfg.depth, model_cfg.hidden_size) == (2, 24)
    graphdef, _, _ = nnx.split(TextToImage(model_cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = nnx.merge(graphdef, pixart_init_params(config, pixart, model_cfg),
                      text_model_buffers(model_cfg, mesh))
    rows = [source[i] for i in range(3)]
    emb = np.stack([r["text"] for r in rows])
    mask = np.stack([r["text_mask"] for r in rows])
    assert mask.sum(1).min() < 24  # padding present
    x = np.random.default_rng(0).standard_normal((3, 4, 4, 4)).astype(np.float32)
    t = np.array([3, 500, 999], np.int32)
    ours = np.asarray(model.denoise(x, t, emb, mask))
    added = ({"resolution": torch.tensor([[32.0, 32.0]] * 3), "aspect_ratio": torch.ones(3, 1)}
             if micro else {})
    want = diffusers_out(reference, x, t, emb, mask, **added)
    np.testing.assert_allclose(ours, want, atol=1e-5 * np.abs(want).max(), rtol=0)


def test_pixart_mismatches_with_the_data_are_one_line_errors(setup):
    config = config_for(setup).copy_and_resolve_references()
    source, tokenizer = text_source(config)
    pixart = load_init_pixart(config)
    cases = [((3, 4), "reads 4-channel latents"),
             ((4, 8), r"trained on 4×4 latents \(32 px\), the latents in .* are 8×8 \(64 px\)")]
    for (channels, side), message in cases:
        with pytest.raises(ValueError, match=message) as err:
            text_model_config(config, tokenizer, channels, side, pixart=pixart, latent_scale=8)
        assert "\n" not in str(err.value)
    wide = config_for(setup).copy_and_resolve_references()
    wide.text.caption_channels = 32
    with pytest.raises(ValueError, match="set --config.text.caption_channels=16"):
        text_source(wide)
    sized = config_for(setup).copy_and_resolve_references()
    text_source(sized)
    sized.model.depth = 5
    with pytest.raises(ValueError, match="init_from .* has model.depth=2, the config says 5"):
        text_model_config(sized, None, 4, 4, pixart=pixart, latent_scale=8)


def test_train_py_fine_tunes_then_sample_py_draws_prompts(setup):
    tmp = setup["tmp"]
    workdir = tmp / "run"
    argv = ["train.py", f"--config={ROOT}/configs/pixart_finetune.py", f"--workdir={workdir}",
            f"--config.data.path={setup['latents']}", f"--config.init_from={setup['pixart']}",
            "--config.data.image_size=32", f"--config.vae={setup['vae']}",
            "--config.total_steps=2", "--config.checkpoint_every=2", "--config.log_every=1",
            "--config.global_batch_size=8", "--config.model.dtype=float32",
            "--config.async_checkpointing=False", "--config.data.num_workers=0"]
    first, second = run_command(train_script, argv, times=2)
    assert "done: step 2 of 2 (this run: steps 0..2)" in first
    recorded = json.loads((workdir / "config.json").read_text())
    assert recorded["text"]["t5"] == str(setup["t5"]) and recorded["text"]["max_length"] == 24
    model_config = json.loads((workdir / "model_config.json").read_text())
    assert (model_config["depth"], model_config["hidden_size"], model_config["encoder"]) == (
        2, 24, "none")
    assert second.startswith(f"already complete: {workdir} finished all 2 steps")

    # sample.py --ckpt=W --prompt: the recorded T5 encodes, the run's VAE decodes (32 px).
    out = tmp / "prompts"
    run_command(sample_script, ["sample.py", f"--ckpt={workdir}", "--prompt=a red circle",
                                "--prompt=two cats on a sofa", "--steps=3", f"--out={out}"])
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 + 34, 2 + 2 * 34, 3) and len(np.unique(grid)) > 8
    asked = json.loads((out / "prompts.json").read_text())
    assert asked["prompts"] == ["a red circle", "two cats on a sofa"] and asked["steps"] == 3
    # The same OUT again is sample.py's own; --t5 overriding the record, to a missing folder,
    # is a one-line error naming the flag.
    with pytest.raises(FileNotFoundError, match=r"--t5") as err:
        run_command(sample_script, ["sample.py", f"--ckpt={workdir}", "--prompt=a red circle",
                                    f"--t5={tmp / 'no_t5'}", f"--out={out}"])
    assert "\n" not in str(err.value)
