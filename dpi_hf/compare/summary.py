"""Aggregating run records over seeds: mean ± std per method and task, and the budget check."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from ..evaluation.registry import HELDOUT_LOSS
from .settings import eval_record

if TYPE_CHECKING:
    from .context import RunContext


def mean_std(values: list[float]) -> dict:
    """``{"mean", "std" (sample; None for one value), "n"}`` of the values that are not None."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


# two-sided 95 % quantiles of Student's t for 1-10 degrees of freedom; above, the Cornish-Fisher expansion (< 0.005 off)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t_quantile_975(df: int) -> float:
    """The 97.5th percentile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci(values: list[float]) -> dict:
    """:func:`mean_std` plus the 95 % t-interval of the mean (``lo``, ``hi``; None for fewer than two values): for
    differences paired by seed, an effect is one whose interval excludes 0."""
    out = mean_std(values)
    if out["n"] < 2:
        return {**out, "lo": None, "hi": None}
    half = t_quantile_975(out["n"] - 1) * out["std"] / out["n"] ** 0.5
    return {**out, "lo": out["mean"] - half, "hi": out["mean"] + half}


def mean_nll(record: dict, tasks: list[str]) -> float:
    """A run's held-out NLL averaged over the tasks (each task weighs the same)."""
    return statistics.fmean(record["tasks"][t][HELDOUT_LOSS] for t in tasks)


def summarise(records: list[dict], tasks: list[str]) -> dict:
    """One method's runs (one record per seed) as mean ± std per task score, NLL, extra metric, cost and forgetting."""
    out: dict[str, Any] = {"tasks": {}}
    for task in tasks:
        entries = [r["tasks"][task] for r in records]
        extra_names = sorted({m for e in entries for m in e.get("extra", {})})
        out["tasks"][task] = {"metric": entries[0].get("metric"),
                              "score": mean_std([e.get("score") for e in entries]),
                              HELDOUT_LOSS: mean_std([e[HELDOUT_LOSS] for e in entries]),
                              "extra": {m: mean_std([e.get("extra", {}).get(m) for e in entries])
                                        for m in extra_names}}
    out["macro"] = mean_std([r["macro"] for r in records])
    out["mean_nll"] = mean_std([mean_nll(r, tasks) for r in records])
    for key in ("train_examples", "train_steps", "train_seconds", "probe_examples", "probe_seconds",
                "probe_tokens", "train_tokens", "total_examples", "total_steps", "eval_seconds"):
        out[key] = mean_std([r.get(key) for r in records])
    out["forgetting"] = mean_std([r["forgetting"]["mean"] for r in records if "forgetting" in r])
    return out


def paired_differences(runs: list[dict], tasks: list[str], methods: list[str], reference: str) -> dict:
    """Each method against ``reference``, seed by seed: the seed moves both runs alike (same data order where the
    stages allow), so the difference's spread over seeds is the noise a claim must beat, not the two methods' own.

    Returns ``{method: {"mean_nll": mean_std of (method − reference) mean NLL, "lower_nll": seeds where the method's
    mean NLL is lower, "macro": mean_std of the macro-score difference, "higher_macro": seeds where it is higher,
    "nll": {task: mean_std of the task's NLL difference}, "score": {task: :func:`mean_ci` of the task's score
    difference, with its 95 % t-interval over seeds}, "seeds": the seeds both ran}}`` for every other method.
    """
    by_key = {(r["method"], r["seed"]): r for r in runs}
    out: dict[str, Any] = {}
    for method in methods:
        if method == reference:
            continue
        seeds = sorted(s for m, s in by_key if m == method and (reference, s) in by_key)
        pairs = [(by_key[(method, s)], by_key[(reference, s)]) for s in seeds]
        nll = [mean_nll(a, tasks) - mean_nll(b, tasks) for a, b in pairs]
        macro = [a["macro"] - b["macro"] for a, b in pairs if a["macro"] is not None and b["macro"] is not None]
        out[method] = {"mean_nll": mean_std(nll), "lower_nll": sum(d < 0 for d in nll),
                       "macro": mean_std(macro), "higher_macro": sum(d > 0 for d in macro),
                       HELDOUT_LOSS: {t: mean_std([a["tasks"][t][HELDOUT_LOSS] - b["tasks"][t][HELDOUT_LOSS]
                                                   for a, b in pairs]) for t in tasks},
                       "score": {t: mean_ci([a["tasks"][t]["score"] - b["tasks"][t]["score"] for a, b in pairs
                                             if a["tasks"][t].get("score") is not None
                                             and b["tasks"][t].get("score") is not None]) for t in tasks},
                       "seeds": seeds}
    return out


