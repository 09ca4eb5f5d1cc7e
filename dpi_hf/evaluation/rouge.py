"""The offline proxy for judge scores: ROUGE-L F1 against the reference answer.

It measures overlap with one reference, not quality, so it is reported as ``rougeL_proxy`` and never as a judge
score.
"""

from __future__ import annotations

from dpi_hf.evaluation.rows import check_paired


def rouge_l_proxy(predictions: list[str], references: list[str]) -> dict:
    """Mean ROUGE-L F1 (``rouge_score``, Porter stemming) of predictions against references.

    Args:
        predictions: model outputs.
        references: reference answers, one per prediction.

    Returns:
        ``{"metric": "rougeL_proxy", "rougeL_proxy": mean F1 in [0, 1], "n", "unparsable": empty predictions
        (scored 0)}``.

    Raises:
        DPIConfigError: lengths differ or there are no rows.
    """
    from rouge_score import rouge_scorer  # optional dependency (the "eval" extra)

    check_paired(predictions, references, "ROUGE-L")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(reference, prediction)["rougeL"].fmeasure
              for prediction, reference in zip(predictions, references)]
    return {"metric": "rougeL_proxy", "rougeL_proxy": sum(scores) / len(scores), "n": len(scores),
            "unparsable": sum(not p.strip() for p in predictions)}
