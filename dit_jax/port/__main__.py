"""Convert DiT weights between PyTorch and this project's model-checkpoint format.

    python -m dit_jax.port to-jax DiT-XL-2-256x256.pt ckpts/xl2-256 [--name=DiT-XL/2 --image-size=256]
    python -m dit_jax.port to-jax facebook/DiT-XL-2-256 ckpts/xl2-256-diffusers
    python -m dit_jax.port to-jax runs/xl2/results/000/checkpoints/0100000.pt ckpts/mine --which=model
    python -m dit_jax.port to-torch ckpts/xl2-256 xl2.pt        # or xl2.safetensors
    python -m dit_jax.port to-diffusers ckpts/xl2-256 xl2-diffusers/   # DiTTransformer2DModel folder
    python -m dit_jax.port to-jax last.pt ckpts/repa --kind=repa     # REPA, read in SiT's time
    python -m dit_jax.port to-torch ckpts/repa repa.pt --kind=repa   # and back to REPA's layout

Usage: python -m dit_jax.port COMMAND SRC OUT [flags], COMMAND one of to-jax (OUT: a folder,
model_config.json + orbax params), to-torch (OUT: a .pt/.pth or .safetensors file, the official
layout), to-diffusers (OUT: a folder with config.json + diffusion_pytorch_model.safetensors of a
diffusers DiTTransformer2DModel). SRC is anything `dit_jax.port.load_any` reads (.pt/.safetensors
file, diffusers folder or hub id, dit_jax model checkpoint, train.py workdir). An OUT that exists
(a non-empty folder, a file) is refused unless --overwrite. .safetensors and dit_jax checkpoints
need no PyTorch; .pt files do (pip install -e ".[torch]").
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from absl import app, flags

from dit_jax import cli
from dit_jax.checkpoint import save_model
from dit_jax.port import sit
from dit_jax.port.dit import EMBEDDER_CHOICES, load_any, save_diffusers

COMMANDS = ("to-jax", "to-torch", "to-diffusers")

# A FlagValues of its own: main() also runs as a function next to sample.py's global flags.
FLAGS = flags.FlagValues()
flags.DEFINE_string("name", None, "official model name to check against, e.g. DiT-XL/2",
                    flag_values=FLAGS)
flags.DEFINE_integer("image_size", None, "image size in pixels to check against", flag_values=FLAGS)
flags.DEFINE_enum("which", "ema", ["ema", "model"], "weights of a train.py checkpoint",
                  flag_values=FLAGS)
flags.DEFINE_integer("num_heads", None, "heads, for widths outside the official table",
                     flag_values=FLAGS)
flags.DEFINE_enum("numerics", None, ["official", "diffusers"],
                  "default: official, diffusers for diffusers weights", flag_values=FLAGS)
flags.DEFINE_integer("num_classes", None,
                     "classes, when a label table of R rows is not R - 1 classes + null",
                     flag_values=FLAGS)
flags.DEFINE_float("class_dropout_prob", None,
                   "0 for a label table without the null-label row (default 0.1)",
                   flag_values=FLAGS)
flags.DEFINE_enum("kind", "dit", list(sit.KINDS),
                  "a PyTorch file's kind (to-jax) or the layout written (to-torch): dit, sit, or "
                  "repa (REPA's reversed time; docs/transport.md)", flag_values=FLAGS)
flags.DEFINE_enum("embedders", None, list(EMBEDDER_CHOICES),
                  "diffusers sources whose per-block t/y embedder copies differ: refused by "
                  "default ('same'); 'block0' ports them with block 0's embedders, which computes "
                  "another function than the diffusers model", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "replace an OUT that exists (a non-empty folder or a file)",
                  flag_values=FLAGS)


def check_out(out: str | Path, overwrite: bool) -> None:
    """Refuse to write over anything that is there (a file, a non-empty folder), unless told."""
    path = Path(out)
    if overwrite or not path.exists():
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    raise FileExistsError(f"{out} exists and is not empty: pass --overwrite to replace what it "
                          f"holds, or choose another OUT")


def main(argv: Sequence[str]) -> int:
    """`python -m dit_jax.port COMMAND SRC OUT [flags]`; argv without the program name."""
    FLAGS.unparse_flags()  # a previous call's values must not carry over
    args = cli.parse_flags(["python -m dit_jax.port", *argv], FLAGS)[1:]
    if len(args) != 3 or args[0] not in COMMANDS:
        raise app.UsageError(f"usage: python -m dit_jax.port {{{','.join(COMMANDS)}}} SRC OUT "
                             f"[flags]; got {' '.join(args) or 'no arguments'} (--help: examples)")
    command, src, out = args
    check_out(out, FLAGS.overwrite)
    overrides = {k: FLAGS[k].value for k in ("num_heads", "numerics", "num_classes",
                                            "class_dropout_prob", "embedders")
                 if FLAGS[k].value is not None}
    if command == "to-jax" and FLAGS.kind != "dit":
        model = sit.from_torch(src, kind=FLAGS.kind, name=FLAGS.name, image_size=FLAGS.image_size,
                               which=FLAGS.which, **overrides)
    else:
        model = load_any(src, name=FLAGS.name, image_size=FLAGS.image_size, which=FLAGS.which,
                         **overrides)
    if command == "to-jax":
        path = save_model(out, model)
    elif command == "to-diffusers":
        path = save_diffusers(model, out)
    else:
        path = sit.save_torch(model, out, kind=FLAGS.kind)
    cfg = model.config
    print(f"wrote {path}: depth {cfg.depth}, width {cfg.hidden_size}, heads {cfg.num_heads}, patch "
          f"{cfg.patch_size}, input {cfg.input_size}, numerics {cfg.numerics}")
    return 0


if __name__ == "__main__":
    cli.run(main, flag_values=FLAGS)
