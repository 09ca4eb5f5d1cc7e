"""Task evaluation for dpi-hf comparisons: generation, task metrics, held-out loss and the macro-average.

Entry point: :func:`evaluate_task` (``metric`` one of :data:`METRICS`) and :func:`macro_score`. The building
blocks (answer extraction, scorers, the judge client, the HumanEval sandbox) are exported for direct use.
"""

from dpi_hf.evaluation.code import codebleu_score, extract_code
from dpi_hf.evaluation.generation import generate_completions
from dpi_hf.evaluation.gsm8k import extract_number, gsm8k_accuracy
from dpi_hf.evaluation.humaneval import completion_for_problem, humaneval_pass_at_1
from dpi_hf.evaluation.judge import JudgeClient, JudgeError, judge_scores, parse_judge_score
from dpi_hf.evaluation.logiqa import extract_choice, logiqa_accuracy
from dpi_hf.evaluation.metrics import EVALUATE_MODULES, load_metric, metric_path
from dpi_hf.evaluation.nll import heldout_nll
from dpi_hf.evaluation.reasoning_gym_eval import extract_final_answer, reasoning_gym_score
from dpi_hf.evaluation.registry import METRICS, evaluate_task, macro_score, normalised_score
from dpi_hf.evaluation.rouge import rouge_l_proxy

__all__ = [
    "EVALUATE_MODULES",
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
