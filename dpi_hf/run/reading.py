"""Reading a recipe file: YAML, ``--key value`` overrides and ``${var}`` variables, before any validation.

This module imports only PyYAML: the command line reads a recipe, decides whether the run is offline
(``HF_HUB_OFFLINE`` must be set before ``huggingface_hub`` is imported) and only then validates it with
:meth:`dpi_hf.run.recipe.Recipe.from_dict`, which imports datasets, transformers and trl.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ..core.errors import DPIConfigError
from ..utils import did_you_mean

SECTIONS = ("vars", "model", "tasks", "eval", "runtime")
_VAR = re.compile(r"\$\{([^}]*)\}")
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A task path that starts with a variable naming a folder: "${data_dir}/gsm8k/train.jsonl".
_FOLDER_VAR = re.compile(r"^\$\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}[/\\]")
# Task sources whose path is not a local file (dpi_hf.data.SOURCES; not imported: this module stays PyYAML-only).
_NOT_FILE_SOURCES = ("hub", "reasoning_gym")


def read_recipe(path: str | os.PathLike, overrides: Sequence[str] | Mapping[str, Any] = ()) -> dict:
    """Read a recipe file, apply ``overrides`` and substitute ``${var}`` placeholders; validate nothing else.

    Args:
        path: the YAML file.
        overrides: command-line tokens (``["--learning_rate", "5e-5", "--tasks.0.max_samples=8"]``) or a mapping
            of dotted keys to values (``{"tasks.0.max_samples": 8}``); see the module docstring.

    Returns:
        The resolved mapping, without its ``vars`` section.

    Raises:
        DPIConfigError: missing or unreadable file, invalid YAML, a malformed override, an undefined variable.
    """
    path = Path(path)
    if not path.is_file():
        hint = " (it is a directory)" if path.is_dir() else ""
        raise DPIConfigError(f"recipe {str(path)!r} not found{hint}; pass a YAML file such as recipes/quickstart.yaml.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DPIConfigError(f"cannot read recipe {str(path)!r} ({err}); check the path and its permissions.") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise DPIConfigError(f"recipe {str(path)!r} is not valid YAML{at}: {problem}; fix the syntax there.") from None
    if data is None:
        raise DPIConfigError(f"recipe {str(path)!r} is empty; it needs `model:`, `tasks:` and training fields.")
    return resolve_recipe(data, overrides, source=str(path))


def resolve_recipe(data: Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any] = (),
                   source: str | None = None) -> dict:
    """Apply ``overrides`` to a parsed recipe and substitute its variables (see :func:`read_recipe`).

    Args:
        data: the parsed YAML mapping (``vars`` included).
        overrides: command-line tokens or a mapping of dotted keys to values.
        source: the file it came from, for messages (default None).
    """
    if not isinstance(data, Mapping):
        raise DPIConfigError(f"{where(source)}a recipe must be a YAML mapping of sections and fields, got "
                             f"{type(data).__name__}.")
    data = copy.deepcopy(dict(data))
    declared = data.pop("vars", None) or {}
    if not isinstance(declared, Mapping):
        raise DPIConfigError(f"{where(source)}`vars:` must map variable names to values, got {declared!r}.")
    variables = {str(k): v for k, v in declared.items()}
    for name in variables:
        if not _VAR_NAME.match(name):
            raise DPIConfigError(f"{where(source)}vars: {name!r} is not a valid variable name (letters, digits, _).")
    referenced = _referenced_variables(data)
    pairs = parse_overrides(overrides) if not isinstance(overrides, Mapping) else list(overrides.items())
    for key, value in pairs:
        if key in variables or key in referenced:
            variables[key] = value
        else:
            _apply_override(data, key, value, source)
    _check_data_folders(data, variables, source)
    return _substitute(data, variables, source)


def parse_overrides(tokens: Sequence[str]) -> list[tuple[str, Any]]:
    """Turn ``["--a", "1", "--b=x", "--flag"]`` into ``[("a", 1), ("b", "x"), ("flag", True)]``.

    Values are parsed as YAML scalars/lists where that works (``8``, ``true``, ``null``, ``[a, b]``), else kept as
    the string given. A key without a value (followed by another ``--key`` or at the end) means ``true``.

    Raises:
        DPIConfigError: a token that is not ``--key`` where a key is expected.
    """
    pairs: list[tuple[str, Any]] = []
    i = 0
    tokens = list(tokens)
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise DPIConfigError(f"unexpected argument {token!r}: overrides are `--field value` pairs, e.g. "
                                 "`--learning_rate 5e-5` or `--tasks.0.max_samples 8`.")
        key, sep, value = token[2:].partition("=")
        if not sep:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value = tokens[i + 1]
                i += 1
            else:
                value = "true"
        pairs.append((key, parse_value(value)))
        i += 1
    return pairs


def parse_value(text: str) -> Any:
    """A command-line value read as YAML (``"8"`` → 8, ``"[a, b]"`` → list); the raw string when that fails."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:  # e.g. "*embed*" reads as a YAML alias: the user meant the string
        return text


def where(source: str | None) -> str:
    """The prefix naming the recipe file in a message (``"recipe 'x.yaml': "``), or ``""`` without one."""
    return f"recipe {source!r}: " if source else ""


