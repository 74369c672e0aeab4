"""The train step: one update of the parameters, the optimiser state and the EMA, as a pure
function of (state, buffers, batch), compiled once with `jax.jit` over the mesh.

Everything random in a step (timesteps, noise, label dropout) is drawn for the whole global
batch from fold_in(rng, step) before the batch is split into microbatches, so a step's result
does not depend on the mesh, on the number of hosts, or on the number of microbatches (JAX's
partitionable threefry draws the same bits whatever the sharding).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from dit_jax import transport as flow
from dit_jax.diffusion import training_losses
from dit_jax.models.sit import sit_forward
from dit_jax.sharding import (abstract_with_shardings, batch_sharding, microbatch_sharding,
                              replicated, state_shardings)
from dit_jax.train.state import TrainState, ema_update


@dataclasses.dataclass(frozen=True)
class StepConfig:
    ema_decay: float
    accum_steps: int = 1


def make_train_step(graphdef, diffusion, tx: optax.GradientTransformation, schedule: Callable,
                    step_config: StepConfig, mesh: Mesh, encoder: Callable | None = None
                    ) -> Callable:
    """`train_step(state, buffers, batch) -> (state, metrics)`, not yet jitted.

    diffusion: the GaussianDiffusion of the official objective, or a `dit_jax.transport.Transport`
    for SiT's (the model then read with `sit_forward`, t drawn by `sample_t`).

    batch: {"x": (B, H, W, C) float32, "y": (B,) int32}, sharded over (data, fsdp).
    metrics: batch means of the loss and its terms, the global gradient norm (before clipping)
    and the learning rate of this update.
    encoder: `encoder(vae_weights, images, noise) -> latents` to train on images encoded inside
    the step (the posterior mean + std · noise, × scaling factor, as released); `buffers` is then
    the pair (model buffers, VAE weights). Each microbatch is encoded on its own, so the VAE's
    activations scale with the microbatch, not the batch; the posterior noise is drawn for the
    whole batch, so accumulation does not change the draws.
    """
    k = step_config.accum_steps

    def microbatch_grads(params, buffers, micro):
        if encoder is not None:
            buffers, vae_weights = buffers
            micro = {**micro, "x": encoder(vae_weights, micro["x"], micro["posterior_noise"])}

        def loss_fn(p):
            model = nnx.merge(graphdef, p, buffers)
            # Labels were already dropped for the whole batch, so no dropout inside the model.
            if isinstance(diffusion, flow.Transport):  # SiT's objective: t in [0, 1]
                model_fn = lambda x_t, t: sit_forward(model, x_t, t, micro["y"])  # noqa: E731
                terms = flow.training_losses(diffusion, model_fn, micro["x"], micro["t"],
                                             micro["noise"])
            else:
                model_fn = lambda x_t, t: model(x_t, t, micro["y"], train=False)  # noqa: E731
                terms = training_losses(diffusion, model_fn, micro["x"], micro["t"],
                                        micro["noise"])
            return jnp.mean(terms["loss"]), terms
        (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, terms

    def train_step(state: TrainState, buffers, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        t_key, noise_key, drop_key = jax.random.split(key, 3)
        x, y = batch["x"], batch["y"]
        model_buffers = buffers[0] if encoder is not None else buffers
        latent_shape = (jax.eval_shape(encoder, buffers[1], x, None).shape
                        if encoder is not None else x.shape)
        n = x.shape[0]
        inputs = {
            "x": x,  # images when encoded here, else what the model sees
            "y": _drop_labels(graphdef, state.params, model_buffers, y, drop_key),
            "t": (flow.sample_t(diffusion, t_key, n) if isinstance(diffusion, flow.Transport)
                  else jax.random.randint(t_key, (n,), 0, diffusion.num_timesteps, jnp.int32)),
            "noise": jax.random.normal(noise_key, latent_shape, jnp.float32),
        }
        if encoder is not None:
            # A stream of its own: the other draws stay those of a run on extracted latents.
            inputs["posterior_noise"] = jax.random.normal(jax.random.fold_in(key, 3), latent_shape,
                                                          jnp.float32)
        if k == 1:
            grads, terms = microbatch_grads(state.params, buffers, inputs)
        else:
            # Microbatch j takes rows j, j+k, j+2k, …: each is spread over all devices like the
            # full batch, so every device stays busy in every microbatch.
            micro = jax.tree.map(lambda a: _strided_split(a, k, mesh), inputs)

            def body(acc, mb):
                g, terms = microbatch_grads(state.params, buffers, mb)
                return jax.tree.map(jnp.add, acc, g), terms

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grads, terms = jax.lax.scan(body, zeros, micro)
            grads = jax.tree.map(lambda g: g / k, grads)
            terms = jax.tree.map(lambda a: a.reshape(-1), terms)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state,
            ema=ema_update(state.ema, params, step_config.ema_decay))
        metrics = {name: jnp.mean(terms[name]) for name in ("loss", "mse", "vb") if name in terms}
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        return new_state, metrics

    return train_step


def _drop_labels(graphdef, params, buffers, y, key):
    """Classifier-free-guidance label dropout with the model's own rule (null class
    num_classes with probability class_dropout_prob), drawn for the whole batch."""
    model = nnx.merge(graphdef, params, buffers)
    if model.y_embedder is None or model.y_embedder.dropout_prob <= 0:
        return y
    return model.y_embedder.drop_labels(y, key)


def _strided_split(a: jax.Array, k: int, mesh: Mesh) -> jax.Array:
    n = a.shape[0]
    if n % k:
        raise ValueError(f"batch of {n} cannot be split into {k} microbatches")
    out = a.reshape((n // k, k) + a.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(out, microbatch_sharding(mesh, out.ndim))


def jit_train_step(train_step: Callable, state_shardings, buffer_shardings, mesh: Mesh,
                   batch_ndim: int = 4):
    """The step compiled for these shardings; the old state is donated to the new one."""
    batch_shardings = {"x": batch_sharding(mesh, batch_ndim), "y": batch_sharding(mesh, 1)}
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, buffer_shardings, batch_shardings),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,))


def lower_train_step(graphdef, diffusion, tx: optax.GradientTransformation, schedule: Callable,
                     step_config: StepConfig, mesh: Mesh, *, abstract_state, buffers,
                     element_shape: tuple[int, ...], global_batch: int,
                     encoder: Callable | None = None):
    """The train step lowered for these shapes and shardings (`.compile()` it): the one builder of
    the train loop and the benchmarks. `abstract_state` is the train state's shapes (its
    shardings follow from the model's logical axes), `buffers` those of the fixed model variables
    (with an encoder: the pair (model buffers, VAE weights)); they may be concrete arrays.
    Returns (lowered step, state shardings, buffer shardings)."""
    shardings = state_shardings(abstract_state, mesh)
    buffer_shardings = state_shardings(buffers, mesh)
    step = jit_train_step(
        make_train_step(graphdef, diffusion, tx, schedule, step_config, mesh, encoder=encoder),
        shardings, buffer_shardings, mesh, batch_ndim=1 + len(element_shape))
    x_shape = (global_batch,) + tuple(element_shape)
    batch = {"x": jax.ShapeDtypeStruct(x_shape, jnp.float32,
                                       sharding=batch_sharding(mesh, len(x_shape))),
             "y": jax.ShapeDtypeStruct((global_batch,), jnp.int32,
                                       sharding=batch_sharding(mesh, 1))}
    lowered = step.lower(abstract_with_shardings(abstract_state, shardings),
                         abstract_with_shardings(buffers, buffer_shardings), batch)
    return lowered, shardings, buffer_shardings
