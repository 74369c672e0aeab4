"""The T5 encoder and tokenizer: the same numbers as transformers' T5EncoderModel and T5 tokenizer
on small random models, every checkpoint layout, bf16, sharded over the 8-device CPU mesh."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from references import sentencepiece_model

from dit_jax import sharding
from dit_jax.models import t5
from dit_jax.port import load_t5_encoder, load_t5_tokenizer
from dit_jax.port.t5 import encoder_fn

# Small enough for seconds on CPU; d_model, heads·d_kv and d_ff divide by 2 (mesh axes).
TINY = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=40, num_layers=3, num_heads=4,
            is_encoder_decoder=False, use_cache=False)


def bucket_reference(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """T5's relative position bucket from its definition, in float64 NumPy."""
    n = np.asarray(relative_position, np.int64)
    out = np.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        out += (n > 0) * num_buckets
        distance = np.abs(n)
    else:
        distance = np.maximum(-n, 0)
    exact = num_buckets // 2
    with np.errstate(divide="ignore"):
        log_ratio = np.log(distance.astype(np.float64) / exact) / math.log(max_distance / exact)
    large = np.minimum(exact + np.floor(log_ratio * (num_buckets - exact)), num_buckets - 1)
    return out + np.where(distance < exact, distance, large).astype(np.int64)


@pytest.mark.parametrize("bidirectional,num_buckets,max_distance",
                         [(True, 32, 128), (False, 32, 128), (True, 16, 40)])
def test_relative_position_bucket_matches_float64_reference(bidirectional, num_buckets,
                                                            max_distance):
    distances = np.arange(-1000, 1001)
    got = np.asarray(t5.relative_position_bucket(
        distances, bidirectional=bidirectional, num_buckets=num_buckets,
        max_distance=max_distance))
    want = bucket_reference(distances, bidirectional, num_buckets, max_distance)
    np.testing.assert_array_equal(got, want)
    if bidirectional and num_buckets == 32:
        # Exact below 8; log-spaced buckets whose edges 16, 32, 64 fall exactly on
        # integers (where float32 rounding could go astray); the last bucket from 8·16^(7/8) ≈ 91
        # on; keys after the query in the upper half.
        assert got[1000 + 7] == 16 + 7 and got[1000 - 7] == 7
        assert (got[1000 - 15], got[1000 - 16], got[1000 - 64], got[1000 - 90]) == (9, 10, 14, 14)
        assert got[1000 - 91] == got[1000 - 1000] == 15 and got[1000 + 128] == 31


# --------------------------------------------------------------------------------------------
# transformers references


@pytest.fixture(scope="module")
def torch_models():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    def build(feed_forward_proj, cls=transformers.T5EncoderModel, seed=0, **extra):
        torch.manual_seed(seed)
        config = {**TINY, "feed_forward_proj": feed_forward_proj, **extra}
        model = cls(transformers.T5Config(**config)).eval()
        with torch.no_grad():  # norms away from their initial ones, so their weights count
            for name, p in model.named_parameters():
                if "layer_norm" in name:
                    p.mul_(1 + 0.5 * torch.randn_like(p))
        return model

    return build


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, TINY["vocab_size"], (4, 20))
    mask = np.ones_like(ids)
    mask[1, 12:] = 0
    mask[2, 3:] = 0
    ids = np.where(mask > 0, ids, 0)  # padding id 0, as the tokenizer pads
    return ids, mask


def reference(model, ids, mask):
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)
                     ).last_hidden_state.float().numpy()


@pytest.fixture(scope="module")
def gated(torch_models, tmp_path_factory, inputs):
    """The T5 v1.1 (gated-GELU) model saved as safetensors, and its output on padded inputs."""
    model = torch_models("gated-gelu")
    folder = tmp_path_factory.mktemp("t5") / "encoder"
    model.save_pretrained(folder)
    return model, folder, reference(model, *inputs)


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu"])
def test_encoder_matches_transformers_with_padding(feed_forward_proj, gated, torch_models,
                                                   tmp_path, inputs):
    if feed_forward_proj == "gated-gelu":
        _, folder, want = gated
    else:  # the original T5's FFN
        model = torch_models(feed_forward_proj, seed=1)
        folder = tmp_path / "encoder"
        model.save_pretrained(folder)
        want = reference(model, *inputs)
    encoder = load_t5_encoder(folder)
    encode = encoder_fn(encoder)
    got = np.asarray(encode(*inputs))
    assert got.shape == (4, 20, TINY["d_model"]) and got.dtype == np.float32
    # Every position, padded ones included: transformers computes their rows too (attending to
    # the real tokens only), and so does the port.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The padding does matter: without the mask the padded rows' neighbours change.
    unmasked = np.asarray(encode(inputs[0]))
    assert np.abs(unmasked[1, :12] - want[1, :12]).max() > 1e-3
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 100\)"):
        encode(inputs[0] + 100)


