"""The stored importance of a run's probes (``save_importance=True``) and cores selected from it without probing.

While the probes run, each task's importance is written as soon as it is known, as its mean over the probe's
optimizer steps, in bfloat16, to ``_dpi_runs/probes/<task>.mean-importance.safetensors`` (so a resumed run still has
the tasks probed before the interruption); after the plan, :func:`collect_importance` gathers them into
``dpi/importance.safetensors`` (:func:`dpi_hf.artifacts.save_importance`).

:func:`cores_from_importance` is ``probe_cores(..., importance_from=DIR)``: the cores at this config's ``core_fraction``
and ``core_scope``, selected from the importance another probe stored, with no probe run.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..artifacts import (
    CORES_FILE,
    DPI_DIR,
    IMPORTANCE_FILE,
    importance_path,
    load_importance,
    read_importance_metadata,
    resolve_masks_source,
    save_dpi_artifacts,
    save_importance,
    write_model_card,
)
from ..core import model_fingerprint, plan_stages, read_cores_metadata, select_core
from ..core.errors import DPIConfigError, FingerprintMismatchError
from ..core.signals import threshold_ties, tie_warning
from .config import DPIConfig
from .multitask import safe_name
from .run_state import MASK_SETTINGS, check_output_dir, clear_run_state

logger = logging.getLogger(__name__)


def probe_importance_path(runs_dir, task: str) -> Path:
    """Where a run keeps one task's mean importance until :func:`collect_importance`."""
    return Path(runs_dir) / "probes" / f"{safe_name(task)}.mean-importance.safetensors"


def save_probe_importance(runs_dir, task: str, importance, batches: int) -> Path:
    """Write ``importance / batches`` (the mean per optimizer step) of one task, bfloat16, under ``runs_dir``."""
    if not isinstance(batches, int) or batches < 1:
        raise DPIConfigError(f"the probe of {task!r} took {batches!r} steps; its importance has no mean.")
    path = probe_importance_path(runs_dir, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {n: (t.detach().to("cpu", torch.float32) / batches).to(torch.bfloat16).contiguous()
               for n, t in importance.items()}
    save_file(tensors, str(path), metadata={"batches": str(batches)})
    return path


def collect_importance(runs_dir, output_dir, tasks: list[str], fingerprint: dict, **settings) -> Path:
    """Gather the tasks' probe importances of ``runs_dir`` into ``output_dir/dpi/importance.safetensors``."""
    importance, batches = {}, {}
    for task in tasks:
        path = probe_importance_path(runs_dir, task)
        if not path.is_file():
            raise DPIConfigError(f"the importance of the probe of {task!r} is missing ({path}); the run was resumed "
                                 "from probes made without save_importance=True: probe again (overwrite_output_dir).")
        with safe_open(str(path), framework="pt") as f:
            batches[task] = int(f.metadata()["batches"])
            importance[task] = {n: f.get_tensor(n) for n in f.keys()}
    return save_importance(output_dir, importance, batches, fingerprint=fingerprint, **settings)


def cores_from_importance(model, args: DPIConfig, source, tasks: list[str] | None = None):
    """The cores of ``tasks`` at ``args.core_fraction`` / ``core_scope``, selected from the importance stored in
    ``source``, and written to ``args.output_dir/dpi/`` like a probe's (cores, plan, card, and a copy of the
    importance file, so the new directory serves ``protect_method="ewc"`` too). No probe runs; the model is only read.

    The importance must come from this model's weights (names, shapes and the content digest; ``allow_mask_mismatch``
    accepts other weights of the same architecture). Because it is stored in bfloat16, the cores equal those a fresh
    probe selects at the same p except where bfloat16 rounding ties elements at the selection threshold.

    Returns:
        task → CoreMask.
    """
    source = str(source)
    if importance_path(source) is None:
        raise DPIConfigError(
            f"importance_from={source!r} holds no {DPI_DIR}/{IMPORTANCE_FILE}; probe once with "
            "DPIConfig(save_importance=True) (probe_cores, dpi-hf probe or a DPI run) to store it."
        )
    path = importance_path(source)
    meta = read_importance_metadata(path)
    tasks = list(tasks) if tasks is not None else list(meta["tasks"])
    used = check_output_dir(args)  # before any work: a used output_dir is refused (or cleared with overwrite)
    try:
        stored = load_importance(source, tasks=tasks, model=model, check_content=not args.allow_mask_mismatch)
    except FingerprintMismatchError as e:
        raise DPIConfigError(f"importance_from={source!r} does not belong to this model: {e}") from None
    if used:
        clear_run_state(args.output_dir)
    cores = {}
    for task in tasks:
        cores[task] = select_core(stored[task], args.core_fraction, scope=args.core_scope, include=args.core_include,
                                  exclude=args.core_exclude)
        message = tie_warning(threshold_ties(stored.pop(task), cores[task]), f"core of {task!r} from stored importance")
        if message:
            logger.warning(message)
    plan = plan_stages(cores, args.jaccard_threshold, order=args.stage_order, seed=args.seed, tasks=tasks,
                       overlap="raw")
    probed = {}
    cores_file = resolve_masks_source(source) / CORES_FILE
    if cores_file.is_file():
        probed = {k: v for k, v in read_cores_metadata(cores_file).items() if k in MASK_SETTINGS}
    settings = {**probed, "core_fraction": args.core_fraction, "core_scope": args.core_scope,
                "core_include": args.core_include, "core_exclude": args.core_exclude, "core_signal": meta["signal"],
                "probe_reliability": "none", "overlap": "raw", "importance_from": source}
    fingerprint = model_fingerprint(model)
    save_dpi_artifacts(args.output_dir, cores, plan, fingerprint=fingerprint, **settings)
    target = Path(args.output_dir) / DPI_DIR / IMPORTANCE_FILE
    if target.resolve() != path.resolve():
        shutil.copy2(path, target)
    write_model_card(args.output_dir, plan, {**settings, "stages_trained": False})
    return cores
