"""PixArt-α (dit_jax.models.pixart, dit_jax.port.pixart) against diffusers'
PixArtTransformer2DModel built with small random weights, the original checkpoint layout (keys
renamed as the original repository's converter names them), the text mask, the released
initialisation, caption dropout and sharding."""

import dataclasses
import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dit_jax import sharding
from dit_jax.models.pixart import PixArt, PixArtConfig
from dit_jax.port import load_pixart, save_pixart

# The tiny diffusers configuration (width 24 = 3 heads × 8, caption width 32).
TINY = dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
            caption_channels=32, in_channels=4, out_channels=8, cross_attention_dim=24,
            attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
JAX_TINY = dict(input_size=8, patch_size=2, hidden_size=24, depth=2, num_heads=3,
                caption_channels=32)
TEXT_LEN = 6
# Rows 1 and 2 padded (the pipeline pads T5 tokens to a fixed length with a mask).
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], np.int64)


def _diffusers_model(micro: bool, seed: int = 0):
    diffusers = pytest.importorskip("diffusers")
    import torch

    model = diffusers.PixArtTransformer2DModel(**TINY, use_additional_conditions=micro)
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # diffusers zero-initialises nothing here, but randomise every tensor
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def _inputs(height: int, width: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, height, width, 4)).astype(np.float32)  # NHWC
    t = np.array([0, 517, 999])
    text = rng.standard_normal((3, TEXT_LEN, 32)).astype(np.float32)
    # 1024-MS style micro-conditions: [height, width] in pixels and height / width.
    resolution = np.array([[8.0 * height, 8.0 * width]] * 3, np.float32)
    aspect = np.full((3, 1), height / width, np.float32)
    return x, t, text, resolution, aspect


def _run_torch(model, x, t, text, mask, resolution, aspect):
    import torch

    kwargs = {}
    if model.config.use_additional_conditions:
        kwargs["added_cond_kwargs"] = dict(resolution=torch.from_numpy(resolution),
                                           aspect_ratio=torch.from_numpy(aspect))
    with torch.no_grad():
        out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                    encoder_hidden_states=torch.from_numpy(text), timestep=torch.from_numpy(t),
                    encoder_attention_mask=None if mask is None else torch.from_numpy(mask),
                    **kwargs).sample
    return out.numpy().transpose(0, 2, 3, 1)


@partial(jax.jit, static_argnums=(0, 9))
def _apply(graphdef, state, x, t, text, mask, resolution, aspect, key, train):
    # One compiled program per shape: op-by-op execution compiles every op anew (slow on CPU).
    return nnx.merge(graphdef, state)(x, t, text, mask, resolution=resolution, aspect_ratio=aspect,
                                      train=train, rngs=key)


def _run_jax(model, x, t, text, mask=None, resolution=None, aspect=None, *, train=False,
             key=None):
    if not model.config.micro_conditions:
        resolution = aspect = None
    return np.asarray(_apply(*nnx.split(model), x, t, text, mask, resolution, aspect, key, train))


