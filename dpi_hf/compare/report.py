"""Writing a comparison or a sweep: JSON record, Markdown table and plots, each written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.io import atomic_write_text
from .plots import plot_forgetting, plot_paired, plot_scores, plot_sweep
from .tables import comparison_markdown, sweep_markdown


def write_comparison(out: Path, results: dict) -> None:
    """Write ``results.json``, ``results.md``, ``scores.png``, ``paired.png`` (with a reference and two seeds or
    more) and ``forgetting.png`` into ``out``; records the file names under ``results["files"]``."""
    files = {"json": "results.json", "table": "results.md", "scores_plot": "scores.png",
             "forgetting_plot": "forgetting.png"}
    results["files"] = files
    plot_scores(out / files["scores_plot"], results)
    if plot_paired(out / "paired.png", results):
        files["paired_plot"] = "paired.png"
    plot_forgetting(out / files["forgetting_plot"], results)
    atomic_write_text(out / files["table"], comparison_markdown(results))
    write_json(out / files["json"], results)


def write_sweep(out: Path, result: dict) -> None:
    """Write ``sweep.json``, ``sweep.md`` and ``sweep.png`` into ``out``; records them under ``result["files"]``."""
    files = {"json": "sweep.json", "table": "sweep.md", "plot": "sweep.png"}
    result["files"] = files
    plot_sweep(out / files["plot"], result)
    atomic_write_text(out / files["table"], sweep_markdown(result))
    write_json(out / files["json"], result)


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically; numpy / torch scalars become numbers, other unknown
    values strings."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default))


def _json_default(value):
    """JSON for values ``json`` does not know: numpy / torch scalars as numbers, anything else as a string."""
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)

