"""The two entry points of the comparison harness: :func:`run_comparison` (the paper's Table 1) and :func:`run_sweep`
(its Figure 2 ablation). Both check everything before any training, then run, summarise and write."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..core.errors import DPIConfigError
from .context import build_context
from .report import write_comparison, write_sweep
from .runs import evaluate_base, train_and_evaluate, train_single_tasks
from .settings import DEFAULT_METHODS, METHODS, EvalSettings, check_groups, check_seeds, make_config, method_fields
from .summary import assemble, assemble_sweep


def run_comparison(
    tasks,
    model: Any,
    output_dir: str | Path,
    *,
    training: Mapping[str, Any] | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    heuristic_groups: Sequence[Sequence[str]] | None = None,
    seeds: Sequence[int] = (0,),
    evaluation: EvalSettings | Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    dtype: str = "float32",
    include_base: bool = True,
    resume: bool = True,
    keep_stage_models: bool = False,
    vary_rows: bool = False,
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
        methods: which of :data:`METHODS` to run (default: :data:`DEFAULT_METHODS`, the paper's four). ``"cpi"`` is
            DPI with ``fusion="cpi"`` (its probes are trained into the backbone the stages start from; the
            ``fusion_factor`` / ``fusion_stage_fraction`` of ``training`` apply to it only).
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
        vary_rows: seed s draws other rows: every task's ``seed`` and ``eval_seed`` are shifted by s (training and
            held-out rows; both runs of a pair by seed use the same rows). Needs TaskSpecs. Default False: every seed
            trains and scores the same rows (only the order and the initialisation of what is random differ). The
            base model is scored on the unshifted rows.

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
    seeds = check_seeds(seeds)
    ctx = build_context(tasks, model, output_dir, training, evaluation, tokenizer, dtype, resume, keep_stage_models,
                        vary_rows)
    groups = check_groups(heuristic_groups, list(ctx.train_sets)) if "multistage_heuristic" in methods else None
    plans = {m: method_fields(m, groups, list(ctx.train_sets)) for m in methods}
    for fields in plans.values():  # fail now, not after an hour of training
        make_config(ctx.training, fields, seed=seeds[0], run_dir=ctx.output_dir)

    t_start = time.perf_counter()
    base = evaluate_base(ctx) if include_base else None
    runs = []
    for s in seeds:
        seed_ctx = ctx.for_seed(s)
        runs += [train_single_tasks(seed_ctx, s) if m == "single_task" else train_and_evaluate(seed_ctx, m, plans[m], s)
                 for m in methods]
    results = assemble(ctx, runs, base, methods, seeds,
                       extra_settings={"heuristic_groups": groups, "vary_rows": ctx.vary_rows})
    results["wall_seconds"] = time.perf_counter() - t_start
    write_comparison(ctx.output_dir, results)
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
    from ..trainer.config import CORE_SCOPES

    seeds = check_seeds(seeds)
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
    ctx = build_context(tasks, model, output_dir, training, evaluation, tokenizer, dtype, resume, keep_stage_models)
    base_fields: dict[str, Any] = {"staging": staging}
    if staging == "given":
        base_fields.update(stage_groups=check_groups(stage_groups, list(ctx.train_sets), "stage_groups"),
                           freeze_cores=True)
    points = [(f"p{p:g}-{scope}", {**base_fields, "core_fraction": p, "core_scope": scope}, p, scope)
              for scope in scopes for p in fractions]
    if reference:
        points.append(("unfrozen", {**base_fields, "freeze_cores": False}, None, None))
    for _, fields, _, _ in points:
        make_config(ctx.training, fields, seed=seeds[0], run_dir=ctx.output_dir)

    t_start = time.perf_counter()
    base = evaluate_base(ctx)
    records = []
    for seed in seeds:
        for name, fields, p, scope in points:
            record = train_and_evaluate(ctx, name, fields, seed)
            record.update(core_fraction=p, core_scope=scope, reference=p is None)
            records.append(record)
    result = assemble_sweep(ctx, records, base, staging, time.perf_counter() - t_start)
    write_sweep(ctx.output_dir, result)
    return result

