"""``dpi-hf train RECIPE.yaml [--dry-run] [--list-fields] [--FIELD VALUE ...]``: run a recipe end to end."""

from __future__ import annotations

import argparse
import os
import textwrap

from ..core.errors import DPIConfigError
from .common import Verb

_TRAIN_EPILOG = """\
recipe sections (see docs/recipes.md):
  vars:     variables for ${name} placeholders, e.g. {data_dir: data}
  model:    name_or_path (Hub id, directory or offline:smollm2-135m-instruct), dtype, revision,
            trust_remote_code, attn_implementation, tokenizer, cache_dir
  tasks:    list of tasks: name, source, path, config, split, columns, max_samples, eval_samples, seed,
            system_prompt, kwargs
  eval:     before, after, metrics (task -> metric names), max_samples, max_new_tokens, batch_size,
            trainer_eval, metric_kwargs, judge
  runtime:  num_threads, offline
  any other top-level key is a DPIConfig field (SFTConfig / TrainingArguments / DPI): --list-fields shows them.

overrides (after the recipe, applied before validation; values are read as YAML):
  --FIELD VALUE            a DPIConfig field, e.g. --learning_rate 5e-5 --max_steps 20 --output_dir runs/x
  --SECTION.KEY VALUE      a key of a section, e.g. --model.name_or_path HuggingFaceTB/SmolLM2-135M-Instruct
  --tasks.N.KEY VALUE      a key of task N (0-based) or of the task named N, e.g. --tasks.0.max_samples 8
  --VAR VALUE              a recipe variable, e.g. --data_dir data
  (TrainingArguments' own `debug` field can only be set in the YAML: --debug is this tool's flag.)

what it does: scores the base model on each task's held-out rows, trains with DPITrainer (probes, plan, stages),
saves model and tokenizer to output_dir, scores again, prints the plan and a before/after table, and writes
output_dir/dpi/ (cores.safetensors, plan.json, scores.json, overlap.png, core_density.png, core_modules.png).
"""


def _arguments(train: argparse.ArgumentParser) -> None:
    """Add the arguments of ``dpi-hf train`` to its parser."""
    train.add_argument("recipe", nargs="?", metavar="RECIPE.yaml",
                       help="the recipe file, e.g. recipes/quickstart.yaml")
    train.add_argument("--dry-run", action="store_true",
                       help="validate the recipe with the overrides, print it resolved, and stop (no model loaded)")
    train.add_argument("--list-fields", action="store_true",
                       help="list every DPIConfig field with its default and help, and stop")


def run(args, overrides: list[str]) -> int:
    """``dpi-hf train``: see :func:`dpi_hf.run.train.run_recipe`; ``overrides`` are the ``--FIELD VALUE`` tokens."""
    from ..run.environment import prepare_raw
    from ..run.reading import read_recipe
    from ..run.recipe import Recipe, recipe_fields_help

    if args.list_fields:
        for name, default, text in recipe_fields_help():
            print(f"--{name} (default {default})\n" + textwrap.indent(textwrap.fill(text or "-", 96), "    "))
        return 0
    if not args.recipe:
        raise DPIConfigError("no recipe given; run e.g. `dpi-hf train recipes/quickstart.yaml`.")
    raw = read_recipe(args.recipe, overrides)
    prepare_raw(raw)  # offline mode, before anything imports huggingface_hub
    recipe = Recipe.from_dict(raw, source=args.recipe)
    if args.dry_run:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        print(recipe.to_yaml().rstrip())
        print(f"# valid recipe: {len(recipe.tasks)} tasks {recipe.task_names}, staging {recipe.args.staging!r}, "
              f"output_dir {recipe.args.output_dir!r}{', offline' if offline else ''}")
        return 0
    from ..run.train import run_recipe

    run_recipe(recipe)
    return 0


VERB = Verb(
    "train",
    help="run a recipe: score the base model, train with DPI, score again, report",
    usage="dpi-hf train RECIPE.yaml [--dry-run] [--list-fields] [--debug] [--FIELD VALUE ...]",
    description="Run a recipe end to end (see docs/cli.md).", epilog=_TRAIN_EPILOG,
    arguments=_arguments, run=run, takes_overrides=True, raw_text=True,
)
