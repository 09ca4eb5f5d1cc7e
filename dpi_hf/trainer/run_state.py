"""A DPI run's identity and its state on disk: what decides its cores, plan and weights, and the checks that keep
a resumed or repeated run from mixing with another run's checkpoints and artifacts."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
from pathlib import Path

import numpy as np
from datasets import Dataset
from trl import SFTConfig

from ..artifacts import (
    CORES_FILE,
    DPI_DIR,
    IMPORTANCE_FILE,
    PLAN_FILE,
    load_dpi_artifacts,
    read_importance_metadata,
    resolve_masks_source,
)
from .config import IMPORTANCE_METHODS, DPIConfig
from ..core import CoreMask, model_fingerprint, read_cores_metadata
from ..core.errors import DPIConfigError, FingerprintMismatchError, MaskFileError

logger = logging.getLogger(__name__)

RUNS_DIR = "_dpi_runs"
IDENTITY_FILE = "identity.json"

# DPIConfig's own fields (not SFTConfig's), derived once from the dataclass
DPI_FIELDS = tuple(f for f in DPIConfig.__dataclass_fields__ if f not in SFTConfig.__dataclass_fields__)
# fields that change how a run is stored or reported, not which cores, plan or weights it produces
_BOOKKEEPING_FIELDS = ("task_column", "save_stage_models", "overwrite_output_dir", "allow_mask_mismatch")
# training arguments that set the budget and optimisation of the stages: part of a run's identity
_BUDGET_FIELDS = ("max_steps", "num_train_epochs", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs",
                  "warmup_steps", "weight_decay", "optim", "adam_beta1", "adam_beta2", "adam_epsilon",
                  "per_device_train_batch_size", "gradient_accumulation_steps", "max_grad_norm", "seed", "data_seed",
                  "max_length", "packing", "completion_only_loss", "assistant_only_loss", "neftune_noise_alpha",
                  "bf16", "fp16")


# fields whose default None is resolved from the others when the config is built (never "set" by themselves)
_RESOLVED_FIELDS = ("probe_updates_weights", "probe_affinity", "jaccard_threshold")


def dpi_fields_changed(args: DPIConfig) -> list[str]:
    defaults = DPIConfig.__dataclass_fields__
    return [n for n in DPI_FIELDS
            if n not in _BOOKKEEPING_FIELDS and n not in _RESOLVED_FIELDS and getattr(args, n) != defaults[n].default]


def dpi_settings(args: DPIConfig) -> dict:
    """The DPI fields of ``args`` (every field DPIConfig adds to SFTConfig), JSON-ready."""
    return {n: getattr(args, n) for n in DPI_FIELDS if n not in _BOOKKEEPING_FIELDS} | {"freeze": args.freezes}


def dataset_digest(ds: Dataset) -> str:
    """sha256 of a tokenized dataset's token ids (and masks), row by row: the data a phase trains on."""
    h = hashlib.sha256()
    cols = [c for c in ("input_ids", "completion_mask", "assistant_masks", "labels") if c in ds.column_names]
    h.update(json.dumps(cols).encode())
    for batch in ds.select_columns(cols).iter(batch_size=1000):
        for c in cols:
            for row in batch[c]:
                h.update(np.asarray(row, dtype=np.int64).tobytes())
                h.update(b"|")
    return h.hexdigest()


# how the protected cores are protected: part of a protected run's identity
PROTECT_FIELDS = ("protect_method", "protect_lambda", "protect_ewc_form", "protect_ewc_scope")

# the settings a cores file records that decide which elements its cores hold
MASK_SETTINGS = ("core_fraction", "core_scope", "core_include", "core_exclude", "core_signal", "probe_reliability",
                 "probe_steps", "probe_epochs", "probe_learning_rate", "probe_updates_weights")


