"""The torch-only DPI engine: core masks, exact selection, stage planning and exact freezing.

Nothing in this package imports transformers, trl or accelerate; the Trainer glue in :mod:`dpi_hf` builds on it.
"""

from .errors import DPIConfigError, FingerprintMismatchError, MaskFileError, ProbeDivergedError
from .fingerprint import check_fingerprint, model_fingerprint
from .freezing import ParameterFreezer
from .masks import CoreMask
from .planning import StagePlan, plan_stages
from .selection import select_core, update_magnitudes
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
    "load_cores",
    "model_fingerprint",
    "plan_stages",
    "read_cores_metadata",
    "save_cores",
    "select_core",
    "update_magnitudes",
]
