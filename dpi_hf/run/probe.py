"""``dpi-hf probe``: probe a recipe's tasks and plan, without training any stage.

Loads the recipe's tasks (training rows only) and model, runs :meth:`dpi_hf.DPITrainer.probe`, and leaves in
``output_dir/dpi/`` the cores, ``plan.json`` (with the split-half reliability report when probed that way) and the
overlap plot. A later ``dpi-hf train`` of the same recipe with ``--masks_from OUTPUT_DIR`` reuses these cores, so
the plan (and whether the cores are reliable) can be checked before paying for the stages.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from ..core.planning import ONE_STAGE_NOTE
from .environment import apply_runtime
from .model import load_model_and_tokenizer
from .recipe import Recipe


def run_probe(recipe: Recipe, log: Callable[[str], None] = print, importance_from=None):
    """Probe every task of ``recipe`` and write the plan; return the :class:`~dpi_hf.core.StagePlan`.

    Args:
        recipe: a validated recipe with at least one task.
        log: where the plan, the probe cost and the artifact paths go (default: print).
        importance_from: a directory with ``dpi/importance.safetensors`` of these tasks on this model: the cores are
            selected from it at the recipe's ``core_fraction`` without probing (default None: probe).
    """
    apply_runtime(recipe)
    if importance_from is not None:
        return _cores_from_importance(recipe, importance_from, log)
    from ..data import load_tasks
    from ..trainer.phases import PROBE
    from ..trainer.protection import CoreProbingTrainer
    from ..trainer import check_output_dir

    check_output_dir(recipe.args)  # before loading anything: a used output_dir is refused now
    t0 = time.perf_counter()
    train = {name: splits["train"] for name, splits in load_tasks(recipe.tasks).items()}
    model, tokenizer = load_model_and_tokenizer(recipe.model)
    # one task is enough: the cores of a model's existing skill, to protect in a later run (protect_cores_from)
    trainer = CoreProbingTrainer(model, args=recipe.args, train_dataset=train, processing_class=tokenizer)
    plan = trainer.probe()
    probes = [r for r in trainer.phase_records if r.kind == PROBE]
    log(f"[dpi-hf] plan:\n{plan.describe()}")
    log(f"[dpi-hf] probe cost: {len(probes)} probes, {sum(r.steps for r in probes)} steps, "
        f"{sum(r.examples for r in probes)} examples, {sum(r.tokens for r in probes):,} tokens (forward and "
        f"backward), {sum(r.seconds for r in probes):.0f} s (whole command {time.perf_counter() - t0:.0f} s)")
    if plan.is_multitask:  # said again, last, before anything is trained on this plan
        log(f"[dpi-hf] {ONE_STAGE_NOTE}: training this plan costs the probes on top of what staging=multitask "
            "trains, for the same model.")
    out = trainer.args.output_dir
    log(f"[dpi-hf] wrote {out}/dpi/cores.safetensors and {out}/dpi/plan.json"
        f"{f' and {out}/dpi/overlap.png' if len(train) > 1 else ''}; train the stages with these cores: dpi-hf train "
        f"RECIPE --masks_from {out} --output_dir OTHER_DIR, or protect them while training something new: "
        f"--protect_cores_from {out}")
    return plan


def _cores_from_importance(recipe: Recipe, importance_from, log):
    from ..artifacts import load_dpi_artifacts
    from ..trainer.protection import probe_cores

    from ..artifacts import importance_path
    from ..core.errors import DPIConfigError
    from ..trainer import check_output_dir

    check_output_dir(recipe.args)  # before loading the model: a used output_dir, or no stored importance, fails now
    if not os.path.exists(importance_from) or importance_path(importance_from) is None:
        raise DPIConfigError(f"--importance_from {importance_from!r} holds no dpi/importance.safetensors; probe once "
                             "with --save_importance true to store it.")
    model, _ = load_model_and_tokenizer(recipe.model)
    names = [t.name for t in recipe.tasks]  # Recipe.from_dict made them TaskSpecs
    probe_cores(model, dict.fromkeys(names), recipe.args, importance_from=importance_from)
    _, plan = load_dpi_artifacts(recipe.args.output_dir)
    out = recipe.args.output_dir
    log(f"[dpi-hf] plan:\n{plan.describe()}")
    log(f"[dpi-hf] cores at p = {recipe.args.core_fraction} selected from the importance in {importance_from} (no "
        f"probe run); wrote {out}/dpi/cores.safetensors, {out}/dpi/plan.json and {out}/dpi/importance.safetensors")
    return plan
