"""GSM8K exact-match accuracy as a local ``evaluate`` module.

Load it with ``dpi_hf.evaluation.load_metric("gsm8k_accuracy")`` (or ``evaluate.load`` on this directory).
``compute(predictions=[...], references=[...])`` returns :func:`dpi_hf.evaluation.gsm8k.gsm8k_accuracy`'s dict.
"""

import datasets
import evaluate

from dpi_hf.evaluation.gsm8k import gsm8k_accuracy

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
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        return gsm8k_accuracy(list(predictions), list(references))
