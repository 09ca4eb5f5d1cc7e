"""GSM8K exact-match accuracy as a local ``evaluate`` module.

Load it with ``dpi_hf.evaluation.load_metric("gsm8k_accuracy")`` (or ``evaluate.load`` on this directory).
``compute(predictions=[...], references=[...])`` returns :func:`dpi_hf.evaluation.gsm8k.gsm8k_accuracy`'s dict.
"""

import evaluate

from dpi_hf.evaluation.gsm8k import gsm8k_accuracy
from dpi_hf.evaluation.metrics import text_pair_info

_DESCRIPTION = (
    "Exact-match accuracy (%) of the final number: after the last '####', else after the last 'Answer:', else the "
    "last number; commas, '$' and trailing zeros are ignored. Completions without a number are wrong and counted "
    "as unparsable."
)
_KWARGS = """
Args:
    predictions: model completions (strings).
    references: gold answers (strings containing the number).
Returns:
    gsm8k_accuracy (%), n, correct, unparsable, metric.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Gsm8kAccuracy(evaluate.Metric):
    def _info(self):
        return text_pair_info(_DESCRIPTION, _KWARGS)

    def _compute(self, predictions, references):
        return gsm8k_accuracy(list(predictions), list(references))
