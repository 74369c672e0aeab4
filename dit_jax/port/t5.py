"""transformers-format T5 encoders and their tokenizers → dit_jax (PixArt-α's text side).

`load_t5_encoder(SRC)` reads a folder that transformers' `save_pretrained` wrote for a
`T5EncoderModel` or a whole `T5ForConditionalGeneration` (config.json + model.safetensors, sharded
safetensors with model.safetensors.index.json, or pytorch_model.bin, sharded or not), a diffusers
pipeline folder that keeps it in text_encoder/ (PixArt-alpha/PixArt-XL-2-1024-MS), or a hub id
(downloaded through huggingface_hub). Weights are read tensor by tensor, and each device reads
only its own shard from the memory-mapped file: T5-XXL (4.7B parameters) goes straight onto a
mesh without ever being whole in host or device memory (pass `mesh=`).

`load_t5_tokenizer(SRC)` builds the tokenizer from the same kind of folder (or its tokenizer/
subfolder): tokenizer.json through the `tokenizers` library, else spiece.model through
`sentencepiece`. It encodes as transformers' T5 tokenizer called the way PixArt-α's pipeline
calls it (max-length padding to 120 tokens, truncation, EOS appended). See docs/t5.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from dit_jax import sharding
from dit_jax.models.t5 import T5Encoder, T5EncoderConfig, check_token_ids, split_encoder
from dit_jax.port.dit import looks_like_hub_id
from dit_jax.port.keys import check_keys

SAFETENSORS = "model.safetensors"
TORCH_BIN = "pytorch_model.bin"
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
TOKENIZER_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json")
# PixArt-α's prompt length (diffusers' PixArtAlphaPipeline max_sequence_length).
PIXART_MAX_LENGTH = 120

_HOW_TO = ("expected a transformers T5 folder (config.json + model.safetensors, sharded "
           "model-*.safetensors with model.safetensors.index.json, or pytorch_model.bin), a "
           "pipeline folder with text_encoder/ and tokenizer/ (e.g. `huggingface-cli download "
           "PixArt-alpha/PixArt-XL-2-1024-MS --include 'text_encoder/*' 'tokenizer/*' "
           "--local-dir DIR`), or a hub id such as 'google/t5-v1_1-xxl' when online")


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in (
        SAFETENSORS, SAFETENSORS + ".index.json", TORCH_BIN, TORCH_BIN + ".index.json"))


def _download(repo_id: str, patterns: Sequence[str], fallback: Sequence[str] = ()) -> Path:
    from huggingface_hub import snapshot_download

    try:
        root = Path(snapshot_download(repo_id, allow_patterns=list(patterns)))
        if fallback and not any(_has_weights(f) for f in (root, root / "text_encoder")):
            # The pickled .bin only for repos without safetensors (google/t5-v1_1-xxl).
            root = Path(snapshot_download(repo_id, allow_patterns=list(fallback)))
    except Exception as e:  # offline, unknown or gated repo: all mean "not available"
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {e}): {_HOW_TO}") from e
    return root


def _encoder_folder(src) -> Path:
    path = Path(src).expanduser()
    if not path.exists():
        if not looks_like_hub_id(str(src)):
            raise FileNotFoundError(f"T5 encoder {str(src)!r} does not exist: {_HOW_TO}")
        weights = ["model.safetensors*", "model-*.safetensors"]
        path = _download(str(src), ["config.json", *weights, "text_encoder/config.json",
                                    *(f"text_encoder/{w}" for w in weights)],
                         fallback=["pytorch_model*.bin*", "text_encoder/pytorch_model*.bin*"])
    if not (path / "config.json").is_file() and (path / "text_encoder" / "config.json").is_file():
        path = path / "text_encoder"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path}: {_HOW_TO}")
    return path


def _tokenizer_folder(src) -> Path:
    path = Path(src).expanduser()
    if not path.exists():
        if not looks_like_hub_id(str(src)):
            raise FileNotFoundError(f"T5 tokenizer {str(src)!r} does not exist: {_HOW_TO}")
        names = TOKENIZER_FILES + TOKENIZER_CONFIGS
        path = _download(str(src), [*names, *(f"tokenizer/{n}" for n in names)])
    for folder in (path, path / "tokenizer"):
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return folder
    raise FileNotFoundError(f"no tokenizer.json or spiece.model in {path} (nor in "
                            f"{path / 'tokenizer'}): {_HOW_TO}")


# --------------------------------------------------------------------------------------------
# Tensors, read lazily
# --------------------------------------------------------------------------------------------


class _Tensor:
    """One stored tensor: its shape, and a reader of any slice of it as float32 NumPy."""

    def __init__(self, shape: tuple[int, ...], read: Callable[[tuple], np.ndarray]):
        self.shape = shape
        self.read = read


def _safetensors_tensors(path: Path) -> dict[str, _Tensor]:
    from safetensors import safe_open

    cpu = jax.devices("cpu")[0]

    def reader(key):
        def read(index):
            # framework="flax" reads bfloat16 too (NumPy has no bf16); the slice is read from
            # the memory-mapped file alone, onto the host CPU device.
            with jax.default_device(cpu), safe_open(str(path), framework="flax") as f:
                return np.asarray(f.get_slice(key)[index].astype(jnp.float32))
        return read

    with safe_open(str(path), framework="flax") as f:
        return {key: _Tensor(tuple(f.get_slice(key).get_shape()), reader(key)) for key in f.keys()}


def _torch_tensors(path: Path) -> dict[str, _Tensor]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path} is a PyTorch pickle and needs torch to read: install torch, "
                          f"or convert it to safetensors") from e
    try:
        try:
            # mmap: tensors stay in the file until a slice of them is read.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # The legacy (pre-zip) format cannot be memory-mapped: read it whole.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable PyTorch state_dict (loaded with "
                         f"weights_only=True): {e}") from e

    def reader(tensor):
        return lambda index: tensor[index].float().numpy()

    return {key: _Tensor(tuple(t.shape), reader(t)) for key, t in state.items()
            if isinstance(t, torch.Tensor)}


def _read_weights(folder: Path) -> dict[str, _Tensor]:
    if (folder / SAFETENSORS).is_file():
        return _safetensors_tensors(folder / SAFETENSORS)
    for stem, read in ((SAFETENSORS, _safetensors_tensors), (TORCH_BIN, _torch_tensors)):
        index = folder / f"{stem}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ValueError(f"{index} is not a shard index (a JSON object with a "
                                 f"'weight_map'): {e}") from e
            out: dict[str, _Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    raise FileNotFoundError(f"{folder / shard}, listed in {index}, is missing")
                out.update(read(folder / shard))
            return out
    if (folder / TORCH_BIN).is_file():
        return _torch_tensors(folder / TORCH_BIN)
    raise FileNotFoundError(f"no T5 weights in {folder} (looked for {SAFETENSORS}, "
                            f"{TORCH_BIN} and their .index.json): {_HOW_TO}")


# --------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------


def encoder_keys(cfg: T5EncoderConfig) -> dict[str, tuple[tuple, bool]]:
    """transformers key of every encoder weight → (path in the T5Encoder's state, whether it is
    a Linear weight, stored (out, in), that the model holds transposed)."""
    table: dict[str, tuple[tuple, bool]] = {
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
            (("relative_attention_bias",), False),
        "encoder.final_layer_norm.weight": (("final_layer_norm", "weight"), False),
    }
    ffn = ("wi_0", "wi_1", "wo") if cfg.is_gated else ("wi", "wo")
    for i in range(cfg.num_layers):
        layer = f"encoder.block.{i}.layer"
        table[f"{layer}.0.layer_norm.weight"] = (("blocks", i, "attention_norm", "weight"), False)
        table[f"{layer}.1.layer_norm.weight"] = (("blocks", i, "ffn_norm", "weight"), False)
        for name in ("q", "k", "v", "o"):
            table[f"{layer}.0.SelfAttention.{name}.weight"] = (
                ("blocks", i, "attention", name, "kernel"), True)
        for name in ffn:
            table[f"{layer}.1.DenseReluDense.{name}.weight"] = (
                ("blocks", i, "ffn", name, "kernel"), True)
    return table


# The token table: T5EncoderModel saves it as shared.weight (encoder.embed_tokens.weight is
# tied to it and may be saved too).
EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight")
# What a whole T5ForConditionalGeneration checkpoint adds, which the encoder does not use.
IGNORED_PREFIXES = ("decoder.", "lm_head.")


def _leaf(tree, path):
    for part in path:
        tree = tree[part]
    return tree


def load_t5_encoder(src, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool | str = False,
                    mesh: Mesh | None = None) -> T5Encoder:
    """A T5Encoder from a transformers-format folder, a pipeline folder with text_encoder/, or a
    hub id (see the module doc). `dtype` is the compute dtype (jnp.bfloat16 for T5-XXL on
    accelerators), `param_dtype` the stored one. With `mesh`, every weight is placed sharded
    over it as dit_jax.sharding lays out the encoder's logical axes; without, on the default
    device. Call it as `encoder(input_ids, attention_mask)`, or compiled through `encoder_fn`."""
    folder = _encoder_folder(src)
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") not in ("t5", "mt5"):
        raise ValueError(f"{folder / 'config.json'} has model_type {config.get('model_type')!r}, "
                         f"not 't5': {_HOW_TO}")
    cfg = T5EncoderConfig.from_hf(config, dtype=jnp.dtype(dtype),
                                  param_dtype=jnp.dtype(param_dtype), remat=remat)
    tensors = _read_weights(folder)
    table = encoder_keys(cfg)
    embedding = next((k for k in EMBEDDING_KEYS if k in tensors), None)
    if embedding is None:
        raise ValueError(f"{folder}: no token table ({' or '.join(EMBEDDING_KEYS)}) among the "
                         f"checkpoint's keys")
    encoder_found = [k for k in tensors if k not in EMBEDDING_KEYS
                     and not k.startswith(IGNORED_PREFIXES)]
    check_keys(encoder_found, table,
               f"{folder} does not match a {cfg.num_layers}-layer T5 encoder with "
               f"feed_forward_proj {cfg.feed_forward_proj!r}")
    table = {embedding: (("shared",), False), **table}

    graphdef, abstract = split_encoder(cfg)
    if mesh is not None:
        shardings = sharding.state_shardings(abstract, mesh)
    else:
        single = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda v: v.replace(single), abstract,
                                 is_leaf=lambda x: isinstance(x, nnx.Variable))
    values = nnx.to_pure_dict(abstract)
    targets = nnx.to_pure_dict(shardings)
    for key, (path, transposed) in table.items():
        tensor, target = tensors[key], _leaf(values, path)
        want = tuple(reversed(target.shape)) if transposed else tuple(target.shape)
        if tensor.shape != want:
            raise ValueError(f"{folder}: {key} has shape {tensor.shape}, the config.json's "
                             f"model expects {want}")
        node = _leaf(values, path[:-1])
        node[path[-1]] = _place(tensor, target.shape, transposed, target.dtype,
                                _leaf(targets, path))
    nnx.replace_by_pure_dict(abstract, values)
    return nnx.merge(graphdef, abstract)


def _place(tensor: _Tensor, shape, transposed: bool, dtype, target) -> jax.Array:
    """A global array of `shape` laid out as `target`; every device's shard is read from the
    file on its own (a Linear weight is stored (out, in): the slice is read transposed)."""
    cache: dict[Any, np.ndarray] = {}

    def shard(index):
        # Replicated weights ask for the same slice once per device: read it once.
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in cache:
            value = tensor.read(tuple(reversed(index)) if transposed else index)
            cache[key] = (value.T if transposed else value).astype(dtype)
        return cache[key]

    return jax.make_array_from_callback(tuple(shape), target, shard)


def encoder_fn(encoder: T5Encoder, mesh: Mesh | None = None):
    """`encoder(input_ids, attention_mask)` compiled: a function (input_ids, attention_mask=None)
    → last hidden state (N, L, d_model) float32. With `mesh`, the weights are laid out over it
    (moved there once if they are not) and the batch is split over its batch axes, padded to a
    multiple of their size for the computation (a batch of one prompt runs on any mesh)."""
    graphdef, state = nnx.split(encoder)

    def forward(state, input_ids, attention_mask):
        return nnx.merge(graphdef, state)(input_ids, attention_mask)

    if mesh is None:
        compiled, rows, batch = jax.jit(forward), 1, None
    else:
        state_sh = sharding.state_shardings(state, mesh)
        state = jax.device_put(state, state_sh)
        batch = sharding.batch_sharding(mesh, 2)
        compiled = jax.jit(forward, in_shardings=(state_sh, batch, batch),
                           out_shardings=sharding.batch_sharding(mesh, 3))
        rows = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))

    def call(input_ids, attention_mask=None):
        input_ids = np.asarray(input_ids, np.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        mask = (np.ones_like(input_ids) if attention_mask is None
                else np.asarray(attention_mask, np.int32))
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}, input_ids "
                             f"{input_ids.shape}: they must match")
        check_token_ids(input_ids, encoder.config.vocab_size)
        n = input_ids.shape[0]
        extra = -n % rows
        if extra:  # rows of padding tokens, attended (the mask of 1s keeps them finite)
            input_ids = np.concatenate([input_ids, np.zeros((extra,) + input_ids.shape[1:],
                                                            np.int32)])
            mask = np.concatenate([mask, np.ones((extra,) + mask.shape[1:], np.int32)])
        if batch is not None:  # global arrays: every host passes the same prompts
            input_ids, mask = sharding.place((input_ids, mask), (batch, batch))
        return compiled(state, input_ids, mask)[:n]

    return call


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------

_EXTRA_ID = re.compile(r"<extra_id_(\d+)>")


class T5Tokenizer:
    """Prompts → (input_ids, attention_mask), both (N, max_length) int32, as transformers' T5
    tokenizer gives them with padding="max_length", truncation=True: the text's pieces, cut to
    max_length - 1, then EOS, then padding; the mask is 1 on the pieces and EOS."""

    def __init__(self, encode_pieces: Callable[[list[str]], list[list[int]]], *, eos_id: int,
                 pad_id: int, max_length: int = PIXART_MAX_LENGTH, source: str = ""):
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1 (room for EOS), got {max_length}")
        self._encode_pieces = encode_pieces
        self.eos_id, self.pad_id, self.max_length = eos_id, pad_id, max_length
        self.source = source

    def __call__(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a string or a sequence of strings")
        ids = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
        mask = np.zeros((len(prompts), self.max_length), np.int32)
        for row, pieces in enumerate(self._encode_pieces(prompts)):
            tokens = list(pieces[:self.max_length - 1]) + [self.eos_id]
            ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = 1
        return ids, mask


def _special_tokens(folder: Path) -> dict[str, Any]:
    """eos/pad token strings and extra_ids from tokenizer_config.json / special_tokens_map.json
    (T5's defaults where absent)."""
    out: dict[str, Any] = {"eos_token": "</s>", "pad_token": "<pad>", "extra_ids": 100}
    for name in reversed(TOKENIZER_CONFIGS):  # tokenizer_config.json wins
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            for key in out:
                value = data.get(key)
                if isinstance(value, dict):  # an AddedToken written out: {"content": ...}
                    value = value.get("content")
                if value is not None:
                    out[key] = value
    return out


def _from_tokenizer_json(path: Path, special: Mapping[str, Any]):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    # The file's own padding/truncation/post-processing settings are bypassed: T5Tokenizer
    # applies transformers' rules itself, so every file gives the same layout.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    ids = {}
    for name in ("eos_token", "pad_token"):
        ids[name] = tokenizer.token_to_id(special[name])
        if ids[name] is None:
            raise ValueError(f"{path}: the {name} {special[name]!r} is not in the vocabulary")

    def encode(prompts):
        return [e.ids for e in tokenizer.encode_batch(prompts, add_special_tokens=False)]

    return encode, ids["eos_token"], ids["pad_token"]


def _from_spiece(path: Path, special: Mapping[str, Any]):
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    ids = {}
    for name in ("eos_token", "pad_token"):
        ids[name] = processor.piece_to_id(special[name])
        if processor.id_to_piece(ids[name]) != special[name]:
            raise ValueError(f"{path}: the {name} {special[name]!r} is not in the vocabulary")
    # transformers appends the sentinels <extra_id_0..extra_ids-1> after the SentencePiece
    # vocabulary, in reverse (<extra_id_0> last), and matches them in the text as whole tokens.
    size, extra = processor.get_piece_size(), int(special["extra_ids"])

    def encode_one(text):
        out, start = [], 0
        for match in _EXTRA_ID.finditer(text):
            n = int(match.group(1))
            if n >= extra:
                continue
            out += processor.encode(text[start:match.start()]) + [size + extra - 1 - n]
            start = match.end()
        return out + processor.encode(text[start:])

    return (lambda prompts: [encode_one(p) for p in prompts]), ids["eos_token"], ids["pad_token"]


def load_t5_tokenizer(src, *, max_length: int = PIXART_MAX_LENGTH) -> T5Tokenizer:
    """The T5 tokenizer of a folder (or its tokenizer/ subfolder) or hub id: tokenizer.json
    through `tokenizers` when present, else spiece.model through `sentencepiece`. Encodes as
    PixArt-α's pipeline does: `tokenizer(prompts)` → (input_ids, attention_mask), (N,
    max_length) int32, max-length padding, truncation, EOS appended."""
    folder = _tokenizer_folder(src)
    special = _special_tokens(folder)
    if (folder / "tokenizer.json").is_file():
        path = folder / "tokenizer.json"
        encode, eos, pad = _from_tokenizer_json(path, special)
    else:
        path = folder / "spiece.model"
        encode, eos, pad = _from_spiece(path, special)
    return T5Tokenizer(encode, eos_id=eos, pad_id=pad, max_length=max_length, source=str(path))


def t5_text_encoder(src: str, *, max_length: int = 120) -> Callable:
    """`encode(captions) -> (embeddings, mask)` of a T5 encoder folder (transformers format, with
    its tokenizer files) or hub id, sharded over every local device, in float32: the encoder of
    `extract_latents --captions` (the embeddings are stored once and trained on many times), and
    of the prompts of a run trained on them (`dit_jax.text_sampling`), so both see the same
    tokens. Captions are tokenized as given (no lower-casing or cleaning)."""
    mesh = sharding.make_mesh(data=1, fsdp=-1, devices=jax.local_devices())
    encode = encoder_fn(load_t5_encoder(src, mesh=mesh), mesh)
    tokenizer = load_t5_tokenizer(src, max_length=max_length)

    def run(captions: Sequence[str]):
        ids, mask = tokenizer(list(captions))
        return np.asarray(encode(ids, mask)), mask

    return run
