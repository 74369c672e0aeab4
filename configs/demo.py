"""A small pixel-space DiT on the built-in procedural shapes data: trains on a laptop CPU in a
few minutes and draws the requested classes in its sample grids.

    python train.py --config=configs/demo.py --workdir=runs/demo

Four classes (red circle, green square, blue triangle, yellow diamond; dit_jax.data.builtin),
32×32 pixels, DiT with 64 tokens (patch 4), hidden 96, depth 3: about 0.5M parameters. The
official loss, diffusion and sampler; what differs from the ImageNet recipe is what a short run
needs: a higher learning rate with warmup and cosine decay, a short EMA horizon, and x̂0 clipped
to the pixel range while sampling. Class conditioning is the slow part to learn (the label only
matters at high noise, where the loss weighs little): after ~1000 steps the guided samples
(scale 4, the official default for visualisation) show the requested classes.
"""

import ml_collections

from configs.dit import base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.total_steps = 1200
    c.global_batch_size = 16
    c.log_every = 50
    c.checkpoint_every = 400
    c.sample_every = 600

    c.model.name = ""
    c.model.hidden_size = 96
    c.model.depth = 3
    c.model.num_heads = 4
    c.model.patch_size = 4
    c.model.dtype = "float32"  # bfloat16 matmuls are slow on most CPUs
    c.model.scan_blocks = False  # three blocks compile fast unscanned; one Param per block

    c.optim.lr = 3e-3
    c.optim.warmup_steps = 50
    c.optim.schedule = "cosine"
    c.optim.ema_decay = 0.99  # a short run needs a short EMA horizon

    c.data.source = "builtin"
    c.data.image_size = 32
    c.vae = "none"

    c.sample.num_images = 16
    c.sample.cfg_scale = 4.0
    c.sample.sampler = "ddim"
    c.sample.steps = 25
    c.sample.clip_denoised = True  # pixels live in [-1, 1]
    return c
