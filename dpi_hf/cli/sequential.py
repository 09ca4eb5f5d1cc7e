"""``dpi-hf sequential RECIPE.yaml``: train A, then B with A's core protected by each signal (and a random control);
report forgetting, learning, the share of forgetting removed and its cost (see :mod:`dpi_hf.compare.sequential`)."""

from __future__ import annotations

import argparse

from .common import Verb, add_seeds_and_resume, print_written
from .output import setup_output


def _arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of ``dpi-hf sequential`` to its parser."""
    p.add_argument("recipe", metavar="RECIPE.yaml", help="e.g. recipes/sequential-smollm2-cpu.yaml")
    add_seeds_and_resume(p, "sequential", "runs")


def run(args, overrides) -> int:
    """``dpi-hf sequential``: run the scenario and print its table; returns 0."""
    import json
    import shutil
    from pathlib import Path

    from ..compare.sequential import TABLE_FILE, load_sequential_recipe, run_sequential
    from ..run.environment import apply_runtime
    from ..run.reading import SECTIONS, parse_overrides

    setup_output()
    # --sequential.KEY VALUE tokens set the scenario's own section; the rest are ordinary recipe overrides
    pairs = parse_overrides(overrides)
    mine = {k.split(".", 1)[1].replace("-", "_"): v for k, v in pairs if k.startswith("sequential.")}
    rest = [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in pairs
            if not k.startswith("sequential.")]  # JSON is YAML: read_recipe parses the values back unchanged
    recipe, settings, raw = load_sequential_recipe(args.recipe, rest, mine)
    if args.seeds:
        settings.seeds = list(args.seeds)
    apply_runtime(recipe)
    out = Path(raw.get("output_dir") or Path("runs") / Path(args.recipe).stem)
    if not args.resume:
        shutil.rmtree(out, ignore_errors=True)
    training = {k: getattr(recipe.args, k) for k in raw if k not in SECTIONS and k != "output_dir"}
    results = run_sequential(recipe, settings, out, training)
    print_written(out, TABLE_FILE, results["files"])
    return 0


VERB = Verb(
    "sequential",
    help="train A then B, protecting A's core by each signal vs. a random control; measure forgetting",
    usage="dpi-hf sequential RECIPE.yaml [--seeds S ...] [--no-resume] [--FIELD VALUE ...]",
    description="For each pair [A, B] of the recipe's sequential: section and each seed: SFT on A, probe A's cores "
                "on the trained model, then SFT on B with nothing protected, with A's core by each signal and p, "
                "and with a random subset of the same size; writes sequential.json, sequential.md and "
                "sequential.png to the recipe's output_dir. Finished runs are reused unless --no-resume.",
    arguments=_arguments, run=run, takes_overrides=True,
)
