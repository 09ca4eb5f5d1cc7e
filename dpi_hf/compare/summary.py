"""Aggregating run records over seeds: mean ± std per method and task, and the budget check."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

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


def summarise(records: list[dict], tasks: list[str]) -> dict:
    """One method's runs (one record per seed) as mean ± std per task score, NLL, extra metric, cost and forgetting."""
    out: dict[str, Any] = {"tasks": {}}
    for task in tasks:
        entries = [r["tasks"][task] for r in records]
        extra_names = sorted({m for e in entries for m in e.get("extra", {})})
        out["tasks"][task] = {"metric": entries[0].get("metric"),
                              "score": mean_std([e.get("score") for e in entries]),
                              "nll": mean_std([e["nll"] for e in entries]),
                              "extra": {m: mean_std([e.get("extra", {}).get(m) for e in entries])
                                        for m in extra_names}}
    out["macro"] = mean_std([r["macro"] for r in records])
    for key in ("train_examples", "train_steps", "train_seconds", "probe_examples", "probe_seconds",
                "total_examples", "total_steps", "eval_seconds"):
        out[key] = mean_std([r.get(key) for r in records])
    out["forgetting"] = mean_std([r["forgetting"]["mean"] for r in records if "forgetting" in r])
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
    return {
        "tasks": tasks, "task_metrics": ctx.task_metrics, "methods": methods, "seeds": seeds,
        "base": base, "runs": runs, "summary": summary,
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
                       "mean_nll": statistics.fmean(r["tasks"][t]["nll"] for t in tasks),
                       "forgetting": r["forgetting"]["mean"], "forgetting_per_task": r["forgetting"]["per_task"],
                       "stages": r["stages"], "frozen_fraction": r["frozen_fraction"],
                       "train_examples": r["train_examples"], "probe_seconds": r["probe_seconds"],
                       "train_seconds": r["train_seconds"],
                       "scores": {t: r["tasks"][t].get("score") for t in tasks},
                       "nll": {t: r["tasks"][t]["nll"] for t in tasks}})
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


