"""``dpi-hf sweep RECIPE.yaml``: DPI at several core fractions and scopes (see :func:`dpi_hf.compare.run_sweep`)."""

from __future__ import annotations

import argparse

from typing import Sequence

from .common import Verb, add_seeds_and_resume, print_written
from .output import setup_output


def _arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of ``dpi-hf sweep`` to its parser."""
    p.add_argument("recipe", metavar="RECIPE.yaml", help="a comparison recipe with a sweep: section")
    p.add_argument("--core-fractions", type=float, nargs="+", metavar="P",
                   help="values of p (default: the recipe's sweep.core_fractions)")
    p.add_argument("--scopes", nargs="+", choices=("global", "per_tensor"), help="core scopes (default: both)")
    add_seeds_and_resume(p, "sweep", "points")


def sweep_command(args, overrides: Sequence[str] = ()) -> int:
    """``dpi-hf sweep``: run the core-fraction sweep of the recipe ``args.recipe`` and print its table; returns 0."""
    from ..compare import prepare_compare_recipe, run_sweep

    setup_output()
    recipe = prepare_compare_recipe(args.recipe, overrides)
    kw = dict(recipe.sweep)
    for name in ("core_fractions", "scopes", "seeds"):
        if getattr(args, name):
            kw[name] = getattr(args, name)
    result = run_sweep(recipe.recipe.tasks, recipe.recipe.model, recipe.output_dir, training=recipe.training,
                       evaluation=recipe.evaluation, resume=args.resume, keep_stage_models=recipe.keep_stage_models,
                       **kw)
    print_written(recipe.output_dir, "sweep.md", result["files"])
    return 0


VERB = Verb(
    "sweep",
    help="ablation: DPI at several core fractions and scopes; score and forgetting against p",
    usage="dpi-hf sweep RECIPE.yaml [--core-fractions P ...] [--scopes S ...] [--seeds S ...] [--FIELD VALUE ...]",
    description="Run DPI once per core_fraction x core_scope with the recipe's budget (plus the same stages "
                "without freezing) and write sweep.json, sweep.md and sweep.png to the recipe's output_dir.",
    arguments=_arguments, run=sweep_command, takes_overrides=True,
)
add_sweep_parser = VERB.add_parser  # the verb in a parser of your own
