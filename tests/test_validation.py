"""Validation at the edges: bad weights (NaN/Inf, broken .safetensors, broken config.json) are
refused by every port with one line that names the file and the key."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from dit_jax.checkpoint import save_model
from dit_jax.port import from_torch, load_any, load_vae, to_diffusers
from dit_jax.port.dit import write_torch
from dit_jax.port.keys import NonFiniteWeightsError
from dit_jax.port.vae import vae_to_torch_state_dict

from conftest import random_dit

torch = pytest.importorskip("torch")


def _small(seed=0, **kw):
    cfg = dict(depth=1, hidden_size=32, num_heads=2, patch_size=2, input_size=8, num_classes=3)
    cfg.update(kw)
    return random_dit(seed=seed, std=0.05, **cfg)


@pytest.fixture(scope="module")
def state_dict():
    from dit_jax.port import to_torch

    return to_torch(_small())


def _poisoned(state_dict, key, value):
    out = {k: v.clone() for k, v in state_dict.items()}
    out[key].view(-1)[3] = value
    return out


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_official_file_with_nan_or_inf_is_refused(tmp_path, state_dict, suffix, value):
    key = "blocks.0.mlp.fc1.weight"
    path = write_torch(_poisoned(state_dict, key, value), tmp_path / f"bad{suffix}")
    for load in (from_torch, load_any):  # the port, init_from and sample.py all go through these
        with pytest.raises(NonFiniteWeightsError, match=rf"{path}: weight '{key}' holds 1 NaN/Inf"):
            load(path)
    from dit_jax.port import sit

    with pytest.raises(NonFiniteWeightsError, match=key):
        sit.from_torch(path, kind="sit")
    write_torch(state_dict, tmp_path / f"good{suffix}")
    load_any(tmp_path / f"good{suffix}", num_heads=2)  # the clean file loads


def test_model_checkpoint_with_nan_is_refused(tmp_path):
    model = _small()
    model.blocks[0].attn.proj.kernel[...] = model.blocks[0].attn.proj.kernel[...].at[0, 0].set(np.inf)
    save_model(tmp_path / "ckpt", model)
    with pytest.raises(NonFiniteWeightsError, match=r"ckpt: weight 'blocks/0/attn/proj/kernel'"):
        load_any(tmp_path / "ckpt")


def test_init_from_with_nan_weights_is_refused(tmp_path, state_dict):
    import ml_collections

    from dit_jax.train.loop import _initial_params

    path = write_torch(_poisoned(state_dict, "final_layer.linear.bias", float("nan")),
                       tmp_path / "bad.pt")
    config = ml_collections.ConfigDict({"init_from": str(path)})
    with pytest.raises(NonFiniteWeightsError, match="final_layer.linear.bias"):
        _initial_params(config, None)


def _diffusers_folder(tmp_path, poison=None):
    from safetensors.torch import save_file

    config, weights = to_diffusers(_small(numerics="diffusers"))
    if poison:
        weights = _poisoned(weights, poison, float("nan"))
    folder = tmp_path / "dit-diffusers"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder, config


def test_diffusers_folder_with_nan_is_refused(tmp_path):
    key = "transformer_blocks.0.ff.net.2.weight"
    folder, _ = _diffusers_folder(tmp_path, poison=key)
    with pytest.raises(NonFiniteWeightsError,
                       match=rf"diffusion_pytorch_model.safetensors: weight '{key}'"):
        load_any(folder)


def test_bad_safetensors_names_the_file(tmp_path, state_dict):
    good = write_torch(state_dict, tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    for name in ("tiny", "cut"):
        with pytest.raises(ValueError, match=rf"{name}.safetensors is not a readable .safetensors "
                                             rf"file \(.*(header too small|incomplete)"):
            load_any(tmp_path / f"{name}.safetensors")
    folder, _ = _diffusers_folder(tmp_path)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 4)
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors is not a readable"):
        load_any(folder)


@pytest.mark.parametrize("edit,message", [
    (lambda text, cfg: text[: len(text) // 2], "config.json is not valid JSON"),
    (lambda text, cfg: "[1, 2]", "config.json holds a JSON list"),
    (lambda text, cfg: json.dumps({k: v for k, v in cfg.items() if k != "num_layers"}),
     r"config.json lacks the key\(s\) \['num_layers'\]"),
    (lambda text, cfg: json.dumps(dict(cfg, patch_size="2")),
     "config.json: 'patch_size' is '2', expected an integer"),
    (lambda text, cfg: json.dumps(dict(cfg, attention_head_dim=16.5)),
     "'attention_head_dim' is 16.5, expected an integer"),
    (lambda text, cfg: json.dumps(dict(cfg, num_layers=True)), "'num_layers' is True"),
])
def test_broken_diffusers_config_names_the_file_and_key(tmp_path, edit, message):
    folder, config = _diffusers_folder(tmp_path)
    path = folder / "config.json"
    path.write_text(edit(path.read_text(), config))
    with pytest.raises(ValueError, match=message) as info:
        load_any(folder)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


# --- the VAE ------------------------------------------------------------------------------------

VAE_CONFIG = {"_class_name": "AutoencoderKL", "block_out_channels": [32], "norm_num_groups": 8,
              "layers_per_block": 1, "latent_channels": 4}


def _vae_folder(tmp_path, poison=None):
    from safetensors.numpy import save_file

    from dit_jax.models.vae import AutoencoderKL, VAEConfig

    abstract = nnx.eval_shape(lambda: AutoencoderKL(VAEConfig.from_dict(VAE_CONFIG),
                                                    rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    state = nnx.state(abstract)
    values = jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32) * 0.05,
                          nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, values)
    nnx.update(abstract, state)
    weights = vae_to_torch_state_dict(abstract)
    if poison:
        weights[poison] = weights[poison].copy()
        weights[poison].reshape(-1)[0] = np.nan
    folder = tmp_path / "vae"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(VAE_CONFIG))
    save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def test_vae_with_nan_weights_or_broken_config_is_refused(tmp_path):
    key = "decoder.conv_out.weight"
    folder = _vae_folder(tmp_path, poison=key)
    with pytest.raises(NonFiniteWeightsError, match=rf"safetensors: weight '{key}' holds 1 NaN"):
        load_vae(folder)
    folder = _vae_folder(tmp_path)
    assert load_vae(folder).latent_channels == 4  # the clean folder loads
    config = folder / "config.json"
    for text, message in (
            ('{"block_out_channels": [32],', "is not valid JSON"),
            (json.dumps(dict(VAE_CONFIG, latent_channels="4")), "'latent_channels' is '4'"),
            (json.dumps(dict(VAE_CONFIG, block_out_channels=[])), "non-empty list of integers"),
            (json.dumps(dict(VAE_CONFIG, norm_num_groups=7)), "not divisible by norm_num_groups")):
        config.write_text(text)
        with pytest.raises(ValueError, match=message) as info:
            load_vae(folder)
        assert str(config) in str(info.value)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"xyz")
    config.write_text(json.dumps(VAE_CONFIG))
    with pytest.raises(ValueError, match="is not a readable .safetensors file"):
        load_vae(folder)


# --- latent shards and labels -------------------------------------------------------------------

def _latents_folder(path, labels=((0, 1), (2, 0)), num_classes=3, poison=None):
    """A latents folder written by hand as extract_latents lays it out: 2 shards of 2 examples
    of (2, 2, 4) latents; `poison` (shard, example) gets a NaN moment."""
    from dit_jax.data.latents import FORMAT, MANIFEST, labels_file, moments_file

    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards = []
    for k, shard_labels in enumerate(labels):
        moments = rng.standard_normal((len(shard_labels), 2, 2, 2, 2, 4)).astype(np.float32)
        moments[:, :, 1] = np.abs(moments[:, :, 1])
        if poison is not None and poison[0] == k:
            moments[poison[1], 1, 0, 1, 0, 2] = np.nan
        np.save(path / moments_file(k), moments)
        np.save(path / labels_file(k), np.asarray(shard_labels, np.int32))
        shards.append({"moments": moments_file(k), "labels": labels_file(k),
                       "count": len(shard_labels)})
    manifest = {"format": FORMAT, "image_size": 16, "latent_shape": [2, 2, 4], "count": 4,
                "scaling_factor": 0.18215, "class_names": [f"c{i}" for i in range(num_classes)],
                "shards": shards}
    (path / MANIFEST).write_text(json.dumps(manifest))
    return path


def test_latent_labels_outside_the_classes_name_the_shard(tmp_path):
    from dit_jax.data import make_batches
    from dit_jax.data.latents import LatentSource

    good = LatentSource(_latents_folder(tmp_path / "good"))
    assert [int(good[i]["y"]) for i in range(4)] == [0, 1, 2, 0]
    # 3 == num_classes is the null class's row, -1 its last row: both trained as "no label".
    for name, labels, num_classes, shown in (
            ("null", ((0, 1), (3, 0)), 3, r"outside \[0, 3\) for its 3 classes, the first 3"),
            ("minus", ((0, -1), (2, 0)), 3, r"outside \[0, 3\) for its 3 classes, the first -1"),
            ("flat", ((0, 0), (0, 1)), 0, r"outside 0 \(the data is unconditional\)")):
        source = LatentSource(_latents_folder(tmp_path / name, labels, num_classes))
        shard = "labels_00001.npy" if name != "minus" else "labels_00000.npy"
        with pytest.raises(ValueError, match=rf"{name}/{shard}: 1 label\(s\) {shown}"):
            [source[i] for i in range(4)]
        loader = make_batches(source, global_batch_size=4, seed=0, host_rows=(0, 4))
        with pytest.raises(Exception, match=shard):  # through grain as well
            next(loader)
        loader.close()


def test_nan_latents_and_truncated_shards_name_the_file(tmp_path):
    from dit_jax.data.latents import LatentSource

    source = LatentSource(_latents_folder(tmp_path / "nan", poison=(1, 1)))
    assert np.isfinite(source[0]["moments"]).all()  # shard 0 is clean
    with pytest.raises(ValueError, match=r"nan/moments_00001.npy: example 1 of this shard holds "
                                         r"NaN/Inf moments"):
        source[2]
    folder = _latents_folder(tmp_path / "cut")
    data = (folder / "moments_00001.npy").read_bytes()
    (folder / "moments_00001.npy").write_bytes(data[:-100])
    (folder / "labels_00000.npy").write_bytes(b"not numpy")
    source = LatentSource(folder)
    with pytest.raises(ValueError, match=r"cut/moments_00001.npy is truncated or not a .npy file "
                                         r"\(\d+ of the \d+ bytes its header announces\); delete "
                                         r"it and shard_00001.json"):
        source[3]
    with pytest.raises(ValueError, match=r"cut/labels_00000.npy is truncated or not a .npy file"):
        source[0]


class _LabelledSource:
    """A plain source (grain's protocol) whose labels are wrong for its class count."""

    num_classes = 3
    element_shape = (2, 2, 1)
    class_names = ("a", "b", "c")

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return {"x": np.zeros(self.element_shape, np.float32), "y": np.int32([0, 1, 2, 7][index])}

    def __repr__(self):
        return "_LabelledSource()"


class _LabelledBatchSource(_LabelledSource):
    def get_batch(self, indices):
        records = [self[int(i)] for i in indices]
        return {"x": np.stack([r["x"] for r in records]), "y": np.asarray([r["y"] for r in records])}


def test_any_source_with_a_label_outside_its_classes_stops(tmp_path):
    from dit_jax.data import Batches
    from dit_jax.data.pipeline import Loader

    for loader in (Batches(_LabelledBatchSource(), global_batch_size=4, seed=0),
                   Loader(_LabelledSource(), global_batch_size=4, seed=0, host_rows=(0, 4))):
        with pytest.raises(ValueError, match=r"a batch of _LabelledSource\(\): 1 label\(s\) outside "
                                             r"\[0, 3\) for its 3 classes, the first 7"):
            next(loader)
        loader.close()


@pytest.mark.slow
def test_union_over_two_processes(tmp_path):
    """The distinct-skipped-files count of several hosts: the union of their sets, not the sum."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = ("import sys, jax\n"
              "from dit_jax.distributed import union_over_hosts\n"
              "i = int(sys.argv[1])\n"
              f"jax.distributed.initialize('localhost:{port}', num_processes=2, process_id=i)\n"
              "mine = [{3, 5, 9}, {5, 11}][i]\n"
              "print(sorted(union_over_hosts(mine)), sorted(union_over_hosts(set())))\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-2000:]
        assert out.strip().splitlines()[-1] == "[3, 5, 9, 11] []", out[-2000:]
