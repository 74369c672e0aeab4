"""The FID Inception-v3 in Flax NNX: the 2015-12-05 TensorFlow graph that the ADM evaluator runs.

It is the network `classify_image_graph_def.pb` that TTUR's FID, OpenAI's ADM evaluator
(guided-diffusion `evaluations/evaluator.py`), pytorch-fid and torch-fidelity all use, which is
not torchvision's Inception-v3:

- the input is uint8-valued RGB of any size; it is resized to 299×299 with TensorFlow 1.x's
  bilinear resize (`align_corners=False` without half-pixel centres: source coordinate =
  destination index × in/out, borders clamped) and scaled as (x − 128) / 128;
- the average pools inside the 35×35, 17×17 and first 8×8 blocks leave the zero padding out of
  the mean (TensorFlow's SAME average pool), and the last block (`Mixed_7c`) max-pools in its
  pool branch;
- the classifier has 1008 outputs.

Outputs (`__call__` returns a dict):

- ``pool_3``: the 2048 global-average-pooled features (FID, precision/recall);
- ``spatial``: ``mixed_6/conv`` — the ReLU output of the 1×1 branch of the fourth 17×17 block
  (`Mixed_6d.branch1x1`) — first 7 of its 192 channels, flattened in (H, W, C) order:
  17·17·7 = 2023 features (sFID), exactly the ADM evaluator's `spatial[..., :7]` reshaped;
- ``logits_unbiased``: pool_3 times the classifier matrix without its bias (the ADM evaluator's
  Inception Score softmaxes these, as `softmax/logits/MatMul` is taken before the bias add);
- ``logits``: with the bias (the network's ImageNet logits).

Weights are the PyTorch conversion of the TensorFlow graph, `pt_inception-2015-12-05-6726825d.pth`
(pytorch-fid's release; torch-fidelity ships the same tensors as
`weights-inception-2015-12-05-6726825d.pth`), with torch's names ("Mixed_6d.branch1x1.conv.weight").
Every matmul and convolution runs at HIGHEST precision: TPUs and GPUs would otherwise round
float32 operands to bfloat16 / TF32, which moves FID.
"""

from __future__ import annotations

import os
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS_FILE)
# torch-fidelity's copy of the same weights; looked for in torch's hub cache.
TORCH_FIDELITY_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7
NUM_LOGITS = 1008
WEIGHTS_HELP = (f"get the FID Inception weights {FID_WEIGHTS_FILE} from {FID_WEIGHTS_URL} and pass "
                "--inception-weights=FILE (see docs/evaluation.md)")

_HIGHEST = jax.lax.Precision.HIGHEST


