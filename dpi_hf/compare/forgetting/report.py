"""The forgetting benchmark's written results: ``forgetting.json`` (with its summary and the settings each line's
validation score chose), ``results.md`` and ``pareto.png``.

Effects are printed in accuracy points (absolute, 0-1 scale) with their 95 % interval; an effect whose interval
contains 0 is printed as "no difference", never as a percentage or ratio.
"""

from __future__ import annotations

from pathlib import Path

from .summary import summarize

__all__ = ["write_outputs", "format_table", "effect"]

TABLE_FILE = "results.md"
PLOT_FILE = "pareto.png"


def write_outputs(out: Path, store, settings) -> dict:
    """Summarise ``store`` (a :class:`~.runner.ResultsStore`) and write the table and the plot next to it; returns
    the results mapping with ``files``."""
    from ...core.io import atomic_write_text
    from .plots import plot_pareto

    data = store.data
    data["summary"] = summarize(data, reps=settings.bootstrap_reps, reference_gain=settings.reference_gain)
    data["chosen"] = {key: g["chosen"] for key, g in data["summary"].items()}
    store.save()
    atomic_write_text(Path(out) / TABLE_FILE, format_table(data))
    plot_pareto(Path(out) / PLOT_FILE, data["summary"])
    return {**data, "files": {"results": store.path.name, "table": TABLE_FILE, "plot": PLOT_FILE}}


def _interval(i: dict | None, signed: bool = False) -> str:
    if not i:
        return "—"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(i['mean'])} [{f.format(i['lo'])}, {f.format(i['hi'])}]"


def effect(i: dict | None) -> str:
    """A paired difference: ``+0.120 [+0.050, +0.190]``, or ``no difference [−0.030, +0.050]`` when the interval
    contains 0."""
    if not i or i.get("lo") is None:
        return "—"
    if i["lo"] <= 0 <= i["hi"]:
        return f"no difference [{i['lo']:+.3f}, {i['hi']:+.3f}]"
    return _interval(i, signed=True)


def _matched(line: dict | None) -> str:
    m = line and line.get("matched")
    if not m:
        return "—"
    text = f"{m['forgetting']:+.3f}"
    if m.get("vs_none"):
        text += f"; vs none {effect(m['vs_none'])}"
    elif m["lo"] is None:
        text += f" (reached in {100 * m['defined']:.0f}% of resamples: no interval)"
    return text


def _reference_line(ref: float | None, is_none: bool) -> str:
    if ref is None:
        return "- forgetting at matched B gain: no reference gain"
    return (f"- forgetting at matched B gain: interpolated along each line's grid at B gain {ref:+.3f}"
            + (" (\"none\"'s)" if is_none else " (the recipe's reference_gain)"))


def _chosen(line: dict | None, label: str) -> bool:
    return bool(line) and len(line["settings"]) > 1 and line["chosen"] == label


def format_table(data: dict) -> str:
    """Markdown: the command, then per group (pair, B length) its facts and one row per setting."""
    lines = ["# Forgetting benchmark", ""]
    if data.get("command"):
        lines += ["```", data["command"], "```", ""]
    lines += ["Accuracy: the verifier's mean score on each task's held-out eval rows (validation rows only choose "
              "settings). Forgetting = A's accuracy after B − after A; learning = B's accuracy after B − after A. "
              "Brackets: 95 % bootstrap intervals over seeds and rows; differences are paired with \"none\" by "
              "seed and row. \"front\": on the Pareto front of (A accuracy after B, B gain). \"chosen\": the "
              "line's best setting on the validation rows.", ""]
    for key, g in data.get("summary", {}).items():
        a, b = g["a"], g["b"]
        ref = g["reference_gain"]
        lines += [f"## {a} → {b}, B for {g['b_steps']} steps ({len(g['seeds'])} seeds, {g['rows']['a']} + "
                  f"{g['rows']['b']} eval rows per seed)", "",
                  f"- base model: {a} {g['base']['a']:.3f}, {b} {g['base']['b']:.3f}; after A: {a} "
                  f"{g['after_a']['a']:.3f}, {b} {g['after_a']['b']:.3f}",
                  f"- majority-answer baseline: {a} {g['majority']['a']:.3f}, {b} {g['majority']['b']:.3f}",
                  f"- held-out rows dropped as repeats of training questions (all seeds): "
                  + ", ".join(f"{t} {n}" for t, n in g["dropped"].items()),
                  _reference_line(ref, data.get("settings", {}).get("reference_gain") is None), "",
                  f"| setting | {a} acc after B | {b} acc after B | forgetting of {a} | learning of {b} | "
                  f"forgetting vs none | learning vs none | forgetting at matched gain (line) | NLL {a} / {b} | "
                  "validation | front | chosen |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        shown_lines = set()
        for label, e in g["settings"].items():
            line = g["lines"].get(e["line"])
            matched = _matched(line) if e["line"] not in shown_lines else "″"
            shown_lines.add(e["line"])
            vs = e["vs_none"]
            lines.append(
                f"| {label} | {_interval(e['a_accuracy'])} | {_interval(e['b_accuracy'])} | "
                f"{effect(e['forgetting'])} | {effect(e['learning'])} | "
                f"{'—' if label == 'none' else effect(vs['forgetting'])} | "
                f"{'—' if label == 'none' else effect(vs['learning'])} | {matched} | "
                f"{e['nll']['a']:.3f} / {e['nll']['b']:.3f} | {e['validation']:.3f} | "
                f"{'✓' if e['pareto'] else ''} | {'✓' if _chosen(line, label) else ''} |")
        lines.append("")
    return "\n".join(lines)
