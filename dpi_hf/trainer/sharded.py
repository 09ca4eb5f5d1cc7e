"""The multi-task run on a sharded model (FSDP2): shard first, per-rank stage state, cores gathered where needed.

:class:`ShardedRunMixin` is mixed into :class:`~dpi_hf.trainer.DPITrainer`. Under FSDP2 the trainer shards the model
(accelerate's model-only ``prepare``) before it copies θ0, so θ0, the probe signals, the cores (per-rank parts, see
:class:`~dpi_hf.core.sharded_mask.ShardedCoreMask`) and the freeze all live on each rank's shards, and every phase's
``Trainer.train()`` finds the model already sharded (accelerate leaves an FSDP module as it is). Unsharded runs
(one process, DDP) keep one stage-state file on rank 0, as before.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..core.errors import DPIConfigError
from ..core.io import atomic_save_file
from ..core.sharded_mask import shard_mask
from ..core.sharding import is_dtensor, snapshot_parameters


def gathered(masks: dict | None) -> dict | None:
    """The global masks of ``masks``: sharded parts are gathered on rank 0 (a collective: every rank calls this).

    Returns the masks themselves when none is sharded, and None on the ranks other than 0 of a sharded run.
    """
    if not masks or not any(hasattr(m, "gather") for m in masks.values()):
        return masks
    out = {t: (m.gather() if hasattr(m, "gather") else m) for t, m in masks.items()}
    return None if any(m is None for m in out.values()) else out


class ShardedRunMixin:
    """Sharding and per-rank stage state for DPITrainer (needs ``model``, ``accelerator``, ``_runs_dir``)."""

    @property
    def _sharded(self) -> bool:
        return any(is_dtensor(p) for p in self.model.parameters())

    def _shard_model(self) -> None:
        """Under FSDP2, shard the model now, before θ0 is copied (see the module docstring); masks loaded before
        (``masks_from``, ``protect_cores_from``) are cut to this rank's rows."""
        if not getattr(self, "is_fsdp_enabled", False) or self._sharded:
            return
        self.model = self.model_wrapped = self.accelerator.prepare(self.model)
        if getattr(self, "_preloaded_cores", None) is not None:
            self._preloaded_cores = {t: shard_mask(m, self.model) for t, m in self._preloaded_cores.items()}
        if getattr(self, "protected", None) is not None:
            self.protected = shard_mask(self.protected, self.model)

    def _stage_state_path(self, k: int) -> Path:
        if self._sharded:  # one file of local shards per rank (sharded safetensors)
            w = self.accelerator.num_processes
            return self._runs_dir / f"stage-{k}.rank{self.accelerator.process_index}-of-{w}.safetensors"
        return self._runs_dir / f"stage-{k}.safetensors"

    def _save_stage_state(self, k: int) -> None:
        """The weights after stage k, for a resume: the whole model on rank 0, or each rank's local shards."""
        if self._sharded or self.is_world_process_zero():
            atomic_save_file(snapshot_parameters(self.model, include_frozen=True), self._stage_state_path(k))

    def _load_stage_state(self, k: int) -> dict[str, torch.Tensor]:
        path = self._stage_state_path(k)
        if not path.is_file():
            raise DPIConfigError(
                f"{path} does not exist: the run was saved with another number of processes (a sharded run keeps "
                "one file of local shards per rank); resume with the world size the run was started with."
            )
        return load_file(str(path))
