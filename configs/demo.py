"""A small pixel-space DiT on the built-in procedural shapes data: trains on a laptop CPU in a
few minutes and draws the requested shapes in its sample grids.

    python train.py --config=configs/demo.py --workdir=runs/demo

Four classes (red circle, green square, blue triangle, yellow diamond; dit_jax.data.builtin),
32×32 pixels, DiT with 64 tokens (patch 4), hidden 96, depth 3: about 0.5M parameters. What
differs from the ImageNet recipe is what a short pixel-space run needs (docs/small_data.md has
the measurements): the model predicts the clean image x0 on the cosine schedule, with a fixed
variance (ε-prediction on the linear schedule, the official choice for latents, learns the
colours but draws round blobs for every class in this budget); a higher learning rate with
warmup and cosine decay; a short EMA horizon; x̂0 clipped to the pixel range while sampling.
Every sample grid is judged by `dit_jax.data` (shape_accuracy: the requested shape;
shape_score: that and clean edges, colour and background), both logged.

4800 steps with EMA 0.995 (about 510 s of CPU, about 4.5 minutes on 2 quiet cores): all of 64
guided samples show the requested shape, on clean backgrounds with smooth interiors. Guidance
is applied only at timesteps 300..999: guiding the last, low-noise steps too turned the
x̂0 model's small errors into speckle (shape_score 0, template fit median 0.83); guided in that
interval, 42% of 64 samples pass the strict shape_score (fit median 0.89). What still fails is
ragged outlines (notched square edges, spurs on diamonds). To draw more samples like the grids
(sample.py takes the guidance interval, like the run's other settings, from the workdir):

    python sample.py --ckpt=runs/demo --labels=circle,square,triangle,diamond \\
        --sampler=ddim --steps=25

docs/small_data.md has the measurements.
"""

import ml_collections

from configs.small import pixel_recipe


def get_config() -> ml_collections.ConfigDict:
    c = pixel_recipe()
    c.total_steps = 4800
    c.checkpoint_every = 1200
    c.sample_every = 2400
    c.optim.ema_decay = 0.995  # a short run needs a short EMA horizon (~200 steps of 4800)

    c.data.source = "builtin"

    c.sample.num_images = 16
    c.sample.cfg_scale = 4.0
    # Guide only while the layout is decided (timesteps 300..999): below that, guidance only
    # amplifies the difference of two imperfect x̂0 predictions into speckle (docs/small_data.md).
    c.sample.guidance_interval = (300, 999)
    c.sample.steps = 25
    return c
