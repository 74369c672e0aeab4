"""What the command lines (train.py, sample.py, `python -m dit_jax.evaluate`, ...) share."""

from __future__ import annotations

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parser, also taking names spelled with dashes (--batch-size as --batch_size),
    the spelling of the README and of most command lines. Pass as `app.run(main,
    flags_parser=parse_flags)`."""
    def underscored(arg):
        if not arg.startswith("--"):
            return arg
        name, eq, value = arg.partition("=")
        return "--" + name[2:].replace("-", "_") + eq + value
    return flags.FLAGS([argv[0], *map(underscored, argv[1:])])
