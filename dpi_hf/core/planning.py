"""Stage planning: overlap of core regions, task groups and the order of stages.

* Overlap: the raw Jaccard J(Ci, Cj) = |Ci ∩ Cj| / |Ci ∪ Cj| (``overlap="raw"``), or the reliability-corrected
  overlap of the split-half probes, the half-level Jaccard divided by sqrt(r_i·r_j) (``overlap="corrected"``,
  DPIConfig's default; :mod:`dpi_hf.core.reliability`). ``plan_stages`` defaults to ``"raw"``, which needs no
  reliability report.
* Groups: an edge i—j when the overlap ≥ τ (or, with ``overlap="affinity"``, when the tasks' symmetric TAG affinity
  is above the affinity threshold, see :mod:`dpi_hf.core.affinity`); the groups are the connected components of that
  graph.
* Stages: the groups in an order (``given``, ``largest_first``, ``random``); stage k freezes
  F_k = ∪_{j<k} ∪_{i∈G_j} C_i.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .affinity import (
    DEFAULT_AFFINITY_THRESHOLD,
    AffinityReport,
    affinity_edges,
    describe_affinity,
    validate_affinity_threshold,
)
from .errors import DPIConfigError
from .masks import CoreMask
from .reliability import ReliabilityReport, describe_reliability

STAGE_ORDERS = ("given", "largest_first", "random")
# what a DPI plan of one stage means, said before any stage is paid for
ONE_STAGE_NOTE = "one stage: DPI is multitask here"
OVERLAPS = ("raw", "corrected", "affinity")
# τ by overlap scale. Raw: the paper's main setting (made for the raw Jaccard of |θ − θ0| cores). Corrected: measured
# (benchmarks/probe_calibration.py, docs/results.md): a task's two independent split-half measurements overlap at
# 0.97–1.00 after correction, six different reasoning-gym tasks at 0.30–0.43; 0.7 is the midpoint, so tasks share a
# stage when the probes cannot tell their cores apart. (Affinity groups on affinity_threshold; τ is unused there.)
DEFAULT_JACCARD_THRESHOLDS = {"raw": 0.1, "corrected": 0.7, "affinity": 0.7}


def default_jaccard_threshold(overlap: str) -> float:
    """The default τ for ``overlap`` (:data:`DEFAULT_JACCARD_THRESHOLDS`)."""
    if overlap not in DEFAULT_JACCARD_THRESHOLDS:
        raise DPIConfigError(f"overlap={overlap!r} is not one of {OVERLAPS}.")
    return DEFAULT_JACCARD_THRESHOLDS[overlap]


def validate_jaccard_threshold(value) -> float:
    """Return ``value`` as a float in [0, 1] or raise naming the argument."""
    try:
        tau = float(value)
    except (TypeError, ValueError):
        raise DPIConfigError(f"jaccard_threshold={value!r} is not a number; pass a value in [0, 1] (default 0.1).")
    if not (0.0 <= tau <= 1.0) or tau != tau:
        raise DPIConfigError(f"jaccard_threshold={value!r} is outside [0, 1]; pass a value in [0, 1] (default 0.1).")
    return tau


def connected_components(tasks: Sequence[str], edges: Sequence[tuple[str, str]]) -> list[list[str]]:
    """Connected components of an undirected graph, each listed in ``tasks`` order, ordered by first member."""
    parent = {t: t for t in tasks}

    def find(t):
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[rb] = ra
    groups: dict[str, list[str]] = {}
    for t in tasks:
        groups.setdefault(find(t), []).append(t)
    return list(groups.values())


def order_groups(
    groups: list[list[str]],
    order: str = "given",
    seed: int = 0,
    sizes: Mapping[str, int] | None = None,
) -> list[list[str]]:
    """Order groups into stages.

    Args:
        groups: the groups, each in task order, listed by first appearance.
        order: ``"given"`` (default) keeps first-appearance order; ``"largest_first"`` puts the group whose tasks
            together have the most training examples (``sizes``; falling back to the number of tasks) first, ties
            by first appearance — the biggest group shapes the most parameters, so its cores should be the ones
            every later stage protects; ``"random"`` shuffles with ``seed``.
        seed: seed for ``"random"`` (default 0).
        sizes: task → number of training examples, for ``"largest_first"``.
    """
    if order == "given":
        return [list(g) for g in groups]
    if order == "largest_first":

        def weight(g):
            return sum(sizes.get(t, 0) for t in g) if sizes else len(g)

        return [list(g) for _, g in sorted(enumerate(groups), key=lambda ig: (-weight(ig[1]), ig[0]))]
    if order == "random":
        out = [list(g) for g in groups]
        random.Random(seed).shuffle(out)
        return out
    raise DPIConfigError(f"stage_order={order!r} is not one of {STAGE_ORDERS}; pick one of them (default 'given').")


@dataclass
class StagePlan:
    """The outcome of planning: overlaps, groups, stages and what each stage freezes.

    Attributes:
        tasks: task names in given order.
        jaccard: ``jaccard[i][j]`` = J(C_tasks[i], C_tasks[j]).
        jaccard_threshold: τ used for the edges.
        groups: connected components (lists of task names), by first appearance.
        stages: the groups in training order.
        stage_order: the ordering rule used.
        core_counts: task → |C_task|.
        frozen_counts: stage index → |F_k| (number of frozen elements during stage k).
        total_elements: N, the number of considered elements.
        cores: task → CoreMask (not serialised; reattach after :meth:`from_json` to call :meth:`frozen_before`).
        freeze: whether stages freeze earlier stages' cores (False for the paper's no-freezing baselines).
        overlap: which matrix the groups were formed on: ``"raw"`` (``jaccard``), ``"corrected"``
            (``reliability.corrected_jaccard``) or ``"affinity"`` (``affinity.symmetric``, edges above
            ``affinity_threshold``).
        reliability: the split-half :class:`~dpi_hf.core.reliability.ReliabilityReport`, when the probes measured it.
        affinity: the tasks' first-order TAG :class:`~dpi_hf.core.affinity.AffinityReport`, when the probes recorded
            their gradients.
        affinity_threshold: the threshold of ``overlap="affinity"`` (an edge when the symmetric affinity is above it).
    """

    tasks: list[str]
    jaccard: list[list[float]]
    jaccard_threshold: float
    groups: list[list[str]]
    stages: list[list[str]]
    stage_order: str = "given"
    core_counts: dict[str, int] = field(default_factory=dict)
    frozen_counts: list[int] = field(default_factory=list)
    total_elements: int = 0
    freeze: bool = True
    overlap: str = "raw"
    reliability: ReliabilityReport | None = None
    affinity: AffinityReport | None = None
    affinity_threshold: float = DEFAULT_AFFINITY_THRESHOLD
    cores: dict[str, CoreMask] | None = field(default=None, repr=False, compare=False)

    def frozen_before(self, k: int) -> CoreMask:
        """F_k: the union of the cores of every task in stages < k (empty for k = 0 or without freezing)."""
        if not 0 <= k < len(self.stages):
            raise DPIConfigError(f"stage index {k} is outside 0..{len(self.stages) - 1}.")
        if self.cores is None:
            raise DPIConfigError("this plan has no cores attached; call plan.attach_cores(cores) first.")
        if not self.freeze or k == 0:
            names = next(iter(self.cores.values())).shapes() if self.cores else {}
            return CoreMask.from_indices({}, names)
        return CoreMask.union_all(self.cores[t] for stage in self.stages[:k] for t in stage)

    def frozen_fraction(self, k: int) -> float:
        return self.frozen_counts[k] / self.total_elements if self.total_elements else 0.0

    def attach_cores(self, cores: Mapping[str, CoreMask]) -> StagePlan:
        missing = [t for t in self.tasks if t not in cores]
        if missing:
            raise DPIConfigError(f"cores are missing for tasks {missing}; probe them or load a complete cores file.")
        self.cores = dict(cores)
        return self

    def to_dict(self) -> dict:
        return {
            "tasks": self.tasks,
            "stages": self.stages,
            "groups": self.groups,
            "jaccard": self.jaccard,
            "jaccard_threshold": self.jaccard_threshold,
            "stage_order": self.stage_order,
            "core_counts": self.core_counts,
            "frozen_counts": self.frozen_counts,
            "total_elements": self.total_elements,
            "freeze": self.freeze,
            "overlap": self.overlap,
            **(self.reliability.to_dict() if self.reliability is not None else {}),
            **({"affinity": self.affinity.to_dict(), "affinity_threshold": self.affinity_threshold}
               if self.affinity is not None else {}),
        }

    def to_json(self, **extra) -> str:
        """JSON text of the plan; ``extra`` keys (e.g. core_fraction, fingerprint, versions) are added."""
        return json.dumps({**self.to_dict(), **extra}, indent=2)

    @classmethod
    def from_dict(cls, d: Mapping) -> StagePlan:
        try:
            return cls(
                tasks=list(d["tasks"]),
                jaccard=[list(map(float, row)) for row in d["jaccard"]],
                jaccard_threshold=float(d["jaccard_threshold"]),
                groups=[list(g) for g in d["groups"]],
                stages=[list(s) for s in d["stages"]],
                stage_order=d.get("stage_order", "given"),
                core_counts={k: int(v) for k, v in d.get("core_counts", {}).items()},
                frozen_counts=[int(x) for x in d.get("frozen_counts", [])],
                total_elements=int(d.get("total_elements", 0)),
                freeze=bool(d.get("freeze", True)),
                overlap=d.get("overlap", "raw"),
                reliability=ReliabilityReport.from_dict(d, d["tasks"], d.get("core_fraction"))
                if "reliability" in d else None,
                affinity=AffinityReport.from_dict(d["affinity"]) if d.get("affinity") else None,
                affinity_threshold=float(d.get("affinity_threshold", DEFAULT_AFFINITY_THRESHOLD)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DPIConfigError(f"not a valid DPI plan ({type(e).__name__}: {e}); re-create it with plan_stages.")

    @classmethod
    def from_json(cls, text: str) -> StagePlan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise DPIConfigError(f"the plan is not valid JSON ({e}); re-create it with `dpi-hf plan`.")
        return cls.from_dict(d)

    def describe(self) -> str:
        """Human-readable summary: overlap matrix and stages."""
        w = max(len(t) for t in self.tasks)
        lines = []
        if self.jaccard:
            lines += ["Jaccard overlap of core regions:", " " * (w + 1) + " ".join(f"{t[:8]:>8}" for t in self.tasks)]
            for t, row in zip(self.tasks, self.jaccard):
                lines.append(f"{t:<{w}} " + " ".join(f"{v:8.3f}" for v in row))
            if self.reliability is not None:
                lines.append(describe_reliability(self.reliability))
            if self.affinity is not None:
                lines.append(describe_affinity(self.affinity))
            if self.overlap == "affinity":
                lines.append(f"groups (affinity > {self.affinity_threshold:g}): {self.groups}")
            else:
                lines.append(f"groups ({'corrected ' if self.overlap == 'corrected' else ''}J >= "
                             f"{self.jaccard_threshold}): {self.groups}")
        for k, s in enumerate(self.stages):
            frozen = f", frozen {100 * self.frozen_fraction(k):.2f}%" if self.frozen_counts else ""
            lines.append(f"stage {k + 1}/{len(self.stages)}: {s}{frozen}")
        if self.is_multitask:
            lines.append(f"{ONE_STAGE_NOTE}: every task is in one group, so the stages train exactly what "
                         "staging='multitask' trains (plus these probes); a higher threshold or another overlap "
                         "splits them (`dpi-hf plan RUN --jaccard-threshold TAU` or `--overlap affinity`).")
        return "\n".join(lines)

    @property
    def is_multitask(self) -> bool:
        """Whether this is a DPI plan (grouped on overlaps, not a baseline's fixed stages) of several tasks in one
        stage: then it trains what the multi-task mixture trains."""
        return self.stage_order in STAGE_ORDERS and len(self.tasks) > 1 and len(self.stages) == 1


def plan_from_groups(
    cores: Mapping[str, CoreMask] | None,
    stages: Sequence[Sequence[str]],
    *,
    tasks: Sequence[str] | None = None,
    freeze: bool = True,
    jaccard_threshold: float = 0.0,
    stage_order: str = "given",
) -> StagePlan:
    """A plan whose stages are given rather than derived from overlaps (the paper's multi-stage baselines).

    Args:
        cores: task → CoreMask, or None for plans that never freeze (``freeze=False``).
        stages: the stages as lists of task names; every task appears exactly once.
        tasks: all task names in given order (default: order of appearance in ``stages``).
        freeze: freeze earlier stages' cores (needs ``cores``).
    """
    tasks = list(tasks) if tasks is not None else [t for s in stages for t in s]
    seen = [t for s in stages for t in s]
    if sorted(seen) != sorted(tasks) or len(set(seen)) != len(seen):
        raise DPIConfigError(
            f"stages {list(map(list, stages))} must name every task exactly once; tasks are {tasks}."
        )
    if any(len(s) == 0 for s in stages):
        raise DPIConfigError("a stage is empty; every stage needs at least one task.")
    if freeze and cores is None:
        raise DPIConfigError("freeze=True needs the tasks' cores; pass cores or set freeze=False.")
    plan = StagePlan(
        tasks=tasks,
        jaccard=[],  # unknown without cores
        jaccard_threshold=jaccard_threshold,
        groups=[list(s) for s in stages],
        stages=[list(s) for s in stages],
        stage_order=stage_order,
        freeze=freeze,
    )
    if cores is not None:
        _check_cores(cores, tasks)
        plan.jaccard = jaccard_matrix(cores, tasks)
        _fill_counts(plan, cores)
    else:
        plan.frozen_counts = [0] * len(plan.stages)
    return plan


def jaccard_matrix(cores: Mapping[str, CoreMask], tasks: Sequence[str]) -> list[list[float]]:
    """Symmetric matrix of J(C_i, C_j) over ``tasks`` (1.0 on the diagonal)."""
    n = len(tasks)
    jac = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            jac[i][j] = jac[j][i] = cores[tasks[i]].jaccard(cores[tasks[j]])
    return jac


def _check_cores(cores: Mapping[str, CoreMask], tasks: Sequence[str]) -> None:
    if not tasks:
        raise DPIConfigError("no tasks given; pass at least one task's core.")
    missing = [t for t in tasks if t not in cores]
    if missing:
        raise DPIConfigError(f"unknown task names {missing}: no core for them; known tasks are {list(cores)}.")
    shapes = cores[tasks[0]].shapes()
    for t in tasks[1:]:
        if cores[t].shapes() != shapes:
            raise DPIConfigError(
                f"the core of task {t!r} covers other parameters than the core of {tasks[0]!r}; "
                "compute every core on the same model with the same include/exclude patterns."
            )


def _fill_counts(plan: StagePlan, cores: Mapping[str, CoreMask]) -> None:
    plan.attach_cores(cores)
    plan.core_counts = {t: cores[t].count() for t in plan.tasks}
    plan.total_elements = cores[plan.tasks[0]].numel()
    plan.frozen_counts = [plan.frozen_before(k).count() for k in range(len(plan.stages))]


def plan_stages(
    cores: Mapping[str, CoreMask],
    jaccard_threshold: float | None = None,
    order: str = "given",
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    sizes: Mapping[str, int] | None = None,
    reliability: ReliabilityReport | None = None,
    overlap: str = "raw",
    affinity: AffinityReport | None = None,
    affinity_threshold: float = DEFAULT_AFFINITY_THRESHOLD,
) -> StagePlan:
    """Group tasks by core overlap and order the groups into stages.

    Args:
        cores: task name → its core region; iteration order is the "given" order.
        jaccard_threshold: τ in [0, 1]; tasks i, j share a group when their overlap ≥ τ (through connected
            components). τ = 0 puts every task in one group. Default None: by ``overlap``, 0.1 on the raw Jaccard
            (the paper's main setting) and 0.7 on the corrected overlap (measured; :data:`DEFAULT_JACCARD_THRESHOLDS`).
        order: stage order: ``"given"`` (default), ``"largest_first"`` or ``"random"`` (see :func:`order_groups`).
        seed: seed for ``order="random"`` (default 0).
        tasks: restrict/reorder to these task names (default: all of ``cores``); unknown names are an error.
        sizes: task → number of training examples, used by ``"largest_first"``.
        reliability: the split-half reliability report of these cores (recorded in the plan; needed for
            ``overlap="corrected"``). Default None.
        overlap: the matrix the groups form on: ``"raw"`` (default; the cores' Jaccard ≥ τ), ``"corrected"`` (the
            reliability-corrected overlap of ``reliability`` ≥ τ) or ``"affinity"`` (the symmetric TAG affinity of
            ``affinity`` > ``affinity_threshold``).
        affinity: the tasks' :class:`~dpi_hf.core.affinity.AffinityReport` (recorded in the plan; needed for
            ``overlap="affinity"``). Default None.
        affinity_threshold: the affinity above which two tasks share a group (default 0: a step on either task
            lowers the other's loss, averaged over the two directions).

    Returns:
        A :class:`StagePlan` with the cores attached.
    """
    if overlap not in OVERLAPS:
        raise DPIConfigError(f"overlap={overlap!r} is not one of {OVERLAPS}.")
    tau = validate_jaccard_threshold(default_jaccard_threshold(overlap) if jaccard_threshold is None
                                     else jaccard_threshold)
    if order not in STAGE_ORDERS:
        raise DPIConfigError(f"order={order!r} is not one of {STAGE_ORDERS}; pick one of them (default 'given').")
    tasks = list(tasks) if tasks is not None else list(cores)
    _check_cores(cores, tasks)
    jac = jaccard_matrix(cores, tasks)
    threshold = validate_affinity_threshold(affinity_threshold)
    if reliability is not None:
        reliability = reorder_report(reliability, tasks)  # the matrices' rows follow the plan's task order
    if affinity is not None:
        affinity = affinity.reorder(tasks)
    grouping = jac
    if overlap == "corrected":
        if reliability is None:
            raise DPIConfigError(
                "overlap='corrected' needs the split-half reliability of the cores; set probe_reliability="
                "'split_half' (or overlap='raw')."
            )
        grouping = reliability.corrected_jaccard
    if overlap == "affinity":
        if affinity is None:
            raise DPIConfigError(
                "overlap='affinity' needs the tasks' gradient dot products, which these probes did not record; probe "
                "again with a gradient core_signal and probe_affinity=True (or pick overlap='corrected' or 'raw')."
            )
        edges = affinity_edges(affinity, threshold)
    else:
        edges = [(tasks[i], tasks[j]) for i in range(len(tasks)) for j in range(i + 1, len(tasks))
                 if grouping[i][j] >= tau]
    groups = connected_components(tasks, edges)
    plan = StagePlan(
        tasks=tasks,
        jaccard=jac,
        jaccard_threshold=tau,
        groups=groups,
        stages=order_groups(groups, order, seed, sizes),
        stage_order=order,
        overlap=overlap,
        reliability=reliability,
        affinity=affinity,
        affinity_threshold=threshold,
    )
    _fill_counts(plan, cores)
    return plan


def reorder_report(report: ReliabilityReport, tasks: list[str]) -> ReliabilityReport:
    """``report`` restricted to ``tasks`` and in their order (e.g. a report loaded with masks of more tasks)."""
    if list(report.tasks) == list(tasks):
        return report
    missing = [t for t in tasks if t not in report.tasks]
    if missing:
        raise DPIConfigError(f"the reliability report has no entry for tasks {missing}; probe them with split_half.")
    pos = [report.tasks.index(t) for t in tasks]
    return ReliabilityReport(
        tasks=list(tasks), core_fraction=report.core_fraction, random_level=report.random_level,
        reliability={t: report.reliability[t] for t in tasks},
        half_jaccard=[[report.half_jaccard[i][j] for j in pos] for i in pos],
        corrected_jaccard=[[report.corrected_jaccard[i][j] for j in pos] for i in pos],
        unreliable={t: m for t, m in report.unreliable.items() if t in tasks},
        pooled_reliability={t: v for t, v in report.pooled_reliability.items() if t in tasks},
    )
