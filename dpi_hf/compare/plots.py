"""The figures of a comparison (``scores.png``, ``paired.png``, ``forgetting.png``) and of a sweep (``sweep.png``)."""

from __future__ import annotations

import math
from pathlib import Path

from ..evaluation.registry import HELDOUT_LOSS, get_metric
from ..inspection import pyplot


def plot_scores(path: Path, results: dict) -> None:
    """Grouped bars: each task's score on the 0-10 macro scale (and the macro), one bar per method; NLL beside."""
    plt = pyplot()
    tasks, summary, metrics = results["tasks"], results["summary"], results["task_metrics"]
    scored = [t for t in tasks if get_metric(metrics[t][0]).is_score]
    loss = get_metric(HELDOUT_LOSS)
    methods = list(summary)
    fig, (ax_score, ax_nll) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(len(methods), 1)
    labels = [f"{t}\n{get_metric(metrics[t][0]).label}" for t in scored] + ["macro"]
    for i, method in enumerate(methods):
        s = summary[method]
        scale = [get_metric(metrics[t][0]).to_ten(1.0) for t in scored]  # the macro scale's factor
        means = [(s["tasks"][t]["score"]["mean"] or 0.0) * k for t, k in zip(scored, scale)]
        stds = [(s["tasks"][t]["score"]["std"] or 0.0) * k for t, k in zip(scored, scale)]
        means.append(s["macro"]["mean"] or 0.0)
        stds.append(s["macro"]["std"] or 0.0)
        xs = [x + i * width for x in range(len(labels))]
        ax_score.bar(xs, means, width, yerr=stds, label=method, capsize=2)
        nll_means = [s["tasks"][t][HELDOUT_LOSS]["mean"] for t in tasks]
        nll_stds = [s["tasks"][t][HELDOUT_LOSS]["std"] or 0.0 for t in tasks]
        ax_nll.bar([x + i * width for x in range(len(tasks))], nll_means, width, yerr=nll_stds, label=method,
                   capsize=2)
    ax_score.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, fontsize=8)
    ax_score.set_ylabel("score on the 0-10 macro scale")
    ax_score.set_title("task scores (mean ± std over seeds)")
    ax_nll.set_xticks([x + 0.4 - width / 2 for x in range(len(tasks))], tasks, fontsize=8)
    ax_nll.set_ylabel(f"held-out {loss.label} (nats/token)")
    ax_nll.set_title(f"held-out {loss.label} ({loss.direction} is better)")
    ax_score.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_paired(path: Path, results: dict) -> bool:
    """Each task's score, every method minus the reference (multitask) seed by seed: the mean with its 95 %
    t-interval over seeds, one group of bars per task. Writes nothing (returns False) without a reference or with
    fewer than two seeds in common."""
    paired = results.get("paired") or {}
    methods = {m: d for m, d in (paired.get("methods") or {}).items()
               if any((d.get("score") or {}).get(t, {}).get("lo") is not None for t in results["tasks"])}
    if not paired.get("reference") or not methods:
        return False
    plt = pyplot()
    tasks = results["tasks"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(tasks) + 2), 4.2))
    width = 0.8 / len(methods)
    for i, (method, d) in enumerate(methods.items()):
        stats = [d["score"].get(t) or {} for t in tasks]
        means = [st.get("mean") or 0.0 for st in stats]
        errs = [[(st["mean"] - st["lo"]) if st.get("lo") is not None else 0.0 for st in stats],
                [(st["hi"] - st["mean"]) if st.get("hi") is not None else 0.0 for st in stats]]
        ax.bar([x + i * width for x in range(len(tasks))], means, width, yerr=errs, label=method, capsize=2)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(tasks))], tasks, fontsize=8)
    ax.set_ylabel(f"score − {paired['reference']} (same seed)")
    ax.set_title(f"each task's score against {paired['reference']}: mean and 95 % interval over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_forgetting(path: Path, results: dict) -> None:
    """One heatmap per staged run of the first seed: NLL after each stage minus the base model's NLL."""
    plt = pyplot()
    tasks, base = results["tasks"], results.get("base")
    first_seed = results["seeds"][0]
    runs = [r for r in results["runs"] if r["seed"] == first_seed and len(r["after_stages"]) >= 1]
    if not runs:  # eval.forgetting = "none": no stage was evaluated
        fig, ax = plt.subplots(figsize=(4, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no stage models evaluated (eval.forgetting = none)", ha="center", va="center")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs) + 1, 3.4), squeeze=False)
    for ax, r in zip(axes[0], runs):
        rows = r["after_stages"]
        values = [[row["tasks_eval"][t][HELDOUT_LOSS] - (base["tasks"][t][HELDOUT_LOSS] if base else 0.0)
                   for t in tasks] for row in rows]
        bound = max(1e-6, max(abs(v) for row in values for v in row))
        image = ax.imshow(values, cmap="coolwarm" if base else "viridis", vmin=-bound if base else None,
                          vmax=bound if base else None, aspect="auto")
        for i, row in enumerate(rows):
            for j, t in enumerate(tasks):
                trained = t in row["tasks"]
                ax.text(j, i, f"{values[i][j]:+.2f}" if base else f"{values[i][j]:.2f}", ha="center",
                        va="center", fontsize=7, fontweight="bold" if trained else "normal")
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), [f"after {row['stage']}" for row in rows], fontsize=7)
        ax.set_title(f"{r['method']} (seed {r['seed']})", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle("held-out NLL change from the base model after each stage (bold: trained in that stage)"
                 if base else "held-out NLL after each stage (bold: trained in that stage)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(path: Path, result: dict) -> None:
    """``sweep.png``: macro score (or mean NLL) and forgetting against p, one line per scope."""
    plt = pyplot()
    summary = [s for s in result["summary"] if not s["reference"]]
    reference = next((s for s in result["summary"] if s["reference"]), None)
    use_macro = all(s["macro"]["mean"] is not None for s in result["summary"])
    score_key, score_label = ("macro", "macro score (0-10)") if use_macro else ("mean_nll", "mean held-out NLL")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], score_key, score_label), (axes[1], "forgetting", "forgetting ΔNLL")):
        for scope in dict.fromkeys(s["core_scope"] for s in summary):
            points = sorted((s for s in summary if s["core_scope"] == scope), key=lambda s: s["core_fraction"])
            xs = [s["core_fraction"] for s in points]
            ys = [s[key]["mean"] if s[key]["mean"] is not None else math.nan for s in points]
            errs = [s[key]["std"] or 0.0 for s in points]
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=2, label=scope)
        if reference is not None and reference[key]["mean"] is not None:
            ax.axhline(reference[key]["mean"], color="grey", linestyle="--", label="no freezing")
        ax.set_xscale("log")
        ax.set_xlabel("core fraction p")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    axes[0].set_title("score against p")
    axes[1].set_title("forgetting against p")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