def _referenced_variables(node) -> set[str]:
    """The names of every ``${var}`` used in the strings of ``node``."""
    if isinstance(node, str):
        return {m.strip() for m in _VAR.findall(node)}
    if isinstance(node, Mapping):
        return set().union(*(_referenced_variables(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_referenced_variables(v) for v in node)) if node else set()
    return set()


def _substitute(node, variables: Mapping[str, Any], source: str | None):
    """``node`` with every ``${var}`` replaced by its value."""
    if isinstance(node, str):
        whole = _VAR.fullmatch(node.strip())
        if whole:  # "${n}" alone keeps the variable's type (a number stays a number)
            return _variable(whole.group(1).strip(), variables, source)
        return _VAR.sub(lambda m: str(_variable(m.group(1).strip(), variables, source)), node)
    if isinstance(node, Mapping):
        return {k: _substitute(v, variables, source) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, variables, source) for v in node]
    return node


def _check_data_folders(data: Mapping[str, Any], variables: Mapping[str, Any], source: str | None) -> None:
    """One error, before any work, when a task reads its local file from a ``${var}`` folder that is not given or
    does not exist (a recipe for local copies of the data run without them)."""
    tasks = data.get("tasks")
    for task in tasks if isinstance(tasks, list) else []:
        if not isinstance(task, Mapping) or task.get("source", "hub") in _NOT_FILE_SOURCES:
            continue
        found = _FOLDER_VAR.match(str(task.get("path") or ""))
        if not found:
            continue
        name = found.group(1)
        reads = f"task {task.get('name')!r} reads its rows from {task['path']!r}"
        if name not in variables or variables[name] is None:
            raise DPIConfigError(f"{where(source)}the recipe uses ${{{name}}} but no value is given"
                                 f"{did_you_mean(name, variables)} ({reads}); pass --{name} VALUE, the folder "
                                 "that holds the local copies of the data (the recipe's header names the files).")
        folder = Path(str(variables[name]))
        if not folder.is_dir():
            relative = "" if folder.is_absolute() else f" in {os.getcwd()!r}"
            raise DPIConfigError(f"{where(source)}{reads}, but the folder {str(folder)!r} does not exist{relative}; "
                                 f"pass --{name} DIR, the folder that holds the local copies of the data (the "
                                 "recipe's header names the files).")


def _variable(name: str, variables: Mapping[str, Any], source: str | None):
    """The value of variable ``name``, or an error naming how to give it."""
    if name not in variables:
        raise DPIConfigError(f"{where(source)}the recipe uses ${{{name}}} but no value is given"
                             f"{did_you_mean(name, variables)}; pass --{name} VALUE or declare it under `vars:`.")
    return variables[name]


def _apply_override(data: dict, key: str, value, source: str | None) -> None:
    """Set dotted ``key`` in ``data``: a top-level field, ``section.key[.key...]`` or ``tasks.<index|name>.key``."""
    parts = key.split(".")
    if any(not p for p in parts):
        raise DPIConfigError(f"override --{key}: empty part in the dotted key; write e.g. --tasks.0.max_samples 8.")
    head = parts[0].replace("-", "_")
    if len(parts) == 1:
        if head in SECTIONS:
            raise DPIConfigError(f"override --{key}: a whole section cannot be replaced; set one of its keys, e.g. "
                                 f"--{head}.<key> VALUE.")
        data[head] = value
        return
    if head not in SECTIONS:
        raise DPIConfigError(f"override --{key}: {head!r} is not a section{did_you_mean(head, SECTIONS)}; dotted "
                             f"keys start with one of {list(SECTIONS[1:])}.")
    node = data.setdefault(head, [] if head == "tasks" else {})
    path = [head]
    for i, part in enumerate(parts[1:], start=1):
        last = i == len(parts) - 1
        if isinstance(node, list):
            index = _task_index(node, part, key)
            if last:
                raise DPIConfigError(f"override --{key}: name a key of the task, e.g. --{'.'.join(path)}.{part}."
                                     "max_samples 8.")
            node = node[index]
        elif isinstance(node, dict):
            if path != ["eval", "metrics"]:  # field names take - or _; task names under eval.metrics are kept
                part = part.replace("-", "_")
            if last:
                node[part] = value
                return
            node = node.setdefault(part, {})
        else:
            raise DPIConfigError(f"override --{key}: {'.'.join(path)} is a value, not a section.")
        path.append(part)


def _task_index(tasks: list, part: str, key: str) -> int:
    """The index of the task named by ``part`` (a position or a task name) in an override key."""
    if part.isdigit():
        index = int(part)
        if index >= len(tasks):
            have = f"tasks 0-{len(tasks) - 1}" if tasks else "no tasks"
            raise DPIConfigError(f"override --{key}: there is no task {index}; the recipe has {have}.")
        return index
    names = [t.get("name") if isinstance(t, Mapping) else None for t in tasks]
    if part not in names:
        raise DPIConfigError(f"override --{key}: no task named {part!r}{did_you_mean(part, [n for n in names if n])}; "
                             f"the tasks are {names}.")
    return names.index(part)
