"""``dpi-hf train``: run a recipe end to end and report: score the base model, train with DPITrainer, score again.

This is what ``dpi-hf train RECIPE.yaml`` does (``recipes/quickstart.yaml`` is the canonical example):

1. load every task (:func:`dpi_hf.data.load_tasks`) and the model (``offline:`` models are converted once);
2. score the base model on each task's held-out ``eval`` rows with the recipe's metrics (``eval.before``);
3. train with :class:`~dpi_hf.DPITrainer` (probes → plan → stages) and save model and tokenizer to ``output_dir``;
4. score the trained model on the same rows (``eval.after``);
5. write ``output_dir/dpi/scores.json`` and the inspection plots, print the plan, a per-task before/after table and
   where the artifacts are.

``scores.json`` holds ``before`` / ``after`` (task → metric → the result dict of
:func:`dpi_hf.evaluation.evaluate_task`), ``rows`` (one per task and metric: before, after, delta and whether the
change is an improvement in the metric's direction, see :class:`~dpi_hf.evaluation.registry.Metric`),
``macro_before`` / ``macro_after`` (the 0–10 macro-average of :func:`dpi_hf.evaluation.macro_score`, None without a
score metric), ``eval_rows`` (task → rows scored), ``timings`` (seconds per phase) and ``plan`` (the stages).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.errors import DPIConfigError
from ..artifacts import write_card_training_data
from ..core.io import atomic_write_text
from ..evaluation.registry import METRIC_REGISTRY, get_metric
from ..offline import hub_model_id
from .environment import apply_runtime
from .model import load_model_and_tokenizer
from .recipe import Recipe

SCORES_FILE = "scores.json"
# the metrics where lower is better (the losses), from their records
LOWER_IS_BETTER = frozenset(n for n, m in METRIC_REGISTRY.items() if not m.higher_is_better)


@dataclass
class RunReport:
    """What :func:`run_recipe` produced.

    Attributes:
        output_dir: the run's output directory (model, tokenizer, ``README.md``, ``dpi/``).
        scores: the content of ``dpi/scores.json`` (see the module docstring).
        plan: the :class:`~dpi_hf.core.StagePlan`, or None for a single-task (plain SFT) run.
        files: label → path of each artifact written.
        seconds: wall time of the whole run.
    """

    output_dir: Path
    scores: dict
    plan: Any
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0


def evaluate_tasks(model, tokenizer, eval_sets: dict, recipe: Recipe, log: Callable[[str], None] = print) -> dict:
    """Score ``model`` on every task's held-out rows with the recipe's metrics.

    Args:
        model: the causal LM.
        tokenizer: its tokenizer (with a chat template).
        eval_sets: task name → its held-out rows (a Dataset).
        recipe: the recipe (metrics, generation length, batch size, metric options, judge).
        log: where progress lines go (default print).

    Returns:
        task → metric → the result dict of :func:`dpi_hf.evaluation.evaluate_task`.
    """
    from ..evaluation import evaluate_task

    spec = recipe.eval
    judge = spec.make_judge()
    by_name = {t.name: t for t in recipe.tasks}
    results: dict[str, dict] = {}
    for task, rows in eval_sets.items():
        results[task] = {}
        for metric in spec.metrics_for(by_name[task]):
            if spec.max_samples == 0 and get_metric(metric).generates:
                continue  # eval.max_samples: 0 scores the held-out NLL only
            kwargs = spec.metric_arguments(metric, judge)
            t0 = time.perf_counter()
            result = evaluate_task(model, tokenizer, rows, metric, **kwargs)
            result["seconds"] = round(time.perf_counter() - t0, 2)
            results[task][metric] = result
            log(f"  {task:<20} {metric:<16} {_fmt(result[metric])}  ({len(rows)} rows, {result['seconds']:.0f} s)")
    return results


def summary_rows(before: dict, after: dict) -> list[dict]:
    """One row per task and metric with ``before``, ``after``, ``delta`` and ``improved`` (None when a side is
    missing), in each metric's direction (:attr:`~dpi_hf.evaluation.registry.Metric.higher_is_better`)."""
    rows = []
    for task in dict.fromkeys([*before, *after]):
        metrics = dict.fromkeys([*before.get(task, {}), *after.get(task, {})])
        for metric in metrics:
            b = before.get(task, {}).get(metric, {}).get(metric)
            a = after.get(task, {}).get(metric, {}).get(metric)
            delta = None if a is None or b is None else a - b
            improved = get_metric(metric).improved(b, a)
            rows.append({"task": task, "metric": metric, "before": b, "after": a, "delta": delta,
                         "improved": improved})
    return rows


