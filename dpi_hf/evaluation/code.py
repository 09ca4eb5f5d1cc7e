"""Code tasks: code extraction from markdown and CodeBLEU against a reference."""

from __future__ import annotations

import re

from dpi_hf.evaluation.rows import check_paired

# A fenced block: ``` or ~~~ fence, an optional language tag, the body, then the closing fence (or the end of the
# text: generation can stop before the model closes the block).
_FENCE = re.compile(r"(```|~~~)[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:\n?[ \t]*\1|\Z)", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3", ""}


def extract_code(text: str) -> str:
    """The code in a model reply: the first fenced block tagged python (or untagged), else the first fenced
    block of any language, else the whole text. Surrounding blank lines are removed; indentation is kept.

    Args:
        text: a model completion (markdown or bare code).
    """
    blocks = [(match.group(2).lower(), match.group(3)) for match in _FENCE.finditer(text)]
    for tag, body in blocks:
        if tag in _PYTHON_TAGS:
            return _trim(body)
    if blocks:
        return _trim(blocks[0][1])
    return _trim(text)


def codebleu_score(predictions: list[str], references: list[str]) -> dict:
    """Mean per-example CodeBLEU (``codebleu.calc_codebleu``, ``lang="python"``, equal weights 0.25 each).

    Code is extracted from markdown fences on both sides first. Per-example scores are averaged (instead of one
    corpus-level score) so that an empty prediction can score exactly 0 — the library gives an empty prediction a
    non-zero data-flow/syntax credit — and is counted in ``unparsable``. Identical code scores 1.0.

    Args:
        predictions: model outputs.
        references: reference code, one per prediction.

    Returns:
        ``{"metric": "codebleu", "codebleu": mean in [0, 1], "n", "unparsable", "ngram_match_score",
        "weighted_ngram_match_score", "syntax_match_score", "dataflow_match_score"}`` (components are means over
        the parsable rows, 0 when there are none).

    Raises:
        DPIConfigError: lengths differ or there are no rows.
    """
    from codebleu import calc_codebleu  # optional dependency (the "eval" extra)

    check_paired(predictions, references, "CodeBLEU")
    components = ("ngram_match_score", "weighted_ngram_match_score", "syntax_match_score", "dataflow_match_score")
    sums = dict.fromkeys(components, 0.0)
    total = 0.0
    unparsable = 0
    for prediction, reference in zip(predictions, references):
        code = extract_code(prediction)
        if not code.strip():
            unparsable += 1
            continue
        scores = calc_codebleu([extract_code(reference)], [code], lang="python")
        total += scores["codebleu"]
        for name in components:
            sums[name] += scores[name]
    n = len(predictions)
    parsable = n - unparsable
    result = {"metric": "codebleu", "codebleu": total / n, "n": n, "unparsable": unparsable}
    result.update({name: (sums[name] / parsable if parsable else 0.0) for name in components})
    return result


def _trim(code: str) -> str:
    lines = code.split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)
