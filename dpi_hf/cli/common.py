"""Helpers the verbs that read a finished run share."""

from __future__ import annotations

import os

from ..core.errors import DPIConfigError


def load_run_cores(output_dir):
    """``(cores, plan)`` of a finished DPI run (its ``output_dir`` or ``dpi/`` folder), which must hold cores.

    Raises:
        DPIConfigError: the path does not exist, or the run never probed (a baseline).
    """
    from ..artifacts import load_dpi_artifacts

    cores, plan = load_dpi_artifacts(existing_path(output_dir))
    if not cores:
        raise DPIConfigError(f"{output_dir!r} holds a plan but no cores (a baseline run that never probed); "
                             "inspect and plan need the cores of a DPI run.")
    return cores, plan


def existing_path(path) -> str:
    """``path`` if it exists: a missing directory must not be taken for a Hub repo id (no network call)."""
    if not os.path.exists(path):
        raise DPIConfigError(f"{str(path)!r} does not exist; pass the output_dir of a DPI run.")
    return str(path)


