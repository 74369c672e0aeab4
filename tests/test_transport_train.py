"""Training with SiT's objective (--config.objective=transport) on the built-in shapes: the loss
falls, and the run's sample grids come from a transport sampler."""

import numpy as np
import pytest

from configs import demo
from dit_jax.sampling import SampleRequest, sample
from dit_jax.train import train
from dit_jax.train.logging import read_log


def test_transport_objective_trains_and_draws_grids(tmp_path):
    c = demo.get_config()
    c.model.hidden_size, c.model.depth, c.model.num_heads, c.model.patch_size = 64, 2, 4, 2
    c.data.image_size = 16
    c.global_batch_size = 16
    c.optim.schedule, c.optim.warmup_steps, c.optim.lr = "constant", 0, 1e-3
    c.total_steps = c.checkpoint_every = c.sample_every = 60
    c.log_every = 1
    c.objective = "transport"
    c.transport.t_sampling = "logit_normal"
    c.transport.sampler = "sde-euler"
    c.sample.num_images, c.sample.steps = 8, 5
    workdir = tmp_path / "flow"
    train(c, workdir)
    losses = np.array([row["loss"] for row in read_log(workdir) if "loss" in row])
    assert len(losses) == 60 and np.isfinite(losses).all()
    first, last = losses[:10].mean(), losses[-10:].mean()
    print(f"transport loss {first:.4f} -> {last:.4f}")
    assert last < 0.7 * first
    grid = np.load(workdir / "samples" / "step_0000060.npz")
    assert grid["images"].shape == (8, 16, 16, 3) and grid["images"].dtype == np.uint8
    assert grid["images"].std() > 1  # not a constant image
    np.testing.assert_array_equal(grid["labels"], np.arange(8) % 4)
    # sample.py on the workdir: the run's objective is read from its config.json.
    written = sample(SampleRequest(ckpt=str(workdir), vae="none", labels=(0, 3), sampler="ode-euler",
                                   steps=4, cfg_scale=2.0, out=str(tmp_path / "out")))
    assert written["grid"].is_file() and len(list(written["samples"].glob("*.png"))) == 2
    with pytest.raises(ValueError, match="objective='transport'"):
        sample(SampleRequest(ckpt=str(workdir), vae="none", sampler="ddim", steps=4,
                             out=str(tmp_path / "bad")))


@pytest.mark.long
def test_transport_demo_draws_the_requested_classes(tmp_path):
    """configs/demo.py with SiT's objective (about as long as the diffusion demo): the grids of
    the ODE sampler show the requested classes."""
    from dit_jax.data import classify_image

    c = demo.get_config()
    c.objective = "transport"
    c.transport.sampler = "ode-heun"
    workdir = tmp_path / "flow-demo"
    train(c, workdir)
    losses = [row["loss"] for row in read_log(workdir) if "loss" in row]
    assert losses[-1] < 0.3 * losses[0]
    final = np.load(workdir / "samples" / f"step_{c.total_steps:07d}.npz")
    predicted = np.array([classify_image(image) for image in final["images"]])
    print(f"transport demo: requested {final['labels'].tolist()}, drawn {predicted.tolist()}")
    assert np.mean(predicted == final["labels"]) >= 0.75
