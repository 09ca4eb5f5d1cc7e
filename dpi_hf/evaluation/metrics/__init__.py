"""dpi-hf's metrics as local ``evaluate`` modules (``evaluate.load`` of a Hub name fails offline; a local path
loads).

Modules: ``gsm8k_accuracy``, ``codebleu``, ``rougeL_proxy`` — the metrics computed from text alone. The others
need the model (log-likelihoods), a sandbox or a judge endpoint and live in :mod:`dpi_hf.evaluation.registry`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpi_hf.core.errors import DPIConfigError

EVALUATE_MODULES: tuple[str, ...] = ("gsm8k_accuracy", "codebleu", "rougeL_proxy")


def metric_path(name: str) -> str:
    """The directory of the local evaluate module ``name``, for ``evaluate.load(metric_path(name))``.

    Raises:
        DPIConfigError: ``name`` is not one of :data:`EVALUATE_MODULES`.
    """
    if name not in EVALUATE_MODULES:
        raise DPIConfigError(f"name {name!r} is not a dpi-hf evaluate module; valid: {', '.join(EVALUATE_MODULES)}")
    return str(Path(__file__).resolve().parent / name)


def load_metric(name: str) -> Any:
    """``evaluate.load`` the local module ``name`` (works offline).

    Args:
        name: one of :data:`EVALUATE_MODULES`.
    """
    import evaluate

    return evaluate.load(metric_path(name))


def text_pair_info(description: str, inputs_description: str) -> Any:
    """The ``evaluate.MetricInfo`` every module here returns: string ``predictions`` scored against string
    ``references``.

    Args:
        description: what the metric computes.
        inputs_description: its arguments and return value (the module's ``compute`` docs).
    """
    import datasets
    import evaluate

    return evaluate.MetricInfo(
        description=description,
        citation="",
        inputs_description=inputs_description,
        features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
    )