def _leaves(encoder):
    return jax.tree.leaves(nnx.to_pure_dict(nnx.state(encoder)))


def test_checkpoint_layouts_load_the_same_weights(gated, torch_models, tmp_path):
    """Sharded safetensors, pytorch_model.bin, a pipeline folder with text_encoder/, and a whole
    T5ForConditionalGeneration (its decoder ignored) give the same encoder."""
    import transformers

    model, folder, _ = gated
    want = _leaves(load_t5_encoder(folder))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    pipeline = tmp_path / "pipeline"
    shutil.copytree(folder, pipeline / "text_encoder")
    # A pickled state_dict with the index of a sharded .bin (the layout of older hub repos).
    import torch

    binary = tmp_path / "binary"
    binary.mkdir()
    shutil.copy(folder / "config.json", binary)
    state = model.state_dict()
    keys = sorted(state)
    # The first shard in torch's legacy (pre-zip) format, which cannot be memory-mapped.
    torch.save({k: state[k] for k in keys[:10]}, binary / "pytorch_model-00001-of-00002.bin",
               _use_new_zipfile_serialization=False)
    torch.save({k: state[k].to(torch.bfloat16) for k in keys[10:]},
               binary / "pytorch_model-00002-of-00002.bin")
    (binary / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        k: f"pytorch_model-0000{1 + (i >= 10)}-of-00002.bin" for i, k in enumerate(keys)}}))
    full = torch_models("gated-gelu", cls=transformers.T5ForConditionalGeneration,
                        is_encoder_decoder=True)
    full.encoder.load_state_dict(model.encoder.state_dict())
    full.shared.load_state_dict(model.shared.state_dict())
    full.save_pretrained(tmp_path / "full")
    for source in ("sharded", "pipeline", "binary", "full"):
        got = _leaves(load_t5_encoder(tmp_path / source))
        for a, b in zip(got, want):
            tol = 1e-2 if source == "binary" else 0  # half of it stored bf16
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol,
                                       err_msg=source)


