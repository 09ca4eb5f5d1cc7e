"""The torch-only DPI engine: core masks, exact selection, stage planning and exact freezing.

Nothing in this package imports transformers, trl or accelerate; the Trainer glue in :mod:`dpi_hf` builds on it.
"""

from .errors import DPIConfigError, FingerprintMismatchError, MaskFileError, ProbeDivergedError
from .fingerprint import check_fingerprint, model_fingerprint
from .freezing import ParameterFreezer
from .masks import CoreMask
from .planning import StagePlan, plan_stages
from .selection import select_core, update_magnitudes
from .sharding import engine_memory_per_rank, restore_parameters, snapshot_parameters
from .storage import load_cores, read_cores_metadata, save_cores

__all__ = [
    "CoreMask",
    "DPIConfigError",
    "FingerprintMismatchError",
    "MaskFileError",
    "ParameterFreezer",
    "ProbeDivergedError",
    "StagePlan",
    "check_fingerprint",
    "engine_memory_per_rank",
    "load_cores",
    "model_fingerprint",
    "plan_stages",
    "read_cores_metadata",
    "restore_parameters",
    "save_cores",
    "select_core",
    "snapshot_parameters",
    "update_magnitudes",
]
