"""Access to the columns of an evaluation dataset.

Evaluation datasets are ``datasets.Dataset`` objects (or lists of row dicts) with the columns written by
``dpi_hf.data``: ``prompt`` (chat messages: optional system + user), ``completion`` (one assistant message),
``task``, ``reference`` (the gold final answer as a string) and ``meta`` (a JSON string with task-specific fields).
"""

from __future__ import annotations

import json
from typing import Any

from dpi_hf.core.errors import DPIConfigError


def column(dataset: Any, name: str) -> list:
    """Return the column ``name`` of ``dataset`` as a list.

    Args:
        dataset: a ``datasets.Dataset`` (columnar access) or a sequence of row dicts.
        name: the column to read.

    Raises:
        DPIConfigError: the column is missing.
    """
    names = getattr(dataset, "column_names", None)
    if names is not None:
        if name not in names:
            raise DPIConfigError(
                f"dataset: column {name!r} is missing (columns: {sorted(names)}); build the evaluation set with "
                f"dpi_hf.data or add a {name!r} column"
            )
        return list(dataset[name])
    rows = list(dataset)
    for i, row in enumerate(rows):
        if name not in row:
            raise DPIConfigError(f"dataset: row {i} has no {name!r} field (fields: {sorted(row)})")
    return [row[name] for row in rows]


def parse_meta(value: Any, index: int) -> dict:
    """Decode one ``meta`` cell (a JSON string, or an already decoded dict).

    Args:
        value: the cell.
        index: the row number, named in the error message.

    Raises:
        DPIConfigError: the cell is not a JSON object.
    """
    if isinstance(value, dict):
        return value
    try:
        meta = json.loads(value)
    except (TypeError, json.JSONDecodeError) as exc:
        raise DPIConfigError(f"dataset: row {index}: column 'meta' is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise DPIConfigError(f"dataset: row {index}: column 'meta' must be a JSON object, got {type(meta).__name__}")
    return meta


def user_question(prompt: list[dict]) -> str:
    """The text of the last user message of a chat prompt (what a judge is shown as the question)."""
    for message in reversed(prompt):
        if message.get("role") == "user":
            return str(message.get("content", ""))
    raise DPIConfigError("dataset: a 'prompt' has no user message; every prompt needs one")


def check_paired(predictions: list, references: list, metric: str, names=("predictions", "references")) -> None:
    """Raise DPIConfigError unless there is at least one row and both lists have the same length."""
    if len(predictions) != len(references):
        raise DPIConfigError(
            f"{names[0]} and {names[1]} must have the same length, got {len(predictions)} and {len(references)}"
        )
    if not predictions:
        raise DPIConfigError(f"{names[0]}: empty; {metric} needs at least one row")
