"""How reproducible a task's core is, and how much of two tasks' overlap survives once probe noise is removed.

Split-half reliability: each task is probed twice from θ0, on two disjoint halves of its rows. Then

* the random level of two independent random p-subsets: J = p / (2 − p);
* task a's reliability r_a = J(C_a¹, C_a²), the Jaccard of its two half-cores;
* the half-level cross overlap H_ab = the mean Jaccard over the four pairs (C_aⁱ, C_bʲ);
* the reliability-corrected overlap H_ab / sqrt(r_a · r_b), clipped to [0, 1].

Both sides of the corrected ratio are measured on half-cores (cores of the same probe budget), so two halves of one
task score ≈ 1. Dividing the pooled cores' Jaccard by a half-level r instead would inflate it, because pooled cores
are themselves more reliable than half-cores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .errors import DPIConfigError
from .masks import CoreMask
from .signals import SIGNAL_REGISTRY

# A core is called reliable when its split-half Jaccard is at least this many times the random level ...
RANDOM_FACTOR = 2.0
# ... and at least this many times its largest half-level overlap with another task. Below that, the task's core is
# no more its own than another task's: probe noise, or two tasks that use the same parameters.
CROSS_FACTOR = 1.2


def random_jaccard(core_fraction: float) -> float:
    """Expected Jaccard of two independent random subsets holding a fraction p of the elements: p / (2 − p)."""
    p = float(core_fraction)
    return p / (2.0 - p)


@dataclass
class ReliabilityReport:
    """Split-half reliability of each task's core and the overlap matrices derived from it.

    Attributes:
        tasks: task names, the row/column order of the matrices.
        core_fraction: p of the cores.
        random_level: p / (2 − p).
        reliability: task → r, the Jaccard of its two half-cores.
        half_jaccard: H[i][j] (mean Jaccard over the four half-core pairs; r on the diagonal).
        corrected_jaccard: clip(H[i][j] / sqrt(r_i r_j), 0, 1) (1 on the diagonal; 0 where an r is 0).
    """

    tasks: list[str]
    core_fraction: float
    random_level: float
    reliability: dict[str, float]
    half_jaccard: list[list[float]]
    corrected_jaccard: list[list[float]]
    unreliable: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "reliability": self.reliability,
            "random_level": self.random_level,
            "half_jaccard": self.half_jaccard,
            "corrected_jaccard": self.corrected_jaccard,
            "unreliable": self.unreliable,
        }

    @classmethod
    def from_dict(cls, d: Mapping, tasks: Sequence[str], core_fraction: float | None = None) -> ReliabilityReport:
        return cls(
            tasks=list(tasks),
            core_fraction=float(core_fraction) if core_fraction is not None else float("nan"),
            random_level=float(d["random_level"]),
            reliability={k: float(v) for k, v in d["reliability"].items()},
            half_jaccard=[list(map(float, r)) for r in d["half_jaccard"]],
            corrected_jaccard=[list(map(float, r)) for r in d["corrected_jaccard"]],
            unreliable=dict(d.get("unreliable", {})),
        )


def _probe_fix(signal: str | None) -> str:
    """What to change when a core is unreliable: the signal's own advice (:attr:`Signal.unreliable_fix`: more probe
    data for a gradient signal, which is already the steadier one; the update signal also gets the default gradient
    signal as an option); an unknown or unnamed signal gets the update signal's."""
    return SIGNAL_REGISTRY.get(signal, SIGNAL_REGISTRY["update"]).unreliable_fix


def _diagnose(tasks, r, half, random_level, signal: str | None = None) -> dict[str, str]:
    fix = _probe_fix(signal)
    out = {}
    for i, t in enumerate(tasks):
        cross = [(half[i][j], tasks[j]) for j in range(len(tasks)) if j != i]
        worst, other = max(cross) if cross else (0.0, None)
        if r[t] < RANDOM_FACTOR * random_level:
            out[t] = (
                f"task {t!r}: its two half-probes' cores overlap at r = {r[t]:.3f}, not clearly above the random "
                f"level {random_level:.3f}: its core is probe noise. {fix[0].upper() + fix[1:]}."
            )
        elif other is not None and r[t] < CROSS_FACTOR * worst:
            out[t] = (
                f"task {t!r}: its half-probes overlap at r = {r[t]:.3f}, not clearly above its overlap with task "
                f"{other!r} ({worst:.3f}): its core is no more its own than {other!r}'s. Either probe noise "
                f"({fix}) or the two tasks use the same parameters (then they belong in one stage)."
            )
    return out


def reliability_report(
    half_cores: Mapping[str, Sequence[CoreMask]], core_fraction: float, tasks: Sequence[str] | None = None,
    signal: str | None = None,
) -> ReliabilityReport:
    """Reliability and corrected overlaps from each task's two half-cores.

    Args:
        half_cores: task → (core of half 1, core of half 2), all over the same parameters.
        core_fraction: p of the cores (for the random level).
        tasks: task order of the matrices (default: the order of ``half_cores``).
        signal: the importance signal the cores come from (a name in ``SIGNAL_REGISTRY``, e.g. ``"fisher"``); it decides
            which fix the warnings about unreliable tasks suggest (default None: the update signal's).
    """
    tasks = list(tasks) if tasks is not None else list(half_cores)
    for t in tasks:
        if t not in half_cores or len(half_cores[t]) != 2:
            raise DPIConfigError(f"task {t!r} needs exactly two half-cores for a split-half reliability report.")
    r = {t: half_cores[t][0].jaccard(half_cores[t][1]) for t in tasks}
    n = len(tasks)
    half = [[0.0] * n for _ in range(n)]
    corrected = [[1.0] * n for _ in range(n)]
    for i, a in enumerate(tasks):
        half[i][i] = r[a]
        for j in range(i + 1, n):
            b = tasks[j]
            h = sum(x.jaccard(y) for x in half_cores[a] for y in half_cores[b]) / 4.0
            half[i][j] = half[j][i] = h
            denom = math.sqrt(r[a] * r[b])
            corrected[i][j] = corrected[j][i] = min(1.0, max(0.0, h / denom)) if denom > 0 else 0.0
    level = random_jaccard(core_fraction)
    unreliable = _diagnose(tasks, r, half, level, signal)
    return ReliabilityReport(tasks, float(core_fraction), level, r, half, corrected, unreliable)


def describe_reliability(report: ReliabilityReport) -> str:
    """Readable lines: random level, r per task, the corrected matrix, and a warning per unreliable task."""
    w = max(len(t) for t in report.tasks)
    lines = [
        f"split-half reliability r (random level {report.random_level:.4f}):",
        *(f"  {t:<{w}} r = {report.reliability[t]:.3f}" for t in report.tasks),
        "reliability-corrected overlap:",
        " " * (w + 1) + " ".join(f"{t[:8]:>8}" for t in report.tasks),
        *(f"{t:<{w}} " + " ".join(f"{v:8.3f}" for v in row) for t, row in zip(report.tasks, report.corrected_jaccard)),
    ]
    lines += [f"WARNING {msg}" for msg in report.unreliable.values()]
    return "\n".join(lines)
