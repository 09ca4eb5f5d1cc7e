"""``dpi-hf probe RECIPE.yaml [--FIELD VALUE ...]``: probe the tasks and write the plan; train no stage."""

from __future__ import annotations

import argparse

from ..core.errors import DPIConfigError
from .common import Verb


def _arguments(probe: argparse.ArgumentParser) -> None:
    """Add the arguments of ``dpi-hf probe`` to its parser."""
    probe.add_argument("recipe", nargs="?", metavar="RECIPE.yaml", help="the recipe file, e.g. recipes/quickstart.yaml")
    probe.add_argument("--importance_from", "--importance-from", dest="importance_from", default=None, metavar="DIR",
                       help="select the cores from the importance stored in DIR (a probe run with "
                            "--save_importance true on the same model) at this recipe's core_fraction and core_scope, "
                            "without probing (the recipe's data is not read)")


def run(args, overrides: list[str]) -> int:
    """``dpi-hf probe``: see :func:`dpi_hf.run.probe.run_probe`; ``overrides`` are ``--FIELD VALUE`` tokens."""
    from ..run.environment import prepare_raw
    from ..run.reading import read_recipe
    from ..run.recipe import Recipe

    if not args.recipe:
        raise DPIConfigError("no recipe given; run e.g. `dpi-hf probe recipes/quickstart.yaml`.")
    raw = read_recipe(args.recipe, overrides)
    for section in ("compare", "sweep"):  # a comparison recipe: its tasks and training fields are what is probed
        raw.pop(section, None)
    prepare_raw(raw)
    recipe = Recipe.from_dict(raw, source=args.recipe)
    from ..run.probe import run_probe

    run_probe(recipe, importance_from=args.importance_from)
    return 0


VERB = Verb(
    "probe",
    help="probe a recipe's tasks and plan the stages (cores, reliability, overlap), without training",
    usage="dpi-hf probe RECIPE.yaml [--debug] [--importance_from DIR] [--FIELD VALUE ...]",
    description="Run the probes of a recipe and write output_dir/dpi/ (cores.safetensors, plan.json with the "
                "reliability report, overlap.png); no stage is trained. Reuse the cores with --masks_from, or protect them in a later run with --protect_cores_from (one task is enough: the cores of a skill the model already has). A "
                "comparison recipe (with compare:/sweep: sections) works too: its tasks and shared training "
                "fields are probed. With --save_importance true the importance is stored too "
                "(dpi/importance.safetensors); --importance_from DIR then selects cores at another "
                "--core_fraction from it without probing again.",
    arguments=_arguments, run=run, takes_overrides=True,
)
