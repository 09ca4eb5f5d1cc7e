"""Typed records of the training phases of a DPI run (probes and stages), as `DPITrainer` returns them.

Every probe and every stage is one ordinary ``Trainer.train()`` call; :class:`PhaseRecord` says what it was
(``kind``), which tasks it trained on, how many optimizer steps and training examples it took and how long. The
comparison harness and reports read these fields rather than parsing phase names, so the wording of log lines can
change freely.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

PROBE = "probe"
STAGE = "stage"
PHASE_KINDS = (PROBE, STAGE)


@dataclass
class PhaseRecord:
    """One probe or stage of a DPI run.

    Attributes:
        kind: ``"probe"`` or ``"stage"``.
        name: a readable label, e.g. ``"probe gsm8k"``, ``"probe gsm8k (half 2/2)"``, ``"stage 1"``.
        tasks: the tasks it trained on.
        steps: optimizer steps taken.
        examples: training examples stepped on, over all data-parallel ranks (rows of every micro-batch, counted at
            the training step).
        tokens: tokens that went through a forward and a backward pass, over all data-parallel ranks (the non-padding
            tokens of every micro-batch, prompt included; a probe that takes no optimizer step still pays both
            passes).
        seconds: wall-clock time of the phase.
        cpu_seconds: CPU time of the process (every thread) during the phase: unlike ``seconds``, barely moved by
            other jobs sharing the machine.
        train_loss: mean training loss (None when unknown).
        frozen: number of parameter elements kept frozen during the phase (0 for probes).
        half: for split-half probes, which half of the task's rows (1 or 2); None otherwise.
        eval: metrics of the evaluation that followed a stage (None when there was none).
        resumed_from: the checkpoint a resumed stage continued from (None for a phase run from its start); then
            ``examples`` and ``train_loss`` cover only the steps run after the resume.
    """

    kind: str
    name: str
    tasks: list[str]
    steps: int = 0
    examples: int = 0
    seconds: float = 0.0
    tokens: int = 0
    cpu_seconds: float = 0.0
    train_loss: float | None = None
    frozen: int = 0
    half: int | None = None
    eval: dict[str, float] | None = field(default=None)
    resumed_from: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in PHASE_KINDS:
            raise ValueError(f"PhaseRecord.kind={self.kind!r} is not one of {PHASE_KINDS}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PhaseRecord:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def batch_rows(inputs: Mapping[str, Any]) -> int:
    """Number of training examples in a collated micro-batch (padding-free batches count their sequences)."""
    ids = inputs["input_ids"]
    if ids.shape[0] == 1 and "position_ids" in inputs and "attention_mask" not in inputs:
        return int((inputs["position_ids"] == 0).sum())  # padding-free batch: sequences restart at position 0
    return int(ids.shape[0])


def batch_tokens(inputs: Mapping[str, Any]) -> int:
    """Number of tokens a collated micro-batch puts through the model: its attention mask's ones when it has one
    (padding excluded), else every position (padding-free batches hold no padding)."""
    mask = inputs.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    return int(inputs["input_ids"].numel())
