"""Task affinity: does a training step on one task lower another task's loss? (TAG, Fifty et al. 2021)

TAG's lookahead affinity of task i on task j is

    Z_i→j = 1 − L_j(θ − η ∇L_i(θ)) / L_j(θ),

positive when a step on i's loss lowers j's loss. To first order in η, L_j(θ − η ∇L_i) ≈ L_j(θ) − η ∇L_i · ∇L_j, so

    Z_i→j ≈ η ḡ_i · ḡ_j / L_j,

which is the estimator used here, from what the probes already compute:

* ḡ_i = S_i / T_i, the mean gradient of task i over its probe's T_i optimizer steps, where S_i = Σ_t g_t is the signed
  gradient sum accumulated beside the importance (:meth:`~dpi_hf.core.signals.ImportanceAccumulator.signed_sum`);
  each g_t is the gradient of a batch's mean loss, so ḡ_i estimates ∇L_i on the task's rows;
* L_j, the probe's mean training loss of task j (at θ itself when the probe takes no optimizer step);
* η, the learning rate of the training that follows (a plain gradient step: TAG's lookahead).

For i ≠ j the batches of the two tasks are independent, so ḡ_i · ḡ_j is an unbiased estimate of ∇L_i · ∇L_j; the
diagonal (a task on itself) carries the batch noise |ḡ_i|² − |∇L_i|² > 0 and is reported, not used.

The directed matrix is symmetrised, A_ij = (Z_i→j + Z_j→i) / 2, and tasks i, j share a group when A_ij > the
threshold (default 0: a step on either task lowers the other's loss, on average over the two directions); groups are
connected components, as for the core overlap. Since η and L are positive, at threshold 0 only the sign of ḡ_i · ḡ_j
decides: tasks whose mean gradients point against each other train in different stages.

Memory: the signed sum is one float32 buffer per considered element and task. Under FSDP it stays sharded: each rank
holds its local shards and :func:`gradient_dot` sums the local dot products across the ranks.

Torch only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import DPIConfigError

# A step on one task must lower the other's loss (on average over both directions) for the two to share a group.
DEFAULT_AFFINITY_THRESHOLD = 0.0


def validate_affinity_threshold(value) -> float:
    """Return ``value`` as a finite float or raise naming the argument."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise DPIConfigError(f"affinity_threshold={value!r} is not a number; pass a finite number (default 0).")
    if t != t or t in (float("inf"), float("-inf")):
        raise DPIConfigError(f"affinity_threshold={value!r} is not finite; pass a finite number (default 0).")
    return t


def _is_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "to_local") and any(getattr(p, "is_shard", lambda: False)() for p in t.placements)


