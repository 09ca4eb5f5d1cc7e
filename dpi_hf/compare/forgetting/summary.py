"""The summary of ``forgetting.json``: per group of runs (a pair and a B length), per setting and per line.

Per setting, over the seeds it shares with "none" (every interval from one :class:`~.stats.Bootstrap` per group, so
paired differences use the same resampled seeds and rows on both sides):

- ``a_accuracy`` / ``b_accuracy``: accuracy after B on A's / B's eval rows;
- ``forgetting`` = A's accuracy after B − after A (row by row), ``learning`` = B's after B − after A;
- ``vs_none``: ``forgetting`` and ``learning`` minus those of "none" (= the accuracy differences after B);
- the mean NLL after B, the validation score (mean over seeds of the average of A's and B's validation accuracy
  after B: only used to choose settings), seconds and examples.

Per line: forgetting at matched B gain (:func:`~.stats.matched_forgetting`, at "none"'s learning or
``reference_gain``) and its difference from "none"'s forgetting; the setting the validation split chooses. Per
group: the Pareto front of (A accuracy after B, B gain) over every setting.
"""

from __future__ import annotations

import statistics

import numpy as np

from .stats import Bootstrap, Interval, choose_settings, matched_forgetting, pareto_front, percentile_interval

__all__ = ["summarize", "group_key"]


def group_key(pair: str, b_steps: int) -> str:
    return f"{pair} | B {b_steps} steps"


def _per_row(runs: dict, a_models: dict, pair: str, role: str, kind: str, other: dict | None = None):
    """seed → per-row values: ``after`` (after B), ``change`` (after B − after A) or ``diff`` (after B − other's)."""
    out = {}
    for seed, r in runs.items():
        after = np.asarray(r["scores"][role], dtype=float)
        if kind == "after":
            out[seed] = after
        elif kind == "change":
            out[seed] = after - np.asarray(a_models[f"{pair}|{seed}"]["after_a"][role]["scores"], dtype=float)
        else:
            out[seed] = after - np.asarray(other[seed]["scores"][role], dtype=float)
    return out


def summarize(data: dict, reps: int = 2000, reference_gain: float | None = None) -> dict:
    """The summary of a results mapping (``forgetting.json``'s ``runs`` and ``a_models``); see the module
    docstring. Groups without a "none" run are left out (nothing to pair with)."""
    runs, a_models = data.get("runs", []), data.get("a_models", {})
    groups: dict[str, dict] = {}
    for r in runs:
        groups.setdefault(group_key(r["pair"], r["b_steps"]), {}).setdefault(r["label"], {})[r["seed"]] = r
    summary = {}
    for key, by_label in groups.items():
        none = by_label.get("none")
        if not none:
            continue
        summary[key] = _group(by_label, none, a_models, reps, reference_gain)
    return summary


