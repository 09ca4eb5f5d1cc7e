"""Helpers the verbs share: reading a finished run, and the options and output of the recipe-running verbs."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.errors import DPIConfigError


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


def verb_parser(subparsers, parents, name: str, **kwargs):
    """``subparsers.add_parser(name, ...)`` with the options every verb shares (``parents``, e.g. ``--debug``) and
    no abbreviated options; ``kwargs`` are ``add_parser``'s (help, description, usage, ...)."""
    return subparsers.add_parser(name, parents=list(parents), allow_abbrev=False, **kwargs)
