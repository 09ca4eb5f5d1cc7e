"""The offline judge proxy, mean ROUGE-L F1, as a local ``evaluate`` module.

Load it with ``dpi_hf.evaluation.load_metric("rougeL_proxy")`` (or ``evaluate.load`` on this directory).
``compute(predictions=[...], references=[...])`` returns :func:`dpi_hf.evaluation.rouge.rouge_l_proxy`'s dict.
It is a proxy for overlap with the reference, never a judge score.
"""

import evaluate

from dpi_hf.evaluation.rouge import rouge_l_proxy
from dpi_hf.evaluation.metrics import text_pair_info

_DESCRIPTION = (
    "Mean ROUGE-L F1 (rouge_score, Porter stemming) against the reference answer: the offline proxy reported when "
    "no judge endpoint is available, under its own name."
)
_KWARGS = """
Args:
    predictions: model completions (strings).
    references: reference answers (strings).
Returns:
    rougeL_proxy (0-1), n, unparsable (empty predictions), metric.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class RougeLProxy(evaluate.Metric):
    def _info(self):
        return text_pair_info(_DESCRIPTION, _KWARGS)

    def _compute(self, predictions, references):
        return rouge_l_proxy(list(predictions), list(references))
