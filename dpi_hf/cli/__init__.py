"""The ``dpi-hf`` command line: a thin dispatcher over one small module per verb.

Each verb module (``dpi_hf/cli/<verb>.py``) declares its verb once, as ``VERB``, a
:class:`~dpi_hf.cli.common.Verb` (name, help texts, its arguments, its ``run(args, extra) -> int`` and whether
unparsed ``--FIELD VALUE`` tokens are recipe overrides); :data:`VERBS` lists the modules in ``--help`` order. Adding a
verb is one module and one entry in :data:`VERBS`.

Every command turns bad input (a missing file, invalid YAML, an unknown key, a missing offline model, ...) into one
line on stderr naming the problem and the fix, and exit status 2; a diverged probe exits with status 3 and
interruption with 130. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .output import install_noise_filters, one_line, setup_output

install_noise_filters()  # first: before any import below or any verb can import TRL (and with it bitsandbytes)

from ..core.errors import DPIConfigError, ProbeDivergedError  # noqa: E402
from .push import PUSH_IGNORE  # noqa: E402,F401  (kept importable as dpi_hf.cli.PUSH_IGNORE)

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
# the verb modules under dpi_hf/cli/, in --help order (each names its verb: NAME)
VERBS = ("train", "probe", "plan", "inspect_cores", "push", "merge", "compare", "sweep", "sequential",
         "materialize_model")
_EXAMPLES = ("examples:\n  dpi-hf train recipes/quickstart.yaml\n  dpi-hf inspect runs/quickstart\n"
             "  dpi-hf plan runs/quickstart --jaccard-threshold 0.3\n  dpi-hf push runs/quickstart me/my-dpi-model")


def _verbs() -> dict:
    """Verb name → its :class:`~dpi_hf.cli.common.Verb`."""
    verbs = [importlib.import_module(f"{__name__}.{module}").VERB for module in VERBS]
    return {v.name: v for v in verbs}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dpi-hf`` with its subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: `dpi-hf --debug train ...` and `dpi-hf train ... --debug` both work (a subparser's default would
    # otherwise reset the value given before the command)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors instead of the one-line message")
    parser = argparse.ArgumentParser(
        prog="dpi-hf", parents=[common], allow_abbrev=False,
        description="Dynamic Parameter Isolation (DPI) for multi-task supervised fine-tuning on the Hugging Face "
                    "stack. Each command has its own --help.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EXAMPLES,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for verb in _verbs().values():
        verb.add_parser(sub, parents=[common])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``dpi-hf`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    setup_output()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    debug = getattr(args, "debug", False)
    verb = _verbs()[args.command]
    if extra and not verb.takes_overrides:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return verb.run(args, extra)
    except KeyboardInterrupt:
        print("dpi-hf: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ProbeDivergedError as err:
        if debug:
            raise
        print(f"dpi-hf: probe diverged: {one_line(err)}; lower learning_rate (or probe_learning_rate if set), "
              "check the data for empty or corrupt rows, or train in float32.", file=sys.stderr)
        return EXIT_DIVERGED
    except (DPIConfigError, ValueError, OSError) as err:
        if debug:
            raise
        print(f"dpi-hf: error: {one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
