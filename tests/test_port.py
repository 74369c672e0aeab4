"""dit_jax.port.dit against PyTorch: diffusers' DiTTransformer2DModel as the reference for both
numerics (patched as docs/numerics.md#diffusers-port says, for the official function), exact round
trips, and error paths."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dit_jax.checkpoint import load_model, save_model
from dit_jax.port import (from_diffusers, from_torch, load_any, save_diffusers, save_torch,
                          to_diffusers, to_torch)
from dit_jax.port.__main__ import main as port_main

from conftest import random_dit

diffusers = pytest.importorskip("diffusers")

# (patch, latent side, heads, head dim): two patch sizes and two grids.
DIFFUSERS_CASES = [(2, 16, 2, 16), (4, 32, 4, 24)]
NUM_CLASSES = 10


def _diffusers_model(patch, side, heads, head_dim, seed=0):
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
        num_layers=2, sample_size=side, patch_size=patch, num_embeds_ada_norm=NUM_CLASSES)
    # eval(): in training mode diffusers drops class labels at random.
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():  # pos_embed is a buffer: it keeps its sin-cos values
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        # Real checkpoints hold one t/y embedder copied into every block.
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model


def _inputs(side, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, side, side, generator=generator)
    t = torch.tensor([0, 517, 999])
    y = torch.tensor([3, NUM_CLASSES - 1, NUM_CLASSES])  # the last is the null class
    return x, t, y


def _run_jax(model, x, t, y):
    out = model(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(t.numpy()),
                jnp.asarray(y.numpy()))
    return np.asarray(out).transpose(0, 3, 1, 2)


def _run_torch(model, x, t, y):
    with torch.no_grad():
        return model(x, t, y).sample.numpy()


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _params(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert jax.tree.structure(pa) == jax.tree.structure(pb)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("patch,side,heads,head_dim", DIFFUSERS_CASES)
def test_diffusers_and_official_numerics(tmp_path, patch, side, heads, head_dim):
    torch_model = _diffusers_model(patch, side, heads, head_dim)
    torch_model.save_pretrained(tmp_path / "dit")
    x, t, y = _inputs(side)
    reference = _run_torch(torch_model, x, t, y)

    model = from_diffusers(tmp_path / "dit")
    assert model.config.numerics == "diffusers"
    assert (model.config.patch_size, model.config.input_size, model.config.num_heads) == (patch, side, heads)
    err = _rel(_run_jax(model, x, t, y), reference)
    assert err < 1e-5, err

    # docs/numerics.md#diffusers-port: patched this way diffusers computes the official function.
    for block in torch_model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        block.norm3.eps = 1e-6
    official_reference = _run_torch(torch_model, x, t, y)
    assert _rel(official_reference, reference) > 1e-3  # the numerics really differ on these weights

    official = from_torch(to_torch(model), num_heads=heads)
    assert official.config.numerics == "official"
    err = _rel(_run_jax(official, x, t, y), official_reference)
    assert err < 1e-5, err
    err = _rel(_run_jax(from_diffusers(tmp_path / "dit", numerics="official"), x, t, y),
               official_reference)
    assert err < 1e-5, err


def test_diffusers_embedder_copies_checked(tmp_path):
    torch_model = _diffusers_model(2, 16, 2, 16)
    with torch.no_grad():
        torch_model.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight.add_(1.0)
    torch_model.save_pretrained(tmp_path / "dit")
    # diffusers runs block 1 with its own (changed) copy: no DiT computes that, so it is refused,
    # naming the option, unless the option is given.
    with pytest.raises(ValueError, match=r"1 per-block embedder copies differ from block 0's "
                                         r"\(first: transformer_blocks\.1\.norm1\.emb\.class_embedder"
                                         r".*embedders='block0' \(python -m dit_jax\.port: "
                                         r"--embedders=block0\)"):
        from_diffusers(tmp_path / "dit")
    with pytest.raises(ValueError, match="--embedders=block0"):
        port_main(["to-jax", str(tmp_path / "dit"), str(tmp_path / "out")])
    with pytest.warns(UserWarning, match=r"using block 0's \(embedders='block0'\)"):
        assert port_main(["to-jax", str(tmp_path / "dit"), str(tmp_path / "out"),
                          "--embedders=block0"]) == 0
    model = load_any(tmp_path / "out")
    x, t, y = _inputs(16)
    # What the option warns about: another function than the diffusers model's.
    assert _rel(_run_jax(model, x, t, y), _run_torch(torch_model, x, t, y)) > 1e-2


def _small(seed=0, **kw):
    cfg = dict(depth=2, hidden_size=64, num_heads=4, patch_size=2, input_size=8, num_classes=NUM_CLASSES)
    cfg.update(kw)
    return random_dit(seed=seed, std=0.05, **cfg)


def test_round_trip_pt_and_safetensors(tmp_path):
    model = _small()
    state_dict = to_torch(model)
    assert state_dict["blocks.1.attn.qkv.weight"].shape == (3 * 64, 64)
    assert state_dict["x_embedder.proj.weight"].shape == (64, 4, 2, 2)
    assert state_dict["pos_embed"].shape == (1, 16, 64)
    _assert_same_params(from_torch(state_dict, num_heads=4), model)
    for suffix in (".pt", ".safetensors"):
        path = save_torch(model, tmp_path / f"model{suffix}")
        loaded = from_torch(path, num_heads=4)
        _assert_same_params(loaded, model)
        assert loaded.config == model.config
    # A stacked-block model exports the same tensors and loads back stacked.
    scanned = from_torch(state_dict, num_heads=4, scan_blocks=True)
    assert scanned.config.scan_blocks
    for key, value in to_torch(scanned).items():
        torch.testing.assert_close(value, state_dict[key], rtol=0, atol=0)


def test_train_dict_entries(tmp_path):
    ema, raw = _small(seed=1), _small(seed=2)
    checkpoint = {"model": to_torch(raw), "ema": to_torch(ema), "opt": {"state": {}, "param_groups": []},
                  "args": argparse.Namespace(model="DiT-S/2", image_size=64)}
    torch.save(checkpoint, tmp_path / "0000100.pt")
    _assert_same_params(from_torch(tmp_path / "0000100.pt", num_heads=4), ema)
    _assert_same_params(from_torch(tmp_path / "0000100.pt", num_heads=4, which="model"), raw)
    with pytest.raises(ValueError, match="which"):
        from_torch(tmp_path / "0000100.pt", num_heads=4, which="opt")


def test_inference_and_checks():
    # Official widths give the heads; 384 wide with patch 4 and 16 tokens is DiT-S/4 at 128 px.
    model = random_dit(depth=2, hidden_size=384, num_heads=6, patch_size=4, input_size=16,
                       num_classes=NUM_CLASSES, learn_sigma=False)
    state_dict = to_torch(model)
    loaded = from_torch(state_dict, image_size=128)
    cfg = loaded.config
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.input_size,
            cfg.num_classes, cfg.learn_sigma) == (2, 384, 6, 4, 16, NUM_CLASSES, False)
    with pytest.raises(ValueError, match=r"not DiT-S/4: depth 2 \(expected 12\)"):
        from_torch(state_dict, name="DiT-S/4")
    with pytest.raises(ValueError, match="128x128 px.*not image_size 256"):
        from_torch(state_dict, image_size=256)
    with pytest.raises(ValueError, match="unknown DiT model 'DiT-M/2'"):
        from_torch(state_dict, name="DiT-M/2")
    with pytest.raises(ValueError, match="patch_size=2 was given but the checkpoint has patch_size=4"):
        from_torch(state_dict, patch_size=2)
    with pytest.raises(ValueError, match="cannot infer num_heads for hidden_size 64"):
        from_torch(to_torch(_small()))


def test_layout_errors(tmp_path):
    state_dict = to_torch(_small())
    missing = dict(state_dict)
    del missing["blocks.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['blocks.1.mlp.fc2.bias'\]"):
        from_torch(missing, num_heads=4)
    extra = dict(state_dict, **{"blocks.0.attn.rotary": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected key\(s\) \['blocks.0.attn.rotary'\]"):
        from_torch(extra, num_heads=4)
    wrong = dict(state_dict, **{"blocks.1.attn.proj.weight": torch.zeros(64, 32)})
    with pytest.raises(ValueError, match=r"blocks.1.attn.proj.weight: the checkpoint has shape "
                                         r"\(64, 32\), the model expects \(64, 64\)"):
        from_torch(wrong, num_heads=4)
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        from_torch({"weights": [1, 2, 3]})
    with pytest.raises(FileNotFoundError) as info:
        from_torch(tmp_path / "DiT-XL-2-256x256.pt")
    message = str(info.value)
    assert "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt" in message
    assert "facebook/DiT-XL-2-256" in message and "--ckpt PATH" in message
    with pytest.raises(FileNotFoundError, match="--ckpt PATH"):
        load_any(tmp_path / "nowhere" / "weights.safetensors")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt is not a readable PyTorch checkpoint"):
        load_any(tmp_path / "garbage.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="directory but no checkpoint"):
        load_any(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown checkpoint file type '.txt'"):
        load_any(tmp_path / "notes.txt")


def test_model_checkpoint_and_cli(tmp_path, capsys):
    model = _small(seed=3)
    save_torch(model, tmp_path / "model.pt")
    assert port_main(["to-jax", str(tmp_path / "model.pt"), str(tmp_path / "ckpt"), "--num-heads", "4",
                      "--image-size", "64"]) == 0
    assert "heads 4" in capsys.readouterr().out
    # An OUT that holds something is not overwritten without --overwrite (nor is a file).
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "ckpt").rglob("*"))
    with pytest.raises(FileExistsError, match=r"ckpt exists and is not empty: pass --overwrite"):
        port_main(["to-jax", str(tmp_path / "model.pt"), str(tmp_path / "ckpt"), "--num-heads=4"])
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "ckpt").rglob("*")) == before
    with pytest.raises(FileExistsError, match="model.pt exists"):
        port_main(["to-torch", str(tmp_path / "ckpt"), str(tmp_path / "model.pt")])
    assert port_main(["to-jax", str(tmp_path / "model.pt"), str(tmp_path / "ckpt"), "--num-heads=4",
                      "--image-size=64", "--overwrite"]) == 0
    (tmp_path / "empty_out").mkdir()  # an empty folder is fine
    assert port_main(["to-jax", str(tmp_path / "ckpt"), str(tmp_path / "empty_out")]) == 0
    loaded = load_any(tmp_path / "ckpt", image_size=64)
    _assert_same_params(loaded, model)
    assert loaded.config == model.config
    bf16 = load_any(tmp_path / "ckpt", dtype="bfloat16", scan_blocks=True)
    assert bf16.config.dtype == jnp.bfloat16 and bf16.config.scan_blocks
    with pytest.raises(ValueError, match="hidden_size=128 was given but the checkpoint has hidden_size=64"):
        load_any(tmp_path / "ckpt", hidden_size=128)
    with pytest.raises(ValueError, match="not image_size 256"):
        load_any(tmp_path / "ckpt", image_size=256)
    # and back to PyTorch, through the CLI
    assert port_main(["to-torch", str(tmp_path / "ckpt"), str(tmp_path / "back.safetensors")]) == 0
    _assert_same_params(from_torch(tmp_path / "back.safetensors", num_heads=4), model)
    save_model(tmp_path / "direct", loaded)
    _assert_same_params(load_model(tmp_path / "direct"), model)


def test_load_any_diffusers_folder(tmp_path):
    torch_model = _diffusers_model(2, 16, 2, 16)
    torch_model.save_pretrained(tmp_path / "pipeline" / "transformer")  # pipeline layout
    x, t, y = _inputs(16)
    model = load_any(tmp_path / "pipeline")
    err = _rel(_run_jax(model, x, t, y), _run_torch(torch_model, x, t, y))
    assert err < 1e-5, err
    # the hub's facebook/DiT-XL-2-* configs name the class Transformer2DModel
    config_file = tmp_path / "pipeline" / "transformer" / "config.json"
    config_file.write_text(config_file.read_text().replace('"DiTTransformer2DModel"', '"Transformer2DModel"'))
    np.testing.assert_array_equal(_run_jax(load_any(tmp_path / "pipeline"), x, t, y), _run_jax(model, x, t, y))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(ValueError, match="'AutoencoderKL', not a DiTTransformer2DModel"):
        load_any(tmp_path / "vae")


def test_load_any_train_workdir(tmp_path):
    from dit_jax.checkpoint import Checkpoints
    from dit_jax.train.state import TrainState

    raw, ema = _small(seed=4), _small(seed=5)
    cfg = raw.config
    state = TrainState(step=jnp.asarray(7, jnp.int32), params=nnx.state(raw, nnx.Param),
                       ema=nnx.state(ema, nnx.Param), opt_state={"count": jnp.zeros((), jnp.int32)},
                       rng=jax.random.key_data(jax.random.key(0)))
    checkpoints = Checkpoints(tmp_path / "run", async_save=False)
    checkpoints.save(state, data_state={}, model_config=cfg)
    checkpoints.close()
    loaded = load_any(tmp_path / "run")
    assert loaded.config == cfg
    _assert_same_params(loaded, ema)
    _assert_same_params(load_any(tmp_path / "run", which="model", image_size=64), raw)
    with pytest.raises(ValueError, match="not DiT-XL/2"):
        load_any(tmp_path / "run", name="DiT-XL/2")


# --------------------------------------------------------------------------------------------
# Export to diffusers


def _diffusers_sized(seed=0, **kw):
    cfg = dict(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=16,
               num_classes=NUM_CLASSES, numerics="diffusers")
    cfg.update(kw)
    return random_dit(seed=seed, std=0.05, **cfg)


def test_export_to_diffusers_loads_in_diffusers_and_back(tmp_path):
    from safetensors.torch import load_file

    model = _diffusers_sized(seed=6)
    folder = save_diffusers(model, tmp_path / "exported")
    torch_model = diffusers.DiTTransformer2DModel.from_pretrained(folder)
    torch_model.eval()
    x, t, y = _inputs(16)
    reference = _run_torch(torch_model, x, t, y)
    assert np.abs(reference).max() > 1e-2  # random weights: a real output, not adaLN-Zero's zeros
    err = _rel(_run_jax(model, x, t, y), reference)
    assert err < 1e-5, err
    # diffusers keeps a copy of the t/y embedders in every block: identical on export.
    weights = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    for key in ("timestep_embedder.linear_1.weight", "class_embedder.embedding_table.weight"):
        torch.testing.assert_close(weights[f"transformer_blocks.1.norm1.emb.{key}"],
                                   weights[f"transformer_blocks.0.norm1.emb.{key}"], rtol=0, atol=0)
    assert weights["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"].shape == (
        NUM_CLASSES + 1, 32)
    config, state_dict = to_diffusers(model)
    assert config["norm_type"] == "ada_norm_zero" and config["num_embeds_ada_norm"] == NUM_CLASSES
    assert (config["sample_size"], config["num_layers"], config["num_attention_heads"],
            config["attention_head_dim"], config["out_channels"]) == (16, 2, 2, 16, 8)
    assert sorted(state_dict) == sorted(torch_model.state_dict())
    back = from_diffusers(folder)
    _assert_same_params(back, model)
    assert back.config == model.config


def test_export_to_diffusers_cli_and_refusals(tmp_path):
    model = _diffusers_sized(seed=7, numerics="official")
    save_torch(model, tmp_path / "model.pt")
    # Official .pt files load with the official numerics, which diffusers does not compute.
    with pytest.warns(UserWarning, match="numerics='official'; diffusers will run"):
        assert port_main(["to-diffusers", str(tmp_path / "model.pt"), str(tmp_path / "hf"),
                          "--num-heads", "2"]) == 0
    _assert_same_params(from_diffusers(tmp_path / "hf"), model)
    with pytest.raises(ValueError, match="always holds a null-label row"):
        to_diffusers(_diffusers_sized(class_dropout_prob=0.0))
    with pytest.raises(ValueError, match="class-conditional only"):
        to_diffusers(_diffusers_sized(num_classes=0))
    with pytest.raises(ValueError, match="16x8 is not square"):
        to_diffusers(_diffusers_sized(input_size=(16, 8)))


# --------------------------------------------------------------------------------------------
# The label table: num_classes + (class_dropout_prob > 0) rows


def test_label_table_without_null_row(tmp_path):
    model = _small(seed=8, class_dropout_prob=0.0)
    state_dict = to_torch(model)
    assert state_dict["y_embedder.embedding_table.weight"].shape == (NUM_CLASSES, 64)
    # Ambiguous: by default R rows are read as the official R - 1 classes + the null row.
    default = from_torch(state_dict, num_heads=4)
    assert (default.config.num_classes, default.config.class_dropout_prob) == (NUM_CLASSES - 1, 0.1)
    for hint in (dict(class_dropout_prob=0.0), dict(num_classes=NUM_CLASSES)):
        loaded = from_torch(state_dict, num_heads=4, **hint)
        assert (loaded.config.num_classes, loaded.config.class_dropout_prob) == (NUM_CLASSES, 0.0)
        _assert_same_params(loaded, model)
    with pytest.raises(ValueError, match="means no null-label row; class_dropout_prob=0.1 means one"):
        from_torch(state_dict, num_heads=4, num_classes=NUM_CLASSES, class_dropout_prob=0.1)
    with pytest.raises(ValueError, match="has 10 rows: neither num_classes=7 nor num_classes \\+ 1"):
        from_torch(state_dict, num_heads=4, num_classes=7)
    # The official train.py stores --num-classes in "args".
    for table_model, dropout in ((model, 0.0), (_small(seed=9), 0.1)):
        checkpoint = {"model": to_torch(table_model), "ema": to_torch(table_model),
                      "args": argparse.Namespace(model="DiT-S/2", num_classes=NUM_CLASSES)}
        torch.save(checkpoint, tmp_path / "ckpt.pt")
        loaded = from_torch(tmp_path / "ckpt.pt", num_heads=4)
        assert (loaded.config.num_classes, loaded.config.class_dropout_prob) == (NUM_CLASSES, dropout)
        _assert_same_params(loaded, table_model)
    # A loaded model may change the dropout rate, not whether the null row exists.
    save_model(tmp_path / "saved", _small(seed=10))
    assert load_any(tmp_path / "saved", class_dropout_prob=0.2).config.class_dropout_prob == 0.2
    with pytest.raises(ValueError, match="class_dropout_prob=0.0 was given but the checkpoint's "
                                         "label table has the null-label row"):
        load_any(tmp_path / "saved", class_dropout_prob=0.0)


# --------------------------------------------------------------------------------------------
# Import error messages name the keys of the user's file


def _rewrite(folder, change):
    from safetensors.torch import load_file, save_file

    path = folder / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(path))
    change(weights)
    save_file(weights, str(path))


def test_diffusers_import_errors_name_the_files_keys(tmp_path):
    from dit_jax.port.dit import diffusers_to_official

    model = _diffusers_sized(seed=11)
    folder = save_diffusers(model, tmp_path / "wrong_shape")
    _rewrite(folder, lambda w: w.update({"transformer_blocks.1.ff.net.2.weight": torch.ones(32, 64)}))
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.ff\.net\.2\.weight: the diffusers "
                                         r"weights have shape \(32, 64\), the model expects "
                                         r"\(32, 128\) \(official key blocks\.1\.mlp\.fc2\.weight\)"):
        from_diffusers(folder)

    folder = save_diffusers(model, tmp_path / "qkv")
    _rewrite(folder, lambda w: w.update({"transformer_blocks.0.attn1.to_k.weight": torch.ones(16, 32)}))
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn1\.to_k\.weight: the diffusers "
                                         r"weights have shape \(16, 32\), the model expects \(32, 32\)"):
        from_diffusers(folder)
    _, state_dict = to_diffusers(model)
    weights = {k: v.numpy() for k, v in state_dict.items()}
    weights["transformer_blocks.1.attn1.to_v.bias"] = np.ones(8, np.float32)
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.attn1\.to_q\.bias, "
                                         r"transformer_blocks\.1\.attn1\.to_k\.bias, "
                                         r"transformer_blocks\.1\.attn1\.to_v\.bias must be vectors "
                                         r"of one shape .* \(32,\), \(32,\), \(8,\)"):
        diffusers_to_official(weights, 2)

    folder = save_diffusers(model, tmp_path / "conv")
    _rewrite(folder, lambda w: w.update({"pos_embed.proj.weight": torch.ones(32, 16)}))
    with pytest.raises(ValueError, match=r"pos_embed\.proj\.weight: the diffusers weights have "
                                         r"shape \(32, 16\), the model expects \(32, 4, 2, 2\)"):
        from_diffusers(folder)


def test_official_import_error_for_a_flat_patch_conv():
    state_dict = to_torch(_small())
    state_dict["x_embedder.proj.weight"] = state_dict["x_embedder.proj.weight"].reshape(64, 16)
    with pytest.raises(ValueError, match=r"x_embedder\.proj\.weight has shape \(64, 16\): "
                                         r"expected 4 dimensions"):
        from_torch(state_dict, num_heads=4)