class BasicConv2d(nnx.Module):
    """Convolution without bias, batch norm (eps 1e-3, running statistics), ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0, *, rngs: nnx.Rngs):
        kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
        self.conv = nnx.Conv(cin, cout, kernel, strides=stride, padding=[(p, p) for p in padding],
                             use_bias=False, precision=_HIGHEST, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=1e-3, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
    # TensorFlow's SAME average pool: padded zeros are not counted in the mean.
    return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nnx.Module):
    """35×35 block (`mixed`, `mixed_1`, `mixed_2`)."""

    def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

    def __call__(self, x):
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_3x3(x)),
        ], axis=-1)


class InceptionB(nnx.Module):
    """35×35 → 17×17 reduction (`mixed_3`)."""

    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        return jnp.concatenate([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            _max_pool_3x3_s2(x),
        ], axis=-1)


class InceptionC(nnx.Module):
    """17×17 block with factorised 7×7 convolutions (`mixed_4` … `mixed_7`)."""

    def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x, *, with_branch1x1: bool = False):
        branch1x1 = self.branch1x1(x)
        dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            dbl = layer(dbl)
        out = jnp.concatenate([
            branch1x1,
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg_pool_3x3(x)),
        ], axis=-1)
        return (out, branch1x1) if with_branch1x1 else out


class InceptionD(nnx.Module):
    """17×17 → 8×8 reduction (`mixed_8`)."""

    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        tower = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                      self.branch7x7x3_4):
            tower = layer(tower)
        return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), tower,
                                _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nnx.Module):
    """8×8 block with split 3×3 convolutions (`mixed_9`, `mixed_10`). The graph's `mixed_10`
    max-pools in its pool branch (`pool="max"`); `mixed_9` averages without the padding."""

    def __init__(self, cin: int, pool: str, *, rngs: nnx.Rngs):
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.pool == "max":
            pooled = nnx.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ], axis=-1)


def _resize_taps(in_size: int, out_size: int):
    """Source indices and weights of TensorFlow 1.x's bilinear resize (align_corners=False),
    computed in float32 as the graph does: src = i · float32(in/out), lo = ⌊src⌋,
    hi = min(lo + 1, in − 1), weight of hi = src − lo."""
    src = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
    lo = src.astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo.astype(np.float32)).astype(np.float32)


def resize_bilinear_tf1(x: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """(N, H, W, C) float32 → (N, size, size, C), TensorFlow 1.x `ResizeBilinear` without
    align_corners: rows are interpolated first, then the two row results along the height,
    in the graph's order of operations (a + (b − a)·w)."""
    n, h, w, c = x.shape
    ylo, yhi, dy = _resize_taps(h, size)
    xlo, xhi, dx = _resize_taps(w, size)
    top, bottom = x[:, ylo], x[:, yhi]
    dx = jnp.asarray(dx)[None, None, :, None]
    dy = jnp.asarray(dy)[None, :, None, None]
    t0, t1 = top[:, :, xlo], top[:, :, xhi]
    b0, b1 = bottom[:, :, xlo], bottom[:, :, xhi]
    upper = t0 + (t1 - t0) * dx
    lower = b0 + (b1 - b0) * dx
    return upper + (lower - upper) * dy


class FIDInceptionV3(nnx.Module):
    """The FID Inception-v3. `model(images)` takes (N, H, W, 3) uint8 (or float in [0, 255]) and
    returns {pool_3, spatial, logits_unbiased, logits}, all float32."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, "avg", rngs=rngs)
        self.Mixed_7c = InceptionE(2048, "max", rngs=rngs)
        self.fc = nnx.Linear(2048, NUM_LOGITS, precision=_HIGHEST, rngs=rngs)

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        x = resize_bilinear_tf1(images.astype(jnp.float32))
        x = (x - 128.0) / 128.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool_3x3_s2(x)
        x = _max_pool_3x3_s2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))
        x, mixed_6_conv = self.Mixed_6d(x, with_branch1x1=True)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
        pool_3 = jnp.mean(x, axis=(1, 2))
        unbiased = jnp.matmul(pool_3, self.fc.kernel[...], precision=_HIGHEST)
        spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        return {"pool_3": pool_3, "spatial": spatial, "logits_unbiased": unbiased,
                "logits": unbiased + self.fc.bias[...]}


# --------------------------------------------------------------------------- weights


def _torch_to_nnx(key: str, value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray] | None:
    """A torch state-dict entry as (path in the nnx pure dict, value); None for entries that
    carry nothing (`num_batches_tracked`)."""
    *module, leaf = key.split(".")
    if leaf == "num_batches_tracked":
        return None
    if module[-1:] == ["conv"] and leaf == "weight":
        return (*module, "kernel"), np.transpose(value, (2, 3, 1, 0))  # OIHW → HWIO
    if module[-1:] == ["bn"]:
        name = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
        if leaf in name:
            return (*module, name[leaf]), value
    if module == ["fc"]:
        if leaf == "weight":
            return ("fc", "kernel"), value.T
        if leaf == "bias":
            return ("fc", "bias"), value
    raise KeyError(key)


def from_state_dict(state_dict: Mapping[str, np.ndarray], source: str = "state dict"
                    ) -> FIDInceptionV3:
    """An FIDInceptionV3 with the weights of a torch-named state dict (pytorch-fid's or
    torch-fidelity's keys). Every parameter must be present with its shape."""
    model = nnx.eval_shape(lambda: FIDInceptionV3(rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    pure = nnx.to_pure_dict(state)
    expected = {path: leaf for path, leaf in _flatten(pure)}
    values: dict[tuple[str, ...], np.ndarray] = {}
    unexpected = []
    for key, value in state_dict.items():
        try:
            entry = _torch_to_nnx(key, np.asarray(value, dtype=np.float32))
        except KeyError:
            unexpected.append(key)
            continue
        if entry is None:
            continue
        path, array = entry
        if path not in expected:
            unexpected.append(key)
        elif tuple(array.shape) != tuple(expected[path].shape):
            raise ValueError(f"{source}: {key} has shape {tuple(np.shape(value))}, the FID "
                             f"Inception needs {tuple(expected[path].shape)} (in torch layout)")
        else:
            values[path] = array
    missing = [".".join(p) for p in expected if p not in values]
    if missing or unexpected:
        raise ValueError(
            f"{source} is not an FID Inception-v3 state dict: missing {missing[:3]}"
            f"{'…' if len(missing) > 3 else ''} ({len(missing)}), unexpected {unexpected[:3]}"
            f"{'…' if len(unexpected) > 3 else ''} ({len(unexpected)}); {WEIGHTS_HELP}")
    for path, array in values.items():
        node = pure
        for name in path[:-1]:
            node = node[name]
        node[path[-1]] = jnp.asarray(array)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def _flatten(tree, prefix=()):
    for name, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, (*prefix, name))
        else:
            yield (*prefix, name), value


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensors of a .pth (needs torch), .safetensors or .npz file, by torch name, as NumPy."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file
        return load_file(str(path))
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {path} needs torch (pip install torch), or convert it once to "
                          ".safetensors/.npz with the same tensor names") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__}); "
                         f"{WEIGHTS_HELP}")
    return {k: v.detach().float().numpy() for k, v in state.items()}