def card_training_data(tasks) -> tuple[list[str], list[str]]:
    """``(Hub dataset ids, a line for each other task)`` of a recipe's tasks, for the model card: Hub-sourced tasks
    are named by their id; generated tasks and local files (which have none) by what they are.

    Args:
        tasks: the recipe's :class:`~dpi_hf.data.TaskSpec` list.
    """
    hub, other = [], []
    for task in tasks:
        if task.source == "hub":
            hub.append(task.path)
        elif task.source == "reasoning_gym":
            other.append(f"`{task.name}`: generated with reasoning-gym (`{task.path}`, seed {task.seed}, "
                         f"{task.max_samples} training rows)")
        else:
            other.append(f"`{task.name}`: local file `{Path(task.path).name}` ({task.source})")
    return hub, other


def format_table(rows: list[dict]) -> str:
    """The before/after table of :func:`summary_rows` as aligned text."""
    header = ("task", "metric", "before", "after", "change")
    body = []
    for r in rows:
        arrow = "" if r["improved"] is None else ("  better" if r["improved"] else ("  same" if r["delta"] == 0
                                                                                    else "  worse"))
        metric = r["metric"] + ("" if get_metric(r["metric"]).higher_is_better else " (lower is better)")
        delta = "" if r["delta"] is None else f"{r['delta']:+.3f}{arrow}"
        body.append((r["task"], metric, _fmt(r["before"]), _fmt(r["after"]), delta))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_recipe(recipe: Recipe, log: Callable[[str], None] | None = None) -> RunReport:
    """Score, train, score again and report (see the module docstring).

    Args:
        recipe: a validated :class:`~dpi_hf.recipes.Recipe`.
        log: where progress and the final report go (default: print to stdout, flushed).

    Returns:
        A :class:`RunReport`; the same content is in ``output_dir/dpi/scores.json``.
    """
    log = log or _print
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    apply_runtime(recipe)
    from ..data import load_tasks
    from ..evaluation import macro_score
    from ..trainer import DPITrainer, check_output_dir

    args = recipe.args
    output_dir = Path(args.output_dir)
    if len(recipe.tasks) > 1 or args.protects:  # a used output_dir is refused before any data or model is loaded
        check_output_dir(args)
    if args.protects:  # so are a missing artifact and an unknown protected task
        from ..trainer.run_state import check_protection_source

        check_protection_source(args)
    log(f"[dpi-hf] recipe {recipe.source or '<dict>'}: {len(recipe.tasks)} tasks {recipe.task_names}, model "
        f"{recipe.model.name_or_path}, output {output_dir}")

    t0 = time.perf_counter()
    data = load_tasks(recipe.tasks)
    train = {name: splits["train"] for name, splits in data.items()}
    eval_sets = {}
    for name, splits in data.items():
        if "eval" in splits:
            rows = splits["eval"]
            cap = recipe.eval.max_samples  # 0: the NLL of every row only (see evaluate_tasks)
            eval_sets[name] = rows.select(range(min(cap, len(rows)))) if cap else rows
    timings["load_data"] = time.perf_counter() - t0
    log("[dpi-hf] data: " + ", ".join(f"{n} {len(train[n])} train / {len(eval_sets.get(n, []))} held out"
                                      for n in train))

    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(recipe.model)
    timings["load_model"] = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[dpi-hf] model: {type(model).__name__}, {n_params / 1e6:.1f}M parameters, {model.dtype}")

    before: dict = {}
    if recipe.eval.before and eval_sets:
        log("[dpi-hf] scoring the base model on held-out rows")
        t0 = time.perf_counter()
        before = evaluate_tasks(model, tokenizer, eval_sets, recipe, log)
        timings["eval_before"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    trainer_eval = None
    if recipe.eval.trainer_eval and eval_sets:
        # only the SFT columns: the trainer tokenizes them; task/reference/meta are for the scorers
        trainer_eval = {n: rows.select_columns(["prompt", "completion"]) for n, rows in eval_sets.items()}
    trainer = DPITrainer(model, args=args, train_dataset=train, eval_dataset=trainer_eval, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        write_card_training_data(output_dir, *card_training_data(recipe.tasks),
                                 base_model=hub_model_id(recipe.model.name_or_path))
    timings["train"] = time.perf_counter() - t0

    after: dict = {}
    if recipe.eval.after and eval_sets:
        log("[dpi-hf] scoring the trained model on the same held-out rows")
        t0 = time.perf_counter()
        # the trainer's tokenizer: TRL may have given it a chat template (SFTConfig.chat_template_path)
        after = evaluate_tasks(trainer.model, trainer.processing_class, eval_sets, recipe, log)
        timings["eval_after"] = time.perf_counter() - t0

    rows = summary_rows(before, after)
    plan = trainer.plan
    files: dict[str, Path] = {"model": output_dir}
    dpi_dir = output_dir / "dpi"
    if trainer.cores:
        from ..inspection import write_plots

        files.update(write_plots(trainer.cores, plan, dpi_dir))
    timings["total"] = time.perf_counter() - t_start
    scores = {
        "recipe": recipe.source,
        "model": recipe.model.name_or_path,
        "tasks": recipe.task_names,
        "eval_rows": {n: len(rows_) for n, rows_ in eval_sets.items()},
        "before": before,
        "after": after,
        "rows": rows,
        "macro_before": _macro(macro_score, before),
        "macro_after": _macro(macro_score, after),
        "plan": plan.to_dict() if plan is not None else None,
        "stage_history": trainer.stage_history,
        "cost": _cost(trainer.phase_records),
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    atomic_write_text(dpi_dir / SCORES_FILE, json.dumps(scores, indent=2, default=str))
    files["scores"] = dpi_dir / SCORES_FILE
    for name in ("cores.safetensors", "plan.json", "overlap.png", "forgetting.json", "protected.json"):
        if (dpi_dir / name).is_file() and dpi_dir / name not in files.values():
            files[name] = dpi_dir / name
    if (output_dir / "README.md").is_file():
        files["model card"] = output_dir / "README.md"
    report = RunReport(output_dir=output_dir, scores=scores, plan=plan, files=files,
                       seconds=time.perf_counter() - t_start)
    log(format_report(report))
    return report


def format_report(report: RunReport) -> str:
    """The end-of-run text: plan, before/after table, macro-average, artifacts, timings."""
    s = report.scores
    lines = ["", "=" * 100, "DPI run finished in " + _duration(report.seconds)]
    if report.plan is not None:
        lines += ["", report.plan.describe()]
    if s["rows"]:
        n = ", ".join(f"{t} {k}" for t, k in s["eval_rows"].items())
        lines += ["", f"Held-out scores before and after training ({n} rows; same rows, greedy decoding):",
                  format_table(s["rows"])]
        if s["macro_before"] is not None or s["macro_after"] is not None:
            lines.append(f"macro-average (0-10, score metrics only): {_fmt(s['macro_before'])} -> "
                         f"{_fmt(s['macro_after'])}")
    cost = s.get("cost") or {}
    if cost.get("probe", {}).get("phases"):
        lines += ["", "Training cost: " + cost_line(cost)]
    lines += ["", "Artifacts:"]
    width = max(len(k) for k in report.files)
    lines += [f"  {k:<{width}}  {v}" for k, v in report.files.items()]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in s["timings"].items()),
              f"Next: `dpi-hf inspect {report.output_dir}` (core statistics), `dpi-hf plan {report.output_dir} "
              "--jaccard-threshold TAU` (re-plan without probing).", "=" * 100]
    return "\n".join(lines)


def _cost(records) -> dict:
    """Probe and stage cost of a run (phases, optimizer steps, training examples, tokens through forward and backward,
    seconds), from its phase records."""
    out = {}
    for kind in ("probe", "stage"):
        rs = [r for r in records if r.kind == kind]
        out[kind] = {"phases": len(rs), "steps": sum(r.steps for r in rs), "examples": sum(r.examples for r in rs),
                     "tokens": sum(getattr(r, "tokens", 0) for r in rs), "seconds": round(sum(r.seconds for r in rs), 1),
                     "cpu_seconds": round(sum(getattr(r, "cpu_seconds", 0.0) for r in rs), 1)}
    return out


def cost_line(cost: dict) -> str:
    """One line: what the probes cost (runs, steps, examples, forward+backward tokens, seconds) and what share of the
    stages' training that is, by tokens, wall time and CPU time (the one other jobs on the machine barely move)."""
    p, t = cost["probe"], cost.get("stage") or {}

    def share(key):
        return f"{100 * p[key] / t[key]:.0f}%" if t.get(key) else "-"

    line = (f"probes {p['phases']} runs, {p['steps']} steps, {p['examples']} examples, {p.get('tokens', 0):,} tokens "
            f"(forward and backward), {p['seconds']:.0f} s")
    if t.get("phases"):
        line += (f"; stages {t['phases']}, {t['steps']} steps, {t['examples']} examples, {t.get('tokens', 0):,} "
                 f"tokens, {t['seconds']:.0f} s; probes / training = {share('tokens')} of the tokens, "
                 f"{share('seconds')} of the wall time, {share('cpu_seconds')} of the CPU time")
    return line + "."


def _macro(macro_score, results: dict):
    """The macro score of a before/after result set, or None when only NLL was measured."""
    if not results:
        return None
    try:
        return macro_score([r for metrics in results.values() for r in metrics.values()])
    except DPIConfigError:  # only NLL was measured: there is no score metric to average
        return None


def _fmt(value) -> str:
    """A value for the report: 3 decimals for floats, "-" for None."""
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    """``seconds`` as "M min S s"."""
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def _print(text: str) -> None:
    """Print ``text`` to stdout, flushed (the default ``log`` of :func:`run_recipe`)."""
    print(text, file=sys.stdout, flush=True)
