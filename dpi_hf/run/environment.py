"""Process settings every run applies before it loads anything: offline mode, thread count and log output.

``dpi-hf train``, ``compare``, ``sweep`` (and ``probe``) call :func:`prepare_raw` on the resolved recipe mapping
before anything imports ``huggingface_hub`` (which reads ``HF_HUB_OFFLINE`` once), then :func:`apply_runtime` on
the validated recipe.
"""

from __future__ import annotations

import os
from typing import Any, Mapping


def wants_offline(raw: Mapping[str, Any]) -> bool:
    """Whether a resolved recipe mapping runs offline (see :class:`~dpi_hf.run.recipe.RuntimeSpec`), decided
    without importing the Hugging Face libraries (``HF_HUB_OFFLINE`` only takes effect when set before they are
    imported).

    Args:
        raw: the output of :func:`~dpi_hf.run.reading.read_recipe`.
    """
    runtime = raw.get("runtime") or {}
    if isinstance(runtime, Mapping) and isinstance(runtime.get("offline"), bool):
        return runtime["offline"]
    model = raw.get("model") or {}
    name = str(model.get("name_or_path", "")) if isinstance(model, Mapping) else ""
    tasks = raw.get("tasks") or []
    uses_hub = any(not isinstance(t, Mapping) or t.get("source", "hub") == "hub" for t in tasks)
    return name.startswith("offline:") and not uses_hub


def set_offline_environment() -> None:
    """Tell huggingface_hub, datasets and transformers never to contact the Hub (call before importing them)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"


def prepare_raw(raw: Mapping[str, Any]) -> None:
    """Go offline when the resolved recipe mapping ``raw`` wants it (:func:`wants_offline`); call it before the
    recipe is validated, as validation imports the Hugging Face libraries."""
    if wants_offline(raw):
        set_offline_environment()


def apply_runtime(recipe) -> None:
    """Apply a validated recipe's ``runtime:`` section to this process: ``torch.set_num_threads(num_threads)``.

    Args:
        recipe: a :class:`~dpi_hf.run.recipe.Recipe`.
    """
    if recipe.runtime.num_threads:
        import torch

        torch.set_num_threads(recipe.runtime.num_threads)