def _fresh(cfg):
    """PixArt(cfg) initialised as released, the initialisation compiled as one program."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: PixArt(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(PixArt(cfg, rngs=nnx.Rngs(0))))())


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _random_pixart(seed=0, std=0.1, **config):
    """A PixArt with N(0, std²) values in every parameter and buffer, drawn by NumPy."""
    model = nnx.eval_shape(lambda: PixArt(PixArtConfig(**config)))
    state = nnx.state(model)
    rng = np.random.default_rng(seed)
    values = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32) * std),
                          nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, values)
    nnx.update(model, state)
    return model


# The official converter (PixArt-alpha/PixArt-alpha, tools/convert_pixart_alpha_to_diffusers.py),
# read backwards: diffusers name → original name. Written out here, independently of the port.
def _original_state_dict(diffusers_model, depth):
    import torch

    sd = {k: v.clone() for k, v in diffusers_model.state_dict().items()}
    out = {}
    top = {"pos_embed.proj": "x_embedder.proj",
           "caption_projection.linear_1": "y_embedder.y_proj.fc1",
           "caption_projection.linear_2": "y_embedder.y_proj.fc2",
           "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
           "adaln_single.emb.resolution_embedder.linear_1": "csize_embedder.mlp.0",
           "adaln_single.emb.resolution_embedder.linear_2": "csize_embedder.mlp.2",
           "adaln_single.emb.aspect_ratio_embedder.linear_1": "ar_embedder.mlp.0",
           "adaln_single.emb.aspect_ratio_embedder.linear_2": "ar_embedder.mlp.2",
           "adaln_single.linear": "t_block.1", "proj_out": "final_layer.linear"}
    for i in range(depth):
        top.update({f"transformer_blocks.{i}.attn1.to_out.0": f"blocks.{i}.attn.proj",
                    f"transformer_blocks.{i}.ff.net.0.proj": f"blocks.{i}.mlp.fc1",
                    f"transformer_blocks.{i}.ff.net.2": f"blocks.{i}.mlp.fc2",
                    f"transformer_blocks.{i}.attn2.to_q": f"blocks.{i}.cross_attn.q_linear",
                    f"transformer_blocks.{i}.attn2.to_out.0": f"blocks.{i}.cross_attn.proj"})
        out[f"blocks.{i}.scale_shift_table"] = sd.pop(f"transformer_blocks.{i}.scale_shift_table")
        for p in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat(
                [sd.pop(f"transformer_blocks.{i}.attn1.to_{n}.{p}") for n in "qkv"])
            out[f"blocks.{i}.cross_attn.kv_linear.{p}"] = torch.cat(
                [sd.pop(f"transformer_blocks.{i}.attn2.to_{n}.{p}") for n in "kv"])
    for src, dst in top.items():
        for p in ("weight", "bias"):
            if f"{src}.{p}" in sd:
                out[f"{dst}.{p}"] = sd.pop(f"{src}.{p}")
    out["final_layer.scale_shift_table"] = sd.pop("scale_shift_table")
    assert not sd, sorted(sd)
    # The buffers the original stores besides: its position table and the null caption.
    out["pos_embed"] = diffusers_model.pos_embed.pos_embed.clone()
    out["y_embedder.y_embedding"] = torch.randn(TEXT_LEN, 32) / 32 ** 0.5
    return out


@pytest.mark.parametrize("micro", [False, True])
def test_diffusers_parity_masks_and_resolutions(tmp_path, micro):
    torch_model = _diffusers_model(micro)
    torch_model.save_pretrained(tmp_path / "pipe" / "transformer")
    model = load_pixart(tmp_path / "pipe")  # a pipeline folder: the model is in transformer/
    cfg = model.config
    assert (cfg.micro_conditions, cfg.hidden_size, cfg.num_heads, cfg.depth) == (micro, 24, 3, 2)
    assert (cfg.base_size, cfg.interpolation_scale, cfg.learn_sigma) == (4, 1.0, True)
    # The trained size, and a larger non-square input (interpolated position table).
    for height, width in [(8, 8), (8, 12)]:
        x, t, text, resolution, aspect = _inputs(height, width)
        for mask in (MASK, None):
            reference = _run_torch(torch_model, x, t, text, mask, resolution, aspect)
            # diffusers without a mask attends to every token, as an all-true mask does.
            jax_mask = np.ones_like(MASK) if mask is None else mask
            err = _rel(_run_jax(model, x, t, text, jax_mask, resolution, aspect), reference)
            assert err < 1e-5, (height, width, mask is None, err)
    # The hub's PixArt repos name the class Transformer2DModel (same keys); other norms refuse.
    config_file = tmp_path / "pipe" / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(dict(config, _class_name="Transformer2DModel")))
    legacy = load_pixart(tmp_path / "pipe" / "transformer")
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(legacy))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    config_file.write_text(json.dumps(dict(config, norm_type="ada_norm_zero")))
    with pytest.raises(ValueError, match="norm_type"):
        load_pixart(tmp_path / "pipe")
    # The micro-conditions really enter the output.
    if micro:
        other = _run_jax(model, x, t, text, MASK, resolution * 2, aspect)
        assert _rel(other, _run_jax(model, x, t, text, MASK, resolution, aspect)) > 1e-3
        with pytest.raises(ValueError, match="micro-conditions"):
            jax.eval_shape(lambda: model(x, t, text, MASK))


def test_original_checkpoint_and_exports(tmp_path):
    import torch

    diffusers = pytest.importorskip("diffusers")
    torch_model = _diffusers_model(micro=True, seed=3)
    original = _original_state_dict(torch_model, depth=2)
    torch.save({"state_dict": original}, tmp_path / "PixArt-tiny.pth")
    model = load_pixart(tmp_path / "PixArt-tiny.pth", num_heads=3)
    cfg = model.config
    assert (cfg.input_size, cfg.micro_conditions, cfg.model_max_length) == (8, True, TEXT_LEN)
    np.testing.assert_array_equal(np.asarray(model.y_embedder.y_embedding[...]),
                                  original["y_embedder.y_embedding"].numpy())
    x, t, text, resolution, aspect = _inputs(12, 8)
    reference = _run_torch(torch_model, x, t, text, MASK, resolution, aspect)
    assert _rel(_run_jax(model, x, t, text, MASK, resolution, aspect), reference) < 1e-5

    # A training checkpoint: the EMA weights by default, "model" on request.
    ema = {k: v if k == "pos_embed" else v * 0.5 for k, v in original.items()}
    torch.save({"state_dict": original, "state_dict_ema": ema, "epoch": 3}, tmp_path / "train.pth")
    from_ema = load_pixart(tmp_path / "train.pth", num_heads=3)
    np.testing.assert_array_equal(np.asarray(from_ema.t_block.bias[...]),
                                  ema["t_block.1.bias"].numpy())
    from_model = load_pixart(tmp_path / "train.pth", which="model", num_heads=3)
    np.testing.assert_array_equal(np.asarray(from_model.t_block.bias[...]),
                                  original["t_block.1.bias"].numpy())

    # Exports: a diffusers folder that diffusers loads, and the original layout back.
    save_pixart(model, tmp_path / "exported")
    again = diffusers.PixArtTransformer2DModel.from_pretrained(tmp_path / "exported").eval()
    assert _rel(_run_torch(again, x, t, text, MASK, resolution, aspect), reference) < 1e-5
    save_pixart(model, tmp_path / "back.pth")
    back = load_pixart(tmp_path / "back.pth", num_heads=3)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(back))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Errors name what is wrong.
    with pytest.raises(ValueError, match="num_heads"):
        load_pixart(tmp_path / "PixArt-tiny.pth")
    del original["blocks.1.cross_attn.proj.bias"]
    torch.save({"state_dict": original}, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing key\(s\) \['blocks.1.cross_attn.proj.bias'\]"):
        load_pixart(tmp_path / "broken.pth", num_heads=3)
    with pytest.raises(FileNotFoundError, match="PixArt-XL-2-1024-MS"):
        load_pixart(tmp_path / "nothing-here")


def test_padded_text_tokens_never_change_the_output():
    model = _random_pixart(**JAX_TINY)
    x, t, text, _, _ = _inputs(8, 8)
    out = _run_jax(model, x, t, text, MASK)
    garbage = np.where(MASK[..., None] > 0, text, 1e3 * np.ones_like(text))
    np.testing.assert_array_equal(_run_jax(model, x, t, garbage, MASK), out)
    # Each example with its padding cut off (shorter texts, no mask): the same output.
    for length in sorted(set(MASK.sum(axis=1))):
        rows = np.flatnonzero(MASK.sum(axis=1) == length)
        alone = _run_jax(model, x[rows], t[rows], text[rows, :length])
        np.testing.assert_allclose(alone, out[rows], rtol=1e-5, atol=1e-6)
    # ... and the unpadded tokens do matter.
    changed = text.copy()
    changed[2, 0] += 1.0
    assert np.abs(_run_jax(model, x, t, changed, MASK) - out)[2].max() > 1e-4


def test_fresh_model_as_released():
    model = _fresh(PixArtConfig(**JAX_TINY, micro_conditions=True))
    x, t, text, resolution, aspect = _inputs(8, 8)
    out = _run_jax(model, x, t, text, MASK, resolution, aspect)
    # The final linear layer starts at zero: a fresh model outputs exactly zero.
    assert out.shape == (3, 8, 8, 8) and not np.any(np.asarray(out))
    # Zero: the final layer and every cross-attention output projection. Random, not zero: the
    # adaLN-single tables (randn/√D), the patch conv and the rest.
    for block in model.blocks:
        assert not np.any(np.asarray(block.cross_attn.proj.kernel[...]))
        assert not np.any(np.asarray(block.cross_attn.proj.bias[...]))
        table = np.asarray(block.scale_shift_table[...])
        assert table.shape == (6, 24) and 0.5 < table.std() * 24 ** 0.5 < 1.5
        assert np.all(np.asarray(block.attn.qkv.kernel[...]) != 0)
    assert np.all(np.asarray(model.t_block.kernel[...]) != 0)
    assert np.asarray(model.y_embedder.y_embedding[...]).shape == (120, 32)
    # With a non-zero final layer the output is non-zero but still ignores the text: the
    # cross-attention projections start at zero.
    model.final_layer.linear.kernel[...] = jnp.ones_like(model.final_layer.linear.kernel[...])
    first = _run_jax(model, x, t, text, MASK, resolution, aspect)
    second = _run_jax(model, x, t, text + 1, MASK, resolution, aspect)
    assert np.abs(first).max() > 1e-3
    np.testing.assert_array_equal(first, second)


def test_caption_dropout_swaps_in_the_null_caption():
    model = _random_pixart(**JAX_TINY, model_max_length=TEXT_LEN, class_dropout_prob=1.0)
    x, t, text, _, _ = _inputs(8, 8)
    null = np.broadcast_to(np.asarray(model.y_embedder.y_embedding[...]), text.shape)
    dropped = _run_jax(model, x, t, text, MASK, train=True, key=jax.random.key(0))
    # The mask is kept, as the original does: the null caption is cut to the caption's length.
    np.testing.assert_allclose(dropped, _run_jax(model, x, t, null, MASK), rtol=1e-6, atol=1e-6)
    assert _rel(_run_jax(model, x, t, text, MASK), dropped) > 1e-3
    # Same weights (same draws), no dropout: training mode changes nothing and needs no rngs.
    kept = _random_pixart(**JAX_TINY, model_max_length=TEXT_LEN, class_dropout_prob=0.0)
    np.testing.assert_array_equal(_run_jax(kept, x, t, text, MASK, train=True),
                                  _run_jax(model, x, t, text, MASK))
    with pytest.raises(ValueError, match="needs rngs"):
        model(x, t, text, MASK, train=True)
    with pytest.raises(ValueError, match="null caption"):
        model(x, t, text[:, :3], MASK[:, :3], train=True, rngs=nnx.Rngs(dropout=0))


@pytest.mark.parametrize("shape", [(2, 2, 2)])  # every axis at once: data, fsdp, tensor
def test_sharded_forward_equals_one_device(shape):
    model = _random_pixart(**dict(JAX_TINY, hidden_size=48, num_heads=4, caption_channels=16),
                           micro_conditions=True)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 8, 8, 4)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, 8))
    text = jnp.asarray(rng.standard_normal((8, TEXT_LEN, 16)), jnp.float32)
    mask = jnp.asarray(np.arange(TEXT_LEN)[None] < rng.integers(1, TEXT_LEN + 1, (8, 1)))
    resolution = jnp.full((8, 2), 64.0)
    aspect = jnp.ones((8,))
    graphdef, state = nnx.split(model)

    def forward(state, x, t, text, mask, resolution, aspect):
        return nnx.merge(graphdef, state)(x, t, text, mask, resolution=resolution,
                                          aspect_ratio=aspect)

    args = (x, t, text, mask, resolution, aspect)
    reference = jax.jit(forward)(state, *args)
    # Recomputing the blocks in the backward pass changes nothing forward.
    remat = nnx.graphdef(nnx.eval_shape(
        lambda: PixArt(dataclasses.replace(model.config, remat=True))))
    out = jax.jit(lambda s, *a: nnx.merge(remat, s)(*a[:4], resolution=a[4],
                                                     aspect_ratio=a[5]))(state, *args)
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference), rtol=1e-6, atol=1e-7)

    mesh = sharding.make_mesh(*shape)
    state_sh = sharding.state_shardings(state, mesh)
    in_sh = tuple(sharding.batch_sharding(mesh, a.ndim) for a in args)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(state, state_sh)
        # Every matrix is split over the mesh as its logical names say.
        kv = sharded["blocks"][0]["cross_attn"]["kv_linear"]["kernel"][...]
        assert kv.sharding.spec == sharding.param_spec(("embed", "qkv"), kv.shape, mesh)
        assert "fsdp" in kv.sharding.spec and ("tensor" in kv.sharding.spec) == (shape[2] > 1)
        caption = sharded["y_embedder"]["y_proj"]["fc1"]["kernel"][...]
        assert caption.sharding.spec == P(None, "fsdp")
        out = jax.jit(forward, in_shardings=(state_sh, *in_sh),
                      out_shardings=in_sh[0])(sharded, *args)
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference), rtol=1e-5, atol=1e-6)
