"""reasoning-gym tasks (``TaskSpec(source="reasoning_gym")``): procedural rows with a verifier.

Two ways to hold rows out:

- without ``eval_seed`` (the default): ``max_samples + eval_samples + validation_samples`` entries are generated
  with ``seed`` and split like any other source (:func:`dpi_hf.data.load_task`);
- with ``eval_seed``: the training rows are the first ``max_samples`` entries of the generator at ``seed``; the
  held-out rows come from the generator at ``eval_seed``, in order, skipping every entry whose question also occurs
  among the training rows (small generators repeat questions: such a row would measure memory, not skill). The
  first ``eval_samples`` kept entries form the ``eval`` split, the next ``validation_samples`` the ``validation``
  split (which also skips questions of the eval split). :func:`heldout_splits` says how many it dropped.

An entry depends only on the generator's seed and its index (not on the dataset size), so generating more entries
to replace dropped ones leaves the kept ones unchanged.
"""

from __future__ import annotations

import functools
import logging

from .core.errors import DPIConfigError
from .task_rows import ANSWER_INSTRUCTION, drop_hash_line, json_roundtrips, make_row, record_error
from .utils import did_you_mean

__all__ = ["reasoning_gym_source", "heldout_splits"]

logger = logging.getLogger(__name__)

# how many times the held-out generator may double its size to replace questions that repeat training ones
_MAX_DOUBLINGS = 5


def _generate(spec, seed: int, size: int):
    """(dataset, convert) of ``size`` entries of ``spec.path`` at ``seed``; convert(entry, index) builds a row."""
    try:
        import reasoning_gym
    except ImportError as err:
        raise DPIConfigError("reasoning_gym tasks need `pip install reasoning-gym==0.1.25`.") from err
    try:
        dataset = reasoning_gym.create_dataset(spec.path, size=size, seed=seed, **spec.kwargs)
    except Exception as err:
        names = sorted(reasoning_gym.factory.DATASETS)
        raise DPIConfigError(f"task {spec.name!r}: reasoning_gym could not create {spec.path!r} "
                             f"({err}){did_you_mean(spec.path, names)}.") from err
    recipe = {"source": "reasoning_gym", "rg_name": spec.path, "rg_size": size, "rg_seed": seed,
              "rg_kwargs": spec.kwargs}
    return dataset, functools.partial(_row, spec, recipe)


def reasoning_gym_source(spec):
    """(records, convert) for :func:`dpi_hf.data.load_task`'s common split: every split's entries from ``seed``."""
    return _generate(spec, spec.seed, spec.max_samples + spec.eval_samples + spec.validation_samples)


def heldout_splits(spec, report: dict | None = None) -> dict[str, list[dict]]:
    """The rows of a task with ``eval_seed``: ``train`` from ``seed``, ``eval`` (and ``validation``) from
    ``eval_seed`` without the questions of the training rows (see the module docstring).

    Args:
        spec: a :class:`~dpi_hf.data.TaskSpec` with ``source="reasoning_gym"`` and ``eval_seed`` set.
        report: a dict that receives ``eval_duplicates_dropped`` and ``validation_duplicates_dropped`` (the held-out
            entries skipped because their question was already used) and ``eval_generated`` (the entries
            generated at ``eval_seed``); default None.

    Returns:
        split name → rows (``train``, ``eval`` when ``eval_samples > 0``, ``validation`` when
        ``validation_samples > 0``).

    Raises:
        DPIConfigError: the generator repeats the training questions so often that ``2**5`` times the held-out rows
            asked for do not hold enough new ones.
    """
    train_set, convert = _generate(spec, spec.seed, spec.max_samples)
    train = [convert(train_set[i], i) for i in range(spec.max_samples)]
    trained = {train_set[i]["question"] for i in range(spec.max_samples)}
    wanted = spec.eval_samples + spec.validation_samples
    size = wanted
    for _ in range(_MAX_DOUBLINGS + 1):
        held, convert = _generate(spec, spec.eval_seed, size)
        picked = _pick(held, size, trained, spec.eval_samples, spec.validation_samples)
        if picked is not None:
            break
        size *= 2
    else:
        raise DPIConfigError(
            f"task {spec.name!r}: {spec.path!r} repeats its training questions so often that {size // 2} entries "
            f"at eval_seed={spec.eval_seed} hold fewer than {wanted} new ones; lower eval_samples/validation_samples "
            "or max_samples, or make the generator's problems more varied (kwargs)."
        )
    (eval_idx, validation_idx), (dropped_eval, dropped_validation) = picked
    if report is not None:
        report.update(eval_duplicates_dropped=dropped_eval, validation_duplicates_dropped=dropped_validation,
                      eval_generated=size)
    if dropped_eval or dropped_validation:
        logger.info("task %r: dropped %d eval and %d validation rows whose question is also a training row's "
                    "(eval_seed=%d)", spec.name, dropped_eval, dropped_validation, spec.eval_seed)
    splits = {"train": train}
    if spec.eval_samples:
        splits["eval"] = [convert(held[i], i) for i in eval_idx]
    if spec.validation_samples:
        splits["validation"] = [convert(held[i], i) for i in validation_idx]
    return splits


def _pick(held, size: int, trained: set, n_eval: int, n_validation: int):
    """((eval indices, validation indices), (eval dropped, validation dropped)), or None when ``held`` runs out."""
    eval_idx, validation_idx, dropped = [], [], [0, 0]
    eval_questions: set = set()
    for i in range(size):
        if len(eval_idx) == n_eval and len(validation_idx) == n_validation:
            break
        question = held[i]["question"]
        if len(eval_idx) < n_eval:
            if question in trained:
                dropped[0] += 1
                continue
            eval_idx.append(i)
            eval_questions.add(question)
        elif question in trained or question in eval_questions:
            dropped[1] += 1
        else:
            validation_idx.append(i)
    if len(eval_idx) < n_eval or len(validation_idx) < n_validation:
        return None
    return (eval_idx, validation_idx), tuple(dropped)


def _row(spec, recipe: dict, entry: dict, index: int) -> dict:
    answer = entry.get("answer")
    if answer is None:
        raise record_error(spec, index, "has no gold answer (reasoning_gym returned None); use another dataset")
    answer = str(answer)
    final_line = f"Answer:\n{answer}" if "\n" in answer else f"Answer: {answer}"
    cot = (entry.get("metadata") or {}).get("answer_cot") if spec.path == "gsm_symbolic" else None
    # answer_cot ends in GSM8K's "#### <n>" line; the "Answer:" line replaces it so there is one final answer
    completion = f"{drop_hash_line(cot)}\n{final_line}" if cot else final_line
    meta = dict(recipe, index=int(index))
    if json_roundtrips(entry):
        meta["entry"] = entry
    return make_row(spec, f"{entry['question']}\n\n{ANSWER_INSTRUCTION}", completion, answer, meta)
