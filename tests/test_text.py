"""Text conditioning (docs/text.md): captioned data, caption dropout and the null caption, the
text mask through the pipeline, guidance with a negative prompt, text-embedding extraction, and a
short text-to-image training run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dit_jax.data.captions import (HELD_OUT, TEXT_MANIFEST, CaptionedFolderSource,
                                   CaptionedShapes, TextLatentSource, WordTokenizer, caption_of,
                                   parse_caption, prompt_check, read_captions, text_record)
from dit_jax.data.folder import scan_folder
from dit_jax.data.latents import MANIFEST
from dit_jax.extract_text import extract_text
from dit_jax.models.text import TextModelConfig, TextToImage
from dit_jax.sharding import make_mesh
from dit_jax.text_sampling import text_guidance, text_model_buffers
from imagedata import make_image_folder

WORDS = CaptionedShapes().vocabulary()


def tiny_config(**changes) -> TextModelConfig:
    fields = dict(input_size=8, in_channels=3, hidden_size=24, depth=1, num_heads=2, patch_size=2,
                  learn_sigma=False, caption_channels=16, max_length=8, caption_dropout=0.3,
                  encoder="t5", vocab_size=WordTokenizer(WORDS).vocab_size, encoder_layers=1,
                  encoder_heads=2, encoder_head_dim=8, encoder_ff=32)
    fields.update(changes)
    return TextModelConfig(**fields)


def perturbed(model: TextToImage, seed: int = 1) -> TextToImage:
    """Every weight moved off its initial value (a fresh PixArt's final layer is zero, so its
    output would be exactly zero whatever the text)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves), rest)


@pytest.fixture(scope="module")
def model():
    # With the pooled caption in the modulation: the padding and guidance tests cover it too.
    return perturbed(TextToImage(tiny_config(pooled_text=True), rngs=nnx.Rngs(0)))


# --------------------------------------------------------------------------------------------
# Data


def test_captioned_shapes_hold_out_pairs_and_caption_their_pixels():
    source = CaptionedShapes(image_size=32, size=96)
    batch = source.get_batch(np.arange(96))
    pairs = {parse_caption(c) for c in batch["caption"]}
    assert len(pairs) == 12 and not pairs & set(HELD_OUT)  # the 4 held-out pairs never shown
    assert {c.split()[-2] for c in batch["caption"]} == {"dark", "light"}
    # The data's own images follow their captions by the judge that scores samples.
    scores = prompt_check(batch["x"], list(batch["caption"]))
    assert scores["shape"] == scores["colour"] == 1.0 and scores["both_held_out"] is None
    # A held-out prompt judged on a trained image of another pair fails on the swapped attribute.
    red_square = caption_of(1, 0)
    assert parse_caption(red_square) in HELD_OUT
    red_circle = batch["x"][list(batch["caption"]).index(caption_of(0, 0, "dark"))]
    check = prompt_check(red_circle[None], [red_square])
    assert check["colour"] == 1.0 and check["shape"] == 0.0 and check["both_held_out"] == 0.0
    # Same example, same pixels, in any batch.
    np.testing.assert_array_equal(source[5]["x"], batch["x"][5])


