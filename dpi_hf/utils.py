"""Small validation helpers shared by the recipe, data, evaluation and comparison modules.

Each one builds (or raises) the one-line :class:`~dpi_hf.core.errors.DPIConfigError` message that names the problem
and the fix, so that every entry point words the same mistake the same way.
"""

from __future__ import annotations

import difflib
import numbers
from typing import Any, Iterable, Mapping, Sequence

from .core.errors import DPIConfigError


def did_you_mean(word: str, choices: Iterable[Any]) -> str:
    """``" (did you mean 'x'?)"`` for the choice closest to ``word`` (difflib, cutoff 0.6), else ``""``.

    Args:
        word: what the user wrote.
        choices: the valid spellings (converted with ``str``).
    """
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer: a Python ``int`` or a numpy integer, but not a ``bool``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_unknown_keys(data: Any, valid: Sequence[str], where: str) -> None:
    """Raise unless ``data`` is a mapping whose keys are all in ``valid``.

    Args:
        data: the user's mapping (e.g. a recipe section).
        valid: the accepted keys.
        where: how the message names the mapping, e.g. ``"eval"`` or ``"recipe: compare"``.

    Raises:
        DPIConfigError: ``data`` is not a mapping, or has a key outside ``valid`` (named with the closest valid one).
    """
    if not isinstance(data, Mapping):
        raise DPIConfigError(f"`{where}` must be a mapping of {list(valid)}, got {type(data).__name__}.")
    for key in data:
        if key not in valid:
            raise DPIConfigError(f"{where}: unknown key {key!r}{did_you_mean(str(key), valid)}; valid keys: "
                                 f"{list(valid)}.")


def repeated(names: Iterable[Any]) -> list:
    """The names that occur more than once in ``names``, sorted."""
    names = list(names)
    return sorted({n for n in names if names.count(n) > 1})


def check_each_task_once(groups: Any, tasks: Sequence[str], what: str) -> list[list[str]]:
    """Check that ``groups`` (lists of task names) name every task of ``tasks`` exactly once, in non-empty groups.

    Args:
        groups: the user's groups, e.g. ``[["a"], ["b", "c"]]``.
        tasks: the task names.
        what: how the message names the groups, e.g. ``"stage_groups"`` or ``"heuristic_groups"``.

    Returns:
        The groups as lists of strings.

    Raises:
        DPIConfigError: an unknown task (named with the closest task), a missing or repeated task, or an empty
            group.
    """
    groups = [[str(t) for t in g] for g in groups]
    named = [t for g in groups for t in g]
    for task in named:
        if task not in tasks:
            raise DPIConfigError(f"{what} names unknown task {task!r}{did_you_mean(task, tasks)}; the tasks are "
                                 f"{list(tasks)}.")
    missing = [t for t in tasks if t not in named]
    empty = any(not g for g in groups)
    if missing or repeated(named) or empty:
        raise DPIConfigError(f"{what} must name every task exactly once; missing {missing}, repeated "
                             f"{repeated(named)}{', and a group is empty' if empty else ''}; the tasks are "
                             f"{list(tasks)}.")
    return groups
