"""Fine-tuning PixArt-α on your captioned images (docs/pixart.md#fine-tuning-with-trainpy).

    # once: VAE latents and the frozen T5's caption embeddings (120 tokens, as PixArt-α reads)
    python -m dit_jax.extract_latents --data=IMAGES --out=LATENTS --image-size=512 \\
        --vae=stabilityai/sd-vae-ft-ema --captions --text-encoder=PixArt-alpha/PixArt-XL-2-512x512
    python train.py --config=configs/pixart_finetune.py --workdir=runs/pixart_ft \\
        --config.data.path=LATENTS --config.init_from=PixArt-alpha/PixArt-XL-2-512x512
    python sample.py --ckpt=runs/pixart_ft --prompt="a watercolor lighthouse at dusk"

`init_from` is anything `dit_jax.port.load_pixart` reads (a diffusers PixArtTransformer2DModel or
pipeline folder, a hub id, an original .pth). The model (depth, width, heads, patch, learned
sigma, caption width, micro-conditions, position scale) is the one in those weights; the run
starts from them exactly (the EMA too). The latents must be what it reads: its latent channels
and size (data.image_size = latent side × 8), and T5 embeddings of its caption width. The text
length and width come from the latents' text_manifest.json, which also names the T5: the run's
config.json records it (text.t5), and sample.py encodes prompts with it.

The recipe. From the PixArt-α paper (Chen et al. 2023, training details): AdamW with weight
decay 0.03 and a constant learning rate 2e-5; caption dropout 0.1 to the null caption for
classifier-free guidance. From the released training configs (PixArt-alpha repository, its
512 px configs): gradient clipping at global norm 0.01, AdamW eps 1e-10, EMA rate 0.9999, every
parameter decayed (PyTorch's AdamW). Our choices: batch 32, no warmup, 10,000 steps, bfloat16
matmuls with float32 weights, no sample grids during training (they would need T5 in the
training job; sample with sample.py), and the sampling defaults of diffusers'
PixArtAlphaPipeline for sample.py (DPM-Solver++ 20 steps, guidance 4.5).

The null caption of caption dropout is this project's fixed random table (docs/text.md), not the
original's: diffusers checkpoints do not store theirs. The fine-tune learns it as its
unconditional input; `sample.py --negative-prompt=""` guides against T5's empty prompt instead,
as diffusers' pipeline does.
"""

import ml_collections

from configs.dit import base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.init_from = ""  # required: the PixArt-α to fine-tune
    c.total_steps = 10_000
    c.global_batch_size = 32
    c.log_every = 50
    c.checkpoint_every = 1000
    c.sample_every = 0

    c.model.name = ""  # the size comes from init_from's weights
    c.model.condition = "text"
    c.model.num_classes = 0

    c.text.encoder = "none"  # a frozen T5's embeddings, extracted once
    c.text.max_length = 0  # from the latents' text_manifest.json
    c.text.caption_channels = 0  # idem (T5-XXL: 4096)
    c.text.caption_dropout = 0.1  # paper
    c.text.pooled_text = False  # not in PixArt-α

    c.data.source = "latents"
    c.data.image_size = 512  # PixArt-XL-2-512x512 (1024 for -1024-MS)
    c.vae = "stabilityai/sd-vae-ft-ema"  # PixArt-α's VAE

    c.optim.lr = 2e-5  # paper
    c.optim.schedule = "constant"  # paper
    c.optim.warmup_steps = 0  # ours
    c.optim.weight_decay = 3e-2  # paper
    c.optim.weight_decay_mask = "all"  # released code: PyTorch AdamW on every parameter
    c.optim.eps = 1e-10  # released configs
    c.optim.grad_clip = 0.01  # released configs (gradient_clip)
    c.optim.ema_decay = 0.9999  # released configs (ema_rate)

    # diffusers' PixArtAlphaPipeline defaults, for sample.py --ckpt=WORKDIR --prompt=...
    c.sample.sampler = "dpm++"
    c.sample.steps = 20
    c.sample.cfg_scale = 4.5
    return c
