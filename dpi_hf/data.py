"""Tasks as datasets for SFT and evaluation.

A task is described by a :class:`TaskSpec` (usually one entry of a recipe's ``tasks:`` list) and loaded by
:func:`load_task` into a :class:`datasets.DatasetDict` with a ``train`` split and, when ``eval_samples > 0``, a
held-out ``eval`` split. Every row is in TRL's conversational prompt-completion format, so ``SFTTrainer`` computes
the loss on the completion only:

- ``prompt``: list of chat messages (an optional system message, then the user turn(s));
- ``completion``: list with the assistant message to learn;
- ``task``: the task name;
- ``reference``: the gold final answer as a string (GSM8K: the number after ``####``; LogiQA: the letter;
  Alpaca/CodeAlpaca: the output text; reasoning-gym: the entry's answer);
- ``meta``: a JSON string with what an evaluator needs (LogiQA: options and letter; reasoning-gym: the entry or
  the recipe to regenerate it, see :func:`score_reasoning_gym`).

Sampling: records are permuted with ``seed``; the first ``eval_samples`` form the eval split, the next
``validation_samples`` the validation split and the next ``max_samples`` (default: all the rest) the training
split. The eval split therefore does not change when ``max_samples`` or ``validation_samples`` does. Every split
keeps the source order. reasoning-gym tasks with ``eval_seed`` draw their held-out rows from another generator seed
instead, without the questions of the training rows (:mod:`dpi_hf.reasoning_gym_tasks`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import datasets
import numpy as np

from .core.errors import DPIConfigError
from .evaluation.answers import extract_final_answer
from .evaluation.reasoning_gym_eval import score_reasoning_gym
from .reasoning_gym_tasks import heldout_splits, reasoning_gym_source
from .task_rows import ANSWER_INSTRUCTION, make_row as _row, record_error as _record_error
from .utils import check_unknown_keys, did_you_mean, is_int, repeated

__all__ = ["TaskSpec", "load_task", "load_tasks", "extract_final_answer", "score_reasoning_gym", "SOURCES",
           "FILE_SOURCES", "COLUMN_ROLES", "ANSWER_INSTRUCTION"]

FILE_SOURCES = ("gsm8k_jsonl", "logiqa_txt", "alpaca_json", "prompt_completion", "messages")
SOURCES = ("hub",) + FILE_SOURCES + ("reasoning_gym",)
COLUMN_ROLES = ("prompt", "completion", "messages", "reference", "options", "answer")
_COLUMN_SOURCES = ("hub", "prompt_completion", "messages")

_LOGIQA_LETTERS = "ABCD"
# A number written with thousands separators ("1,080", "-109,200,000.5"); the separators are formatting.
_GROUPED_NUMBER = re.compile(r"[-\u2212]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_BLOCK_LINES = 8  # LogiQA: blank, letter, context, question, 4 options


@dataclass
class TaskSpec:
    """One task: where its data comes from and how much of it to use.

    Args:
        name: the task name (required); it labels rows (``task`` column) and names the task in masks and reports.
        source: one of :data:`SOURCES`: ``"hub"`` (``datasets.load_dataset``), ``"gsm8k_jsonl"``, ``"logiqa_txt"``,
            ``"alpaca_json"`` (also CodeAlpaca), ``"prompt_completion"`` (json/jsonl), ``"messages"`` (json/jsonl of
            chats) or ``"reasoning_gym"`` (procedural; default ``"hub"``).
        path: the local file for the file sources, the dataset id for ``"hub"``, the dataset name (e.g.
            ``"gsm_symbolic"``) for ``"reasoning_gym"`` (required).
        config: the Hub config name (``"hub"`` only; default None).
        split: the Hub split to read (``"hub"`` only; default ``"train"``).
        columns: for ``"hub"``, ``"prompt_completion"`` and ``"messages"``: which columns hold the ``prompt``,
            ``completion``, ``messages`` and ``reference``. A ``prompt`` may name a list of columns, joined with
            a blank line (e.g. ``["instruction", "input"]``). Default: ``messages`` when the data has that column,
            else ``prompt``/``completion``. Without a reference column the reference is the final answer found
            in the completion (see :func:`extract_final_answer`), else the whole completion text.
        max_samples: how many training examples to keep (default None: all; required for ``"reasoning_gym"``).
        eval_samples: how many examples to hold out as the ``eval`` split (default 0: no eval split).
        validation_samples: how many examples to hold out as a ``validation`` split, for choosing settings (a
            learning rate, a penalty weight) on other rows than the ``eval`` ones that are reported (default 0: no
            validation split).
        seed: seeds the sampling and the eval split, and the reasoning-gym generator (default 0).
        eval_seed: ``"reasoning_gym"`` only: draw the ``eval`` and ``validation`` rows from the generator at this
            seed, dropping every held-out row whose question is also a training row's (see
            :mod:`dpi_hf.reasoning_gym_tasks`); must differ from ``seed``. Default None: every split from ``seed``.
        system_prompt: a system message put first in every prompt that has none (default None).
        kwargs: extra keyword arguments for ``datasets.load_dataset`` (``"hub"``) or
            ``reasoning_gym.create_dataset`` (``"reasoning_gym"``); not allowed for the file sources.
    """

    name: str
    source: str = "hub"
    path: str | None = None
    config: str | None = None
    split: str = "train"
    columns: dict[str, Any] = field(default_factory=dict)
    max_samples: int | None = None
    eval_samples: int = 0
    validation_samples: int = 0
    seed: int = 0
    eval_seed: int | None = None
    system_prompt: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise DPIConfigError(f"task name must be a non-empty string, got {self.name!r}.")
        where = f"task {self.name!r}"
        if self.source not in SOURCES:
            raise DPIConfigError(f"{where}: unknown source {self.source!r}{did_you_mean(self.source, SOURCES)}; "
                                 f"valid sources: {list(SOURCES)}.")
        if not self.path:
            raise DPIConfigError(f"{where}: `path` is required for source {self.source!r} (the file, the Hub "
                                 "dataset id, or the reasoning-gym dataset name).")
        self.path = str(self.path)
        if not isinstance(self.split, str) or not self.split:
            raise DPIConfigError(f"{where}: split must be a split name such as 'train', got {self.split!r}.")
        if self.max_samples is not None and (not is_int(self.max_samples) or self.max_samples <= 0):
            raise DPIConfigError(f"{where}: max_samples must be a positive integer or null, got {self.max_samples!r}.")
        if not is_int(self.eval_samples) or self.eval_samples < 0:
            raise DPIConfigError(f"{where}: eval_samples must be an integer >= 0, got {self.eval_samples!r}.")
        if not is_int(self.validation_samples) or self.validation_samples < 0:
            raise DPIConfigError(f"{where}: validation_samples must be an integer >= 0, got "
                                 f"{self.validation_samples!r}.")
        if not is_int(self.seed):
            raise DPIConfigError(f"{where}: seed must be an integer, got {self.seed!r}.")
        if self.eval_seed is not None:
            if self.source != "reasoning_gym":
                raise DPIConfigError(f"{where}: eval_seed draws held-out rows from another generator seed, which only "
                                     "reasoning_gym tasks have; remove it (eval_samples holds rows out of the data).")
            if not is_int(self.eval_seed) or self.eval_seed == self.seed:
                raise DPIConfigError(f"{where}: eval_seed must be an integer other than seed ({self.seed}), got "
                                     f"{self.eval_seed!r}.")
            if not self.eval_samples + self.validation_samples:
                raise DPIConfigError(f"{where}: eval_seed is set but no row is held out; set eval_samples (and "
                                     "validation_samples).")
        if self.source == "reasoning_gym" and self.max_samples is None:
            raise DPIConfigError(f"{where}: reasoning_gym tasks are generated, set max_samples (how many).")
        if self.kwargs and self.source in FILE_SOURCES:
            raise DPIConfigError(f"{where}: kwargs only apply to the 'hub' and 'reasoning_gym' sources; remove them.")
        if self.config is not None and self.source != "hub":
            raise DPIConfigError(f"{where}: config (a Hub config name) only applies to source 'hub'; remove it.")
        if self.columns and self.source not in _COLUMN_SOURCES:
            raise DPIConfigError(f"{where}: columns only apply to the sources {list(_COLUMN_SOURCES)}; remove them.")
        self.columns = dict(self.columns or {})
        for role, column in self.columns.items():
            if role not in COLUMN_ROLES:
                raise DPIConfigError(f"{where}: unknown column role {role!r}{did_you_mean(role, COLUMN_ROLES)}; "
                                     f"valid roles: {list(COLUMN_ROLES)}.")
            if not (isinstance(column, str) or (role == "prompt" and _is_str_list(column))):
                raise DPIConfigError(f"{where}: columns[{role!r}] must be a column name"
                                     f"{' or a list of names' if role == 'prompt' else ''}, got {column!r}.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TaskSpec":
        """Build a spec from a mapping (a recipe entry); unknown keys raise :class:`DPIConfigError`.

        Args:
            data: keys are the field names of :class:`TaskSpec`.
        """
        if not isinstance(data, Mapping):
            raise DPIConfigError(f"a task must be a mapping of TaskSpec fields, got {type(data).__name__}.")
        check_unknown_keys(data, [f.name for f in dataclasses.fields(cls)], f"task {data.get('name', '?')!r}")
        if "name" not in data:
            raise DPIConfigError(f"a task needs a `name`; got keys {sorted(data)}.")
        return cls(**data)


def load_task(spec: TaskSpec | Mapping[str, Any], report: dict | None = None) -> datasets.DatasetDict:
    """Load one task as ``train`` (and ``eval`` when ``spec.eval_samples > 0``, ``validation`` when
    ``spec.validation_samples > 0``) splits; see the module docstring.

    Args:
        spec: a :class:`TaskSpec` or a mapping accepted by :meth:`TaskSpec.from_dict`.
        report: a dict that receives what the loader dropped: with ``eval_seed``, ``eval_duplicates_dropped`` and
            ``validation_duplicates_dropped`` (held-out rows whose question is a training row's) and
            ``eval_generated``; otherwise nothing is dropped and both counts are 0 (default None).

    Raises:
        DPIConfigError: unreadable, missing or malformed data (the message names the task and file), or no data.
    """
    spec = spec if isinstance(spec, TaskSpec) else TaskSpec.from_dict(spec)
    if spec.eval_seed is not None:
        rows = heldout_splits(spec, report)
        return datasets.DatasetDict({split: datasets.Dataset.from_list(r) for split, r in rows.items()})
    if report is not None:
        report.update(eval_duplicates_dropped=0, validation_duplicates_dropped=0)
    records, convert = _source(spec)
    train_idx, eval_idx, validation_idx = _split_indices(len(records), spec)
    splits = {"train": train_idx}
    if spec.eval_samples:
        splits["eval"] = eval_idx
    if spec.validation_samples:
        splits["validation"] = validation_idx
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_list(_convert_all(spec, records, convert, idx)) for split, idx in splits.items()}
    )


def load_tasks(specs) -> dict[str, datasets.DatasetDict]:
    """Load several tasks, keyed by name in the given order.

    Args:
        specs: an iterable of :class:`TaskSpec` or mappings.

    Raises:
        DPIConfigError: two tasks share a name, or any error of :func:`load_task`.
    """
    specs = [s if isinstance(s, TaskSpec) else TaskSpec.from_dict(s) for s in specs]
    names = [s.name for s in specs]
    duplicates = repeated(names)
    if duplicates:
        raise DPIConfigError(f"task names must be unique; repeated: {duplicates}.")
    return {s.name: load_task(s) for s in specs}


# --- sources: each returns (records, convert) where convert(record, index) builds one row -----------------------


def _source(spec: TaskSpec) -> tuple[Any, Callable[[Any, int], dict]]:
    if spec.source == "reasoning_gym":
        return reasoning_gym_source(spec)
    if spec.source == "hub":
        return _hub_source(spec)
    if spec.source == "logiqa_txt":
        return _logiqa_blocks(spec), functools.partial(_logiqa_row, spec)
    records = _json_records(spec)
    if spec.source == "gsm8k_jsonl":
        return records, functools.partial(_gsm8k_row, spec)
    if spec.source == "alpaca_json":
        return records, functools.partial(_alpaca_row, spec)
    return records, _column_converter(spec, _record_keys(records), where=spec.path)


def _hub_source(spec: TaskSpec):
    try:
        data = datasets.load_dataset(spec.path, spec.config, split=spec.split, **spec.kwargs)
    except Exception as err:  # network, unknown id/config/split: all surface as one config error
        raise DPIConfigError(f"task {spec.name!r}: could not load Hub dataset {spec.path!r} (config "
                             f"{spec.config!r}, split {spec.split!r}): {err}") from err
    return data, _column_converter(spec, list(data.column_names), where=f"Hub dataset {spec.path!r}")


def _convert_all(spec: TaskSpec, records, convert, indices: list[int]) -> list[dict]:
    rows = []
    for i in indices:
        try:
            rows.append(convert(records[i], i))
        except DPIConfigError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError) as err:  # a field missing or of the wrong type
            raise _record_error(spec, i, f"is malformed ({type(err).__name__}: {err})") from err
    return rows


# --- file readers --------------------------------------------------------------------------------------------------


def _read_text(spec: TaskSpec) -> str:
    try:
        return Path(spec.path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DPIConfigError(f"task {spec.name!r}: cannot read {spec.path!r} ({err}); check `path`.") from err


def _json_records(spec: TaskSpec) -> list[dict]:
    """A JSON list of objects, or JSON lines (one object per line), whatever the file extension."""
    text = _read_text(spec)
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise DPIConfigError(f"task {spec.name!r}: {spec.path!r} is not a JSON list or JSON lines ({err}).") from err
    if not records:
        raise DPIConfigError(f"task {spec.name!r}: {spec.path!r} holds no records.")
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DPIConfigError(f"task {spec.name!r}: record {bad} of {spec.path!r} is not a JSON object.")
    return records


def _logiqa_blocks(spec: TaskSpec) -> list[list[str]]:
    lines = _read_text(spec).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DPIConfigError(f"task {spec.name!r}: {spec.path!r} holds no records.")
    if len(lines) % _BLOCK_LINES:
        raise DPIConfigError(f"task {spec.name!r}: {spec.path!r} has {len(lines)} lines, not a multiple of 8; "
                             "LogiQA blocks are: blank, letter a-d, context, question, 4 options A.-D.")
    return [lines[i:i + _BLOCK_LINES] for i in range(0, len(lines), _BLOCK_LINES)]


def _record_keys(records: list[dict]) -> list[str]:
    return sorted(set().union(*(r.keys() for r in records)))


# --- row builders --------------------------------------------------------------------------------------------------


def _gsm8k_row(spec: TaskSpec, record: dict, index: int) -> dict:
    question, answer = _fields(spec, record, index, "question", "answer")
    final = extract_final_answer(answer)
    if final is None:
        raise _record_error(spec, index, "has no '#### <number>' final answer")
    return _row(spec, question, answer, _plain_number(final), {"source": spec.source})


def _alpaca_row(spec: TaskSpec, record: dict, index: int) -> dict:
    instruction, output = _fields(spec, record, index, "instruction", "output")
    extra = record.get("input") or ""
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return _row(spec, prompt, output, output, {"source": spec.source})


def _logiqa_row(spec: TaskSpec, block: list[str], index: int) -> dict:
    blank, letter, context, question, *options = block
    letter = letter.strip().upper()
    if blank.strip() or len(letter) != 1 or letter not in _LOGIQA_LETTERS or not context.strip():
        raise _record_error(spec, index, f"(lines {index * 8 + 1}-{index * 8 + 8}) is not blank, letter a-d, "
                                         "context, question, options A.-D.")
    texts = [_logiqa_option(c, o) for c, o in zip(_LOGIQA_LETTERS, options)]
    listed = "\n".join(f"{c}. {t}" for c, t in zip(_LOGIQA_LETTERS, texts))
    instruction = ANSWER_INSTRUCTION.replace("<answer>", "<letter>")
    prompt = f"{context.strip()}\n\n{question.strip()}\n{listed}\n\n{instruction}"
    meta = {"source": spec.source, "options": texts, "answer": letter}
    return _row(spec, prompt, f"Answer: {letter}", letter, meta)


def _logiqa_option(label: str, line: str) -> str:
    """The text of option ``label`` from its line, which in the upstream files is not always ``"A.<text>"``.

    Seen in the LogiQA English files: ``"d.<text>"``, ``"C <text>"`` and the label moved into the sentence by the
    translation (``"Most of the spirits on the C.S City market"``). Options are positional, so the label is only
    removed, never trusted.
    """
    patterns = (
        (rf"^\s*{label}\s*\.\s*", re.IGNORECASE),  # "A.text", "d.text"
        (rf"^\s*{label}\s+(?=[A-Z\"])", 0),  # "C The ..." but not an unlabeled "A person ..."
        (rf"\b{label}\.", 0),  # label moved into the sentence
    )
    for pattern, flags in patterns:
        text, found = re.subn(pattern, "", line, count=1, flags=flags)
        if found:
            return text.strip()
    return line.strip()


def _column_converter(spec: TaskSpec, available: list[str], where: str) -> Callable[[dict, int], dict]:
    """Row builder for column-mapped data (hub, prompt_completion, messages)."""
    columns = dict(spec.columns)
    if "messages" not in columns and "prompt" not in columns:
        uses_messages = spec.source == "messages" or (spec.source == "hub" and "messages" in available)
        columns.update({"messages": "messages"} if uses_messages else {"prompt": "prompt", "completion": "completion"})
    multiple_choice = "options" in columns
    if multiple_choice and ("answer" not in columns or "prompt" not in columns):
        raise DPIConfigError(f"task {spec.name!r}: a multiple-choice mapping needs columns prompt, options and answer "
                             "(e.g. `{prompt: [context, query], options: options, answer: correct_option}`).")
    if "prompt" in columns and "completion" not in columns and not multiple_choice:
        columns["completion"] = "completion"
    needed = [c for v in columns.values() for c in ([v] if isinstance(v, str) else v)]
    missing = [c for c in needed if c not in available]
    if missing:
        raise DPIConfigError(f"task {spec.name!r}: {where} has no column(s) {missing}; its columns are {available}. "
                             "Map them with `columns: {prompt: ..., completion: ...}` or `{messages: ...}`.")

    def convert(record: dict, index: int) -> dict:
        if multiple_choice:
            return _multiple_choice_row(spec, record, columns, index)
        if "messages" in columns:
            prompt, completion = _split_chat(spec, record[columns["messages"]], index)
        else:
            names = [columns["prompt"]] if isinstance(columns["prompt"], str) else columns["prompt"]
            prompt = "\n\n".join(str(record[n]) for n in names if record[n]) if len(names) > 1 else record[names[0]]
            completion = record[columns["completion"]]
        if not completion or (isinstance(completion, list) and not completion[-1].get("content")):
            raise _record_error(spec, index, "has an empty completion")
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        # the final answer found in the completion, as the file sources give it: openai/gsm8k from the Hub and
        # gsm8k/train.jsonl give the same reference
        found = extract_final_answer(text)
        reference = record[columns["reference"]] if "reference" in columns else _plain_number(found) if found else text
        return _row(spec, prompt, completion, reference, {"source": spec.source})

    return convert


def _prompt_text(record: dict, prompt_columns) -> str:
    names = [prompt_columns] if isinstance(prompt_columns, str) else prompt_columns
    return "\n\n".join(str(record[n]) for n in names if record[n])


def _multiple_choice_row(spec: TaskSpec, record: dict, columns: dict, index: int) -> dict:
    """A LogiQA-style row from Hub columns: the options listed A., B., ...; the answer an index or a letter."""
    options = record[columns["options"]]
    if not isinstance(options, (list, tuple)) or not 2 <= len(options) <= len(_LOGIQA_LETTERS):
        raise _record_error(spec, index, f"has options {options!r}; expected a list of 2-4 strings")
    letters = _LOGIQA_LETTERS[: len(options)]
    answer = record[columns["answer"]]
    if is_int(answer) and 0 <= int(answer) < len(options):
        letter = letters[int(answer)]
    elif isinstance(answer, str) and answer.strip().upper() in letters:
        letter = answer.strip().upper()
    else:
        raise _record_error(spec, index, f"has answer {answer!r}; expected an option index or letter")
    texts = [str(o).strip() for o in options]
    listed = "\n".join(f"{c}. {t}" for c, t in zip(letters, texts))
    instruction = ANSWER_INSTRUCTION.replace("<answer>", "<letter>")
    prompt = f"{_prompt_text(record, columns['prompt'])}\n{listed}\n\n{instruction}"
    meta = {"source": spec.source, "options": texts, "answer": letter}
    return _row(spec, prompt, f"Answer: {letter}", letter, meta)


def _split_chat(spec: TaskSpec, messages, index: int) -> tuple[list[dict], list[dict]]:
    """(prompt, completion) of a chat: everything before the last assistant turn, and that turn."""
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages or []]
    if "assistant" not in roles:
        raise _record_error(spec, index, "has no assistant message to learn")
    last = len(roles) - 1 - roles[::-1].index("assistant")
    if last == 0:
        raise _record_error(spec, index, "starts with the assistant turn: there is no prompt")
    return messages[:last], [messages[last]]


# --- helpers -------------------------------------------------------------------------------------------------------


def _fields(spec: TaskSpec, record: dict, index: int, *keys: str) -> list[str]:
    missing = [k for k in keys if not isinstance(record.get(k), str) or not record[k].strip()]
    if missing:
        raise _record_error(spec, index, f"lacks a non-empty string for {missing}")
    return [record[k] for k in keys]


def _split_indices(n: int, spec: TaskSpec) -> tuple[list[int], list[int], list[int]]:
    """Seeded (train, eval, validation) record indices, each sorted; see the module docstring."""
    if n == 0:
        raise DPIConfigError(f"task {spec.name!r}: {spec.path!r} gave no examples.")
    held = spec.eval_samples + spec.validation_samples
    if held >= n:
        also = f" with validation_samples={spec.validation_samples}" if spec.validation_samples else ""
        raise DPIConfigError(f"task {spec.name!r}: eval_samples={spec.eval_samples}{also} leaves no training examples "
                             f"out of {n}; lower it.")
    order = np.random.default_rng(spec.seed).permutation(n)
    held_out = order[:spec.eval_samples]
    validation = order[spec.eval_samples:held]
    train = order[held:]
    if spec.max_samples is not None:
        train = train[:spec.max_samples]
    return sorted(train.tolist()), sorted(held_out.tolist()), sorted(validation.tolist())


def _plain_number(answer: str) -> str:
    """``answer`` without thousands separators when it is a number written with them ("1,080" → "1080")."""
    return answer.replace(",", "") if _GROUPED_NUMBER.fullmatch(answer) else answer


def _is_str_list(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) for v in value)
