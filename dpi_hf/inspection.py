"""Where the core regions lie: per task, by layer and by module type, as tables and PNG plots.

``dpi-hf inspect OUTPUT_DIR`` prints :func:`format_statistics` and writes :func:`write_plots`. Parameters are
classified by name (:func:`module_type`) into attention, MLP, embeddings, norms, lm_head and other, and assigned a
layer by the number after ``layers.`` / ``h.`` / ``blocks.`` / ``layer.`` / ``block.`` in their name (parameters
outside the decoder blocks — embeddings, final norm, lm_head — have no layer).

Density = core elements / elements (of a module type or a layer): at core fraction p a uniform spread would give p
everywhere, so a density far above p marks where the task's probe moved the weights most. Share = the part of the
task's whole core that lies there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .core import CoreMask, StagePlan, plan_stages

MODULE_TYPES = ("attention", "mlp", "embeddings", "norms", "lm_head", "other")
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_ATTENTION = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "qkv")
_MLP = ("mlp", "ffn", "feed_forward", "gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "dense_h_to_4h",
        "dense_4h_to_h", "experts")


def module_type(name: str) -> str:
    """The module type of parameter ``name``: one of :data:`MODULE_TYPES`.

    Norms are recognised first (``post_attention_layernorm`` is a norm, not attention), then the output head,
    embeddings, attention and MLP projections by their usual names in Hugging Face models.
    """
    n = name.lower()
    if "norm" in n or re.search(r"(?:^|\.)ln_?\w*\.", n):
        return "norms"
    if "lm_head" in n:
        return "lm_head"
    if "embed" in n or re.search(r"(?:^|\.)(?:wte|wpe)\.", n):
        return "embeddings"
    if any(k in n for k in _ATTENTION):
        return "attention"
    if any(k in n for k in _MLP):
        return "mlp"
    return "other"


def layer_index(name: str) -> int | None:
    """The decoder-block index in parameter ``name`` (``model.layers.3.mlp.up_proj.weight`` → 3), or None."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


@dataclass
class CoreStatistics:
    """Core counts of every task, aggregated by module type and by layer.

    Attributes:
        tasks: task names.
        total_elements: N, the number of considered elements.
        core_counts: task → |C_task|.
        type_elements: module type → elements of that type.
        type_counts: task → module type → core elements of that type.
        layer_elements: layer (None: outside the blocks) → elements.
        layer_counts: task → layer → core elements.
    """

    tasks: list[str]
    total_elements: int
    core_counts: dict[str, int]
    type_elements: dict[str, int]
    type_counts: dict[str, dict[str, int]]
    layer_elements: dict[int | None, int]
    layer_counts: dict[str, dict[int | None, int]]

    @property
    def layers(self) -> list[int]:
        """The block indices, ascending."""
        return sorted(k for k in self.layer_elements if k is not None)

    def type_density(self, task: str, kind: str) -> float:
        return self.type_counts[task].get(kind, 0) / self.type_elements[kind] if self.type_elements.get(kind) else 0.0

    def type_share(self, task: str, kind: str) -> float:
        total = self.core_counts[task]
        return self.type_counts[task].get(kind, 0) / total if total else 0.0

    def layer_density(self, task: str, layer: int | None) -> float:
        n = self.layer_elements.get(layer, 0)
        return self.layer_counts[task].get(layer, 0) / n if n else 0.0


def core_statistics(cores: Mapping[str, CoreMask]) -> CoreStatistics:
    """Aggregate ``cores`` (task → CoreMask over the same parameters) by module type and layer.

    Raises:
        ValueError: ``cores`` is empty.
    """
    if not cores:
        raise ValueError("no cores to inspect; run a DPI training (probes) first.")
    tasks = list(cores)
    first = cores[tasks[0]]
    type_elements, layer_elements = _tally(first.names(), first.numel)
    type_counts: dict[str, dict[str, int]] = {}
    layer_counts: dict[str, dict[int | None, int]] = {}
    for task, core in cores.items():
        type_counts[task], layer_counts[task] = _tally(core.names(), core.count)
    ordered_types = {k: type_elements[k] for k in MODULE_TYPES if k in type_elements}
    return CoreStatistics(tasks=tasks, total_elements=first.numel(),
                          core_counts={t: c.count() for t, c in cores.items()}, type_elements=ordered_types,
                          type_counts=type_counts, layer_elements=layer_elements, layer_counts=layer_counts)


