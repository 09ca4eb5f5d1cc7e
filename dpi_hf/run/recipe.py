"""Recipes: one YAML file that names the model, the tasks, the evaluation and every training field of a DPI run.

A recipe has five reserved sections; every other top-level key is a :class:`~dpi_hf.DPIConfig` field (any
``SFTConfig`` / ``TrainingArguments`` field or DPI field), parsed the Hugging Face way with
``HfArgumentParser(DPIConfig).parse_dict(..., allow_extra_keys=False)``::

    vars:      {data_dir: data}                    # ${name} placeholders used in strings anywhere below
    model:     {name_or_path: offline:smollm2-135m-instruct, dtype: float32}
    tasks:                                          # a list of dpi_hf.data.TaskSpec entries
      - {name: gsm8k, source: gsm8k_jsonl, path: "${data_dir}/gsm8k/train.jsonl", max_samples: 500}
    eval:      {metrics: {gsm8k: [gsm8k_accuracy, nll]}, max_new_tokens: 256}
    runtime:   {num_threads: 1}
    output_dir: runs/my-run                         # from here on: DPIConfig fields
    learning_rate: 1.0e-4

Overrides (``dpi-hf train RECIPE --key value ...``) are applied to the parsed YAML before validation:

* ``--learning_rate 5e-5``: a DPIConfig field (``-`` and ``_`` are interchangeable in field names);
* ``--model.name_or_path X``, ``--eval.max_samples 8``: a key inside a section (dotted path);
* ``--tasks.0.max_samples 8`` or ``--tasks.gsm8k.max_samples 8``: a task's key, by position or by name;
* ``--data_dir DIR``: a variable (a key of ``vars`` or a ``${data_dir}`` used in the recipe).

Values are read as YAML (``8`` → int, ``true`` → bool, ``null`` → None, ``[a, b]`` → list); a string given for a
number or boolean field is converted with that field's argparse type, as ``HfArgumentParser`` does on the command
line (PyYAML reads ``5e-5`` as a string). Unknown keys at any level raise :class:`DPIConfigError` naming the key
and the closest valid one.

Reading (YAML, overrides, variables) is :mod:`dpi_hf.run.reading`; this module validates the result.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import yaml

from ..core.errors import DPIConfigError
from ..evaluation.settings import EvalSpec
from ..utils import check_each_task_once, check_unknown_keys, did_you_mean, is_int, repeated
from .model import ModelSpec
from .reading import SECTIONS, read_recipe, where


@dataclass
class RuntimeSpec:
    """The ``runtime:`` section: process settings that are not training hyper-parameters.

    Args:
        num_threads: torch intra-op CPU threads (``torch.set_num_threads``; default None: torch's default, one per
            core). On a CPU shared with other work, 1 avoids OpenMP threads spinning against each other, which
            slows small models down several-fold.
        offline: never contact the Hub (sets ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE`` and
            ``TRANSFORMERS_OFFLINE``). Default None: offline when the model is an ``offline:`` model and no task
            reads a Hub dataset.
    """

    num_threads: int | None = None
    offline: bool | None = None

    def __post_init__(self) -> None:
        if self.num_threads is not None and (not is_int(self.num_threads) or self.num_threads < 1):
            raise DPIConfigError(f"runtime.num_threads must be a positive integer or null, got {self.num_threads!r}.")
        if self.offline is not None and not isinstance(self.offline, bool):
            raise DPIConfigError(f"runtime.offline must be true, false or null, got {self.offline!r}.")


@dataclass
class Recipe:
    """A validated recipe: see the module docstring.

    Attributes:
        model: the ``model:`` section.
        tasks: the ``tasks:`` section, as :class:`~dpi_hf.data.TaskSpec` (at least one, unique names).
        eval: the ``eval:`` section.
        runtime: the ``runtime:`` section.
        args: the :class:`~dpi_hf.DPIConfig` built from every other key.
        source: the recipe file, when it was read from one.
        raw: the resolved mapping (variables substituted, overrides applied) the recipe was built from.
    """

    model: ModelSpec
    tasks: list
    eval: EvalSpec
    runtime: RuntimeSpec
    args: Any
    source: str | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str | None = None) -> "Recipe":
        """Validate a resolved recipe mapping (the output of :func:`read_recipe`) and build the recipe.

        Args:
            raw: the recipe as a mapping; ``vars`` are ignored here (already substituted).
            source: the file it came from, for messages (default None).

        Raises:
            DPIConfigError: an unknown key (with the closest valid key), a missing section or a bad value.
        """
        from ..data import TaskSpec

        if not isinstance(raw, Mapping):
            raise DPIConfigError(f"{where(source)}a recipe must be a YAML mapping of sections and fields, got "
                                 f"{type(raw).__name__}.")
        raw = copy.deepcopy(dict(raw))
        if "model" not in raw:
            raise DPIConfigError(f"{where(source)}the recipe has no `model:` section; add e.g. "
                                 "`model: {name_or_path: offline:smollm2-135m-instruct}`.")
        if not raw.get("tasks"):
            raise DPIConfigError(f"{where(source)}the recipe has no `tasks:`; list at least one task, e.g. "
                                 "`tasks: [{name: gsm8k, source: gsm8k_jsonl, path: data/gsm8k/train.jsonl}]`.")
        model = _section(ModelSpec, raw["model"], "model", source)
        if not isinstance(raw["tasks"], list):
            raise DPIConfigError(f"{where(source)}`tasks:` must be a list of task mappings, got "
                                 f"{type(raw['tasks']).__name__}.")
        tasks = [_task(TaskSpec, entry, i, source) for i, entry in enumerate(raw["tasks"])]
        names = [t.name for t in tasks]
        if repeated(names):
            raise DPIConfigError(f"{where(source)}task names must be unique; repeated: {repeated(names)}.")
        evaluation = _section(EvalSpec, raw.get("eval") or {}, "eval", source)
        unknown_tasks = [t for t in evaluation.metrics if t not in names]
        if unknown_tasks:
            raise DPIConfigError(f"{where(source)}eval.metrics names unknown task {unknown_tasks[0]!r}"
                                 f"{did_you_mean(unknown_tasks[0], names)}; the tasks are {names}.")
        runtime = _section(RuntimeSpec, raw.get("runtime") or {}, "runtime", source)
        training = {k: v for k, v in raw.items() if k not in SECTIONS}
        args = build_training_args(training, source)
        _check_stage_groups(args, names, source)
        # the resolved mapping shows the training fields as parsed (learning_rate: 5e-5 as a number, not a string)
        raw.update({k: _plain(getattr(args, k.replace("-", "_"))) for k in training})
        return cls(model=model, tasks=tasks, eval=evaluation, runtime=runtime, args=args, source=source, raw=raw)

    @property
    def task_names(self) -> list[str]:
        """The task names, in recipe order."""
        return [t.name for t in self.tasks]

    def to_yaml(self) -> str:
        """The resolved recipe as YAML (variables substituted, overrides applied)."""
        return yaml.safe_dump(self.raw, sort_keys=False, allow_unicode=True)


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] | Mapping[str, Any] = ()) -> Recipe:
    """Read, resolve and validate a recipe file: :func:`read_recipe` then :meth:`Recipe.from_dict`.

    Args:
        path: the YAML file.
        overrides: command-line tokens or a mapping of dotted keys to values (see the module docstring).
    """
    return Recipe.from_dict(read_recipe(path, overrides), source=str(path))


def build_training_args(fields: Mapping[str, Any], source: str | None = None):
    """Build a :class:`~dpi_hf.DPIConfig` from a mapping of its fields, the ``HfArgumentParser`` way.

    Unknown keys raise with the closest valid field; strings given for non-string fields are converted with the
    field's argparse type (so ``learning_rate: 5e-5``, which PyYAML reads as a string, is a float).

    Args:
        fields: DPIConfig / SFTConfig / TrainingArguments field names → values.
        source: the recipe file, for messages (default None).
    """
    from transformers import HfArgumentParser

    from ..trainer.config import DPIConfig

    valid = [f.name for f in dataclasses.fields(DPIConfig) if f.init]
    fields = {k.replace("-", "_") if isinstance(k, str) else k: v for k, v in fields.items()}
    for key in fields:
        if key not in valid:
            raise DPIConfigError(f"{where(source)}unknown key {key!r}{did_you_mean(str(key), valid + list(SECTIONS))}"
                                 "; top-level keys are the sections vars/model/tasks/eval/runtime and DPIConfig fields "
                                 "(see `dpi-hf train --list-fields`).")
    parser = HfArgumentParser(DPIConfig)
    converted = {}
    for key, value in fields.items():
        action = parser._option_string_actions.get(f"--{key}")
        converted[key] = _convert(key, value, action, source)
    try:
        (args,) = parser.parse_dict(converted, allow_extra_keys=False)
    except DPIConfigError as err:
        raise DPIConfigError(f"{where(source)}{err}") from None
    except (ValueError, TypeError) as err:  # TrainingArguments' own checks (e.g. incompatible strategies)
        raise DPIConfigError(f"{where(source)}invalid training fields: {err}") from None
    return args


def recipe_fields_help() -> list[tuple[str, str, str]]:
    """(name, default, help) of every DPIConfig field, DPI fields first, for ``dpi-hf train --list-fields``."""
    from ..trainer.config import DPIConfig

    own = set(DPIConfig.__annotations__)
    rows = []
    for f in dataclasses.fields(DPIConfig):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            "<factory>" if f.default_factory is not dataclasses.MISSING else "<required>")
        help_text = " ".join(str(f.metadata.get("help", "")).split())
        rows.append((f.name, repr(default), help_text, f.name in own))
    rows.sort(key=lambda r: not r[3])
    return [(name, default, text) for name, default, text, _ in rows]



def _plain(value):
    """A parsed field value as plain YAML data (TrainingArguments turns some strings into enums)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def _section(cls, data, name: str, source: str | None):
    """Build a section dataclass ``cls`` from ``data``, naming the recipe in any error."""
    valid = [f.name for f in dataclasses.fields(cls)]
    try:
        check_unknown_keys(data, valid, name)
        return cls(**data)
    except DPIConfigError as err:
        raise DPIConfigError(f"{where(source)}{err}") from None
    except TypeError as err:  # a required key is missing
        raise DPIConfigError(f"{where(source)}`{name}:` is incomplete ({err}); its keys are {valid}.") from None


