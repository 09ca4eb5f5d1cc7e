"""The Markdown tables of a comparison (``results.md``) and of a sweep (``sweep.md``)."""

from __future__ import annotations

from ..evaluation.registry import HELDOUT_LOSS, get_metric


def _fmt(stat: dict, digits: int) -> str:
    """``mean ± std`` with ``digits`` decimals ("—" without a value)."""
    if stat["mean"] is None:
        return "—"
    text = f"{stat['mean']:.{digits}f}"
    return text + (f" ± {stat['std']:.{digits}f}" if stat.get("std") is not None else "")


def _label(metric: str) -> str:
    """A metric's column label (its :class:`~dpi_hf.evaluation.registry.Metric` record's)."""
    return get_metric(metric).label


def _digits(metric: str) -> int:
    """Decimals shown for a metric (its record's: 1 for percentages, 2 for judge ratings, 3 otherwise)."""
    return get_metric(metric).digits


def comparison_markdown(results: dict) -> str:
    """``results.md``: the scores table, held-out NLL, budget and cost, forgetting tables and DPI diagnostics."""
    tasks, summary, metrics = results["tasks"], results["summary"], results["task_metrics"]
    seeds = results["seeds"]
    lines = [f"# Comparison: {', '.join(results['methods'])}", ""]
    lines.append(f"Model `{results['settings']['model']}`; seeds {seeds} (mean ± sample std over seeds where "
                 f"there are several); eval rows per task {results['settings']['eval_sizes']}; train rows per task "
                 f"{results['settings']['train_sizes']}.")
    if any(m[0] == "rougeL_proxy" for m in metrics.values()):
        lines.append("ROUGE-L is an offline **proxy** for the judge score (no judge endpoint was used); the macro "
                     "score below is therefore not comparable with judge-based macro scores.")
    lines += ["", "## Scores (Table 1)", ""]
    header = ["method"] + [f"{t} ({_label(metrics[t][0])})" for t in tasks] + ["macro (0-10)"]
    extras = [(t, m) for t in tasks for m in metrics[t][1:]]
    header += [f"{t} ({_label(m)})" for t, m in extras]
    lines += [_row(header), _row(["---"] * len(header))]
    for method, s in summary.items():
        cells = [method] + [_fmt(s["tasks"][t]["score"], _digits(metrics[t][0])) for t in tasks]
        cells.append(_fmt(s["macro"], 2))
        cells += [_fmt(s["tasks"][t]["extra"].get(m, {"mean": None}), _digits(m)) for t, m in extras]
        lines.append(_row(cells))
    loss = get_metric(HELDOUT_LOSS)
    lines += ["", f"## Held-out {loss.label} (nats/token of the reference completion; {loss.direction} is better)", ""]
    header = ["method"] + tasks + ["mean"]
    lines += [_row(header), _row(["---"] * len(header))]
    for method, s in summary.items():
        lines.append(_row([method] + [_fmt(s["tasks"][t][HELDOUT_LOSS], loss.digits) for t in tasks]
                          + [_fmt(s["mean_nll"], loss.digits)]))
    lines += _paired_lines(results.get("paired"), tasks)
    lines += ["", "## Budget, cost and forgetting", "",
              "Training examples are counted at the training step. `train examples` are the stages' (the budget); "
              "probes are training too — for dpi before the plan, for cpi also trained into the backbone its stages "
              "start from — and `total examples` counts probes and stages: what each method spent in all. "
              "Forgetting: mean over tasks trained before the last stage of (NLL after the last stage − NLL after "
              "the task's own stage).", ""]
    header = ["method", "train examples", "train steps", "train s", "probe examples", "probe s",
              "probe / train tokens", "total examples", "eval s", "forgetting ΔNLL"]
    lines += [_row(header), _row(["---"] * len(header))]
    for method, s in summary.items():
        if method == "base":
            continue
        lines.append(_row([method, _fmt(s["train_examples"], 0), _fmt(s["train_steps"], 0),
                           _fmt(s["train_seconds"], 0), _fmt(s["probe_examples"], 0), _fmt(s["probe_seconds"], 0),
                           _token_share(s), _fmt(s.get("total_examples", {"mean": None}), 0), _fmt(s["eval_seconds"], 0),
                           _fmt(s["forgetting"], 3)]))
    same = results["budget"]["same_budget"]
    lines += ["", f"Same number of training examples for every run: **{'yes' if same else 'NO'}** "
                  f"({sorted(set(results['budget']['train_examples'].values()))})."]
    lines += ["", "## Forgetting tables (held-out NLL after each stage)", ""]
    base = results.get("base")
    for r in results["runs"]:
        if len(r["after_stages"]) < 2:
            continue
        lines += [f"### {r['method']}, seed {r['seed']}", ""]
        header = ["after stage (trained tasks)"] + tasks
        lines += [_row(header), _row(["---"] * len(header))]
        if base is not None:
            lines.append(_row(["base"] + [f"{base['tasks'][t]['nll']:.3f}" for t in tasks]))
        for row in r["after_stages"]:
            cells = [f"{row['stage']} ({', '.join(row['tasks'])})"]
            for t in tasks:
                value = row["tasks_eval"][t]
                text = f"{value['nll']:.3f}"
                if value.get("score") is not None:
                    text += f" / {value['score']:.{_digits(value['metric'])}f}"
                cells.append(f"**{text}**" if t in row["tasks"] else text)
            lines.append(_row(cells))
        lines.append("")
    dpi_runs = [r for r in results["runs"] if r["fields"].get("staging") == "dpi"]
    if dpi_runs:
        lines += ["## DPI diagnostics", ""]
        for r in dpi_runs:
            lines += [f"seed {r['seed']}: probes {r['probe_seconds']:.0f} s on {r['probe_examples']} examples; "
                      f"frozen fraction per stage {[round(f, 5) for f in r['frozen_fraction']]}", "", "```",
                      r["plan_text"], "```", ""]
    recorded = sum(r["train_wall_seconds"] + r["eval_seconds"] for r in results["runs"])
    recorded += results["base"]["seconds"] if results.get("base") else 0.0
    lines += [f"Compute recorded by the runs (training incl. probes, evaluation): {recorded:.0f} s; wall time of the "
              f"call that wrote this table: {results.get('wall_seconds', 0):.0f} s (finished runs are reused).", ""]
    return "\n".join(lines)