def assemble(ctx: RunContext, runs: list[dict], base: dict | None, methods: list[str], seeds: list[int],
              extra_settings: dict) -> dict:
    """The content of ``results.json`` (files aside): tasks, runs, per-method summary, budget check, settings."""
    tasks = list(ctx.train_sets)
    summary = {m: summarise([r for r in runs if r["method"] == m], tasks) for m in methods}
    if base is not None:
        summary = {"base": summarise([base], tasks), **summary}
    examples = {f"{r['method']}/seed-{r['seed']}": r["train_examples"] for r in runs}
    totals = {f"{r['method']}/seed-{r['seed']}": r.get("total_examples") for r in runs}
    # the paper's baseline is the mixture: every other method is judged against it, seed by seed
    reference = "multitask" if "multitask" in methods and len(methods) > 1 else None
    paired = {"reference": reference,
              "methods": paired_differences(runs, tasks, methods, reference) if reference else {}}
    return {
        "tasks": tasks, "task_metrics": ctx.task_metrics, "methods": methods, "seeds": seeds,
        "base": base, "runs": runs, "summary": summary, "paired": paired,
        "budget": {"train_examples": examples, "same_budget": len(set(examples.values())) <= 1,
                   "total_examples": totals},
        "settings": {"model": ctx.model_id, "training": ctx.training, "eval": eval_record(ctx.evaluation),
                     "train_sizes": {t: len(d) for t, d in ctx.train_sets.items()},
                     "eval_sizes": {t: len(d) for t, d in ctx.eval_sets.items()}, **extra_settings},
    }


def assemble_sweep(ctx: RunContext, records: list[dict], base: dict, staging: str, wall: float) -> dict:
    """The content of ``sweep.json`` (files aside): one point per run, the summary per point over seeds, budget."""
    tasks = list(ctx.train_sets)
    points = []
    for r in records:
        points.append({"name": r["method"], "seed": r["seed"], "core_fraction": r["core_fraction"],
                       "core_scope": r["core_scope"], "reference": r["reference"], "macro": r["macro"],
                       "mean_nll": mean_nll(r, tasks),
                       "forgetting": r["forgetting"]["mean"], "forgetting_per_task": r["forgetting"]["per_task"],
                       "stages": r["stages"], "frozen_fraction": r["frozen_fraction"],
                       "train_examples": r["train_examples"], "probe_seconds": r["probe_seconds"],
                       "train_seconds": r["train_seconds"],
                       "scores": {t: r["tasks"][t].get("score") for t in tasks},
                       HELDOUT_LOSS: {t: r["tasks"][t][HELDOUT_LOSS] for t in tasks}})
    summary = []
    for name in dict.fromkeys(p["name"] for p in points):
        group = [p for p in points if p["name"] == name]
        summary.append({"name": name, "core_fraction": group[0]["core_fraction"],
                        "core_scope": group[0]["core_scope"], "reference": group[0]["reference"],
                        **{k: mean_std([p[k] for p in group]) for k in ("macro", "mean_nll", "forgetting")},
                        "stages": group[0]["stages"], "frozen_fraction": group[0]["frozen_fraction"]})
    examples = {f"{p['name']}/seed-{p['seed']}": p["train_examples"] for p in points}
    return {"tasks": tasks, "task_metrics": ctx.task_metrics, "staging": staging, "points": points,
            "summary": summary, "base": base, "wall_seconds": wall,
            "budget": {"train_examples": examples, "same_budget": len(set(examples.values())) <= 1},
            "settings": {"model": ctx.model_id, "training": ctx.training,
                         "eval": eval_record(ctx.evaluation)}}