def _task(task_spec_cls, entry, index: int, source: str | None):
    """Build task ``index`` of the recipe, naming it in any error."""
    try:
        return task_spec_cls.from_dict(entry)
    except DPIConfigError as err:
        raise DPIConfigError(f"{where(source)}tasks[{index}]: {err}") from None


def _check_stage_groups(args, names: list[str], source: str | None) -> None:
    """Check ``stage_groups`` against the recipe's tasks now, before any model is loaded."""
    if not args.stage_groups:
        return
    try:
        check_each_task_once(args.stage_groups, names, "stage_groups")
    except DPIConfigError as err:
        raise DPIConfigError(f"{where(source)}{err}") from None


def _convert(key: str, value, action, source: str | None):
    """A recipe value for field ``key``, converted like argparse converts a string default (see build_training_args)."""
    if action is None or not isinstance(value, str) or action.type in (None, str):
        if action is not None and action.type is str and action.nargs is None and isinstance(value, (int, float)) \
                and not isinstance(value, bool):
            return str(value)  # `--run_name 7` names a run "7"; YAML read it as a number
        return value
    if action.nargs in ("+", "*"):
        return [_call_type(key, action, value, source)]
    return _call_type(key, action, value, source)


def _call_type(key: str, action, value: str, source: str | None):
    """``value`` converted with the field's argparse type, or an error naming the field and its choices."""
    try:
        return action.type(value)
    except (TypeError, ValueError) as err:
        choices = f"; choices: {list(action.choices)}" if action.choices else ""
        raise DPIConfigError(f"{where(source)}{key}={value!r} is not a valid value ({err}){choices}.") from None

