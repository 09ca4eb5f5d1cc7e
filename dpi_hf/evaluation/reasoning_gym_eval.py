"""reasoning-gym tasks: the final answer scored by the dataset's own verifier."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Callable, Mapping

from dpi_hf.core.errors import DPIConfigError
from dpi_hf.evaluation.answers import extract_final_answer, reasoning_gym_dataset
from dpi_hf.evaluation.rows import column, parse_meta


def _verifier_answer(completion: str | None) -> str:
    """The answer the verifier scores: :func:`~dpi_hf.evaluation.answers.extract_final_answer` (the last
    ``<answer>`` tag, else the text after the last ``Answer:`` or ``####``), else the whole completion, stripped (a
    model that answers without a marker still gets the verifier's judgement)."""
    return extract_final_answer(completion) or (completion or "").strip()


def score_reasoning_gym(answer: str | None, meta: str | Mapping[str, Any]) -> float:
    """Score ``answer`` with the verifier of the reasoning-gym dataset a row came from.

    Args:
        answer: the extracted answer (e.g. ``extract_final_answer(response)``); None scores 0.
        meta: the row's ``meta`` (JSON string or dict) as written by :func:`dpi_hf.data.load_task`. The entry is
            taken from it when it was stored, else regenerated deterministically from the stored name, size, seed
            and index.

    Returns:
        The verifier's score in [0, 1].
    """
    meta = json.loads(meta) if isinstance(meta, str) else meta
    if meta.get("source") != "reasoning_gym":
        raise DPIConfigError(f"score_reasoning_gym needs the meta of a reasoning_gym row, got source "
                             f"{meta.get('source')!r}.")
    _, entry, score_answer = _resolve(meta, 0)
    return float(score_answer(answer=answer, entry=entry))


def reasoning_gym_score(completions: list[str], dataset: Any) -> dict:
    """Mean verifier score of the completions on reasoning-gym rows.

    Each row's ``meta`` is either the whole reasoning-gym entry (``question``, ``answer``, ``metadata`` with
    ``source_dataset``) or a recipe ``{"rg_name", "rg_seed", "rg_size", "index"}`` that regenerates it with
    ``reasoning_gym.create_dataset(rg_name, size=rg_size, seed=rg_seed)[index]``. The score is the dataset's
    ``score_answer(answer=extract_final_answer(completion), entry=entry)`` in [0, 1] (partial credit where the
    dataset gives it); a completion without an answer marker is scored whole.

    Args:
        completions: model outputs, one per row.
        dataset: rows with a ``meta`` column.

    Returns:
        ``{"metric": "reasoning_gym", "reasoning_gym": mean score in [0, 1], "n", "unparsable": empty answers
        (scored by the verifier like any other, usually 0), "by_dataset": {name: mean score}}``.

    Raises:
        DPIConfigError: lengths differ, no rows, or a ``meta`` that is neither form.
    """
    metas = column(dataset, "meta")
    if len(completions) != len(metas):
        raise DPIConfigError(f"completions ({len(completions)}) and dataset rows ({len(metas)}) must match")
    if not completions:
        raise DPIConfigError("completions: empty; reasoning-gym scoring needs at least one row")
    names, scores = zip(*_scored_rows(completions, metas))
    unparsable = sum(not _verifier_answer(c) for c in completions)
    by_dataset: dict[str, list[float]] = {}
    for name, score in zip(names, scores):
        by_dataset.setdefault(name, []).append(score)
    return {"metric": "reasoning_gym", "reasoning_gym": sum(scores) / len(scores), "n": len(scores),
            "unparsable": unparsable, "by_dataset": {k: sum(v) / len(v) for k, v in sorted(by_dataset.items())}}


def reasoning_gym_row_scores(completions: list[str], metas: list[Any]) -> list[float]:
    """The verifier's score of each completion, as :func:`reasoning_gym_score` scores them (the answer after the
    final-answer marker; a completion without one scored whole).

    Args:
        completions: model outputs, one per row.
        metas: the rows' ``meta`` values (JSON strings or dicts), in the same order.
    """
    return [score for _, score in _scored_rows(completions, metas)]


def _scored_rows(completions, metas):
    """(dataset name, score) per row."""
    for i, (completion, value) in enumerate(zip(completions, metas)):
        name, entry, score_answer = _resolve(parse_meta(value, i), i)
        yield name, float(score_answer(answer=_verifier_answer(completion), entry=entry))


def _resolve(meta: dict, index: int) -> tuple[str, dict, Callable[..., float]]:
    """(dataset name, entry, score function) for one row's meta."""
    if "rg_name" in meta:
        try:
            # the generator's options (e.g. chain_sum's digit counts) are part of the recipe: without them the
            # regenerated entry is another problem
            kwargs = json.dumps(meta.get("rg_kwargs") or {}, sort_keys=True)
            dataset = reasoning_gym_dataset(str(meta["rg_name"]), int(meta["rg_size"]), int(meta["rg_seed"]), kwargs)
            entry = meta["entry"] if "entry" in meta else dataset[int(meta["index"])]
            return str(meta["rg_name"]), entry, dataset.score_answer
        except KeyError as exc:
            raise DPIConfigError(f"dataset: row {index}: meta recipe lacks {exc}; it needs rg_name, rg_seed, "
                                 "rg_size and index") from None
    source = meta.get("metadata", {}).get("source_dataset") if isinstance(meta.get("metadata"), dict) else None
    if source is None or "answer" not in meta:
        raise DPIConfigError(
            f"dataset: row {index}: meta is neither a reasoning-gym entry (question/answer/metadata.source_dataset) "
            "nor a recipe {rg_name, rg_seed, rg_size, index}"
        )
    return str(source), meta, _score_function(str(source))


@lru_cache(maxsize=64)
def _score_function(name: str) -> Callable[..., float]:
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(name)
