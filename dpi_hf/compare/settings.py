"""What a comparison runs and how: the methods, the fields the runner owns, the evaluation settings and the
checks made before any model is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..core.errors import DPIConfigError
from ..evaluation.settings import FORGETTING_MODES, EvalSpec
from ..utils import check_each_task_once, did_you_mean, is_int

__all__ = ["METHODS", "DEFAULT_METHODS", "FORGETTING_MODES", "EvalSettings", "eval_record", "check_seeds", "check_groups",
           "method_fields", "make_config"]

# the paper's four methods; "cpi": DPI whose stages start from the CPI-FT fusion of its probe models;
# "dpi_affinity": DPI grouped on the tasks' gradient affinity (overlap="affinity"); "sequential_freeze": one stage per
# task in the given order, each freezing the cores of the tasks before it (sequential fine-tuning with protection);
# "single_task": every task trained alone, on the steps its rows get in the mixture, and scored on its own rows
METHODS: tuple[str, ...] = ("multitask", "multistage_random", "multistage_heuristic", "dpi", "cpi", "dpi_affinity",
                            "sequential_freeze", "single_task")
# what a comparison runs when it names no methods: the paper's four (the others are asked for by name)
DEFAULT_METHODS: tuple[str, ...] = METHODS[:4]
STAGING = {"multitask": "multitask", "multistage_random": "random", "multistage_heuristic": "given", "dpi": "dpi",
           "cpi": "dpi", "dpi_affinity": "dpi", "sequential_freeze": "given", "single_task": "single_task"}
# Fields the runner sets per method and seed; a recipe setting them would silently change what a method means.
RUNNER_FIELDS = ("staging", "stage_groups", "seed", "output_dir", "save_stage_models", "fusion")
# the cpi method's own settings: shared training fields, applied to the cpi runs only (the other methods do not fuse)
FUSION_FIELDS = ("fusion_factor", "fusion_stage_fraction")
# Defaults for every run, under the recipe's own values: no checkpoints or trackers for throw-away comparison runs,
# and whole batches only, so that every method trains on exactly steps × batch examples (see dpi_hf.compare).
TRAINING_DEFAULTS = {"report_to": "none", "save_strategy": "no", "dataloader_drop_last": True}
RECORD = "compare_run.json"

#: How every model of a comparison is evaluated: the same type as a recipe's ``eval:`` section
#: (:class:`dpi_hf.evaluation.settings.EvalSpec`; ``metric_samples=`` is accepted for ``max_samples``).
EvalSettings = EvalSpec


def eval_record(spec: EvalSpec) -> dict:
    """The evaluation settings that decide a comparison's numbers, as stored in ``results.json`` and hashed into
    each run's settings key (``before``/``after``/``trainer_eval`` are not part of it).

    Args:
        spec: the evaluation settings.
    """
    return {"metrics": spec.metrics, "metric_samples": spec.max_samples, "nll_samples": spec.nll_samples,
            "max_new_tokens": spec.max_new_tokens, "batch_size": spec.batch_size,
            "metric_kwargs": spec.metric_kwargs, "forgetting": spec.forgetting, "judge": spec.judge}


def check_seeds(seeds) -> list[int]:
    """``seeds`` as a list, checked to be a non-empty list of distinct integers."""
    seeds = list(seeds)
    if not seeds or any(not is_int(s) for s in seeds) or len(set(seeds)) != len(seeds):
        raise DPIConfigError(f"seeds={seeds} must be a non-empty list of distinct integers, e.g. [1, 2, 3].")
    return seeds


def check_groups(groups, tasks: list[str], what: str = "heuristic_groups") -> list[list[str]]:
    """The stages of ``multistage_heuristic`` (or of a sweep's ``staging="given"``), checked to name every task
    once.

    Args:
        groups: lists of task names (None or empty: an error naming an example).
        tasks: the comparison's task names.
        what: the name the message gives the groups (default ``"heuristic_groups"``).
    """
    if not groups:
        user = "multistage_heuristic" if what == "heuristic_groups" else "staging='given'"
        raise DPIConfigError(f"{user} needs {what} (the stages as lists of task names), e.g. "
                             f"[[{tasks[0]!r}], {tasks[1:]!r}].")
    return check_each_task_once(groups, tasks, what)


def method_fields(method: str, groups, tasks: list[str] | None = None) -> dict:
    """The DPIConfig fields that make a run the method ``method`` (its staging, the heuristic's groups, ...).

    Args:
        method: one of :data:`METHODS`.
        groups: the stages of ``multistage_heuristic`` (None when it does not run).
        tasks: the task names in order (the stages of ``sequential_freeze``; default None).

    ``single_task`` returns ``{"staging": "single_task"}``: not a DPIConfig value but the runner's mark for one
    training per task (:func:`~dpi_hf.compare.runs.train_single_tasks`), each an ordinary one-dataset run.
    """
    fields: dict[str, Any] = {"staging": STAGING[method]}
    if method == "multistage_heuristic":
        fields["stage_groups"] = groups
    if method == "cpi":
        fields["fusion"] = "cpi"
    if method == "dpi_affinity":  # probe_affinity resolves to True for this overlap
        fields["overlap"] = "affinity"
    if method == "sequential_freeze":
        fields.update(stage_groups=[[t] for t in tasks or []], freeze_cores=True)
    return fields


def make_config(training: Mapping[str, Any], fields: Mapping[str, Any], *, seed: int, run_dir: Path,
                save_stages: bool = False):
    """The :class:`~dpi_hf.DPIConfig` of one run.

    Args:
        training: the fields every run shares.
        fields: the method's (or sweep point's) own fields.
        seed: the training seed.
        run_dir: the run's ``output_dir``.
        save_stages: save the model after each stage (``save_stage_models``; default False).

    Raises:
        DPIConfigError: a field DPIConfig does not know (with the closest one) or DPIConfig's own checks.
    """
    from ..trainer.config import DPIConfig

    if fields.get("staging") == "single_task":  # each task's run is plain SFT on one dataset (no DPI fields)
        from ..trainer.run_state import DPI_FIELDS

        fields = {k: v for k, v in fields.items() if k != "staging"}
        training = {k: v for k, v in training.items() if k not in DPI_FIELDS}
    # the harness owns its run folders (it reuses finished runs by their settings itself), so a run it trains
    # again starts clean
    kwargs = {**training, **fields, "seed": seed, "output_dir": str(run_dir), "save_stage_models": save_stages,
              "overwrite_output_dir": True}
    if kwargs.get("fusion", "none") == "none":  # fusion_factor / fusion_stage_fraction are the cpi method's
        for key in FUSION_FIELDS:
            kwargs.pop(key, None)
    valid = DPIConfig.__dataclass_fields__
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise DPIConfigError(f"training fields {unknown} are not DPIConfig fields"
                             f"{did_you_mean(unknown[0], list(valid))}.")
    return DPIConfig(**kwargs)
