"""What the verbs share: the :class:`Verb` record each verb module declares, reading a finished run, and the
options and output of the recipe-running verbs."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..core.errors import DPIConfigError


@dataclass(frozen=True)
class Verb:
    """One ``dpi-hf`` verb, declared once in its module as ``VERB``.

    Args:
        name: the verb as typed (``dpi-hf NAME``).
        help: the one line ``dpi-hf --help`` shows for it.
        description: the paragraph its own ``--help`` shows.
        arguments: ``arguments(parser)`` adds the verb's own arguments to its parser.
        run: ``run(args, extra) -> exit status``; ``extra`` are the tokens the parser did not know.
        takes_overrides: ``extra`` are recipe overrides (``--FIELD VALUE``); else unknown tokens are an error
            (default False).
        usage: the usage line (default None: argparse's).
        epilog: text after the options (default None).
        raw_text: keep the description's and epilog's line breaks (default False).
    """

    name: str
    help: str
    description: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Sequence[str]], int]
    takes_overrides: bool = False
    usage: Optional[str] = None
    epilog: Optional[str] = None
    raw_text: bool = False

    def add_parser(self, subparsers, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
        """Add this verb to ``subparsers`` (the ``add_subparsers()`` object of the ``dpi-hf`` parser), with the options
        every verb shares (``parents``, e.g. ``--debug``) and no abbreviated options; returns its parser."""
        extra = {"formatter_class": argparse.RawDescriptionHelpFormatter} if self.raw_text else {}
        parser = subparsers.add_parser(self.name, parents=list(parents), allow_abbrev=False, help=self.help,
                                       description=self.description, usage=self.usage, epilog=self.epilog, **extra)
        self.arguments(parser)
        return parser


def load_run_cores(output_dir):
    """``(cores, plan)`` of a finished DPI run (its ``output_dir`` or ``dpi/`` folder), which must hold cores.

    Raises:
        DPIConfigError: the path does not exist, or the run never probed (a baseline).
    """
    from ..artifacts import load_dpi_artifacts

    cores, plan = load_dpi_artifacts(existing_path(output_dir))
    if not cores:
        raise DPIConfigError(f"{output_dir!r} holds a plan but no cores (a baseline run that never probed); "
                             "inspect and plan need the cores of a DPI run.")
    return cores, plan


def existing_path(path) -> str:
    """``path`` if it exists: a missing directory must not be taken for a Hub repo id (no network call)."""
    if not os.path.exists(path):
        raise DPIConfigError(f"{str(path)!r} does not exist; pass the output_dir of a DPI run.")
    return str(path)


def add_seeds_and_resume(parser, section: str, runs: str) -> None:
    """Add ``--seeds S ...`` (default: the recipe's ``<section>.seeds``) and ``--no-resume`` (train again the
    ``runs`` that already finished) to a recipe-running verb's ``parser``."""
    parser.add_argument("--seeds", type=int, nargs="+", help=f"training seeds (default: the recipe's {section}.seeds)")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help=f"train again {runs} that already finished (default: reuse them)")


def print_written(output_dir, table: str, files: dict) -> None:
    """Print the Markdown ``table`` file of ``output_dir`` and the names of the ``files`` written there."""
    print((Path(output_dir) / table).read_text())
    print(f"wrote {', '.join(files.values())} to {output_dir}")