def test_bad_checkpoints_name_the_problem(gated, tmp_path):
    _, folder, _ = gated
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_t5_encoder(tmp_path / "nowhere")
    wrong = tmp_path / "wrong"
    shutil.copytree(folder, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "num_layers": 4}))
    with pytest.raises(ValueError, match=r"missing key\(s\) \['encoder\.block\.3\."):
        load_t5_encoder(wrong)
    (wrong / "config.json").write_text(json.dumps({**config, "d_ff": 48}))
    with pytest.raises(ValueError, match=r"DenseReluDense\.wi_0\.weight has shape \(40, 32\)"):
        load_t5_encoder(wrong)
    (wrong / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        load_t5_encoder(wrong)
    (wrong / "config.json").write_text(json.dumps(config))
    (wrong / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no T5 weights"):
        load_t5_encoder(wrong)


def test_bf16_is_close(gated, inputs):
    _, folder, want = gated
    for param_dtype in (jnp.float32, jnp.bfloat16):
        encoder = load_t5_encoder(folder, dtype=jnp.bfloat16, param_dtype=param_dtype)
        assert encoder.blocks[0].attention.q.kernel[...].dtype == param_dtype
        got = np.asarray(encoder_fn(encoder)(*inputs))
        assert got.dtype == np.float32  # norms and residual stream stay float32
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert 1e-5 < err < 2e-2, err  # bf16 rounding, and only that


def test_sharded_forward_equals_one_device(gated, inputs):
    _, folder, want = gated
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    encoder = load_t5_encoder(folder, mesh=mesh)
    # Loaded straight into the layout: fsdp over d_model, tensor over heads and the FFN.
    assert encoder.blocks[0].attention.q.kernel[...].sharding.spec == P("fsdp", "tensor")
    assert encoder.blocks[1].ffn.wo.kernel[...].sharding.spec == P("tensor", "fsdp")
    assert encoder.shared[...].sharding.spec == P(None, "fsdp")
    single = encoder_fn(load_t5_encoder(folder))(*inputs)
    with jax.set_mesh(mesh):
        encode = encoder_fn(encoder, mesh)
        got = encode(*inputs)
        # One prompt on the 4-way batch split: padded for the computation, cut after it.
        one = encode(inputs[0][1:2], inputs[1][1:2])
    np.testing.assert_allclose(np.asarray(got), np.asarray(single), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(one), want[1:2], rtol=1e-5, atol=1e-5)


def test_remat_gives_the_same_gradients(gated, inputs):
    _, folder, _ = gated

    def grads(remat):
        graphdef, state = nnx.split(load_t5_encoder(folder, remat=remat))
        loss = lambda s: jnp.sum(jnp.sin(nnx.merge(graphdef, s)(*inputs)))  # noqa: E731
        return jax.tree.leaves(jax.jit(jax.grad(loss))(state))

    for a, b in zip(grads(True), grads(False)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_xxl_config_from_hf():
    xxl = dict(t5.T5_CONFIGS["t5-v1_1-xxl"], model_type="t5", d_model=4096, is_gated_act=True,
               tie_word_embeddings=False, dropout_rate=0.1)
    cfg = t5.T5EncoderConfig.from_hf(xxl)
    assert (cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.num_layers) == (
        4096, 64, 64, 10240, 24)
    assert cfg.is_gated and cfg.activation == "gelu_new"
    _, abstract = t5.split_encoder(cfg)
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
    assert abs(count - 4.76e9) < 0.01e9, count  # T5-XXL's encoder, token table included
    assert t5.T5EncoderConfig.from_hf({**TINY}).feed_forward_proj == "relu"  # as transformers
    with pytest.raises(ValueError, match="unsupported activation 'tanhh'"):
        t5.T5EncoderConfig(feed_forward_proj="gated-tanhh")


# --------------------------------------------------------------------------------------------
# The tokenizer

PROMPTS = ["a cat on the moon", "", "x" * 300, "a <extra_id_0> dog <extra_id_99>b",
           "  two   spaces  ", "Ünïcödé café", "a<extra_id_5>b <extra_id_100> c",
           "ＦＵＬＬ width ½, and a longer caption about a watercolor lighthouse at dusk"]


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory):
    """A tiny SentencePiece Unigram model trained here (ids as T5's: pad 0, EOS 1, unk 2), as
    spiece.model, and the tokenizer.json that transformers' T5 tokenizer writes from it."""
    pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    sentences = ["a photo of a cat sitting on a red chair", "an astronaut riding a horse",
                 "a bowl of fruit: apples, oranges and bananas!", "a lighthouse at dusk",
                 "The quick brown fox jumps over the lazy dog.", "Ünïcödé café naïve façade"] * 5
    root = tmp_path_factory.mktemp("tokenizer")
    (root / "spiece").mkdir()
    (root / "spiece" / "spiece.model").write_bytes(sentencepiece_model(sentences, 80))
    hf = transformers.T5TokenizerFast.from_pretrained(root / "spiece")
    hf.save_pretrained(root / "json")
    assert not (root / "json" / "spiece.model").exists()
    return hf, root


@pytest.mark.parametrize("kind", ["spiece", "json"])
@pytest.mark.parametrize("max_length", [12, 40])
def test_tokenizer_matches_transformers(tokenizer_folders, kind, max_length):
    hf, root = tokenizer_folders
    ours = load_t5_tokenizer(root / kind, max_length=max_length)
    assert ours.source.endswith("spiece.model" if kind == "spiece" else "tokenizer.json")
    ids, mask = ours(PROMPTS)
    want = hf(PROMPTS, padding="max_length", max_length=max_length, truncation=True,
              add_special_tokens=True)
    np.testing.assert_array_equal(ids, np.asarray(want["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(want["attention_mask"]))
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == (len(PROMPTS), max_length)
    # EOS (1) closes every prompt, truncated ones included; padding (0) is masked out.
    lengths = mask.sum(1)
    assert (ids[np.arange(len(PROMPTS)), lengths - 1] == 1).all()
    assert lengths[1] == 1 and lengths[2] == max_length
    assert (ids[mask == 0] == 0).all()


def test_tokenizer_default_length_and_pipeline_folder(tokenizer_folders, tmp_path):
    hf, root = tokenizer_folders
    shutil.copytree(root / "spiece", tmp_path / "pipeline" / "tokenizer")
    ours = load_t5_tokenizer(tmp_path / "pipeline")
    ids, mask = ours("a cat on the moon")
    assert ids.shape == mask.shape == (1, 120)  # PixArt-α's prompt length
    np.testing.assert_array_equal(ids[0], hf("a cat on the moon", padding="max_length",
                                             max_length=120)["input_ids"])
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or spiece.model"):
        load_t5_tokenizer(tmp_path)
