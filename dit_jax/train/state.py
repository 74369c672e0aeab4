"""The train state (parameters, EMA, optimiser state, step, RNG), the optimiser, and the model
built from a training config.

The state is a plain pytree of arrays (nnx `State`s of `Param`s keep the model's logical-axis
metadata, so `dit_jax.sharding.state_shardings` lays the parameters, the EMA and the Adam moments
out identically). The model's graph (`graphdef`) and its fixed buffers (the sin-cos position
table) live outside the state: they never change and are not checkpointed.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from dit_jax.models.dit import BLOCK_TYPES, DIT_CONFIGS, DiT, DiTConfig, split_model
from dit_jax.sharding import place, state_shardings

# Independent streams derived from the run seed (the data order uses the seed directly).
_INIT_STREAM, _STEP_STREAM = 0, 1


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: the number of updates applied
    params: nnx.State  # float32 master weights
    ema: nnx.State  # float32, same layout as params
    opt_state: Any
    rng: jax.Array  # uint32 key data; the key of step s is fold_in(rng, s)


# --------------------------------------------------------------------------------------------
# The model of a run


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def model_config_from(config, *, num_classes: int, in_channels: int, input_size: int
                      ) -> DiTConfig:
    """The DiTConfig of a training config: the named official size (`model.name`, e.g.
    "DiT-XL/2") with any of hidden_size/depth/num_heads/patch_size replacing it, or those four
    alone when the name is empty. The input (side, channels) and class count come from the data."""
    m = config.model
    fields: dict[str, Any] = {}
    if m.name:
        if m.name not in DIT_CONFIGS:
            raise ValueError(f"unknown model {m.name!r}; choose one of {sorted(DIT_CONFIGS)}")
        fields.update(DIT_CONFIGS[m.name])
    for key in ("hidden_size", "depth", "num_heads", "patch_size"):
        if m[key] is not None:
            fields[key] = int(m[key])
    missing = [k for k in ("hidden_size", "depth", "num_heads", "patch_size") if k not in fields]
    if missing:
        raise ValueError(f"model.name is empty, so model.{', model.'.join(missing)} must be set")
    block = m.get("block", "adaln_zero")
    if block not in BLOCK_TYPES:
        raise ValueError(f"model.block must be one of {BLOCK_TYPES}, got {block!r}")
    if m.dtype not in _DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {m.dtype!r}")
    return DiTConfig(
        input_size=input_size, in_channels=in_channels, num_classes=num_classes,
        class_dropout_prob=float(m.class_dropout_prob), learn_sigma=bool(m.learn_sigma),
        dtype=_DTYPES[m.dtype], attention_impl=m.attention_impl, remat=parse_remat(m.remat),
        scan_blocks=bool(m.scan_blocks), block=block, **fields)


def parse_remat(value: str) -> bool | str:
    """The config's `model.remat` ("none", "full" or a jax.checkpoint_policies name) as
    DiTConfig.remat."""
    word = str(value).strip()
    if word == "none":
        return False
    if word == "full":
        return True
    return word  # DiTConfig checks that the policy exists


# --------------------------------------------------------------------------------------------
# Optimiser


def make_schedule(optim, total_steps: int):
    """Learning rate as a function of the update index (0 for the first update)."""
    lr, warmup = float(optim.lr), int(optim.warmup_steps)
    if optim.schedule == "constant":
        base = optax.constant_schedule(lr)
        if warmup > 0:
            base = optax.join_schedules(
                [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    elif optim.schedule == "cosine":
        base = optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=lr, warmup_steps=warmup,
            decay_steps=max(int(total_steps), warmup + 1),
            end_value=lr * float(optim.final_lr_fraction))
    else:
        raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {optim.schedule!r}")
    if warmup == 0:
        return base
    # Warmup from 0 would make the first update a no-op; count it as step 1 of the ramp instead.
    return lambda count: base(count + 1)


def weight_decay_mask(params: nnx.State, kind: str):
    """Which parameters weight decay applies to: "all" (torch AdamW's default) or "matrices"
    (everything but the biases). Decided by name, not rank, so that the stacked blocks of a
    scanned model (biases of shape (depth, D)) are masked like the plain ones."""
    if kind not in ("all", "matrices"):
        raise ValueError(f"optim.weight_decay_mask must be 'all' or 'matrices', got {kind!r}")

    def decays(path, _):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return kind == "all" or names[-1] != "bias"

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim, total_steps: int):
    """(optax transformation, lr schedule). Official recipe by default: AdamW lr 1e-4, betas
    (0.9, 0.999), weight decay 0, constant, no clipping.

    The optimizer state has one tree structure whatever the options (clipping is an identity when
    off, the decay mask is always there), so that a run can resume with clipping or the mask
    changed, which is what one does after a loss spike."""
    schedule = make_schedule(optim, total_steps)
    mask_kind = optim.weight_decay_mask
    weight_decay_mask(nnx.State({"bias": 0.0}), mask_kind)  # a bad name fails here, not in jit
    adamw = optax.adamw(
        schedule, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
        weight_decay=float(optim.weight_decay),
        mask=lambda p: weight_decay_mask(p, mask_kind))
    clip = float(optim.grad_clip or 0.0)
    return optax.chain(optax.clip_by_global_norm(clip) if clip > 0 else optax.identity(),
                       adamw), schedule


def ema_update(ema: nnx.State, params: nnx.State, decay) -> nnx.State:
    """ema ← decay·ema + (1 - decay)·params (the official `update_ema`), in float32."""
    return jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p.astype(e.dtype), ema, params)


# --------------------------------------------------------------------------------------------
# Creating the state on a mesh


def abstract_train_state(cfg: DiTConfig, tx: optax.GradientTransformation):
    _, params, _ = split_model(cfg)
    return jax.eval_shape(lambda p: _new_state(p, tx, jax.random.key(0)), params)


def _new_state(params, tx, key) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                      rng=jax.random.key_data(key))


def check_init_params(spec: str, params, expected) -> None:
    """Raise ValueError (one line) when the `init_from` weights `params` do not have the
    parameter names and shapes of this run's model (`expected`, abstract params): the check of
    every fine-tuning start, class-conditional (DiT) or text (PixArt-α)."""
    def shapes(tree):
        return {jax.tree_util.keystr(k): tuple(v.shape)
                for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

    got, want = shapes(params), shapes(expected)
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:6]
        raise ValueError(f"init_from {spec!r} does not fit the model of this run "
                         f"(first differences, as (name, shape): {diff})")


def create_train_state(cfg: DiTConfig, tx: optax.GradientTransformation, mesh: Mesh, *,
                       seed: int, init_params: nnx.State | None = None) -> TrainState:
    """A fresh state, created directly in its sharded layout (no full copy on any one device).
    `init_params` (fine-tuning) replaces the random initial weights; the EMA starts as a copy of
    the initial weights either way."""
    shardings = state_shardings(abstract_train_state(cfg, tx), mesh)
    root = jax.random.key(seed)
    step_key = jax.random.fold_in(root, _STEP_STREAM)
    if init_params is None:
        def init(key):
            model = DiT(cfg, rngs=nnx.Rngs(jax.random.fold_in(key, _INIT_STREAM)))
            return _new_state(nnx.state(model, nnx.Param), tx, step_key)
        return jax.jit(init, out_shardings=shardings)(root)
    params = place(init_params, shardings.params)
    return jax.jit(lambda p: _new_state(p, tx, step_key), out_shardings=shardings)(params)

