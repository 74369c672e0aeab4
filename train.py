"""Train a DiT: `python train.py --config=CONFIG --workdir=DIR [--config.key=value ...]`.

    # the demo: a small pixel-space DiT on built-in shapes, minutes on a laptop CPU
    python train.py --config=configs/demo.py --workdir=runs/demo
    # DiT-XL/2 on pre-extracted ImageNet latents, FSDP over 8 devices, a changed learning rate
    python train.py --config=configs/dit.py:XL/2 --workdir=runs/xl2 \\
        --config.data.source=latents --config.data.path=/data/latents256 \\
        --config.mesh.fsdp=8 --config.optim.lr=2e-4
    # resume: the same command again (it continues from the newest checkpoint)
    python train.py --config=configs/demo.py --workdir=runs/demo
    # then sample from the run (its own settings: VAE, image size, schedule, class names)
    python sample.py --ckpt=runs/demo --labels=circle,square
    # fine-tune PixArt-α on captioned latents (extract_latents --captions; docs/pixart.md)
    python train.py --config=configs/pixart_finetune.py --workdir=runs/pixart_ft \\
        --config.data.path=LATENTS --config.init_from=PixArt-alpha/PixArt-XL-2-512x512
    python sample.py --ckpt=runs/pixart_ft --prompt="a lighthouse at dusk"

Running the same command again with the same workdir resumes from its newest checkpoint; a
finished run says so and exits. On several hosts, run the same command on every host (see
docs/launch.md). On a terminal a progress bar shows the run; in a file or a batch log, one plain
line per logged step; at the end, a summary says where the checkpoints, logs and samples are.
Exit status: 0 when total_steps are done, 143 after a preemption save (SIGTERM), 1 on a
non-finite loss or a user error (one line; --verbose for the traceback), 2 when the run cannot
start as asked (a config value, a locked workdir, a resume with another model).
"""

import sys
from pathlib import Path

import jax
from absl import app, flags
from ml_collections import config_flags

from dit_jax import cli
from dit_jax.checkpoint.workdir import CHECKPOINT_DIR
from dit_jax.distributed import initialize_distributed, split_cpu
from dit_jax.train.logging import LOG_FILE, TENSORBOARD_DIR
from dit_jax.train.loop import PREEMPTED_EXIT_CODE, SAMPLES_DIR, SETUP_ERRORS, train

config_flags.DEFINE_config_file("config", None, "training config file (e.g. configs/dit.py:XL/2)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and samples")
cli.define_distributed_flag()
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs)")
flags.DEFINE_integer("num_processes", None, "number of processes (multi-process runs)")
flags.DEFINE_integer("process_id", None, "index of this process (multi-process runs)")
FLAGS = flags.FLAGS


def summary(result: dict, workdir: str, total_steps: int) -> str:
    """The end-of-run lines: what was done, the last loss, where everything is."""
    metrics = result.get("metrics") or {}
    loss = metrics.get("loss")
    loss_text = f", loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
    if result["status"] == "complete":
        head = (f"already complete: {workdir} finished all {total_steps} steps before this run, "
                f"nothing to do (raise --config.total_steps to train further)")
    elif result["status"] == "preempted":
        head = (f"preempted at step {result['step']} of {total_steps}{loss_text}: run the same "
                f"command to resume")
    else:
        head = (f"done: step {result['step']} of {total_steps} (this run: steps "
                f"{result['start']}..{result['step']}){loss_text}")
    lines = [head, f"  checkpoints  {workdir}/{CHECKPOINT_DIR}/",
             f"  logs         {workdir}/{LOG_FILE}, {workdir}/{TENSORBOARD_DIR}/ "
             f"(tensorboard --logdir={workdir}/{TENSORBOARD_DIR})"]
    if (Path(workdir) / SAMPLES_DIR).is_dir():  # none with sample_every=0
        lines.append(f"  samples      {workdir}/{SAMPLES_DIR}/")
    return "\n".join(lines + [f"  sample more: python sample.py --ckpt={workdir}"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {' '.join(argv[1:])}: every setting is a flag "
                             f"(--help: examples)")
    for name in ("config", "workdir"):  # required, checked here: tests import train and sample
        if FLAGS[name].value is None:
            raise app.UsageError(f"--{name} is required, e.g. python train.py "
                                 f"--config=configs/demo.py --workdir=runs/demo (--help: examples)")
    several = initialize_distributed(
        FLAGS.distributed, coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    if not several:
        split_cpu(int(FLAGS.config.get("cpu_devices", 0)), int(FLAGS.config.global_batch_size))
    try:
        result = train(FLAGS.config, FLAGS.workdir)
    except SETUP_ERRORS as err:  # the run cannot start as asked: one line, status 2
        if FLAGS.verbose:
            raise
        cli.fail(err, status=2)
    if jax.process_index() == 0:
        print(summary(result, FLAGS.workdir, int(FLAGS.config.total_steps)), flush=True)
    if result["status"] == "preempted":
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    cli.run(main)
