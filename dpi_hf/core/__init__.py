"""The torch-only DPI engine: core masks, exact selection, stage planning, exact freezing
and CPI-FT fusion.

Nothing in this package imports transformers, trl or accelerate; the Trainer glue in :mod:`dpi_hf` builds on it.
"""

from .errors import DPIConfigError, FingerprintMismatchError, MaskFileError, ProbeDivergedError
from .fingerprint import check_fingerprint, model_fingerprint
from .freezing import ParameterFreezer
from .fusion import TransplantMap, fuse_models, slerp
from .masks import CoreMask
from .planning import StagePlan, plan_stages
from .selection import select_core
from .signals import update_magnitudes
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
    "TransplantMap",
    "check_fingerprint",
    "engine_memory_per_rank",
    "fuse_models",
    "load_cores",
    "model_fingerprint",
    "plan_stages",
    "read_cores_metadata",
    "restore_parameters",
    "save_cores",
    "select_core",
    "slerp",
    "snapshot_parameters",
    "update_magnitudes",
]