def gradient_dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Σ over parameters of a[n] · b[n], accumulated in float64.

    Args:
        a, b: name → tensor over the same names (e.g. two tasks' signed gradient sums). Values may be DTensors
            sharded over a device mesh (FSDP2): each rank then adds the dot products of its local shards and the
            total is all-reduced over the mesh's process group, so every rank returns the same full dot product
            (every rank of the mesh must call this with the same names in the same order).
    """
    if list(a) != list(b):
        raise DPIConfigError("the gradient sums cover different parameters; compute both on the same model.")
    total = torch.zeros((), dtype=torch.float64)
    group = None
    for n in a:
        x, y = a[n], b[n]
        if hasattr(x, "to_local"):
            if _is_sharded(x):
                group = x.device_mesh.get_group()
            x, y = x.to_local(), y.to_local()
        total += torch.dot(x.reshape(-1).to(torch.float64), y.reshape(-1).to(torch.float64)).cpu()
    if group is not None:
        import torch.distributed as dist

        device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        t = total.to(device)
        dist.all_reduce(t, group=group)
        total = t.cpu()
    return float(total)


@dataclass
class AffinityReport:
    """The first-order TAG affinity of every pair of tasks, and what it was computed from.

    Attributes:
        tasks: task names, the row/column order of the matrices.
        learning_rate: η of the lookahead step.
        steps: task → T, the number of gradient steps its signed sum adds up.
        losses: task → L, its probe's mean training loss.
        gradient_dots: G[i][j] = ḡ_i · ḡ_j, the dot products of the tasks' mean gradients.
        affinity: Z[i][j] = η G[i][j] / L_j, the effect of a step on task i on task j's loss (directed).
        symmetric: A[i][j] = (Z[i][j] + Z[j][i]) / 2, what the groups are formed on.
    """

    tasks: list[str]
    learning_rate: float
    steps: dict[str, int]
    losses: dict[str, float]
    gradient_dots: list[list[float]]
    affinity: list[list[float]]
    symmetric: list[list[float]]

    def to_dict(self) -> dict:
        return {"tasks": list(self.tasks), "learning_rate": self.learning_rate, "steps": self.steps,
                "losses": self.losses, "gradient_dots": self.gradient_dots, "affinity": self.affinity,
                "symmetric": self.symmetric}

    @classmethod
    def from_dict(cls, d: Mapping) -> AffinityReport:
        try:
            return affinity_report([list(map(float, r)) for r in d["gradient_dots"]], list(d["tasks"]),
                                   {k: int(v) for k, v in d["steps"].items()},
                                   {k: float(v) for k, v in d["losses"].items()}, float(d["learning_rate"]),
                                   dots_of_means=True)
        except (KeyError, TypeError, ValueError) as e:
            raise DPIConfigError(f"not a valid affinity record ({type(e).__name__}: {e}); probe the tasks again.")

    def reorder(self, tasks: Sequence[str]) -> AffinityReport:
        """This report restricted to ``tasks``, in their order."""
        missing = [t for t in tasks if t not in self.tasks]
        if missing:
            raise DPIConfigError(f"the affinity record has no entry for tasks {missing}; probe them again.")
        pos = [self.tasks.index(t) for t in tasks]
        return affinity_report([[self.gradient_dots[i][j] for j in pos] for i in pos], list(tasks),
                               {t: self.steps[t] for t in tasks}, {t: self.losses[t] for t in tasks},
                               self.learning_rate, dots_of_means=True)


def affinity_report(
    dots: Sequence[Sequence[float]],
    tasks: Sequence[str],
    steps: Mapping[str, int],
    losses: Mapping[str, float],
    learning_rate: float,
    dots_of_means: bool = False,
) -> AffinityReport:
    """The affinity matrices from the tasks' gradient dot products.

    Args:
        dots: D[i][j] = S_i · S_j, the dot products of the tasks' signed gradient sums (symmetric), or, with
            ``dots_of_means=True``, of their mean gradients ḡ_i · ḡ_j.
        tasks: task names in the matrix order.
        steps: task → T_i, the number of steps S_i sums (ḡ_i = S_i / T_i).
        losses: task → L_i > 0, the task's loss at θ (its probe's mean training loss).
        learning_rate: η > 0, the lookahead step.
        dots_of_means: whether ``dots`` already holds the mean gradients' dot products (default False).
    """
    tasks = list(tasks)
    n = len(tasks)
    if len(dots) != n or any(len(row) != n for row in dots):
        raise DPIConfigError(f"the gradient dot products must form a {n}x{n} matrix for tasks {tasks}.")
    if not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
        raise DPIConfigError(f"learning_rate={learning_rate!r} must be positive for the affinity lookahead step.")
    for t in tasks:
        if steps.get(t, 0) < 1:
            raise DPIConfigError(f"task {t!r} accumulated no gradient step; its affinity is undefined.")
        if not (losses.get(t, 0.0) > 0 and losses[t] == losses[t]):
            raise DPIConfigError(f"task {t!r} has loss {losses.get(t)!r}; the affinity divides by a positive loss.")
    scale = [[1.0 if dots_of_means else 1.0 / (steps[tasks[i]] * steps[tasks[j]]) for j in range(n)]
             for i in range(n)]
    means = [[float(dots[i][j]) * scale[i][j] for j in range(n)] for i in range(n)]
    z = [[learning_rate * means[i][j] / losses[tasks[j]] for j in range(n)] for i in range(n)]
    sym = [[(z[i][j] + z[j][i]) / 2.0 for j in range(n)] for i in range(n)]
    return AffinityReport(tasks, float(learning_rate), {t: int(steps[t]) for t in tasks},
                          {t: float(losses[t]) for t in tasks}, means, z, sym)


def affinity_edges(report: AffinityReport, threshold: float = DEFAULT_AFFINITY_THRESHOLD) -> list[tuple[str, str]]:
    """The pairs of different tasks whose symmetric affinity is above ``threshold`` (strictly)."""
    t = report.tasks
    return [(t[i], t[j]) for i in range(len(t)) for j in range(i + 1, len(t)) if report.symmetric[i][j] > threshold]


def describe_affinity(report: AffinityReport) -> str:
    """Readable lines: the symmetric affinity matrix, with η and each task's loss."""
    w = max(len(t) for t in report.tasks)
    return "\n".join([
        f"task affinity (TAG lookahead, first order: η ḡ_i·ḡ_j / L_j, symmetrised; η = {report.learning_rate:g}):",
        " " * (w + 1) + " ".join(f"{t[:9]:>9}" for t in report.tasks),
        *(f"{t:<{w}} " + " ".join(f"{v:9.2e}" for v in row) for t, row in zip(report.tasks, report.symmetric)),
        "  loss L per task: " + ", ".join(f"{t} {report.losses[t]:.3f}" for t in report.tasks),
    ])


def gradient_dot_file(sums: Mapping[str, torch.Tensor], path) -> float:
    """Σ over parameters of sums[n] · (the tensor ``n`` of the safetensors file ``path``), in float64, reading the
    file one tensor at a time (so a task's saved gradient sum never has to be in memory whole).

    Args:
        sums: name → full (not sharded) tensor, e.g. a task's signed gradient sum under DDP or on one device.
        path: a safetensors file holding a tensor of the same shape for every name of ``sums``.
    """
    from safetensors import safe_open

    total = torch.zeros((), dtype=torch.float64)
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        missing = [n for n in sums if n not in names]
        if missing:
            raise DPIConfigError(f"the gradient sum in {str(path)!r} has no tensor {missing[0]!r}; probe again.")
        for n, x in sums.items():
            if hasattr(x, "to_local"):
                raise DPIConfigError("gradient_dot_file needs full tensors; sharded sums are reduced by gradient_dot.")
            y = f.get_tensor(n)
            total += torch.dot(x.detach().reshape(-1).to("cpu", torch.float64), y.reshape(-1).to(torch.float64))
    return float(total)
