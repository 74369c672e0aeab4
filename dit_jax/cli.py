"""One convention for every command line: train.py, sample.py and `python -m dit_jax.port`,
`dit_jax.extract_latents`, `dit_jax.evaluate`, `dit_jax.plan`.

- absl flags (ml_collections config flags where a config exists); names with dashes or underscores
  (--batch-size = --batch_size), `--name=value` or `--name value`.
- `--help` prints the entry point's module doc (its examples) and its flags.
- A user error (a missing file, a bad value, a misspelt config key, an unreadable checkpoint)
  prints one line, `PROGRAM: error: MESSAGE`, and exits with status 1; `--verbose` shows the
  traceback instead (and the INFO logs of other libraries).
- Other libraries' INFO logs (orbax writes a line per file it touches, JAX its backend probes)
  are kept off the console; this project's messages stay.

train.py, sample.py, evaluate and plan parse absl's global FLAGS through `app.run`; the ports and
the latent extractor keep their flags in a FlagValues of their own (their `main(argv)` is also
called as a function, next to sample.py's global flags), parsed by `run(main, flag_values=...)`.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from absl import app, flags
from absl import logging as absl_logging

# Exceptions that describe a mistake in the command (or in its inputs), not a bug: one line.
USER_ERRORS = (app.UsageError, ValueError, KeyError, OSError, ImportError, FloatingPointError,
               RuntimeError)

_OWN_CODE = str(Path(__file__).resolve().parent)  # dit_jax/
HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull", "-?")


def define_common_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if "verbose" not in flag_values:
        flags.DEFINE_bool("verbose", False, "on an error, print the traceback (not just its "
                          "message), and keep other libraries' INFO logs",
                          flag_values=flag_values)


define_common_flags()


def define_distributed_flag() -> None:
    """--distributed, shared by the global-FLAGS entry points (train.py and sample.py both define
    it; tests import both into one process)."""
    if "distributed" not in flags.FLAGS:
        flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                          "call jax.distributed.initialize: auto = when launched as several "
                          "processes")
    caller = sys._getframe(1).f_globals.get("__name__", "__main__")
    flags.FLAGS.register_key_flag_for_module(caller, flags.FLAGS["distributed"])


def program_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:  # python -m dit_jax.port
        name = spec.name.removesuffix(".__main__")
        return f"python -m {name}"
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "dit_jax"


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl's flag parser, also taking names spelled with dashes (--batch-size as --batch_size,
    --no-progress as --noprogress), the spelling of the README and of most command lines. Returns the positional arguments
    (argv[0] first). A bad flag (unknown name, bad value, a config key that does not exist) raises
    app.UsageError with one line naming it."""
    def underscored(arg):
        if not arg.startswith("--"):
            return arg
        name, eq, value = arg.partition("=")
        name = name[2:].replace("-", "_")
        if name.startswith("no_") and name not in flag_values and not eq:
            flag = flag_values[name[3:]] if name[3:] in flag_values else None
            if flag is not None and flag.boolean:  # --no-progress: absl's --noprogress
                name = "no" + name[3:]
        return "--" + name + eq + value

    argv = [argv[0], *map(underscored, argv[1:])]
    try:
        return flag_values(argv)
    except flags.Error as err:
        raise app.UsageError(_one_line(str(err))) from err
    except (AttributeError, KeyError) as err:  # ml_collections: --config.<key> that is not there
        raise app.UsageError(_config_key_error(err, argv)) from err


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _config_key_error(err: Exception, argv: Sequence[str]) -> str:
    # ml_collections nests the message: "'lrr'\nDid you mean "lr" instead of "lrr"?", quoted again
    # by each KeyError/AttributeError it passes through.
    text = err
    while isinstance(text, BaseException):  # AttributeError(KeyError(message))
        text = text.args[0] if text.args else ""
    text = str(text)
    while isinstance(text, str) and len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    text = str(text).replace("\\n", "\n").replace("\\'", "'")
    key = re.match(r"'?([\w.]+)'?", text)
    hint = re.search(r'Did you mean "([\w.]+)"', text)
    name = key.group(1) if key else text.splitlines()[0]
    flag = next((a.partition("=")[0] for a in argv
                 if a.startswith("--") and re.search(rf"\.{re.escape(name)}(\.|=|$)", a)), None)
    message = f"{flag or '--config'}: the config has no key {name!r}"
    if hint:
        message += f" (did you mean {hint.group(1)!r}?)"
    return message + "; `--helpfull` lists the flags, the config file lists its keys"


