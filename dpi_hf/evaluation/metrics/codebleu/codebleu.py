"""Mean per-example CodeBLEU (Python) as a local ``evaluate`` module.

Load it with ``dpi_hf.evaluation.load_metric("codebleu")`` (or ``evaluate.load`` on this directory).
``compute(predictions=[...], references=[...])`` returns :func:`dpi_hf.evaluation.code.codebleu_score`'s dict.
"""

import evaluate

from dpi_hf.evaluation.code import codebleu_score
from dpi_hf.evaluation.metrics import text_pair_info

_DESCRIPTION = (
    "Mean per-example CodeBLEU (codebleu.calc_codebleu, lang='python', weights 0.25 each) of the code extracted "
    "from markdown fences; empty predictions score 0 and are counted as unparsable."
)
_KWARGS = """
Args:
    predictions: model completions (strings; code or markdown with code fences).
    references: reference code (strings).
Returns:
    codebleu (0-1), its four components, n, unparsable, metric.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class CodeBleu(evaluate.Metric):
    def _info(self):
        return text_pair_info(_DESCRIPTION, _KWARGS)

    def _compute(self, predictions, references):
        return codebleu_score(list(predictions), list(references))