def as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def check_output_dir(args: DPIConfig, resume=None) -> bool:
    """Whether ``args.output_dir`` holds another DPI run; raise if a fresh run may not start there.

    A fresh (not resumed) run in an ``output_dir`` with a previous run's DPI state (``dpi/`` or ``_dpi_runs/``) would
    mix two runs' checkpoints and artifacts: it is refused unless ``overwrite_output_dir`` (then that state is deleted
    when training starts). Cheap; the CLI calls it before loading any model.

    Args:
        args: the run's config.
        resume: the ``resume_from_checkpoint`` the run will be started with (default None: ``args``' own).
    """
    resume = args.resume_from_checkpoint if resume is None else resume
    out = Path(args.output_dir)
    used = (out / RUNS_DIR / IDENTITY_FILE).is_file() or (out / DPI_DIR / PLAN_FILE).is_file() or \
        (out / DPI_DIR / CORES_FILE).is_file()
    if used and not resume and not args.overwrite_output_dir:
        raise DPIConfigError(
            f"output_dir {str(out)!r} already holds a DPI run (dpi/ or _dpi_runs/). Resume it with "
            "resume_from_checkpoint=True, start fresh with overwrite_output_dir=True (deletes its DPI state), or "
            "pick another output_dir."
        )
    return used


def run_identity(args: DPIConfig, task_train: dict[str, Dataset], fingerprint: dict,
                 masks_digest: str | None = None, protect_digest: str | None = None) -> dict:
    """Everything that decides the cores, the plan and the trained weights of a run: each task's row count and a
    digest of its tokenized rows, the model's architecture and content fingerprint, every DPI field, and the
    budget and optimisation arguments with the world size; with ``masks_from``, a digest of the masks' cores file.

    Args:
        args: the run's config.
        task_train: task → its tokenized training rows.
        fingerprint: the model's :func:`~dpi_hf.core.model_fingerprint`.
        masks_digest: sha256 of the ``masks_from`` cores file the run uses (the ``digest`` of
            :func:`load_run_masks`' source), or None.
        protect_digest: sha256 of the ``protect_cores_from`` cores file, or None.
    """
    fp = fingerprint
    return {
        "tasks": {t: {"rows": len(ds), "digest": dataset_digest(ds)} for t, ds in task_train.items()},
        "model_fingerprint": {k: fp[k] for k in ("sha256", "content")},
        **dpi_settings(args),
        "masks_digest": masks_digest,
        "protect_digest": protect_digest,
        "budget": {f: getattr(args, f, None) for f in _BUDGET_FIELDS} | {"world_size": args.world_size},
    }


def protected_run_identity(args: DPIConfig, train_dataset: Dataset, fingerprint: dict, protect_digest: str) -> dict:
    """The identity of a protected single-dataset run (SFTTrainer plus ``protect_cores_from``): a digest of its
    tokenized rows, the model's fingerprint, the protection fields, the protected cores file's digest, and the budget
    and optimisation arguments with the world size — what a resume must find unchanged."""
    return {
        "rows": len(train_dataset), "digest": dataset_digest(train_dataset),
        "model_fingerprint": {k: fingerprint[k] for k in ("sha256", "content")},
        "protect_cores_from": args.protect_cores_from, "protect_tasks": args.protect_tasks,
        **{f: getattr(args, f) for f in PROTECT_FIELDS},
        "protect_digest": protect_digest,
        "budget": {f: getattr(args, f, None) for f in _BUDGET_FIELDS} | {"world_size": args.world_size},
    }