def default_cache_dir() -> Path:
    """$DIT_JAX_CACHE, else $XDG_CACHE_HOME/dit_jax, else ~/.cache/dit_jax."""
    if os.environ.get("DIT_JAX_CACHE"):
        return Path(os.environ["DIT_JAX_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "dit_jax"


def _torch_hub_checkpoints() -> Path:
    hub = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(hub).expanduser() / "hub" / "checkpoints"


def resolve_weights(path: str | os.PathLike | None = None, *, download: bool = True,
                    cache_dir: str | os.PathLike | None = None, url: str = FID_WEIGHTS_URL) -> Path:
    """The FID Inception weights file: `path` if given; else a copy already in the cache dir or
    torch's hub cache (pytorch-fid's and torch-fidelity's downloads); else downloaded from `url`
    into the cache dir. Raises FileNotFoundError saying where to get the file."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"FID Inception weights {path} not found; {WEIGHTS_HELP}")
        return path
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = url.rsplit("/", 1)[-1]
    hub = _torch_hub_checkpoints()
    for candidate in (cache / name, hub / FID_WEIGHTS_FILE, hub / TORCH_FIDELITY_WEIGHTS_FILE):
        if candidate.is_file():
            return candidate
    if not download:
        raise FileNotFoundError(f"FID Inception weights not found in {cache}; {WEIGHTS_HELP}")
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / name
    print(f"downloading the FID Inception weights from {url} to {target}", file=sys.stderr)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, target)  # atomic: concurrent hosts never read half a file
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise FileNotFoundError(f"could not download the FID Inception weights ({e}); "
                                f"{WEIGHTS_HELP}") from None
    return target


def load_inception(path: str | os.PathLike | None = None, **resolve_kwargs) -> FIDInceptionV3:
    """The FID Inception with the weights of `path` (see `resolve_weights` when None)."""
    path = resolve_weights(path, **resolve_kwargs)
    return from_state_dict(read_state_dict(path), source=str(path))


__all__ = ["FIDInceptionV3", "FID_WEIGHTS_FILE", "FID_WEIGHTS_URL", "WEIGHTS_HELP",
           "from_state_dict", "load_inception", "read_state_dict", "resize_bilinear_tf1",
           "resolve_weights"]
