"""dpi-hf: Dynamic Parameter Isolation for multi-task SFT on the Hugging Face stack.

The torch-only engine (:mod:`dpi_hf.core`) is imported eagerly; the Trainer glue (which imports transformers and
trl, a few seconds) is imported on first use of its names.
"""

from .core import __all__ as _core_all
from .core import (  # noqa: F401  (re-exported, listed in __all__)
    CoreMask,
    DPIConfigError,
    FingerprintMismatchError,
    MaskFileError,
    ParameterFreezer,
    ProbeDivergedError,
    StagePlan,
    check_fingerprint,
    load_cores,
    model_fingerprint,
    plan_stages,
    read_cores_metadata,
    save_cores,
    select_core,
    update_magnitudes,
)

__version__ = "0.1.0"

_LAZY = {
    "DPIConfig": "dpi_hf.trainer.config",
    "DPITrainer": "dpi_hf.trainer.trainer",
    "CoreProbeCallback": "dpi_hf.trainer.callbacks",
    "FreezeMaskCallback": "dpi_hf.trainer.callbacks",
    "save_dpi_artifacts": "dpi_hf.artifacts",
    "load_dpi_artifacts": "dpi_hf.artifacts",
    "probe_cores": "dpi_hf.trainer.protection",
    "merge_models": "dpi_hf.merging",
    "merge_checkpoints": "dpi_hf.merging",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dpi_hf' has no attribute {name!r}")


__all__ = [*_core_all, *_LAZY]
