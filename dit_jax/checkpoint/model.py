"""This project's model-checkpoint format: one DiT as a directory.

    DIR/model_config.json   the DiTConfig fields (dtype as a string, e.g. "float32")
    DIR/params/             an orbax checkpoint of the pure dict of every model variable
                            (parameters and the fixed pos_embed)

`python -m dit_jax.port to-jax` writes it, `sample.py --ckpt DIR` and train.py fine-tuning read it.
It holds weights only (no optimiser state): training checkpoints live in train.py's workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from dit_jax.models.dit import DiT, DiTConfig, convert_blocks

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def config_to_dict(cfg: DiTConfig) -> dict[str, Any]:
    fields = dataclasses.asdict(cfg)
    fields["dtype"] = jnp.dtype(cfg.dtype).name
    if not isinstance(cfg.input_size, int):
        fields["input_size"] = list(cfg.input_size)
    return fields


def config_from_dict(fields: dict[str, Any], config_class: type = DiTConfig):
    """The `config_class` (a model config dataclass: DiTConfig, TextModelConfig) that
    `config_to_dict` wrote as JSON."""
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown {config_class.__name__} field(s) {unknown}; known: "
                         f"{sorted(known)}")
    fields = dict(fields)
    if "dtype" in fields:
        fields["dtype"] = jnp.dtype(fields["dtype"])
    if isinstance(fields.get("input_size"), list):
        fields["input_size"] = tuple(fields["input_size"])
    return config_class(**fields)


# Fields that change how a model computes but not its weights: the only ones a loaded model may
# change (the others would reinterpret the tensors).
RUNTIME_FIELDS = ("dtype", "attention_impl", "remat", "scan_blocks", "numerics",
                  "class_dropout_prob")


def with_config(model: DiT, **changes) -> DiT:
    """The same weights under a config with `changes` to RUNTIME_FIELDS."""
    cfg = model.config
    changes = {k: v for k, v in changes.items() if getattr(cfg, k, None) != v}
    fixed = sorted(set(changes) - set(RUNTIME_FIELDS))
    if fixed:
        raise ValueError(
            f"cannot change {fixed} of a loaded model (checkpoint has "
            f"{ {k: getattr(cfg, k, None) for k in fixed} }, asked "
            f"{ {k: changes[k] for k in fixed} }); only {list(RUNTIME_FIELDS)} can be overridden")
    if "class_dropout_prob" in changes and cfg.num_classes and (
            (changes["class_dropout_prob"] > 0) != (cfg.class_dropout_prob > 0)):
        raise ValueError(
            f"cannot change class_dropout_prob from {cfg.class_dropout_prob} to "
            f"{changes['class_dropout_prob']}: whether it is 0 decides whether the label table "
            f"has the null-class row (as released), so the weights would not fit")
    if "scan_blocks" in changes:
        model = convert_blocks(model, scan_blocks=changes.pop("scan_blocks"))
    if not changes:
        return model
    target = nnx.eval_shape(lambda: DiT(dataclasses.replace(model.config, **changes)))
    state = nnx.state(target)
    nnx.replace_by_pure_dict(state, nnx.to_pure_dict(nnx.state(model)))
    nnx.update(target, state)
    return target


def is_model_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / CONFIG_FILE).is_file() and (Path(directory) / PARAMS_DIR).is_dir()


def save_model(directory: str | os.PathLike, model: DiT) -> Path:
    """Write `model` (config and every variable) to `directory`, replacing a previous save."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        config = json.dumps(config_to_dict(model.config), indent=2)
        (directory / CONFIG_FILE).write_text(config + "\n")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / PARAMS_DIR, nnx.to_pure_dict(nnx.state(model)), force=True)
    checkpointer.wait_until_finished()
    return directory


def load_model(directory: str | os.PathLike, **overrides) -> DiT:
    """Read a model written by `save_model`. `overrides` change non-shape DiTConfig fields
    (dtype, attention_impl, remat, scan_blocks, numerics, class_dropout_prob)."""
    directory = Path(directory).absolute()
    if not is_model_checkpoint(directory):
        raise FileNotFoundError(
            f"{directory} is not a dit_jax model checkpoint (no {CONFIG_FILE} and {PARAMS_DIR}/)")
    cfg = config_from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    target = nnx.eval_shape(lambda: DiT(cfg))
    state = nnx.state(target)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            nnx.to_pure_dict(state))
    values = ocp.StandardCheckpointer().restore(directory / PARAMS_DIR, abstract)
    nnx.replace_by_pure_dict(state, values)
    nnx.update(target, state)
    return with_config(target, **overrides)
