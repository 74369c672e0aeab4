"""Convert DiT weights between PyTorch and this project's model-checkpoint format.

    python -m dit_jax.port to-jax DiT-XL-2-256x256.pt ckpts/xl2-256 [--name DiT-XL/2 --image-size 256]
    python -m dit_jax.port to-jax facebook/DiT-XL-2-256 ckpts/xl2-256-diffusers
    python -m dit_jax.port to-jax runs/xl2/results/000/checkpoints/0100000.pt ckpts/mine --which model
    python -m dit_jax.port to-torch ckpts/xl2-256 xl2.pt        # or xl2.safetensors
    python -m dit_jax.port to-diffusers ckpts/xl2-256 xl2-diffusers/   # DiTTransformer2DModel folder
    python -m dit_jax.port to-jax last.pt ckpts/repa --kind repa     # REPA, read in SiT's time
    python -m dit_jax.port to-torch ckpts/repa repa.pt --kind repa   # and back to REPA's layout

SRC is anything `dit_jax.port.load_any` reads (.pt/.safetensors file, diffusers folder or hub id,
dit_jax model checkpoint, train.py workdir).
"""

from __future__ import annotations

import argparse
import sys

from dit_jax.checkpoint import save_model
from dit_jax.port import sit
from dit_jax.port.dit import load_any, save_diffusers


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dit_jax.port", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for command, out_help in (("to-jax", "output directory (model_config.json + orbax params)"),
                              ("to-torch", "output file, .pt/.pth or .safetensors (official layout)"),
                              ("to-diffusers", "output folder (config.json + "
                                               "diffusion_pytorch_model.safetensors of a diffusers "
                                               "DiTTransformer2DModel)")):
        sub = commands.add_parser(command)
        sub.add_argument("src", help="checkpoint file, folder, workdir or hub id")
        sub.add_argument("out", help=out_help)
        sub.add_argument("--name", help="official model name to check against, e.g. DiT-XL/2")
        sub.add_argument("--image-size", type=int, help="image size in pixels to check against")
        sub.add_argument("--which", choices=("ema", "model"), default="ema",
                         help="weights of a train.py checkpoint")
        sub.add_argument("--num-heads", type=int, help="heads, for widths outside the official table")
        sub.add_argument("--numerics", choices=("official", "diffusers"),
                         help="default: official, diffusers for diffusers weights")
        sub.add_argument("--num-classes", type=int,
                         help="classes, when a label table of R rows is not R - 1 classes + null")
        sub.add_argument("--class-dropout-prob", type=float,
                         help="0 for a label table without the null-label row (default 0.1)")
        sub.add_argument("--kind", choices=sit.KINDS, default="dit",
                         help="a PyTorch file's kind (to-jax) or the layout written (to-torch): "
                              "dit, sit, or repa (REPA's reversed time; docs/transport.md)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in (("num_heads", args.num_heads), ("numerics", args.numerics),
                                   ("num_classes", args.num_classes),
                                   ("class_dropout_prob", args.class_dropout_prob))
                 if v is not None}
    if args.command == "to-jax" and args.kind != "dit":
        model = sit.from_torch(args.src, kind=args.kind, name=args.name,
                               image_size=args.image_size, which=args.which, **overrides)
    else:
        model = load_any(args.src, name=args.name, image_size=args.image_size, which=args.which,
                         **overrides)
    if args.command == "to-jax":
        path = save_model(args.out, model)
    elif args.command == "to-diffusers":
        path = save_diffusers(model, args.out)
    else:
        path = sit.save_torch(model, args.out, kind=args.kind)
    cfg = model.config
    print(f"wrote {path}: depth {cfg.depth}, width {cfg.hidden_size}, heads {cfg.num_heads}, patch "
          f"{cfg.patch_size}, input {cfg.input_size}, numerics {cfg.numerics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
