"""``dpi-hf plan OUTPUT_DIR``: re-plan the stages of a finished run from its saved cores."""

from __future__ import annotations

import argparse

from pathlib import Path

from ..core.planning import OVERLAPS, STAGE_ORDERS
from .common import Verb, load_run_cores


def _arguments(plan: argparse.ArgumentParser) -> None:
    """Add the arguments of ``dpi-hf plan`` to its parser."""
    plan.add_argument("output_dir", metavar="OUTPUT_DIR", help="a DPI run's output_dir (or its dpi/ folder)")
    plan.add_argument("--jaccard-threshold", type=float, default=None, metavar="TAU",
                      help="τ in [0, 1]: tasks with core overlap J >= τ share a stage (default: the run's τ; on "
                           "another overlap, that overlap's default: 0.7 corrected, 0.1 raw)")
    plan.add_argument("--order", choices=STAGE_ORDERS, default=None,
                      help="stage order (default: the run's); largest_first ranks groups by core size here, as "
                           "the training-set sizes are not stored with the cores")
    plan.add_argument("--overlap", choices=OVERLAPS, default=None,
                      help="what the groups form on: the cores' Jaccard (raw), the reliability-corrected overlap "
                           "(needs a run probed with probe_reliability=split_half), or the tasks' TAG affinity (needs "
                           "a run probed with probe_affinity=True); default: the run's")
    plan.add_argument("--affinity-threshold", type=float, default=None, metavar="A",
                      help="with --overlap affinity: tasks whose symmetric affinity is above A share a stage "
                           "(default: the run's, else 0)")
    plan.add_argument("--seed", type=int, default=None,
                      help="seed of --order random (default: the run's seed, else 0)")
    plan.add_argument("--save", metavar="FILE", default=None,
                      help="also write the new plan as JSON to FILE (the run's own plan.json is never changed)")
    plan.add_argument("--plot", metavar="FILE.png", default=None, help="also draw the overlap heatmap to FILE.png")


def run(args, _extra) -> int:
    """``dpi-hf plan``: re-plan from saved cores and print the overlap matrix and the stages."""
    from ..artifacts import plot_overlap
    from ..core import plan_stages

    cores, saved = load_run_cores(args.output_dir)

    # a baseline run's plan records its staging (e.g. "multitask") as its order: re-plan those in given order
    order = args.order or (saved.stage_order if saved and saved.stage_order in STAGE_ORDERS else "given")
    tasks = saved.tasks if saved and all(t in cores for t in saved.tasks) else list(cores)
    sizes = {t: cores[t].count() for t in tasks}
    reliability = saved.reliability if saved is not None else None
    overlap = args.overlap or (saved.overlap if saved is not None and reliability is not None else "raw")
    # the run's τ on the run's overlap; another overlap's scale gets that scale's default
    tau = args.jaccard_threshold if args.jaccard_threshold is not None else (
        saved.jaccard_threshold if saved is not None and saved.overlap == overlap else None)
    seed = args.seed if args.seed is not None else _run_seed(args.output_dir)
    affinity = saved.affinity if saved is not None else None
    threshold = args.affinity_threshold if args.affinity_threshold is not None else (
        saved.affinity_threshold if saved is not None else 0.0)
    plan = plan_stages(cores, tau, order=order, seed=seed, tasks=tasks, sizes=sizes, reliability=reliability,
                       overlap=overlap, affinity=affinity, affinity_threshold=threshold)
    rule = f"affinity > {plan.affinity_threshold:g}" if overlap == "affinity" else \
        f"τ = {plan.jaccard_threshold} on the {overlap} overlap"
    print(f"Plan from {args.output_dir} ({rule}, order {order}; {len(tasks)} tasks):")
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


def _run_seed(output_dir) -> int:
    """The seed the run planned with (``plan.json``'s run identity), or 0 for runs that did not record it."""
    import json

    from ..artifacts import PLAN_FILE, find_dpi_dir

    record = json.loads((find_dpi_dir(output_dir) / PLAN_FILE).read_text())
    return int(record.get("run_identity", {}).get("budget", {}).get("seed", 0) or 0)


VERB = Verb(
    "plan",
    help="re-plan the stages from a run's saved cores, without probing again",
    description="Group the tasks of a finished run by core overlap again, with another threshold or order, "
                "from OUTPUT_DIR/dpi/cores.safetensors; prints the Jaccard matrix and the stages. To train with "
                "the new plan: dpi-hf train RECIPE --masks_from OUTPUT_DIR --jaccard_threshold TAU.",
    arguments=_arguments, run=run, takes_overrides=False,
)
