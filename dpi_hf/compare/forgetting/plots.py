"""``pareto.png``: per group (pair, B length), every setting as a point (A accuracy after B, B gain), each line of a
method's grid connected, the Pareto front highlighted."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_pareto"]


def plot_pareto(path: Path, summary: dict) -> None:
    """One panel per group of ``summary`` (:func:`~.summary.summarize`); nothing is written when it is empty."""
    from ...inspection import pyplot

    if not summary:
        return
    plt = pyplot()
    n = len(summary)
    fig, axes = plt.subplots(1, n, figsize=(7.5 * n, 6), squeeze=False)
    for ax, (key, g) in zip(axes[0], summary.items()):
        by_line: dict[str, list] = {}
        for label, e in g["settings"].items():
            by_line.setdefault(e["line"], []).append((label, e))
        colors = plt.get_cmap("tab20")
        for i, (line, points) in enumerate(by_line.items()):
            xs = [e["a_accuracy"]["mean"] for _, e in points]
            ys = [e["learning"]["mean"] for _, e in points]
            style = dict(color="k", marker="*", ms=14) if line == "none" else dict(color=colors(i % 20), marker="o")
            ax.plot(xs, ys, "-" if len(points) > 1 else "", label=line, lw=1.2, **style)
        front = sorted(((e["a_accuracy"]["mean"], e["learning"]["mean"]) for e in g["settings"].values()
                        if e["pareto"]), key=lambda p: p[0])
        if front:
            ax.plot([p[0] for p in front], [p[1] for p in front], color="red", lw=2.5, alpha=0.35, zorder=0,
                    label="Pareto front")
            ax.scatter([p[0] for p in front], [p[1] for p in front], s=160, facecolors="none", edgecolors="red",
                       zorder=3)
        ax.axvline(g["after_a"]["a"], color="0.5", ls="--", lw=0.8)
        ax.annotate("A after A", (g["after_a"]["a"], ax.get_ylim()[0]), fontsize=7, color="0.4")
        ax.set_xlabel(f"{g['a']} accuracy after B (kept)")
        ax.set_ylabel(f"{g['b']} accuracy gained (after B − after A)")
        ax.set_title(f"{g['a']} → {g['b']}, B {g['b_steps']} steps ({len(g['seeds'])} seeds)")
        ax.legend(fontsize=6, loc="best", ncol=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
