"""A DPI run's identity and its state on disk: what decides its cores, plan and weights, and the checks that keep
a resumed or repeated run from mixing with another run's checkpoints and artifacts."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import numpy as np
from datasets import Dataset
from trl import SFTConfig

from .artifacts import CORES_FILE, DPI_DIR, PLAN_FILE
from .config import DPIConfig
from .core import model_fingerprint
from .core.errors import DPIConfigError

RUNS_DIR = "_dpi_runs"
IDENTITY_FILE = "identity.json"

# DPIConfig's own fields (not SFTConfig's), derived once from the dataclass
DPI_FIELDS = tuple(f for f in DPIConfig.__dataclass_fields__ if f not in SFTConfig.__dataclass_fields__)
# fields that change how a run is stored or reported, not which cores, plan or weights it produces
_BOOKKEEPING_FIELDS = ("task_column", "save_stage_models", "overwrite_output_dir", "allow_mask_mismatch")
# training arguments that set the budget and optimisation of the stages: part of a run's identity
_BUDGET_FIELDS = ("max_steps", "num_train_epochs", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay",
                  "optim", "per_device_train_batch_size", "gradient_accumulation_steps", "max_grad_norm", "seed",
                  "max_length", "packing", "bf16", "fp16")


def dpi_fields_changed(args: DPIConfig) -> list[str]:
    defaults = DPIConfig.__dataclass_fields__
    return [n for n in DPI_FIELDS
            if n not in _BOOKKEEPING_FIELDS and getattr(args, n) != defaults[n].default]


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


# the settings a cores file records that decide which elements its cores hold
MASK_SETTINGS = ("core_fraction", "core_scope", "core_include", "core_exclude", "core_signal", "probe_reliability",
                  "probe_steps", "probe_epochs", "probe_learning_rate")


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


def run_identity(args: DPIConfig, task_train: dict[str, Dataset], model) -> dict:
    """Everything that decides the cores, the plan and the trained weights of a run: each task's row count and a
    digest of its tokenized rows, the model's architecture and content fingerprint, every DPI field, and the
    budget and optimisation arguments with the world size."""
    fp = model_fingerprint(model)
    return {
        "tasks": {t: {"rows": len(ds), "digest": dataset_digest(ds)} for t, ds in task_train.items()},
        "model_fingerprint": {k: fp[k] for k in ("sha256", "content")},
        **dpi_settings(args),
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