def _group(by_label: dict, none: dict, a_models: dict, reps: int, reference_gain: float | None) -> dict:
    any_run = next(iter(none.values()))
    pair = any_run["pair"]
    seeds = sorted(none)
    boots: dict[tuple, Bootstrap] = {}

    def boot(subset: tuple) -> Bootstrap:
        if subset not in boots:
            rows = {s: {r: len(none[s]["scores"][r]) for r in ("a", "b")} for s in subset}
            boots[subset] = Bootstrap(rows, reps=reps, seed=0)
        return boots[subset]

    settings, replicates = {}, {}
    for label, runs in by_label.items():
        common = tuple(s for s in seeds if s in runs)
        if not common:
            continue
        runs = {s: runs[s] for s in common}
        base = {s: none[s] for s in common}
        b = boot(common)
        first = runs[common[0]]
        forgetting = _per_row(runs, a_models, pair, "a", "change")
        learning = _per_row(runs, a_models, pair, "b", "change")
        entry = {
            "method": first["method"], "line": first["line"], "setting": first["setting"], "seeds": list(common),
            "a_accuracy": b.interval("a", _per_row(runs, a_models, pair, "a", "after")).to_dict(),
            "b_accuracy": b.interval("b", _per_row(runs, a_models, pair, "b", "after")).to_dict(),
            "forgetting": b.interval("a", forgetting).to_dict(),
            "learning": b.interval("b", learning).to_dict(),
            "vs_none": {
                "forgetting": b.interval("a", _per_row(runs, a_models, pair, "a", "diff", base)).to_dict(),
                "learning": b.interval("b", _per_row(runs, a_models, pair, "b", "diff", base)).to_dict(),
            },
            "nll": {r: statistics.fmean(x["after_b"][r]["nll"] for x in runs.values()) for r in ("a", "b")},
            "nll_forgetting": statistics.fmean(x["after_b"]["a"]["nll"] - x["after_a"]["a"]["nll"]
                                               for x in runs.values()),
            "validation": statistics.fmean((x["validation"]["a"] + x["validation"]["b"]) / 2 for x in runs.values()),
            "seconds": statistics.fmean(x["seconds"] for x in runs.values()),
            "examples": statistics.fmean(x["examples"] for x in runs.values()),
        }
        settings[label] = entry
        if common == tuple(seeds):  # replicates on the group's own resample: usable along a line
            replicates[label] = (
                np.concatenate([[entry["learning"]["mean"]], b.replicates("b", learning)]),
                np.concatenate([[entry["forgetting"]["mean"]], b.replicates("a", forgetting)]),
            )
    front = pareto_front([(e["a_accuracy"]["mean"], e["learning"]["mean"]) for e in settings.values()])
    for flag, entry in zip(front, settings.values()):
        entry["pareto"] = flag
    lines = _lines(settings, replicates, reference_gain)
    after_a = [a_models[f"{pair}|{s}"] for s in seeds]
    return {
        "pair": pair, "a": any_run["a"], "b": any_run["b"], "b_steps": any_run["b_steps"], "seeds": seeds,
        "rows": {r: len(none[seeds[0]]["scores"][r]) for r in ("a", "b")},
        "after_a": {r: statistics.fmean(m["after_a"][r]["accuracy"] for m in after_a) for r in ("a", "b")},
        "base": {r: statistics.fmean(m["base"][r]["accuracy"] for m in after_a) for r in ("a", "b")},
        "majority": {r: statistics.fmean(m["majority"][r]["accuracy"] for m in after_a) for r in ("a", "b")},
        "dropped": {t: sum(m["data"][t].get("eval_duplicates_dropped", 0) for m in after_a)
                    for t in after_a[0]["data"]},
        "reference_gain": lines.pop("_reference"),
        "settings": settings, "lines": lines,
        "chosen": {line: v["chosen"] for line, v in lines.items()},
    }


def _lines(settings: dict, replicates: dict, reference_gain: float | None) -> dict:
    none = replicates.get("none")
    if reference_gain is not None:
        reference = np.full_like(none[0], float(reference_gain)) if none is not None else None
    else:
        reference = none[0] if none is not None else None
    out: dict = {"_reference": float(reference[0]) if reference is not None else None}
    by_line: dict[str, list[str]] = {}
    for label, e in settings.items():
        by_line.setdefault(e["line"], []).append(label)
    chosen = choose_settings({line: {lab: settings[lab]["validation"] for lab in labels}
                              for line, labels in by_line.items()})
    for line, labels in by_line.items():
        entry = {"method": settings[labels[0]]["method"], "settings": labels, "chosen": chosen.get(line),
                 "matched": None}
        usable = [lab for lab in labels if lab in replicates]
        if reference is not None and usable:
            gains = np.stack([replicates[lab][0] for lab in usable])
            forgets = np.stack([replicates[lab][1] for lab in usable])
            matched = matched_forgetting(gains, forgets, reference)
            if matched is not None:
                diff = matched.pop("replicates") - none[1][1:]
                finite = diff[np.isfinite(diff)]
                matched["vs_none"] = None
                if matched["lo"] is not None and len(finite):
                    lo, hi = percentile_interval(finite)
                    matched["vs_none"] = Interval(matched["forgetting"] - float(none[1][0]), float(lo), float(hi),
                                                  len(settings["none"]["seeds"])).to_dict()
            entry["matched"] = matched
        out[line] = entry
    return out