def test_captioned_folder_reads_txt_and_jsonl_captions(tmp_path):
    root = make_image_folder(tmp_path / "txt", flat=3)
    source_paths = scan_folder(root, class_folders=False)[0]
    for i, path in enumerate(source_paths):
        with open(path.rsplit(".", 1)[0] + ".txt", "w") as f:
            f.write(f"caption {i}\n")
    source = CaptionedFolderSource(root, 16)
    assert [source[i]["caption"] for i in range(3)] == ["caption 0", "caption 1", "caption 2"]
    assert source[1]["x"].shape == (16, 16, 3)

    (root / "captions.jsonl").write_text("\n".join(
        json.dumps({"file_name": p[len(str(root)) + 1:], "text": f"from jsonl {i}"})
        for i, p in enumerate(source_paths)) + "\n")
    assert read_captions(root, source_paths)[2] == "from jsonl 2"  # the .jsonl wins

    (root / "captions.jsonl").write_text(json.dumps({"file": "nope.png", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="3 image.*have no line in .*captions.jsonl"):
        CaptionedFolderSource(root, 16)
    (root / "captions.jsonl").unlink()
    os.remove(source_paths[0].rsplit(".", 1)[0] + ".txt")
    with pytest.raises(ValueError, match="1 image.*no .txt caption"):
        CaptionedFolderSource(root, 16)


def test_word_tokenizer_pads_with_eos_like_t5():
    tok = WordTokenizer(WORDS, max_length=6)
    ids, mask = tok(["a RED circle, on a dark background", "", "purple"])
    assert ids.shape == mask.shape == (3, 6) and ids.dtype == np.int32
    assert ids[0, -1] == tok.eos_id and mask[0].all()  # cut to 5 words + EOS
    np.testing.assert_array_equal(ids[1], [1, 0, 0, 0, 0, 0])  # "" is EOS alone
    np.testing.assert_array_equal(mask[2], [1, 1, 0, 0, 0, 0])  # unknown word, EOS
    assert ids[2, 0] == 2


# --------------------------------------------------------------------------------------------
# Caption dropout, the null caption, the mask


def test_caption_dropout_rate_and_null_caption(model):
    n, cfg = 4000, model.config
    text = jax.random.normal(jax.random.key(0), (n, cfg.max_length, cfg.caption_channels))
    mask = (jnp.arange(cfg.max_length)[None] < jnp.arange(n)[:, None] % cfg.max_length + 1)
    out, out_mask = model.drop_captions(text, mask.astype(jnp.int32), jax.random.key(1))
    null = model.dit.y_embedder.y_embedding[...]
    dropped = np.all(np.asarray(out) == np.asarray(null)[None], axis=(1, 2))
    kept = np.all(np.asarray(out) == np.asarray(text), axis=(1, 2))
    assert np.all(dropped ^ kept)
    # Binomial(4000, 0.3): standard deviation 0.0072.
    assert abs(dropped.mean() - cfg.caption_dropout) < 0.03
    assert np.all(np.asarray(out_mask)[dropped] == 1)  # the null caption is attended in full
    np.testing.assert_array_equal(np.asarray(out_mask)[kept], np.asarray(mask, np.int32)[kept])
    # The null caption: fixed randn / sqrt(C), the same in every model of this config (it is
    # not trained and not checkpointed), which sampling rebuilds.
    assert null.shape == (cfg.max_length, cfg.caption_channels)
    assert abs(float(jnp.std(null)) * cfg.caption_channels ** 0.5 - 1) < 0.25
    buffers = text_model_buffers(cfg, make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    np.testing.assert_array_equal(buffers["dit"]["y_embedder"]["y_embedding"][...], null)
    # Rate 0: nothing dropped.
    plain = TextToImage(tiny_config(caption_dropout=0.0))
    same, _ = plain.drop_captions(text, mask, jax.random.key(1))
    assert same is text


def test_padding_tokens_never_change_the_output(model):
    tok = WordTokenizer(WORDS, max_length=model.config.max_length)
    ids, mask = tok(["a red circle", "a blue triangle on a light background"])
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    t = jnp.asarray([10, 700])
    base = model(x, t, ids, mask)
    # Other token ids where the mask is 0: through the encoder and the cross-attention, nothing.
    junk = np.where(mask == 0, np.random.default_rng(0).integers(3, tok.vocab_size, ids.shape), ids)
    np.testing.assert_allclose(model(x, t, junk, mask), base, atol=1e-5, rtol=1e-5)
    # The embeddings path: anything at masked positions.
    emb = model.encode(ids, mask)
    noisy = jnp.where(jnp.asarray(mask)[..., None] == 0, 1e3, emb)
    np.testing.assert_allclose(model.denoise(x, t, noisy, mask), base, atol=1e-5, rtol=1e-5)
    # ... while a real token does change it.
    other = ids.copy()
    other[0, 1] = tok(["green"])[0][0, 0]
    assert not np.allclose(model(x, t, other, mask)[0], base[0], atol=1e-4)


def test_pooled_text_starts_as_the_plain_pixart_block_and_then_conditions(model):
    """pooled_text adds Linear(masked mean of the caption) to the timestep embedding; the Linear
    starts at zero, so a fresh model is the PixArt-α block; once trained, it moves the output."""
    tok = WordTokenizer(WORDS, max_length=model.config.max_length)
    ids, mask = tok(["a red circle", "a blue triangle on a light background"])
    x = jax.random.normal(jax.random.key(4), (2, 8, 8, 3))
    t = jnp.asarray([30, 600])
    fresh = TextToImage(tiny_config(pooled_text=True), rngs=nnx.Rngs(0))
    assert not np.any(np.asarray(fresh.pooled_proj.kernel[...]))
    # The same weights without the pooled path: equal while its Linear is zero.
    plain = TextToImage(tiny_config(), rngs=nnx.Rngs(0))
    values = nnx.to_pure_dict(nnx.state(model))
    del values["pooled_proj"]
    plain_state = nnx.state(plain)
    nnx.replace_by_pure_dict(plain_state, values)
    nnx.update(plain, plain_state)
    zeroed = nnx.clone(model)
    zeroed.pooled_proj.kernel[...] = jnp.zeros_like(zeroed.pooled_proj.kernel[...])
    zeroed.pooled_proj.bias[...] = jnp.zeros_like(zeroed.pooled_proj.bias[...])
    np.testing.assert_allclose(zeroed(x, t, ids, mask), plain(x, t, ids, mask), atol=1e-6)
    # A nonzero projection: the caption's mean, by hand, added to the timestep embedding.
    emb = model.encode(ids, mask)
    m = np.asarray(mask, np.float64)[..., None]
    pooled = (np.asarray(emb, np.float64) * m).sum(1) / m.sum(1)
    expected = pooled @ np.asarray(model.pooled_proj.kernel[...], np.float64) + np.asarray(
        model.pooled_proj.bias[...], np.float64)
    got = model.dit(x, t, emb, mask, condition=jnp.asarray(expected, jnp.float32))
    np.testing.assert_allclose(model.denoise(x, t, emb, mask), got, atol=1e-5, rtol=1e-5)
    assert not np.allclose(model(x, t, ids, mask), zeroed(x, t, ids, mask), atol=1e-4)


def test_guidance_with_negative_prompt_equals_hand_computation(model):
    tok = WordTokenizer(WORDS, max_length=model.config.max_length)
    ids, mask = tok(["a red circle", "a yellow diamond"])
    neg_ids, neg_mask = tok(["a blue square", "a blue square"])
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    t = jnp.asarray([500, 20])
    emb, neg = model.encode(ids, mask), model.encode(neg_ids, neg_mask)
    scale = 3.5
    guided = text_guidance(model, emb, mask, scale, negative=(neg, neg_mask))(x, t)
    cond = np.asarray(model.denoise(x, t, emb, mask), np.float64)
    uncond = np.asarray(model.denoise(x, t, neg, neg_mask), np.float64)
    np.testing.assert_allclose(guided, uncond + scale * (cond - uncond), atol=2e-5, rtol=1e-5)
    # Without a negative prompt the unconditional branch is the null caption, attended in full.
    null, null_mask = model.null_caption(2)
    uncond = np.asarray(model.denoise(x, t, null, null_mask), np.float64)
    np.testing.assert_allclose(text_guidance(model, emb, mask, scale)(x, t),
                               uncond + scale * (cond - uncond), atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Extraction


def t5_folder(root, sentences):
    """A tiny random transformers T5 v1.1 encoder with a SentencePiece tokenizer trained here on
    `sentences`, in one folder, as `--text-encoder` takes it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    from references import sentencepiece_model
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=4,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)).eval()
    model.save_pretrained(root)
    (root / "spiece.model").write_bytes(sentencepiece_model(sentences * 4, 30))
    return root


def test_text_extraction_aligns_with_latents_and_resumes(tmp_path):
    """`extract_latents --captions`: the latents, then each readable image's caption through a
    T5 folder, row for row; an interrupted text extraction redoes only its missing shards."""
    from test_extract_latents import write_vae_folder  # the tiny VAE of the latents tests
    from dit_jax.extract_latents import main
    from dit_jax.port import load_t5_encoder, load_t5_tokenizer

    captions = ["a red circle", "a green square on a light background", "two cats"]
    data = make_image_folder(tmp_path / "images", flat=7, corrupt={"img_900.jpg": "truncated"})
    paths = scan_folder(data, class_folders=False)[0]
    for i, path in enumerate(paths):
        with open(path.rsplit(".", 1)[0] + ".txt", "w") as f:
            f.write(captions[i % 3])
    t5 = t5_folder(tmp_path / "t5", captions)
    out = tmp_path / "latents"
    argv = ["--data", str(data), "--out", str(out), "--image-size", "32",
            "--vae", str(write_vae_folder(tmp_path / "vae")), "--batch-size", "1",
            "--shard-size", "3", "--num-workers", "0", "--no-progress", "--captions",
            "--text-encoder", str(t5), "--max-text-length", "8"]
    main(argv)
    text = json.loads((out / TEXT_MANIFEST).read_text())
    latents = json.loads((out / MANIFEST).read_text())
    assert text["count"] == latents["count"] == 7  # the truncated image skipped in both
    assert text["max_length"] == 8 and text["caption_channels"] == 16
    # Row i is the encoding of the caption of the i-th readable image.
    encoder, tokenizer = load_t5_encoder(t5), load_t5_tokenizer(t5, max_length=8)
    readable = [p for p in paths if p not in latents["skipped_files"]]
    ids, mask = tokenizer([open(p.rsplit(".", 1)[0] + ".txt").read() for p in readable])
    expected = np.asarray(encoder(ids, mask))
    source = TextLatentSource(out, image_size=32)
    for i in range(len(source)):
        np.testing.assert_allclose(source[i]["text"], expected[i], atol=1e-5)
        np.testing.assert_array_equal(source[i]["text_mask"], mask[i])
    example = source.augment(source[0], np.random.default_rng(0))
    assert example["x"].shape == source.element_shape and example["text"].shape == (8, 16)

    # Resume: shard 1's text lost; shards 0 and 2 are not written again.
    (out / text_record(1)).unlink()
    (out / TEXT_MANIFEST).unlink()
    before = {k: os.stat(out / f"text_{k:05d}.npy").st_mtime_ns for k in (0, 2)}
    calls = []
    encode = lambda c: (calls.append(len(c)), (np.asarray(encoder(*tokenizer(c))),  # noqa: E731
                                              tokenizer(c)[1]))[1]
    again = extract_text(data, out, encode, encoder_name=str(t5))
    assert again == text and sum(calls) == json.loads((out / "shard_00001.json").read_text())["count"]
    assert before == {k: os.stat(out / f"text_{k:05d}.npy").st_mtime_ns for k in (0, 2)}


# --------------------------------------------------------------------------------------------
# Sampling a run trained on a frozen T5's embeddings


def frozen_t5_workdir(root, t5):
    """The files of a text run on extracted embeddings that load_text_run reads before any
    weights: model_config.json (encoder "none") and config.json recording text.t5."""
    from dit_jax.checkpoint.model import config_to_dict

    root.mkdir(parents=True)
    cfg = tiny_config(encoder="none", vocab_size=0, in_channels=4)
    (root / "model_config.json").write_text(json.dumps(config_to_dict(cfg)))
    (root / "config.json").write_text(json.dumps({"text": {"t5": t5}, "vae": "none"}))
    return root


def test_frozen_t5_run_without_its_encoder_is_a_one_line_error_naming_t5(tmp_path):
    """sample.py --prompt on a frozen-T5 run: no recorded encoder, a recorded one that is gone,
    and a --t5 that does not exist each fail before any weights are read, in one line that names
    --t5; an --out holding someone else's files is refused before anything is loaded."""
    from dit_jax.text_sampling import load_text_run, sample_text_run

    cases = [(frozen_t5_workdir(tmp_path / "none", ""), None, r"names no encoder \(text.t5\)"),
             (frozen_t5_workdir(tmp_path / "gone", str(tmp_path / "t5_gone")), None,
              "t5_gone' \\(text.t5 in .*config.json\\) does not exist"),
             (frozen_t5_workdir(tmp_path / "flag", str(tmp_path / "t5_gone")),
              str(tmp_path / "other_t5"), "other_t5' \\(--t5\\) does not exist")]
    for workdir, t5, message in cases:
        with pytest.raises(FileNotFoundError, match=message) as err:
            load_text_run(workdir, t5=t5)
        assert "pass --t5=SRC" in str(err.value) and "\n" not in str(err.value)
    # A folder that exists but holds no T5.
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="cannot be loaded .*pass --t5=SRC") as err:
        load_text_run(cases[0][0], t5=str(tmp_path / "empty"))
    assert "\n" not in str(err.value)

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not sample.py's")
    with pytest.raises(ValueError, match="holds files sample.py did not write"):
        sample_text_run(cases[0][0], ["a red circle"], out=out)


# --------------------------------------------------------------------------------------------
# Training


def test_short_text_training_lowers_the_loss_and_follows_colours(tmp_path):
    """The text demo, shortened: the loss falls, and the samples' colours follow the prompts
    better than chance (1/4) on seen and held-out pairs (shapes need the full demo)."""
    from configs.text_demo import get_config
    from dit_jax.train.loop import train

    c = get_config()
    c.total_steps = 600
    c.log_every = 100
    c.checkpoint_every = 600
    c.sample_every = 600
    c.optim.warmup_steps = 20
    c.sample.steps = 20
    c.async_checkpointing = False
    result = train(c, tmp_path / "run")
    # What train.py's end-of-run summary reads.
    assert (result["start"], result["step"], result["status"]) == (0, 600, "completed")
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in lines if "loss" in m]
    assert losses[-1] < 0.7 * losses[0]
    m = result["metrics"]
    assert m["prompt_colour"] > 0.5, m

    # sample.py --prompt's path: the workdir's model, tokenizer and settings; a negative prompt
    # replaces the null caption in the unconditional branch.
    from dit_jax.text_sampling import load_text_run, sample_prompts

    model, tokenizer, settings = load_text_run(tmp_path / "run")
    settings["steps"] = 5
    plain = sample_prompts(model, tokenizer, ["a red square", "a blue circle"], **settings)
    negative = sample_prompts(model, tokenizer, ["a red square", "a blue circle"],
                              negative_prompt="a yellow circle", **settings)
    assert plain.shape == (2, 32, 32, 3) and plain.dtype == np.uint8
    assert np.abs(plain.astype(int) - negative).mean() > 1

    # The command line itself: python sample.py --ckpt=W --prompt=... --prompt=...
    from absl import flags
    from PIL import Image

    import sample as sample_script

    flags.FLAGS.unparse_flags()
    sample_script.parse_flags(["sample.py", f"--ckpt={tmp_path / 'run'}", "--prompt=a red square",
                               "--prompt=a blue circle", "--steps=5",
                               f"--out={tmp_path / 'prompts'}"])
    sample_script.main([])
    grid = np.asarray(Image.open(tmp_path / "prompts" / "grid.png"))
    assert grid.shape == (2 + 34, 2 + 2 * 34, 3) and len(np.unique(grid)) > 8  # 32 px + padding
