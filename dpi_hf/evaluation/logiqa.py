"""LogiQA: 4-way multiple choice, scored by option log-likelihood or by a generated letter."""

from __future__ import annotations

import re
from typing import Any, Optional

from dpi_hf.core.errors import DPIConfigError
from dpi_hf.evaluation.chat import encode, pad_token_id, render_prompt
from dpi_hf.evaluation.generation import generate_completions
from dpi_hf.evaluation.rows import column, parse_meta
from dpi_hf.evaluation.scoring import continuation_logprobs

_LETTERS = "ABCDEFGHIJ"


def logiqa_accuracy(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    *,
    mode: str = "loglik",
    reduction: str = "mean",
    batch_size: int = 8,
    max_new_tokens: int = 32,
) -> dict:
    """Multiple-choice accuracy (%) on rows whose ``meta`` holds ``{"options": [...], "label": "C"}``.

    ``mode="loglik"`` (default): each option's text is scored as the assistant's continuation of the rendered
    prompt (generation prompt appended), and the option with the highest score is the prediction (ties: the
    earliest). ``reduction="mean"`` (default) scores the MEAN log-probability per option token, so long options
    are not penalised for their length; ``reduction="sum"`` uses the total log-probability. Every prediction is
    parsable in this mode.

    ``mode="generate"``: the model answers greedily and :func:`extract_choice` reads the letter; a reply without
    one is wrong and counted in ``unparsable``.

    The gold letter is the row's ``reference``.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer, with a chat template.
        dataset: rows with ``prompt``, ``meta`` and ``reference`` columns.
        mode: ``"loglik"`` or ``"generate"`` (default ``"loglik"``).
        reduction: ``"mean"`` or ``"sum"`` of option-token log-probabilities (default ``"mean"``; loglik only).
        batch_size: sequences per forward pass / prompts per generate call (default 8).
        max_new_tokens: the most tokens generated per answer (default 32; generate only).

    Returns:
        ``{"metric": "logiqa_accuracy", "logiqa_accuracy": %, "n", "correct", "unparsable", "mode", "reduction"}``
        (``reduction`` is None in generate mode).

    Raises:
        DPIConfigError: a bad ``mode``/``reduction``, an empty dataset, or a row with fewer than 2 options or a
            gold letter outside them.
    """
    if mode not in ("loglik", "generate"):
        raise DPIConfigError(f"mode must be 'loglik' or 'generate', got {mode!r}")
    if reduction not in ("mean", "sum"):
        raise DPIConfigError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    prompts = column(dataset, "prompt")
    if not prompts:
        raise DPIConfigError("dataset: it is empty; LogiQA accuracy needs at least one row")
    metas = [parse_meta(value, i) for i, value in enumerate(column(dataset, "meta"))]
    labels = [str(label).strip() for label in column(dataset, "reference")]
    options = []
    for i, (meta, label) in enumerate(zip(metas, labels)):
        row_options = meta.get("options")
        if not isinstance(row_options, list) or not 2 <= len(row_options) <= len(_LETTERS):
            raise DPIConfigError(f"dataset: row {i}: meta['options'] must be a list of 2-{len(_LETTERS)} strings")
        if label not in _LETTERS[:len(row_options)]:
            raise DPIConfigError(f"dataset: row {i}: gold label {label!r} is not one of the option letters")
        options.append([str(o) for o in row_options])

    if mode == "loglik":
        predictions: list[Optional[str]] = _loglik_predictions(model, tokenizer, prompts, options, reduction,
                                                               batch_size)
    else:
        replies = generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size)
        predictions = [extract_choice(reply, opts) for reply, opts in zip(replies, options)]
    correct = sum(p == label for p, label in zip(predictions, labels))
    n = len(prompts)
    return {"metric": "logiqa_accuracy", "logiqa_accuracy": 100.0 * correct / n, "n": n, "correct": correct,
            "unparsable": sum(p is None for p in predictions), "mode": mode,
            "reduction": reduction if mode == "loglik" else None}


def extract_choice(text: str, options: list[str]) -> Optional[str]:
    """The option letter a reply chooses, or None.

    Rules, in order: a letter after the last "answer is" / "Answer:" (e.g. ``"Answer: (C)"``); a letter that opens
    the reply and stands alone (``"C"``, ``"C."``, ``"(C)"``, ``"C) ..."`` — not the article in ``"A cat ..."``);
    a reply that is exactly one option's text (case and surrounding punctuation ignored).

    Args:
        text: the model's reply.
        options: the option texts; their count bounds the valid letters.
    """
    letters = _LETTERS[:len(options)]
    # the marker ignores case, the letter does not: "the answer is a trap" names no option
    markers = list(re.finditer(r"(?i:answer\s*(?:is|:))\s*\(?([A-Z])\b", text))
    if markers:
        letter = markers[-1].group(1)
        if letter in letters:
            return letter
    opening = re.match(r"\s*\(?([A-Z])(?:\s*$|[.:)\]]|\s*\n)", text)
    if opening and opening.group(1) in letters:
        return opening.group(1)
    normalised = _normalise(text)
    for letter, option in zip(letters, options):
        if normalised and normalised == _normalise(option):
            return letter
    return None


def _loglik_predictions(model, tokenizer, prompts, options, reduction, batch_size) -> list[str]:
    pairs, owners = [], []
    for row, (prompt, row_options) in enumerate(zip(prompts, options)):
        context = encode(tokenizer, render_prompt(tokenizer, prompt))
        for option in row_options:
            pairs.append((context, encode(tokenizer, option)))
            owners.append(row)
    scored = continuation_logprobs(model, pairs, pad_token_id=pad_token_id(tokenizer), batch_size=batch_size)
    per_row: list[list[float]] = [[] for _ in prompts]
    for row, (total, count) in zip(owners, scored):
        per_row[row].append(total / count if reduction == "mean" else total)
    return [_LETTERS[max(range(len(s)), key=lambda k: (s[k], -k))] for s in per_row]


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().strip(".。!").strip().lower()