def _paired_lines(paired: dict | None, tasks: list[str]) -> list[str]:
    """The section comparing every method with the reference method seed by seed (nothing without a reference)."""
    if not paired or not paired.get("reference") or not paired["methods"]:
        return []
    ref = paired["reference"]
    lines = ["", f"## Against {ref}, paired by seed", "",
             f"Each method's run minus {ref}'s run at the same seed, mean ± sample std over seeds. A difference "
             "smaller than its std (or seen in fewer than all seeds) does not separate the methods.", ""]
    header = ["method", f"Δ mean NLL vs {ref}", "seeds with lower NLL"] + [f"Δ {t} NLL" for t in tasks] + \
        ["Δ macro", "seeds with higher macro"]
    lines += [_row(header), _row(["---"] * len(header))]
    for method, d in paired["methods"].items():
        n = len(d["seeds"])
        lines.append(_row([method, _fmt(d["mean_nll"], 3), f"{d['lower_nll']}/{n}"]
                          + [_fmt(d[HELDOUT_LOSS][t], 3) for t in tasks]
                          + [_fmt(d["macro"], 2), f"{d['higher_macro']}/{d['macro']['n']}"]))
    if any("score" in d for d in paired["methods"].values()):
        lines += ["", f"Each task's score, method − {ref} by seed: mean and 95 % t-interval over seeds (\"no "
                      "difference\" when the interval contains 0).", ""]
        header = ["method"] + [f"Δ {t} score" for t in tasks]
        lines += [_row(header), _row(["---"] * len(header))]
        for method, d in paired["methods"].items():
            lines.append(_row([method] + [_ci(d.get("score", {}).get(t)) for t in tasks]))
    return lines


def _ci(stat: dict | None) -> str:
    """``mean [lo, hi]`` with the verdict the interval allows ("—" without a value; the mean alone for one seed)."""
    if not stat or stat["mean"] is None:
        return "—"
    if stat.get("lo") is None:
        return f"{stat['mean']:+.3f} (one seed)"
    verdict = "no difference" if stat["lo"] <= 0 <= stat["hi"] else ("higher" if stat["lo"] > 0 else "lower")
    return f"{stat['mean']:+.3f} [{stat['lo']:+.3f}, {stat['hi']:+.3f}] {verdict}"


def _token_share(s: dict) -> str:
    """Probe tokens (forward and backward) as a share of the stages' tokens, e.g. "31%"; "-" without probes."""
    probe = (s.get("probe_tokens") or {}).get("mean")
    train = (s.get("train_tokens") or {}).get("mean")
    return f"{100 * probe / train:.0f}%" if probe and train else "-"


def _row(cells: list[str]) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def sweep_markdown(result: dict) -> str:
    """``sweep.md``: one row per sweep point (p, scope, stages, frozen fractions, macro, NLL, forgetting)."""
    lines = [f"# Core-fraction sweep (staging = {result['staging']})", "",
             f"Model `{result['settings']['model']}`. Forgetting: mean over tasks trained before the last stage of "
             "(NLL after the last stage − NLL after the task's own stage), nats/token. `unfrozen`: the same stages "
             "trained without freezing.", "",
             _row(["point", "p", "scope", "stages", "frozen fraction per stage", "macro (0-10)", "mean NLL",
                   "forgetting ΔNLL"]),
             _row(["---"] * 8)]
    for s in result["summary"]:
        lines.append(_row([s["name"], "—" if s["core_fraction"] is None else f"{s['core_fraction']:g}",
                           s["core_scope"] or "—", len(s["stages"]),
                           ", ".join(f"{f:.4f}" for f in s["frozen_fraction"]) or "—",
                           _fmt(s["macro"], 2), _fmt(s["mean_nll"], 3), _fmt(s["forgetting"], 4)]))
    lines += ["", f"Same number of training examples for every point: "
                  f"**{'yes' if result['budget']['same_budget'] else 'NO'}**. "
                  f"Wall time {result['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)

