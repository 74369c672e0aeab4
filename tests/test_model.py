"""The DiT model against docs/numerics.md#model: parameter counts, fixed embeddings, unpatchify,
label dropout, precision and the remat / scanned forms."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx

import dit_jax
from dit_jax.models import dit

OFFICIAL_COUNTS_256 = {
    "DiT-XL/2": 675_129_632, "DiT-XL/4": 675_074_432, "DiT-XL/8": 675_683_072,
    "DiT-L/2": 458_102_816, "DiT-L/4": 458_053_760, "DiT-L/8": 458_594_816,
    "DiT-B/2": 130_512_416, "DiT-B/4": 130_475_648, "DiT-B/8": 130_881_536,
    "DiT-S/2": 32_963_360, "DiT-S/4": 32_945_024, "DiT-S/8": 33_148_160,
}

SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4,
             num_classes=10)


def small_model(seed=0, **overrides):
    return randomize_params(dit.DiT(dit.DiTConfig(**{**SMALL, **overrides}), rngs=nnx.Rngs(seed)),
                            seed=seed)


def small_inputs(n=3, size=8, channels=4, seed=1):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, size, size, channels)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, n), jnp.int32)
    y = jnp.asarray(rng.integers(0, 10, n), jnp.int32).at[-1].set(10)  # last one: null class
    return x, t, y


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS_256))
def test_parameter_counts_match_official(name):
    model = nnx.eval_shape(lambda: dit_jax.create_model(name, image_size=256))
    assert dit.count_params(model) == OFFICIAL_COUNTS_256[name]


def test_parameter_count_xl2_512():
    model = nnx.eval_shape(lambda: dit_jax.create_model("DiT-XL/2", image_size=512))
    assert model.pos_embed.shape == (1, 1024, 1152)
    assert dit.count_params(model) == 676_014_368


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown DiT model 'DiT-M/2'"):
        dit_jax.create_model("DiT-M/2")
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        dit.DiTConfig(input_size=9, patch_size=2)


def test_fresh_model_outputs_exactly_zero():
    model = dit.DiT(dit.DiTConfig(**SMALL), rngs=nnx.Rngs(0))
    out = model(*small_inputs())
    assert out.shape == (3, 8, 8, 8)
    assert np.all(np.asarray(out) == 0.0)


@pytest.mark.parametrize("family", ["S", "B", "L", "XL"])
def test_random_weights_give_finite_nonzero_output(family):
    # The family's real width and heads; two blocks and a 16 px image keep it quick.
    model = dit_jax.create_model(f"DiT-{family}/2", image_size=16, depth=2, rngs=nnx.Rngs(0))
    randomize_params(model, std=0.02)
    x, t, y = small_inputs(n=2, size=2)
    out = np.asarray(model(x, t, y))
    assert out.shape == (2, 2, 2, 8)
    assert np.isfinite(out).all() and np.abs(out).max() > 1e-3


def test_official_initialisation():
    model = dit.DiT(dit.DiTConfig(**{**SMALL, "hidden_size": 128}), rngs=nnx.Rngs(0))
    d, p, c = 128, 2, 4
    qkv = np.asarray(model.blocks[0].attn.qkv.kernel[...])
    bound = math.sqrt(6 / (d + 3 * d))  # xavier on the whole (3D, D) matrix
    assert qkv.shape == (d, 3 * d) and np.abs(qkv).max() <= bound
    assert np.abs(qkv).max() > 0.95 * bound and abs(qkv.std() - bound / math.sqrt(3)) < 0.05 * bound
    conv = np.asarray(model.x_embedder.kernel[...])
    conv_bound = math.sqrt(6 / (c * p * p + d))  # xavier on the flattened (D, C·p·p) view
    assert np.abs(conv).max() <= conv_bound and np.abs(conv).max() > 0.9 * conv_bound
    # The official initialize_weights sets the conv bias to 0 explicitly (not torch's default).
    np.testing.assert_array_equal(np.asarray(model.x_embedder.bias[...]), 0.0)
    table = np.asarray(model.y_embedder.embedding_table[...])
    assert table.shape == (11, d) and abs(table.std() - 0.02) < 0.002
    assert abs(np.asarray(model.t_embedder.linear_1.kernel[...]).std() - 0.02) < 0.002
    for block in model.blocks:
        assert not np.any(np.asarray(block.adaLN_modulation.kernel[...]))
        assert not np.any(np.asarray(block.attn.qkv.bias[...]))
    assert not np.any(np.asarray(model.final_layer.linear.kernel[...]))
    # The position table is fixed: not a Param, so never trained or decayed.
    assert "pos_embed" not in nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_timestep_embedding_matches_float64_reference():
    t = np.array([0, 1, 17, 250, 500, 999], np.float64)
    freqs = np.exp(-np.log(10000.0) * np.arange(128, dtype=np.float64) / 128)
    expected = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
    got = np.asarray(dit.timestep_frequencies(jnp.asarray(t)))
    assert got.shape == (6, 256)
    np.testing.assert_allclose(got, expected, atol=1e-6 * 1000)  # float32 phase of t·f up to 999
    np.testing.assert_allclose(got[:3], expected[:3], atol=1e-6)
    # diffusers' variant divides by (half - 1).
    freqs_hf = np.exp(-np.log(10000.0) * np.arange(128, dtype=np.float64) / 127)
    got_hf = np.asarray(dit.timestep_frequencies(jnp.asarray(t[:3]), freq_shift=1.0))
    np.testing.assert_allclose(
        got_hf, np.concatenate([np.cos(t[:3, None] * freqs_hf), np.sin(t[:3, None] * freqs_hf)], 1),
        atol=1e-6)


def test_position_embedding_matches_float64_reference():
    d, gh, gw = 16, 3, 5
    table = dit.sincos_2d(d, (gh, gw))
    assert table.shape == (gh * gw, d) and table.dtype == np.float64
    omega = 1.0 / 10000 ** (np.arange(d // 4, dtype=np.float64) / (d // 4))
    for row in range(gh):
        for col in range(gw):
            token = table[row * gw + col]
            # First half: the column (w) coordinate; second half: the row (h).
            np.testing.assert_allclose(token[: d // 4], np.sin(col * omega), atol=1e-12)
            np.testing.assert_allclose(token[d // 4: d // 2], np.cos(col * omega), atol=1e-12)
            np.testing.assert_allclose(token[d // 2: 3 * d // 4], np.sin(row * omega), atol=1e-12)
            np.testing.assert_allclose(token[3 * d // 4:], np.cos(row * omega), atol=1e-12)
    model = dit.DiT(dit.DiTConfig(**SMALL), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(model.pos_embed[...])[0], dit.sincos_2d(64, (4, 4)),
                               atol=1e-6)


def test_unpatchify_layout():
    n, h, w, p, c = 2, 2, 3, 2, 5
    # Token (i, j), feature index (pr, pc, ch) gets value encoding all five coordinates.
    tokens = np.zeros((n, h * w, p * p * c), np.float32)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                for pr in range(p):
                    for pc in range(p):
                        for ch in range(c):
                            tokens[b, i * w + j, (pr * p + pc) * c + ch] = (
                                b * 10000 + i * 1000 + j * 100 + pr * 10 + pc + ch / 10)
    image = np.asarray(dit.unpatchify(jnp.asarray(tokens), (h, w), p))
    assert image.shape == (n, h * p, w * p, c)
    for b, i, j, pr, pc, ch in np.ndindex(n, h, w, p, p, c):
        assert image[b, i * p + pr, j * p + pc, ch] == np.float32(
            b * 10000 + i * 1000 + j * 100 + pr * 10 + pc + ch / 10)


def test_label_dropout_rate_and_reproducibility():
    embedder = dit.LabelEmbedder(10, 8, 0.1, rngs=nnx.Rngs(0))
    labels = jnp.zeros((100_000,), jnp.int32) + 3
    dropped = embedder.drop_labels(labels, jax.random.key(7))
    rate = float(jnp.mean(dropped == 10))
    assert abs(rate - 0.1) < 0.005  # 5 standard deviations at n = 1e5
    assert set(np.unique(np.asarray(dropped))) == {3, 10}
    np.testing.assert_array_equal(dropped, embedder.drop_labels(labels, jax.random.key(7)))
    assert not np.array_equal(dropped, embedder.drop_labels(labels, jax.random.key(8)))


def test_null_label_row_only_with_label_dropout():
    # Official LabelEmbedder: num_classes + (dropout_prob > 0) rows.
    with_null = small_model()
    assert with_null.y_embedder.embedding_table.shape == (11, 64) and with_null.null_label == 10
    without = small_model(class_dropout_prob=0.0)
    assert without.y_embedder.embedding_table.shape == (10, 64)
    assert dit.count_params(with_null) - dit.count_params(without) == 64
    with pytest.raises(ValueError, match="no null-label row"):
        without.null_label
    with pytest.raises(ValueError, match="no null-label row"):
        without.y_embedder.drop_labels(jnp.zeros((4,), jnp.int32), jax.random.key(0))
    with pytest.raises(ValueError, match="unconditional"):
        small_model(num_classes=0).null_label
    x, t, y = small_inputs()
    assert np.isfinite(np.asarray(with_null(x, t, y))).all()  # y holds the null label 10
    # Without dropout, training needs no rngs and the labels pass through.
    np.testing.assert_array_equal(np.asarray(without(x, t, y % 10, train=True)),
                                  np.asarray(without(x, t, y % 10)))
    # Out-of-range concrete labels are an error, not jnp.take's NaN fill.
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 10\) \(no null label"):
        without(x, t, y)
    with pytest.raises(ValueError, match=r"\[0, 11\) \(10 is the null label\); got labels from -1"):
        with_null(x, t, y.at[0].set(-1))


def test_train_mode_drops_labels_eval_does_not():
    model = small_model()
    x, t, _ = small_inputs(n=64)
    y = jnp.full((64,), 2, jnp.int32)
    null = jnp.full((64,), 10, jnp.int32)
    eval_out = np.asarray(model(x, t, y))
    np.testing.assert_array_equal(eval_out, np.asarray(model(x, t, y, train=False)))
    train_out = np.asarray(model(x, t, y, train=True, rngs=nnx.Rngs(dropout=3)))
    null_out = np.asarray(model(x, t, null))
    per_example_dropped = [np.allclose(train_out[i], null_out[i], atol=1e-6) for i in range(64)]
    per_example_kept = [np.allclose(train_out[i], eval_out[i], atol=1e-6) for i in range(64)]
    assert all(a != b for a, b in zip(per_example_dropped, per_example_kept))
    assert 0 < sum(per_example_dropped) < 20
    same_key = np.asarray(model(x, t, y, train=True, rngs=jax.random.key(3)))
    np.testing.assert_array_equal(same_key, np.asarray(model(x, t, y, train=True, rngs=jax.random.key(3))))
    with pytest.raises(ValueError, match="needs rngs"):
        model(x, t, y, train=True)


def test_unconditional_model_has_no_label_embedding():
    model = small_model(num_classes=0)
    assert model.y_embedder is None
    x, t, _ = small_inputs()
    out = model(x, t)
    assert out.shape == (3, 8, 8, 8) and np.abs(np.asarray(out)).max() > 0


def test_learn_sigma_off_and_rectangular_inputs():
    model = small_model(learn_sigma=False, input_size=(8, 12))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 12, 4)), jnp.float32)
    out = model(x, jnp.array([3, 900]), jnp.array([1, 2]))
    assert out.shape == (2, 8, 12, 4)
    assert model.pos_embed.shape == (1, 4 * 6, 64)


def test_bfloat16_compute_close_to_float32():
    model = small_model()
    x, t, y = small_inputs()
    reference = model(x, t, y)
    model_bf16 = small_model(dtype=jnp.bfloat16)
    out = model_bf16(x, t, y)
    assert out.dtype == jnp.float32  # the final projection runs in float32
    err = rel_err(out, reference)
    assert 0 < err < 2e-2
    # Parameters stay float32.
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(model_bf16, nnx.Param)))


def test_remat_and_scanned_forms_equal_plain():
    model = small_model()
    x, t, y = small_inputs()
    reference = np.asarray(nnx.jit(lambda m, *a: m(*a))(model, x, t, y))

    remat = dit.DiT(dataclasses.replace(model.config, remat=True), rngs=nnx.Rngs(1))
    nnx.update(remat, nnx.state(model))
    scanned = dit.convert_blocks(model, scan_blocks=True)
    scanned_remat = dit.convert_blocks(remat, scan_blocks=True)
    assert scanned.config.scan_blocks and scanned.blocks.attn.qkv.kernel.shape == (3, 64, 192)
    for variant in (remat, scanned, scanned_remat):
        out = nnx.jit(lambda m, *a: m(*a))(variant, x, t, y)
        np.testing.assert_allclose(np.asarray(out), reference, rtol=1e-5, atol=1e-6)

    def loss(m):
        return jnp.mean(m(x, t, y) ** 2)

    g_plain = nnx.grad(loss)(model)
    g_scan = nnx.grad(loss)(scanned_remat)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(g_scan["blocks"]["mlp"]["fc1"]["kernel"][...])[i],
                                   np.asarray(g_plain["blocks"][i]["mlp"]["fc1"]["kernel"][...]),
                                   rtol=1e-4, atol=1e-8)

    back = dit.convert_blocks(scanned, scan_blocks=False)
    assert not back.config.scan_blocks
    for a, b in zip(jax.tree.leaves(nnx.state(back)), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("scan_blocks", [False, True])
def test_remat_policy_by_name_gives_the_same_values(scan_blocks):
    model = small_model(scan_blocks=scan_blocks)
    x, t, y = small_inputs()
    graphdef, state = nnx.split(model)

    def loss_and_grad(remat):
        gd = nnx.graphdef(dit.DiT(dataclasses.replace(model.config, remat=remat), rngs=nnx.Rngs(0)))
        fn = lambda s: jnp.mean(nnx.merge(gd, s)(x, t, y) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(fn))(state)

    reference = loss_and_grad(False)
    for remat in (True, "dots_with_no_batch_dims_saveable"):
        # Recomputation may reorder float32 sums (newer XLA fuses differently), so allow rounding.
        for a, b in zip(jax.tree.leaves(loss_and_grad(remat)), jax.tree.leaves(reference)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="checkpoint_policies"):
        dit.DiTConfig(**SMALL, remat="no_such_policy")


def test_scanned_model_runs_inside_another_scan():
    # The samplers (and gradient accumulation) call the model inside a lax.scan.
    model = small_model(scan_blocks=True)
    x, t, y = small_inputs()

    @jax.jit
    def twice(x):
        def body(x, _):
            return model(x, t, y)[..., :4], None
        return jax.lax.scan(body, x, None, length=2)[0]

    expected = model(model(x, t, y)[..., :4], t, y)[..., :4]
    np.testing.assert_allclose(np.asarray(twice(x)), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_attention_matches_explicit_softmax():
    model = small_model()
    attn = model.blocks[0].attn
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, 64)), jnp.float32)
    qkv = np.asarray(x, np.float64) @ np.asarray(attn.qkv.kernel[...], np.float64) + np.asarray(
        attn.qkv.bias[...], np.float64)
    qkv = qkv.reshape(2, 5, 3, 4, 16)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(16)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    heads = (weights @ v).transpose(0, 2, 1, 3).reshape(2, 5, 64)
    expected = heads @ np.asarray(attn.proj.kernel[...], np.float64) + np.asarray(attn.proj.bias[...])
    assert rel_err(attn(x), expected) < 1e-5


def test_config_files_build_every_official_model():
    from configs import demo, dit as dit_configs
    for short in ("XL/2", "B/4", "S/8"):
        config = dit_configs.get_config(short)
        assert config.model.name == f"DiT-{short}"
        assert config.optim.lr == 1e-4 and config.optim.weight_decay == 0.0
        assert config.global_batch_size == 256 and config.optim.ema_decay == 0.9999
    with pytest.raises(ValueError, match="unknown model"):
        dit_configs.get_config("M/2")
    assert demo.get_config().data.source == "builtin"


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU")
def test_cudnn_attention_matches_xla():
    model = small_model(dtype=jnp.bfloat16)
    cudnn = dit.DiT(dataclasses.replace(model.config, attention_impl="cudnn"), rngs=nnx.Rngs(0))
    nnx.update(cudnn, nnx.state(model))
    x, t, y = small_inputs()
    assert rel_err(cudnn(x, t, y), model(x, t, y)) < 2e-2
