"""Training config for the twelve official DiTs, official recipe as defaults
(docs/numerics.md#training-recipe).

    python train.py --config=configs/dit.py:XL/2 --workdir=runs/xl2 --config.data.path=/data/latents
    python train.py --config=configs/dit.py:XL/2 --config.data.image_size=512 ...
"""

import ml_collections

from dit_jax.models.dit import DIT_CONFIGS


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 7_000_000  # XL/2 at 256 px in the paper (3M at 512 px)
    c.global_batch_size = 256
    c.log_every = 100
    c.checkpoint_every = 50_000
    c.sample_every = 10_000
    c.keep_checkpoints = 3  # the most recent N are kept ...
    c.keep_every = 0  # ... plus every Kth step forever (0: none)
    c.async_checkpointing = True  # write checkpoints in the background while training goes on
    # Fine-tuning: initial weights from anything dit_jax.port.load_any reads (an official .pt,
    # a diffusers folder or hub id, a dit_jax model checkpoint, a train.py workdir's EMA); for
    # model.condition="text", a PixArt-α that dit_jax.port.load_pixart reads
    # (configs/pixart_finetune.py).
    c.init_from = ""
    # A CPU-only machine as one single-threaded JAX device per core (-1), N devices, or JAX's one
    # multi-threaded device (0); no effect on GPUs and TPUs (dit_jax.distributed.split_cpu).
    c.cpu_devices = 0
    c.peak_tflops = 0.0  # per-device peak for MFU; 0: from the table in dit_jax.flops

    c.model = ml_collections.ConfigDict()
    c.model.name = "DiT-XL/2"
    c.model.num_classes = -1  # -1: the data's class count (1000 for ImageNet); 0: unconditional
    c.model.class_dropout_prob = 0.1
    c.model.learn_sigma = True
    c.model.dtype = "bfloat16"  # compute dtype; parameters stay float32
    # "auto": splash on TPUs, cuDNN flash attention on NVIDIA GPUs (16-bit), XLA elsewhere; or
    # "xla", "cudnn", "splash" to choose one.
    c.model.attention_impl = "auto"
    # Rematerialisation per block: "none", "full" (recompute everything in the backward pass), or a
    # jax.checkpoint_policies name that keeps some results, e.g. "dots_with_no_batch_dims_saveable".
    c.model.remat = "none"
    # One stacked block scanned depth times. On TPUs the XL/2 step then compiles 4-5× faster (for
    # a v5e-256 slice: ~30 s of CPU time instead of minutes) with the same memory; but the GPU
    # compiler partitions the scanned form badly under fsdp (XL/2 on 8 H100s, batch 256: 151 GiB
    # per GPU instead of 19 GiB, see BENCHMARKS.md), so it stays off by default: set it for TPUs.
    c.model.scan_blocks = False
    # How the blocks are conditioned on (t, y): "adaln_zero" (the released model), or one of the
    # paper's other three, never released: "adaln", "cross_attention", "in_context"
    # (docs/blocks.md). Official weights exist only for "adaln_zero".
    c.model.block = "adaln_zero"
    # Plain hyper-parameters for custom sizes; used when name is "" (None means: from name).
    c.model.hidden_size = ml_collections.FieldReference(None, field_type=int)
    c.model.depth = ml_collections.FieldReference(None, field_type=int)
    c.model.num_heads = ml_collections.FieldReference(None, field_type=int)
    c.model.patch_size = ml_collections.FieldReference(None, field_type=int)
    c.model.condition = "class"  # or "text": captions, PixArt-α blocks (docs/text.md)

    # model.condition="text" only (docs/text.md).
    c.text = ml_collections.ConfigDict()
    c.text.encoder = "t5"  # "t5": a small T5 encoder trained with the model; "none": embeddings
    c.text.max_length = 120  # text tokens (and the null caption's length); 0: from the data
    c.text.caption_channels = 4096  # the encoder's width (T5-XXL: 4096); 0: from the data
    # text.encoder="none": the frozen T5 (folder or hub id, with its tokenizer) whose embeddings
    # the latents hold. "": as their text_manifest.json names it (filled in at train time, so
    # the run's config.json records it and sample.py --prompt encodes prompts with it).
    c.text.t5 = ""
    c.text.caption_dropout = 0.1  # rate of the null caption in training (PixArt-α: 0.1)
    c.text.encoder_layers = 2  # the jointly trained encoder's size
    c.text.encoder_heads = 4
    c.text.encoder_head_dim = 16
    c.text.encoder_ff = 128
    c.text.pooled_text = False  # also the pooled caption into the modulation (docs/text.md)
    c.text.prompts = []  # the sample grids' prompts
    c.text.negative_prompt = ""  # the grids' unconditional branch ("": the null caption)

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.noise_schedule = "linear"
    c.diffusion.diffusion_steps = 1000
    # What the model predicts: "epsilon" (DiT), or "start_x" / "velocity" (v = sqrt(ᾱ)·ε -
    # sqrt(1-ᾱ)·x0), which learn global structure faster in small pixel-space runs
    # (docs/small_data.md). Not in the official release.
    c.diffusion.prediction = "epsilon"
    # Min-SNR-γ loss weighting (0: off, the official uniform MSE); 5 is the paper's choice.
    c.diffusion.min_snr_gamma = 0.0

    # "diffusion": the official DiT objective; "transport": SiT's flow matching (docs/transport.md)
    c.objective = "diffusion"
    c.transport = ml_collections.ConfigDict()
    c.transport.path_type = "Linear"  # "Linear" | "GVP" | "VP"
    c.transport.prediction = "velocity"  # "velocity" | "noise" | "score"
    c.transport.loss_weight = "none"  # "none" | "velocity" | "likelihood" (noise/score only)
    c.transport.t_sampling = "uniform"  # "uniform" (as released) | "logit_normal"
    c.transport.sampler = "ode-heun"  # the sample grids' sampler (steps: sample.steps)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.schedule = "constant"  # or "cosine" (warmup + cosine decay at total_steps)
    c.optim.warmup_steps = 0  # linear warmup (either schedule)
    c.optim.final_lr_fraction = 0.0  # cosine: the lr at total_steps, as a fraction of lr
    c.optim.weight_decay_mask = "all"  # or "matrices": no decay on biases
    c.optim.grad_clip = 0.0  # global-norm clipping; 0 disables
    c.optim.accum_steps = 1  # microbatches per step (gradient accumulation inside the step)
    c.optim.ema_decay = 0.9999

    c.data = ml_collections.ConfigDict()
    c.data.source = "latents"  # "builtin" | "synthetic" | "folder" | "latents"
    c.data.path = ""
    c.data.layout = "auto"  # folder source: "auto" | "classes" (a subfolder each) | "flat" (no labels)
    c.data.random_flip = True  # folder source: the released random horizontal flip
    c.data.image_size = 256
    c.data.num_workers = 4
    c.data.num_examples = 0  # size of the builtin / synthetic data (0: the source's default)
    c.data.dataset_seed = 0  # content of the builtin / synthetic data (the order uses `seed`)

    # A diffusers-format VAE folder or hub id; "none" trains in pixel space.
    c.vae = "stabilityai/sd-vae-ft-ema"

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.sample = ml_collections.ConfigDict()
    c.sample.num_images = 16
    c.sample.cfg_scale = 4.0
    c.sample.sampler = "ddim"  # a dit_jax.samplers name: "ddpm", "ddim", "dpm++"
    c.sample.steps = 50
    # Clip x̂0 to [-1, 1] while sampling (ADM's clip_denoised): for pixel-space models only; the
    # official DiT samples latents unclipped.
    c.sample.clip_denoised = False

    # FID of EMA samples during training (docs/evaluation.md): every `every` steps (0: never),
    # `num_samples` drawn with the sample grids' settings above, against `reference` (an ADM
    # reference batch .npz or an image folder); logged as "fid" to log.jsonl and TensorBoard.
    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0
    c.eval.num_samples = 10_000
    c.eval.reference = ""
    c.eval.inception_weights = ""  # default: the cache, else downloaded
    c.eval.batch_size = 256  # samples per sampling chunk and Inception batch, over all devices
    return c


def get_config(name: str = "XL/2") -> ml_collections.ConfigDict:
    c = base_config()
    full = name if name.startswith("DiT-") else f"DiT-{name}"
    if full not in DIT_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of "
                         f"{sorted(n.removeprefix('DiT-') for n in DIT_CONFIGS)}")
    c.model.name = full
    return c
