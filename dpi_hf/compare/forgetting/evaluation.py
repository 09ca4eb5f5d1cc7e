"""What the forgetting benchmark measures on a model: held-out accuracy by the task's verifier, row by row, and the
held-out NLL; and each task's majority-answer baseline."""

from __future__ import annotations

import json
from collections import Counter

from ...core.errors import DPIConfigError

__all__ = ["check_verifiable", "score_rows", "majority_baseline"]


def check_verifiable(name: str, rows) -> None:
    """Refuse a task whose rows no verifier scores (the benchmark measures accuracy, not only NLL).

    Raises:
        DPIConfigError: a row's ``meta`` is not a reasoning-gym row's.
    """
    source = json.loads(rows[0]["meta"]).get("source") if len(rows) else None
    if source != "reasoning_gym":
        raise DPIConfigError(f"task {name!r} is a {source!r} task; the forgetting benchmark scores accuracy with a "
                             "verifier, so its tasks must be reasoning_gym tasks (source: reasoning_gym).")


def score_rows(model, tokenizer, rows, *, max_new_tokens: int, batch_size: int, nll: bool = True) -> dict:
    """Greedy answers to ``rows`` scored by the reasoning-gym verifier, and the held-out NLL of their references.

    Args:
        model, tokenizer: the model to measure (left in eval mode).
        rows: reasoning-gym rows (``prompt``, ``meta``, ``completion``).
        max_new_tokens: tokens generated per answer.
        batch_size: rows per generation and NLL batch.
        nll: also the held-out NLL per completion token (default True).

    Returns:
        ``{"scores": per-row verifier scores in [0, 1], "accuracy": their mean, "nll": NLL or None}``.
    """
    from ...evaluation.generation import generate_completions
    from ...evaluation.nll import heldout_nll
    from ...evaluation.reasoning_gym_eval import reasoning_gym_row_scores

    model.eval()
    completions = generate_completions(model, tokenizer, list(rows["prompt"]), max_new_tokens=max_new_tokens,
                                       batch_size=batch_size)
    scores = reasoning_gym_row_scores(completions, list(rows["meta"]))
    value = heldout_nll(model, tokenizer, rows, batch_size=batch_size)["nll"] if nll else None
    return {"scores": scores, "accuracy": sum(scores) / len(scores), "nll": value}


def majority_baseline(train_rows, eval_rows) -> dict:
    """The accuracy of always answering the most frequent gold answer of ``train_rows``, scored on ``eval_rows`` by
    the verifier (partial credit where the task gives it); ties: the answer seen first.

    Returns:
        ``{"answer": that answer, "share": its share of the training rows, "accuracy": its score on eval_rows}``.
    """
    from ...evaluation.reasoning_gym_eval import score_reasoning_gym

    counts = Counter(train_rows["reference"])
    answer, n = counts.most_common(1)[0]
    scores = [score_reasoning_gym(answer, meta) for meta in eval_rows["meta"]]
    return {"answer": answer, "share": n / len(train_rows), "accuracy": sum(scores) / len(scores)}
