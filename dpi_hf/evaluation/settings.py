"""How models are evaluated in a run: the one settings type (a recipe's ``eval:`` section) and the one table of
default metrics. ``dpi-hf train``, ``dpi-hf compare`` and ``dpi-hf sweep`` all read it.

The metric functions themselves are in :mod:`dpi_hf.evaluation.registry`; this module decides which metrics a
task gets and with which keyword arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import InitVar, dataclass, field
from typing import Any, Mapping

from dpi_hf.core.errors import DPIConfigError
from dpi_hf.utils import check_unknown_keys, did_you_mean, is_int

# Metrics of a task that eval.metrics does not name, by TaskSpec source; other sources get FALLBACK_METRICS.
DEFAULT_METRICS: dict[str, list[str]] = {
    "reasoning_gym": ["reasoning_gym", "nll"],
    "gsm8k_jsonl": ["gsm8k_accuracy", "nll"],
    "logiqa_txt": ["logiqa_accuracy"],
}
FALLBACK_METRICS = ["nll"]
FORGETTING_MODES = ("nll", "all", "none")
JUDGE_KEYS = ("base_url", "model", "api_key_env", "timeout", "max_retries")


@dataclass
class EvalSpec:
    """The ``eval:`` section: how each task is scored on its held-out ``eval`` split (a task's ``eval_samples``).

    Args:
        before: ``train``: score the base model before training; ``compare``: include the base model as a
            reference row (default True).
        after: ``train``: score the trained model (default True).
        metrics: task name → a metric name or a list of them, of :data:`dpi_hf.evaluation.METRICS` (default for a
            task not listed: by its source, see :data:`DEFAULT_METRICS`). In a comparison the first one is the
            task's score (the table column and the macro score) and the others are reported beside it.
        max_samples: how many of each task's held-out rows the metrics score (the first ones; default None: all).
            0 scores the held-out NLL only (no generation). ``humaneval_pass@1`` scores the first ``max_samples``
            HumanEval problems. The Python name of the comparison API, ``metric_samples=``, is accepted too.
        nll_samples: ``compare``/``sweep``: how many held-out rows the NLL uses (default None: all).
        max_new_tokens: the most tokens generated per answer (default 256).
        batch_size: rows per generation / forward batch (default 8).
        trainer_eval: ``train``: also give the eval splits to the trainer, which logs each task's loss after every
            stage and writes ``dpi/forgetting.json`` (default True).
        metric_kwargs: metric name → extra keyword arguments for it (of
            :func:`~dpi_hf.evaluation.evaluate_task`), e.g. ``{logiqa_accuracy: {mode: generate}}`` (default none).
        judge: for ``judge_score``: ``{base_url, model}`` and optionally ``api_key_env``, ``timeout``,
            ``max_retries`` of an OpenAI-compatible endpoint (:class:`~dpi_hf.evaluation.JudgeClient`; default
            None: no judge, name ``rougeL_proxy`` instead).
        forgetting: ``compare``: what is evaluated after each stage of the staged methods: ``"nll"`` (default;
            cheap), ``"all"`` (NLL and every task's metric) or ``"none"`` (no stage models are saved).

    Raises:
        DPIConfigError: an unknown metric or key, a bad number, or ``judge_score`` without ``judge``.
    """

    before: bool = True
    after: bool = True
    metrics: dict[str, Any] = field(default_factory=dict)
    max_samples: int | None = None
    nll_samples: int | None = None
    max_new_tokens: int = 256
    batch_size: int = 8
    trainer_eval: bool = True
    metric_kwargs: dict[str, dict] = field(default_factory=dict)
    judge: dict[str, Any] | None = None
    forgetting: str = "nll"
    metric_samples: InitVar[int | None] = None

    def __post_init__(self, metric_samples: int | None = None) -> None:
        from dpi_hf.evaluation.registry import METRIC_REGISTRY as METRICS  # the registered names

        if metric_samples is not None:
            self.max_samples = metric_samples
        for name in ("before", "after", "trainer_eval"):
            if not isinstance(getattr(self, name), bool):
                raise DPIConfigError(f"eval.{name} must be true or false, got {getattr(self, name)!r}.")
        for name in ("max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise DPIConfigError(f"eval.{name} must be an integer >= 1, got {value!r}.")
        if self.max_samples is not None and (not is_int(self.max_samples) or self.max_samples < 0):
            raise DPIConfigError(f"eval.max_samples must be an integer >= 0 (0: held-out NLL only) or null (all "
                                 f"rows), got {self.max_samples!r}.")
        if self.nll_samples is not None and (not is_int(self.nll_samples) or self.nll_samples < 1):
            raise DPIConfigError(f"eval.nll_samples must be a positive integer or null (all rows), got "
                                 f"{self.nll_samples!r}.")
        if not isinstance(self.metrics, Mapping):
            raise DPIConfigError(f"eval.metrics must map task names to metrics, got {self.metrics!r}.")
        normalised = {}
        for task, value in self.metrics.items():
            names = [value] if isinstance(value, str) else value
            if not isinstance(names, (list, tuple)) or not names or not all(isinstance(m, str) for m in names):
                raise DPIConfigError(f"eval.metrics.{task} must be a metric name or a list of them, got {value!r}.")
            for m in names:
                if m not in METRICS:
                    raise DPIConfigError(f"eval.metrics.{task}: unknown metric {m!r}{did_you_mean(m, METRICS)}; "
                                         f"valid metrics: {list(METRICS)}.")
                if m == "judge_score" and not self.judge:
                    raise DPIConfigError(f"eval.metrics.{task} is 'judge_score' but eval.judge is not set; give "
                                         "eval.judge {base_url, model, api_key_env} or use 'rougeL_proxy'.")
            normalised[str(task)] = list(names)
        self.metrics = normalised
        if not isinstance(self.metric_kwargs, Mapping):
            raise DPIConfigError(f"eval.metric_kwargs must map metric names to keyword arguments, got "
                                 f"{self.metric_kwargs!r}.")
        for m, kwargs in self.metric_kwargs.items():
            if m not in METRICS:
                raise DPIConfigError(f"eval.metric_kwargs: unknown metric {m!r}{did_you_mean(str(m), METRICS)}; "
                                     f"valid metrics: {list(METRICS)}.")
            if not isinstance(kwargs, Mapping):
                raise DPIConfigError(f"eval.metric_kwargs.{m} must be a mapping of keyword arguments, got {kwargs!r}.")
        if self.judge is not None:
            check_unknown_keys(self.judge, JUDGE_KEYS, "eval.judge")
            if "base_url" not in self.judge or "model" not in self.judge:
                raise DPIConfigError("eval.judge needs base_url and model, e.g. {base_url: http://127.0.0.1:8000/v1, "
                                     "model: gpt-4o, api_key_env: OPENAI_API_KEY}.")
        if self.forgetting not in FORGETTING_MODES:
            raise DPIConfigError(f"eval.forgetting={self.forgetting!r} is not one of {FORGETTING_MODES}"
                                 f"{did_you_mean(str(self.forgetting), FORGETTING_MODES)}.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "EvalSpec":
        """Build the settings from an ``eval:`` mapping (default None: all defaults).

        Raises:
            DPIConfigError: an unknown key (named with the closest valid one) or any error of the constructor.
        """
        data = dict(data or {})
        check_unknown_keys(data, [f.name for f in dataclasses.fields(cls)] + ["metric_samples"], "eval")
        return cls(**data)

    def metrics_for(self, task, source: str | None = None) -> list[str]:
        """The metric names of a task: the ones ``eval.metrics`` names, else its source's default.

        Args:
            task: a :class:`~dpi_hf.data.TaskSpec` (``dpi-hf train``: the recipe's metrics, or the source's
                :data:`DEFAULT_METRICS`, else :data:`FALLBACK_METRICS`), or a task name with its data ``source``
                (a comparison: the score metrics only — the held-out NLL is evaluated for every task anyway —,
                and an error for a task without a named or default score metric).
            source: the task's data source when ``task`` is a name (default None: unknown).
        """
        if not isinstance(task, str):
            return list(self.metrics.get(task.name) or DEFAULT_METRICS.get(task.source, FALLBACK_METRICS))
        from dpi_hf.evaluation.registry import HELDOUT_LOSS, get_metric

        if task in self.metrics:
            return [m for m in self.metrics[task] if get_metric(m).is_score] or [HELDOUT_LOSS]
        if source in DEFAULT_METRICS:
            return [m for m in DEFAULT_METRICS[source] if get_metric(m).is_score]
        raise DPIConfigError(f"eval.metrics names no metric for task {task!r} (source {source!r}); add e.g. "
                             f"`{task}: rougeL_proxy` (or codebleu, judge_score, nll) under eval.metrics.")

    def make_judge(self):
        """The :class:`~dpi_hf.evaluation.JudgeClient` of ``judge``, or None without one."""
        if not self.judge:
            return None
        from dpi_hf.evaluation.judge import JudgeClient

        return JudgeClient(**self.judge)

    def metric_arguments(self, metric: str, judge=None) -> dict:
        """The keyword arguments of :func:`~dpi_hf.evaluation.evaluate_task` for ``metric`` under these settings:
        ``batch_size``, ``max_new_tokens`` (for the metrics that generate, not ``nll``), ``judge`` (for
        ``judge_score``), then the
        ``metric_kwargs`` of the metric, which win.

        Args:
            metric: the metric name.
            judge: the judge client for ``judge_score`` (default None; see :meth:`make_judge`).
        """
        from dpi_hf.evaluation.registry import get_metric

        kwargs: dict[str, Any] = {"batch_size": self.batch_size}
        if get_metric(metric).generates:
            kwargs["max_new_tokens"] = self.max_new_tokens
        if metric == "judge_score":
            kwargs["judge"] = judge
        kwargs.update(self.metric_kwargs.get(metric, {}))
        return kwargs
