"""Task evaluation for dpi-hf comparisons: generation, task metrics, held-out loss and the macro-average.

Entry point: :func:`evaluate_task` (``metric`` one of :data:`METRICS`) and :func:`macro_score`. The building
blocks (answer extraction, scorers, the judge client, the HumanEval sandbox) are exported for direct use, each
imported on first access. :class:`~dpi_hf.evaluation.settings.EvalSpec` is how a run evaluates (a recipe's
``eval:`` section).
"""

import importlib

# public name → the submodule that defines it; imported on first use, so that the light modules (answers,
# settings) can be imported without torch and transformers
_LAZY = {
    "codebleu_score": "code", "extract_code": "code",
    "generate_completions": "generation",
    "extract_number": "gsm8k", "gsm8k_accuracy": "gsm8k",
    "completion_for_problem": "humaneval", "humaneval_pass_at_1": "humaneval",
    "JudgeClient": "judge", "JudgeError": "judge", "judge_scores": "judge", "parse_judge_score": "judge",
    "extract_choice": "logiqa", "logiqa_accuracy": "logiqa",
    "EVALUATE_MODULES": "metrics", "load_metric": "metrics", "metric_path": "metrics",
    "heldout_nll": "nll",
    "extract_final_answer": "answers", "reasoning_gym_score": "reasoning_gym_eval",
    "METRICS": "registry", "evaluate_task": "registry", "macro_score": "registry", "normalised_score": "registry",
    "rouge_l_proxy": "rouge",
    "EvalSpec": "settings", "DEFAULT_METRICS": "settings",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "DEFAULT_METRICS",
    "EVALUATE_MODULES",
    "EvalSpec",
    "METRICS",
    "JudgeClient",
    "JudgeError",
    "codebleu_score",
    "completion_for_problem",
    "evaluate_task",
    "extract_choice",
    "extract_code",
    "extract_final_answer",
    "extract_number",
    "generate_completions",
    "gsm8k_accuracy",
    "heldout_nll",
    "humaneval_pass_at_1",
    "judge_scores",
    "load_metric",
    "logiqa_accuracy",
    "macro_score",
    "metric_path",
    "normalised_score",
    "parse_judge_score",
    "reasoning_gym_score",
    "rouge_l_proxy",
]
