"""``dpi-hf inspect OUTPUT_DIR``: core statistics per task by layer and module type, as tables and plots."""

from __future__ import annotations

import argparse

from pathlib import Path

from .common import Verb, load_run_cores


def _arguments(insp: argparse.ArgumentParser) -> None:
    """Add the arguments of ``dpi-hf inspect`` to its parser."""
    insp.add_argument("output_dir", metavar="OUTPUT_DIR", help="a DPI run's output_dir (or its dpi/ folder)")
    insp.add_argument("--plots", metavar="DIR", default=None,
                      help="folder for the PNG plots (default: the run's dpi/ folder)")
    insp.add_argument("--no-plots", action="store_true", help="print the tables only")


def run(args, _extra) -> int:
    """``dpi-hf inspect``: core statistics tables and plots."""
    from ..artifacts import find_dpi_dir
    from ..inspection import core_statistics, format_statistics, write_plots

    cores, plan = load_run_cores(args.output_dir)
    print(format_statistics(core_statistics(cores)))
    if plan is not None and plan.jaccard:
        print("\n" + plan.describe())
    if not args.no_plots:
        folder = Path(args.plots) if args.plots else find_dpi_dir(args.output_dir)
        files = write_plots(cores, plan, folder)
        print("\nPlots:\n" + "\n".join(f"  {label:<18} {path}" for label, path in files.items()))
    return 0


VERB = Verb(
    "inspect",
    help="core statistics per task by layer and module type, as tables and PNG plots",
    description="Print where each task's core lies — by module type (attention, MLP, embeddings, norms, "
                "lm_head) and by decoder layer — and draw overlap.png, core_density.png and core_modules.png.",
    arguments=_arguments, run=run, takes_overrides=False,
)
