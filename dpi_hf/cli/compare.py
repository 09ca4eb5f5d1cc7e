"""``dpi-hf compare RECIPE.yaml``: train the paper's four methods on one budget and evaluate them (see
:mod:`dpi_hf.compare`)."""

from __future__ import annotations

import argparse

from typing import Sequence

from ..compare.settings import METHODS
from .common import Verb, add_seeds_and_resume, print_written
from .output import setup_output


def _arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of ``dpi-hf compare`` to its parser."""
    p.add_argument("recipe", metavar="RECIPE.yaml", help="a comparison recipe, e.g. recipes/compare-smollm2-cpu.yaml")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="the methods (default: the paper's four; cpi, DPI with CPI-FT fusion, by name)")
    add_seeds_and_resume(p, "compare", "runs")


def compare_command(args, overrides: Sequence[str] = ()) -> int:
    """``dpi-hf compare``: run the comparison of the recipe ``args.recipe`` and print its table; returns 0."""
    from ..compare import prepare_compare_recipe, run_comparison

    setup_output()
    recipe = prepare_compare_recipe(args.recipe, overrides)
    results = run_comparison(
        recipe.recipe.tasks, recipe.recipe.model, recipe.output_dir, training=recipe.training,
        methods=args.methods or recipe.methods, heuristic_groups=recipe.heuristic_groups,
        seeds=args.seeds or recipe.seeds, evaluation=recipe.evaluation, include_base=recipe.include_base,
        resume=args.resume, keep_stage_models=recipe.keep_stage_models, vary_rows=recipe.vary_rows)
    print_written(recipe.output_dir, "results.md", results["files"])
    return 0


VERB = Verb(
    "compare",
    help="train the paper's four methods on the same budget and evaluate them",
    usage="dpi-hf compare RECIPE.yaml [--seeds S ...] [--methods M ...] [--no-resume] [--FIELD VALUE ...]",
    description="Train multitask, multistage_random, multistage_heuristic and dpi on the recipe's tasks with "
                "the same training budget, evaluate the base model and every trained model on every task, and "
                "write results.json, results.md, scores.png and forgetting.png to the recipe's output_dir. "
                "Overrides such as --max_steps 20 or --data_dir DIR apply to the recipe (see docs/evaluation.md).",
    arguments=_arguments, run=compare_command, takes_overrides=True,
)
add_compare_parser = VERB.add_parser  # the verb in a parser of your own
