"""A small pixel-space DiT on the built-in procedural shapes data: trains on a laptop CPU in
minutes and shows the requested classes in its sample grids.

    python train.py --config=configs/demo.py --workdir=runs/demo
"""

import ml_collections

from configs.dit import base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.total_steps = 600
    c.global_batch_size = 32
    c.log_every = 25
    c.checkpoint_every = 200
    c.sample_every = 200

    c.model.name = ""
    c.model.hidden_size = 128
    c.model.depth = 4
    c.model.num_heads = 4
    c.model.patch_size = 4
    c.model.num_classes = -1  # follow the data
    c.model.dtype = "float32"

    c.optim.lr = 1e-3
    c.optim.ema_decay = 0.99  # a short run needs a short EMA horizon
    c.optim.warmup_steps = 50
    c.optim.schedule = "cosine"

    c.data.source = "builtin"
    c.data.image_size = 32
    c.vae = "none"

    c.sample.num_images = 16
    c.sample.cfg_scale = 2.0
    c.sample.sampler = "ddim"
    c.sample.steps = 25
    return c
