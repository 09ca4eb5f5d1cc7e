"""The Hugging Face glue, as in TRL's ``trl/trainer``: a config + trainer pair and what the trainer is made of.

- :mod:`.config` — :class:`DPIConfig` (``SFTConfig`` plus the DPI fields);
- :mod:`.trainer` — :class:`DPITrainer` (``SFTTrainer``: probes → plan → stages);
- :mod:`.probing` — the trainer's probes, core selection, reliability report and stage plan (a mixin);
- :mod:`.callbacks` — :class:`CoreProbeCallback`, :class:`FreezeMaskCallback` (usable in any ``Trainer``);
- :mod:`.phases` — :class:`PhaseRecord` (what each probe and stage trained on);
- :mod:`.protection` — :func:`probe_cores` (the cores of a model's existing skills, for ``protect_cores_from``);
- :mod:`.fusion` — ``fusion="cpi"`` run glue (probe models kept, fused backbone before the stages; a mixin);
- :mod:`.multitask` — task splitting, split halves, mixtures and step allocation;
- :mod:`.run_state` — run identity, resume and protection sources.

The historical import paths (``dpi_hf.config``, ``dpi_hf.callbacks``, ``dpi_hf.phases``, ``dpi_hf.protection``)
re-export these modules' names.
"""

from .callbacks import CoreProbeCallback, FreezeMaskCallback
from .config import DPIConfig
from .phases import PhaseRecord
from .protection import probe_cores
from .run_state import RUNS_DIR, check_output_dir
from .trainer import DPITrainer, allocate_steps, split_tasks

__all__ = ["DPIConfig", "DPITrainer", "CoreProbeCallback", "FreezeMaskCallback", "PhaseRecord", "probe_cores",
           "RUNS_DIR", "check_output_dir", "allocate_steps", "split_tasks"]