def quiet_third_party(verbose: bool = False) -> None:
    """Keep other libraries' INFO/DEBUG records (orbax's per-file lines, JAX's backend probes) off
    the console, and this project's INFO messages on it. With `verbose`, everything shows."""
    logging.getLogger("dit_jax").setLevel(logging.INFO)
    if verbose:
        return
    absl_logging.set_verbosity(absl_logging.INFO)  # filtered below instead, by origin
    # "An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib is not installed"
    # and the like: a fact about the machine, not about this run.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
    handlers = logging.getLogger().handlers or [absl_logging.get_absl_handler()]
    for handler in handlers:
        if not any(isinstance(f, _OwnInfoFilter) for f in handler.filters):
            handler.addFilter(_OwnInfoFilter())


# Libraries whose warnings describe their own bookkeeping, not the run (orbax: "Given directory
# is read only" for every checkpoint a sampler opens): errors only.
_CHATTY = ("/orbax/",)


class _OwnInfoFilter(logging.Filter):
    """Passes warnings and errors (other than _CHATTY libraries' warnings), and INFO records of
    this project's code (the package and the script that was run)."""

    def __init__(self):
        super().__init__()
        self.script = str(Path(sys.argv[0]).resolve()) if sys.argv and sys.argv[0] else None

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname or ""
        if record.levelno >= logging.WARNING:
            return record.levelno >= logging.ERROR or not any(c in path for c in _CHATTY)
        return path.startswith(_OWN_CODE) or path == self.script


def guard(main: Callable, flag_values: flags.FlagValues = flags.FLAGS) -> Callable:
    """`main` with the user errors it raises printed as one line (exit status 1); with --verbose,
    raised as they are."""
    def guarded(argv):
        verbose = flag_values["verbose"].value if "verbose" in flag_values else False
        quiet_third_party(verbose)
        try:
            return main(argv)
        except USER_ERRORS as err:
            if verbose:
                raise
            fail(err)
    return guarded


def fail(err: BaseException | str, status: int = 1) -> NoReturn:
    """Print `err` as one line on stderr and exit with `status`."""
    if isinstance(err, KeyError) and err.args:
        message = str(err.args[0])
    else:
        message = str(err) or type(err).__name__
    hint = "" if isinstance(err, (str, app.UsageError)) else " (--verbose shows the traceback)"
    sys.stderr.write(f"{program_name()}: error: {_one_line(message)}{hint}\n")
    sys.stderr.flush()
    sys.exit(status)


def run(main: Callable, *, flag_values: flags.FlagValues | None = None) -> NoReturn:
    """Run the entry point `main(argv)` under the conventions above. With the global FLAGS
    (flag_values None) absl's app runs it (argv: the positional arguments, program first); with a
    FlagValues of its own, `main` gets the raw arguments (without the program) and parses them
    with `parse_flags(..., flag_values)`."""
    args = sys.argv[1:]
    if flag_values is None:
        if any(a in HELP_FLAGS for a in args):  # absl's own --help exits with status 1
            app.usage(shorthelp="--helpfull" not in args, writeto_stdout=True, exitcode=0)

        def parser(argv):
            try:
                return parse_flags(argv)
            except app.UsageError as err:
                fail(err)
        app.run(guard(main), flags_parser=parser)
    define_common_flags(flag_values)
    if any(a in HELP_FLAGS for a in args):
        print(usage(flag_values))
        sys.exit(0)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # --verbose must count before the full parse (which may fail): read it first.
    flag_values["verbose"].parse("--verbose" in args or "--verbose=true" in args)
    sys.exit(guard(main, flag_values)(args))


def usage(flag_values: flags.FlagValues) -> str:
    doc = (sys.modules["__main__"].__doc__ or "").strip()
    return (f"{doc}\n\nflags:\n" + flag_values.get_help(include_special_flags=False)).rstrip()