def format_statistics(stats: CoreStatistics) -> str:
    """Two tables: by module type (density and share per task) and by layer (density per task), in percent."""
    p = {t: stats.core_counts[t] / stats.total_elements for t in stats.tasks}
    lines = [f"Cores of {len(stats.tasks)} tasks over N = {stats.total_elements:,} elements: "
             + ", ".join(f"{t} {stats.core_counts[t]:,} ({100 * p[t]:.3f}%)" for t in stats.tasks), "",
             "By module type (density = % of that type's elements in the core; share = % of the task's core there):"]
    header = ["type", "elements"] + [f"{t[:20]} dens/share" for t in stats.tasks]
    body = [[kind, f"{n:,}"] + [f"{100 * stats.type_density(t, kind):6.3f} / {100 * stats.type_share(t, kind):5.1f}"
                                for t in stats.tasks]
            for kind, n in stats.type_elements.items()]
    lines += _table(header, body)
    lines += ["", "By layer (density, %):"]
    header = ["layer", "elements"] + [t[:20] for t in stats.tasks]
    keys: list[int | None] = stats.layers + ([None] if None in stats.layer_elements else [])
    body = [["outside" if k is None else str(k), f"{stats.layer_elements[k]:,}"]
            + [f"{100 * stats.layer_density(t, k):.3f}" for t in stats.tasks] for k in keys]
    lines += _table(header, body)
    return "\n".join(lines)


def plot_core_density(stats: CoreStatistics, path) -> Path:
    """Line plot: core density (%) per decoder layer, one line per task, the uniform level p dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(stats.layers) + 3), 4))
    for task in stats.tasks:
        ax.plot(stats.layers, [100 * stats.layer_density(task, k) for k in stats.layers], marker="o", ms=3, label=task)
        ax.axhline(100 * stats.core_counts[task] / stats.total_elements, ls="--", lw=0.8, color="grey")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("core density (% of the layer's elements)")
    ax.set_title("Where each task's core lies (dashed: uniform spread = p)")
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def plot_module_types(stats: CoreStatistics, path) -> Path:
    """Grouped bars: core density (%) per module type, one bar per task."""
    plt = pyplot()
    kinds = list(stats.type_elements)
    fig, ax = plt.subplots(figsize=(1.3 * len(kinds) + 3, 4))
    width = 0.8 / len(stats.tasks)
    for i, task in enumerate(stats.tasks):
        xs = [k + (i - (len(stats.tasks) - 1) / 2) * width for k in range(len(kinds))]
        ax.bar(xs, [100 * stats.type_density(task, kind) for kind in kinds], width=width, label=task)
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_ylabel("core density (% of the type's elements)")
    ax.set_title("Core density by module type")
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def write_plots(cores: Mapping[str, CoreMask], plan: StagePlan | None, folder) -> dict[str, Path]:
    """Write ``overlap.png`` (when there are two or more tasks), ``core_density.png`` and ``core_modules.png``.

    Args:
        cores: task → CoreMask.
        plan: the plan whose Jaccard matrix is drawn; None computes it from ``cores`` with τ = 0.1.
        folder: where the PNG files go (created if needed).

    Returns:
        plot label → file path.
    """
    from .artifacts import plot_overlap

    folder = Path(folder)
    stats = core_statistics(cores)
    files = {"core density plot": plot_core_density(stats, folder / "core_density.png"),
             "module type plot": plot_module_types(stats, folder / "core_modules.png")}
    if len(cores) > 1:
        if plan is None or not plan.jaccard:
            plan = plan_stages(cores, tasks=list(cores))
        files["overlap heatmap"] = plot_overlap(plan, folder / "overlap.png")
    return files


def _tally(names, size) -> tuple[dict[str, int], dict[int | None, int]]:
    """``size(name)`` summed by module type and by layer over the parameter ``names``."""
    by_type: dict[str, int] = {}
    by_layer: dict[int | None, int] = {}
    for name in names:
        n = size(name)
        by_type[module_type(name)] = by_type.get(module_type(name), 0) + n
        by_layer[layer_index(name)] = by_layer.get(layer_index(name), 0) + n
    return by_type, by_layer


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