def changed_fields(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """'field: saved → current' for every field that differs between two run identities (nested dicts flattened)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_fields(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, list) and isinstance(b, tuple) and list(b) == a):
            out.append(f"{prefix}{key}: {_short(a)} → {_short(b)}")
    return out


def _short(v) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 40 else text[:16] + "…" + text[-8:]


def kill_point(name: str) -> None:
    # fault injection for the kill/resume tests: SIGKILL this process at a named point of the run
    if os.environ.get("DPI_HF_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def clear_run_state(output_dir) -> None:
    """Delete a previous run's DPI state in ``output_dir``: ``_dpi_runs/``, ``dpi/`` and ``stage-*/``."""
    out = Path(output_dir)
    shutil.rmtree(out / RUNS_DIR, ignore_errors=True)
    shutil.rmtree(out / DPI_DIR, ignore_errors=True)
    for stage_dir in out.glob("stage-*"):
        if stage_dir.is_dir():
            shutil.rmtree(stage_dir, ignore_errors=True)


def resume_state(runs_dir: Path, resume_from_checkpoint, identity: dict) -> tuple[dict, str | None]:
    """The saved progress of the interrupted run in ``runs_dir`` and the explicit checkpoint (or None), after
    checking that ``identity`` matches the interrupted run's (an error lists every changed field)."""
    saved_path = runs_dir / IDENTITY_FILE
    if not saved_path.is_file():
        raise DPIConfigError(
            f"resume_from_checkpoint was given but {str(runs_dir)!r} holds no interrupted DPI run (no "
            f"{IDENTITY_FILE}); drop resume_from_checkpoint to start fresh."
        )
    changed = changed_fields(json.loads(saved_path.read_text()), identity)
    if changed:
        raise DPIConfigError(
            f"cannot resume the run in {str(runs_dir.parent)!r}: these settings differ from the interrupted run's: "
            f"{'; '.join(changed)}. Restore them to resume, or start fresh with overwrite_output_dir=True "
            "(deletes that run's DPI state) or another output_dir."
        )
    checkpoint = str(resume_from_checkpoint) if isinstance(resume_from_checkpoint, (str, os.PathLike)) else None
    progress_path = runs_dir / "progress.json"
    return (json.loads(progress_path.read_text()) if progress_path.is_file() else {}), checkpoint


def check_explicit_checkpoint(explicit: str, runs_dir: Path, pending: list[int]) -> None:
    """Refuse a ``resume_from_checkpoint`` path that is not a checkpoint of the first unfinished stage."""
    path = Path(explicit).resolve()
    runs = runs_dir.resolve()
    expected = f"{runs}/stage-{pending[0]}/checkpoint-<step>" if pending else "none: every stage is finished"
    ok = (pending and path.parent == (runs / f"stage-{pending[0]}") and path.name.startswith("checkpoint-")
          and path.is_dir())
    if not ok:
        raise DPIConfigError(
            f"resume_from_checkpoint={explicit!r} is not a checkpoint of the stage this run continues with; "
            f"probes keep no checkpoints (a killed probe reruns from θ0) and finished stages are kept. Expected "
            f"{expected}, or pass resume_from_checkpoint=True to pick the latest checkpoint."
        )


def _load_checked(dpi_dir: Path, model, tasks, allow_other_weights: bool):
    """``(cores, plan, other_weights)`` of ``dpi_dir``, checked against ``model``'s names, shapes and weights; with
    ``allow_other_weights`` a content mismatch (same architecture, other weights) is accepted and described."""
    try:
        cores, plan = load_dpi_artifacts(dpi_dir, model=model, tasks=tasks, check_content=True)
        return cores, plan, None
    except FingerprintMismatchError as e:
        if not allow_other_weights or "other weights" not in str(e):
            raise
        cores, plan = load_dpi_artifacts(dpi_dir, model=model, tasks=tasks, check_content=False)
        theirs = read_cores_metadata(dpi_dir / CORES_FILE)["fingerprint"]
        ours = model_fingerprint(model)
        other_weights = (f"masks from {theirs.get('checkpoint') or 'an unnamed checkpoint'} (content "
                         f"{str(theirs.get('content'))[:12]}) on {ours.get('checkpoint') or 'an unnamed checkpoint'} "
                         f"(content {ours['content'][:12]})")
        logger.warning("DPI: allow_mask_mismatch: %s", e)
        return cores, plan, other_weights


def check_protection_source(args: DPIConfig, peft_config=None) -> tuple[Path, list[str]]:
    """The ``dpi/`` folder of ``args.protect_cores_from`` and the tasks to protect, checked without a model: the
    artifact exists, holds cores (and, for ``protect_method`` ewc / freeze_ewc, the importance), and has every task
    of ``protect_tasks``; no ``peft_config`` is given. Cheap; the CLI calls it before loading anything."""
    source = args.protect_cores_from
    if peft_config is not None:
        raise DPIConfigError(
            "protect_cores_from protects elements of the model's own parameters, and peft_config trains adapter "
            "parameters whose names and shapes match no core; drop peft_config (full fine-tuning with the "
            "protection), or drop protect_cores_from (LoRA alone)."
        )
    try:
        dpi_dir = resolve_masks_source(source)
    except MaskFileError:
        raise DPIConfigError(
            f"protect_cores_from={source!r} holds no DPI artifacts (no {DPI_DIR}/{CORES_FILE}); pass the output_dir of "
            "a probe_cores / dpi-hf probe / DPI run, or its dpi/ folder."
        ) from None
    except DPIConfigError as e:  # the Hub message names masks_from: say which field it was
        raise DPIConfigError(str(e).replace("masks_from=", "protect_cores_from=")) from None
    if not (dpi_dir / CORES_FILE).is_file():
        raise DPIConfigError(
            f"protect_cores_from={source!r} holds a plan but no {CORES_FILE}: nothing to protect. Probe the cores to "
            "protect first (dpi_hf.probe_cores or `dpi-hf probe`)."
        )
    available = read_cores_metadata(dpi_dir / CORES_FILE)["tasks"]
    tasks = list(args.protect_tasks) if args.protect_tasks is not None else list(available)
    unknown = [t for t in tasks if t not in available]
    if unknown:
        raise DPIConfigError(
            f"protect_tasks names {unknown}, which protect_cores_from={source!r} has no core for; it holds "
            f"{available}. Name tasks from that list (or drop protect_tasks to protect all of them)."
        )
    if args.protect_method in IMPORTANCE_METHODS:
        path = dpi_dir / IMPORTANCE_FILE
        stored = read_importance_metadata(path)["tasks"] if path.is_file() else []
        lacking = [t for t in tasks if t not in stored]
        if lacking:
            raise DPIConfigError(
                f"protect_method={args.protect_method!r} weighs the penalty by the protected tasks' importance, and "
                f"protect_cores_from={source!r} has no stored importance for {lacking} (no {DPI_DIR}/"
                f"{IMPORTANCE_FILE}{' entry' if path.is_file() else ''}). Probe them with save_importance=True "
                "(probe_cores(..., DPIConfig(save_importance=True)) or `dpi-hf probe RECIPE --save_importance true`), "
                "or use protect_method='l2sp' (a uniform pull that needs no importance)."
            )
    return dpi_dir, tasks


def load_protected_cores(args: DPIConfig, model):
    """Load ``args.protect_cores_from`` before any training: the artifact must hold cores, name every task of
    ``args.protect_tasks``, and fit this model (names, shapes and weights, unless ``allow_mask_mismatch``).

    Returns:
        (frozen, record): the union of the protected cores (a CoreMask), and what was protected and from where —
        ``source``, ``tasks``, ``elements``, ``fraction`` (of the model's parameters), ``digest`` (sha256 of the
        cores file), ``settings`` (the cores' own core settings), ``reliability`` (each protected task's split-half
        r, when measured) and ``other_weights``.
    """
    source = args.protect_cores_from
    dpi_dir, tasks = check_protection_source(args)
    cores, plan, other_weights = _load_checked(dpi_dir, model, tasks, args.allow_mask_mismatch)
    frozen = CoreMask.union_all(cores[t] for t in tasks)
    meta = read_cores_metadata(dpi_dir / CORES_FILE)
    reliability = None
    if plan is not None and plan.reliability is not None:
        reliability = {t: plan.reliability.reliability[t] for t in tasks if t in plan.reliability.reliability}
    record = {
        "source": str(source), "tasks": tasks, "elements": frozen.count(),
        "fraction": frozen.count() / max(sum(p.numel() for p in model.parameters()), 1),
        "digest": hashlib.sha256((dpi_dir / CORES_FILE).read_bytes()).hexdigest(),
        "settings": {k: meta[k] for k in MASK_SETTINGS if k in meta},
        "reliability": reliability, "other_weights": other_weights,
        **{f: getattr(args, f) for f in PROTECT_FIELDS},
    }
    return frozen, record


def load_run_masks(args: DPIConfig, model, tasks: list[str]):
    """Load ``args.masks_from`` for a run, now rather than after hours of training: the masks must exist, fit this
    model (its weights too, unless ``allow_mask_mismatch``), cover every task, and have been computed with this
    config's core settings (or ``allow_mask_mismatch`` records that they were not).

    Returns:
        (cores, source): task → CoreMask, and a dict with the masks' ``path``, the sha256 ``digest`` of their cores
        file, their own ``settings`` (recorded in
        the new artifacts instead of the config's), the ``mismatches`` accepted, ``other_weights`` (the accepted
        fingerprint mismatch, or None), their ``reliability`` report and their ``affinity`` report (or None).
    """
    dpi_dir = resolve_masks_source(args.masks_from)
    cores, plan, other_weights = _load_checked(dpi_dir, model, tasks, args.allow_mask_mismatch)
    if cores is None:
        raise DPIConfigError(f"masks_from={args.masks_from!r} holds a plan but no {CORES_FILE}.")
    meta = read_cores_metadata(dpi_dir / CORES_FILE)
    settings = {k: meta[k] for k in MASK_SETTINGS if k in meta}
    mismatches = [f"{k}: masks {settings[k]!r}, config {getattr(args, k)!r}" for k in settings
                  if as_list(settings[k]) != as_list(getattr(args, k))]
    if mismatches and not args.allow_mask_mismatch:
        raise DPIConfigError(
            f"masks_from={args.masks_from!r} were computed with other core settings than this config's: "
            f"{'; '.join(mismatches)}. Set the config to the masks' values, re-probe (drop masks_from), or set "
            "allow_mask_mismatch=True to use them anyway (recorded in plan.json and the card)."
        )
    for m in mismatches:
        logger.warning("DPI: allow_mask_mismatch: masks_from differs from the config in %s", m)
    reliability = plan.reliability if plan is not None else None
    if args.strict_reliability and reliability is None:
        raise DPIConfigError(
            f"strict_reliability=True needs the split-half reliability of the cores, and masks_from="
            f"{args.masks_from!r} has none (probed with probe_reliability='none'); re-probe with split_half or set "
            "strict_reliability=False."
        )
    if args.staging == "dpi" and args.overlap == "corrected" and reliability is None:
        raise DPIConfigError(
            f"overlap='corrected' needs the split-half reliability of the cores, and masks_from={args.masks_from!r} "
            "has none (probed with probe_reliability='none'); set overlap='raw' or re-probe."
        )
    affinity = plan.affinity if plan is not None else None
    if args.staging == "dpi" and args.overlap == "affinity" and affinity is None:
        raise DPIConfigError(
            f"overlap='affinity' needs the tasks' gradient dot products, and masks_from={args.masks_from!r} has none "
            "(probed without probe_affinity); re-probe with probe_affinity=True or set overlap='corrected'."
        )
    digest = hashlib.sha256((dpi_dir / CORES_FILE).read_bytes()).hexdigest()
    return cores, {"path": str(args.masks_from), "digest": digest, "settings": settings, "mismatches": mismatches,
                   "other_weights": other_weights, "reliability": reliability, "affinity": affinity}
