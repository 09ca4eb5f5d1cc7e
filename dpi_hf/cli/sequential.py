"""``dpi-hf sequential RECIPE.yaml``: the forgetting benchmark. A model learns A, then B with each method of
protecting A; held-out accuracy (and NLL) of both, intervals, the Pareto front, forgetting at matched B gain (see
:mod:`dpi_hf.compare.forgetting`)."""

from __future__ import annotations

import argparse

from .common import Verb, add_seeds_and_resume, print_written
from .output import setup_output


def _arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of ``dpi-hf sequential`` to its parser."""
    from ..compare.forgetting import METHODS

    p.add_argument("recipe", metavar="RECIPE.yaml", help="e.g. recipes/forgetting-smollm2-cpu.yaml")
    p.add_argument("--methods", nargs="+", metavar="M", choices=METHODS,
                   help=f"run only these methods (default: the recipe's sequential.methods); from {', '.join(METHODS)}")
    p.add_argument("--b_steps", type=int, nargs="+", metavar="N",
                   help="B training lengths (default: the recipe's sequential.b_steps, else max_steps)")
    p.add_argument("--best_from", metavar="FILE",
                   help="a forgetting.json whose validation-chosen settings replace each line's grid (e.g. to run "
                        "the other pairs at each method's best setting of the first pair)")
    p.add_argument("--best_pair", metavar="A->B", help="the pair of --best_from whose choice to use (default: its first)")
    add_seeds_and_resume(p, "sequential", "runs")


def run(args, overrides) -> int:
    """``dpi-hf sequential``: run the benchmark and print its table; returns 0."""
    import json
    import shlex
    import shutil
    from pathlib import Path

    from ..compare.forgetting import chosen_settings, load_sequential_recipe, run_forgetting
    from ..compare.forgetting.report import TABLE_FILE
    from ..core.errors import DPIConfigError
    from ..run.environment import apply_runtime
    from ..run.reading import SECTIONS, parse_overrides

    setup_output()
    # --sequential.KEY VALUE tokens set the benchmark's own section; the rest are ordinary recipe overrides
    pairs = parse_overrides(overrides)
    mine = {k.split(".", 1)[1]: v for k, v in pairs if k.startswith("sequential.")}
    rest = [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in pairs
            if not k.startswith("sequential.")]  # JSON is YAML: read_recipe parses the values back unchanged
    if args.methods:
        mine["methods"] = list(args.methods)
    if args.b_steps:
        mine["b_steps"] = list(args.b_steps)
    if args.seeds:  # validated with the section (distinct integers)
        mine["seeds"] = list(args.seeds)
    if args.best_pair and not args.best_from:
        raise DPIConfigError("--best_pair picks a pair of --best_from's results; give --best_from FILE too.")
    recipe, settings, raw = load_sequential_recipe(args.recipe, rest, mine)
    if args.best_from:
        path = Path(args.best_from)
        if not path.is_file():
            raise DPIConfigError(f"--best_from {str(path)!r} does not exist; give a forgetting.json.")
        group, chosen = chosen_settings(json.loads(path.read_text()), args.best_pair)
        settings.keep_only(chosen)
        print(f"[sequential] each line at its setting chosen on the validation rows of {group} ({path}):")
        for line, label in chosen.items():
            print(f"[sequential]   {line}: {label}")
    apply_runtime(recipe)
    out = Path(raw.get("output_dir") or Path("runs") / Path(args.recipe).stem)
    if not args.resume:
        shutil.rmtree(out, ignore_errors=True)
    training = {k: getattr(recipe.args, k) for k in raw if k not in SECTIONS and k != "output_dir"}
    command = " ".join(shlex.quote(str(a)) for a in _command_line(args, overrides))
    results = run_forgetting(recipe, settings, out, training, command=command)
    print_written(out, TABLE_FILE, results["files"])
    return 0


def _command_line(args, overrides) -> list:
    """The command as given (the verb's options, then the recipe overrides): the results record it."""
    line = ["dpi-hf", "sequential", args.recipe]
    for flag, value in (("--methods", args.methods), ("--b_steps", args.b_steps), ("--seeds", args.seeds)):
        if value:
            line += [flag, *value]
    for flag, value in (("--best_from", args.best_from), ("--best_pair", args.best_pair)):
        if value:
            line += [flag, value]
    if not args.resume:
        line.append("--no-resume")
    return line + list(overrides)


VERB = Verb(
    "sequential",
    help="the forgetting benchmark: train A, then B with each way of protecting A; accuracy kept vs. gained",
    usage="dpi-hf sequential RECIPE.yaml [--methods M ...] [--b_steps N ...] [--best_from FILE [--best_pair A->B]] "
          "[--seeds S ...] [--no-resume] [--sequential.KEY VALUE ...] [--FIELD VALUE ...]",
    description="For each pair [A, B] of the recipe's sequential: section and each seed: SFT on A, then from that "
                "model SFT on B with every selected method and setting (nothing, A's core frozen, controls, EWC, "
                "L2-SP, LoRA, WiSE-FT, core-aware interpolation, replay); held-out accuracy by the task's verifier "
                "and NLL of both tasks after A and after B. Writes forgetting.json (every run, appended as it "
                "finishes), results.md and pareto.png to the recipe's output_dir. Finished runs are skipped "
                "unless --no-resume.",
    arguments=_arguments, run=run, takes_overrides=True,
)
