"""`fusion="cpi"` in a DPITrainer run: keep the probe models on disk, then fuse them into the backbone the stages
start from (the engine is :mod:`dpi_hf.core.fusion`).

Which model is a group's model: the data-size-weighted sequential SLERP of its tasks' probe models, with a task's
two split-half probes as two members (each weighted by its half's rows). The probes already ran, so this costs no
training, and it uses every probe: the two halves are two fine-tunes of the same task on disjoint data, and their
merge stands for one fine-tune on all of it (keeping only one half would throw away the other half's training).
Probing a group's tasks together instead would need a second round of probes after the plan.

Files of a run (``output_dir``)::

    _dpi_runs/probe-models/<task>.safetensors         the probe's weights (one probe per task), or
    _dpi_runs/probe-models/<task>-half<h>.safetensors  each split-half probe's weights
    _dpi_runs/probe-models/<task>.importance.safetensors  the importance at the task's core elements only
    _dpi_runs/fused.safetensors                       the fused weights the stages start from (resume reloads them)
    dpi/transplant.safetensors                        which group owns each core element (TransplantMap)
    fused/                                            the fused model, with save_stage_models

A probe's files are written before its cores file, which is what marks the probe finished for a resume; the
transplant map before ``fused.safetensors``, which marks the fusion finished.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..core.fusion import TransplantMap, core_importance, fuse_models, group_core_importance
from ..core.io import atomic_save_file
from ..core.masks import CoreMask
from ..core.planning import StagePlan
from .multitask import safe_name
from .run_state import kill_point

logger = logging.getLogger(__name__)

PROBE_MODELS_DIR = "probe-models"
FUSED_FILE = "fused.safetensors"
TRANSPLANT_FILE = "transplant.safetensors"
FUSED_MODEL_DIR = "fused"


def probe_model_path(runs_dir, task: str, half: int | None = None) -> Path:
    """Where the weights of ``task``'s probe (or of its split-half probe ``half``) are kept."""
    return Path(runs_dir) / PROBE_MODELS_DIR / f"{safe_name(task)}{f'-half{half}' if half else ''}.safetensors"


def importance_path(runs_dir, task: str) -> Path:
    """Where ``task``'s importance at its core elements is kept."""
    return Path(runs_dir) / PROBE_MODELS_DIR / f"{safe_name(task)}.importance.safetensors"


def save_probe_model(model: torch.nn.Module, path) -> Path:
    """Write ``model``'s parameters (CPU copies, one tensor at a time into the file's dict) atomically."""
    return atomic_save_file({n: p.detach().contiguous().cpu() for n, p in model.named_parameters()}, path)


def save_core_importance(importance, core: CoreMask, path) -> Path:
    """Write ``importance`` (name → dense tensor) at ``core``'s elements only: p of a model's size, enough to decide
    which group an element several cores claim goes to."""
    return atomic_save_file(core_importance(importance, core), path)


def fuse_plan(model: torch.nn.Module, plan: StagePlan, cores: dict[str, CoreMask], members: dict[str, list],
              runs_dir, dpi_dir, factor: float, keep: CoreMask | None = None) -> TransplantMap:
    """Fuse the probe models of a run into ``_dpi_runs/fused.safetensors`` and write ``dpi/transplant.safetensors``.

    Args:
        model: the model, at θ0 (its parameters are read as θ0, one tensor at a time; it is not changed).
        plan: the plan; its stages are the groups, in fusion order.
        cores: task → core.
        members: task → list of (probe model file, training rows) of its probes, in probe order.
        runs_dir: the run's ``_dpi_runs`` folder.
        dpi_dir: the run's ``dpi`` folder.
        factor: λ, ``fusion_factor``.
        keep: elements that keep their θ0 value in the fused weights (the protected cores of ``protect_cores_from``,
            which must stay bit-exact through the whole run); default None.

    Returns:
        The transplant map (also written).
    """
    files, sizes, group_cores, group_importance = [], [], [], []
    for stage in plan.stages:
        files.append([str(path) for t in stage for path, _ in members[t]])
        sizes.append([rows for t in stage for _, rows in members[t]])
        union, imp = group_core_importance([cores[t] for t in stage],
                                           [load_file(str(importance_path(runs_dir, t))) for t in stage])
        group_cores.append(union)
        group_importance.append(imp)
    theta0 = {n: p.detach() for n, p in model.named_parameters()}
    fused, tmap = fuse_models(theta0, files, group_cores, sizes, importance=group_importance, factor=factor,
                              groups=[list(s) for s in plan.stages])
    if keep is not None:
        for name in keep.names():
            idx = keep.indices(name)
            fused[name].view(-1)[idx] = theta0[name].detach().reshape(-1)[idx].to(fused[name].device)
    tmap.save(Path(dpi_dir) / TRANSPLANT_FILE, factor=factor)
    kill_point("during-fusion")  # the map is written, the fused weights are not: a resume fuses again
    atomic_save_file(fused, Path(runs_dir) / FUSED_FILE)
    logger.info("DPI: fused %d groups (%s)", len(plan.stages), tmap)
    return tmap


class FusionMixin:
    """DPITrainer's ``fusion="cpi"`` steps: whether the probe models are kept, and the fused start of the stages.

    Mixed into :class:`~dpi_hf.trainer.trainer.DPITrainer`; uses its ``args``, ``tasks``, ``_halves``, ``_restore``,
    ``_runs_dir``, ``_dpi_dir``, ``protected`` and ``save_model``.
    """

    @property
    def _fuses(self) -> bool:
        # probe() trains no stage, so nothing would use the probe models: keep none (a model's size each on disk)
        return self.args.fusion == "cpi" and getattr(self, "_stages_follow", True)

    def _fuse(self, plan: StagePlan, cores) -> dict:
        """Start the stages from the CPI-FT fusion of the probe models (fused now, or reloaded on resume); returns
        the transplant summary for the card."""
        fused_path = self._runs_dir / FUSED_FILE
        if fused_path.is_file():
            logger.info("DPI: fusion already done (%s)", fused_path)
        else:
            members = {t: [(probe_model_path(self._runs_dir, t, h + 1 if len(parts) > 1 else None), len(part))
                           for h, part in enumerate(parts)] for t, parts in ((t, self._halves(t)) for t in self.tasks)}
            if self.is_world_process_zero():
                fuse_plan(self.model, plan, cores, members, self._runs_dir, self._dpi_dir, self.args.fusion_factor,
                          keep=self.protected)
            self.accelerator.wait_for_everyone()
        self._restore(load_file(str(fused_path)))  # every rank: the same file, so the same weights
        kill_point("after-fusion")
        if self.args.save_stage_models:  # every rank: save_model synchronises the processes itself
            self.save_model(str(Path(self._base_output_dir) / FUSED_MODEL_DIR))
        return TransplantMap.read_summary(self._dpi_dir / TRANSPLANT_FILE)
