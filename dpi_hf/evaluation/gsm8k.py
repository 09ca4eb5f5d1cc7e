"""GSM8K: final-number extraction and exact-match accuracy."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Optional

from dpi_hf.core.errors import DPIConfigError

# A number, optionally signed (ASCII or Unicode minus) and with a "$", with thousands separators and decimals.
# The look-behind keeps digits glued to a word ("x2") or after a decimal point from starting a number.
_NUMBER = re.compile(r"(?<![\w.])([-\u2212]?)\$?\s?([-\u2212]?)(\d[\d,]*(?:\.\d+)?)")
_ANSWER_MARKER = re.compile(r"answer\s*:", re.IGNORECASE)


def extract_number(text: str) -> Optional[str]:
    """The final numeric answer in ``text``, canonicalised, or None when there is none.

    Rules, in order; the first that yields a number wins:
      1. the first number after the LAST ``####`` (GSM8K's answer marker);
      2. the first number after the LAST ``Answer:`` (case-insensitive);
      3. the last number anywhere in the text.
    Numbers may carry a sign (``-``/``−``), a ``$``, thousands commas (``1,234``) and decimals; a trailing
    period is sentence punctuation. The canonical form drops commas, ``$`` and trailing zeros, so ``"3.50"`` and
    ``"3.5"``, ``"$1,234"`` and ``"1234"``, ``"-0"`` and ``"0"`` compare equal.

    Args:
        text: a model completion or a reference answer.
    """
    if "####" in text:
        found = _first_number(text.rsplit("####", 1)[1])
        if found is not None:
            return found
    markers = list(_ANSWER_MARKER.finditer(text))
    if markers:
        found = _first_number(text[markers[-1].end():])
        if found is not None:
            return found
    matches = list(_NUMBER.finditer(text))
    return _canonical(matches[-1]) if matches else None


def gsm8k_accuracy(completions: list[str], references: list[str]) -> dict:
    """Exact-match accuracy (%) of the extracted final numbers.

    A completion without a number is scored wrong and counted in ``unparsable``.

    Args:
        completions: model outputs.
        references: gold answers (the number after ``####`` in GSM8K), one per completion.

    Returns:
        ``{"metric": "gsm8k_accuracy", "gsm8k_accuracy": %, "n", "correct", "unparsable"}``.

    Raises:
        DPIConfigError: lengths differ, no rows, or a reference without a number.
    """
    if len(completions) != len(references):
        raise DPIConfigError(
            f"completions and references must have the same length, got {len(completions)} and {len(references)}"
        )
    if not completions:
        raise DPIConfigError("completions: empty; accuracy needs at least one row")
    correct = unparsable = 0
    for i, (completion, reference) in enumerate(zip(completions, references)):
        gold = extract_number(str(reference))
        if gold is None:
            raise DPIConfigError(f"references[{i}] = {reference!r} contains no number; fix the dataset's reference")
        predicted = extract_number(completion)
        if predicted is None:
            unparsable += 1
        elif predicted == gold:
            correct += 1
    n = len(completions)
    return {"metric": "gsm8k_accuracy", "gsm8k_accuracy": 100.0 * correct / n, "n": n, "correct": correct,
            "unparsable": unparsable}


def _first_number(text: str) -> Optional[str]:
    match = _NUMBER.search(text)
    return _canonical(match) if match else None


def _canonical(match: re.Match) -> str:
    negative = bool(match.group(1) or match.group(2))
    digits = match.group(3).replace(",", "")
    value = Decimal(digits)  # always valid: the pattern admits only digits and one ".digits" part
    if negative:
        value = -value
    if value == 0:
        value = Decimal(0)  # "-0" and "0.00" are 0
    return format(value.normalize(), "f")
