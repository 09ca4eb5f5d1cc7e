"""The forgetting benchmark (``dpi-hf sequential``): a model learns task A, then task B; how much of A does each way
of protecting it keep, for how much of B, measured in held-out accuracy?

Every method starts from the same A model with the same B data, steps, batch and seed: nothing (``none``), A's Σg²
core frozen at several p, controls of the same size (random, random matched per tensor, largest |θ_A|, another
task's core), EWC (loss or decoupled form; all elements or the core only; with the core frozen), L2-SP, LoRA,
WiSE-FT interpolation, core-aware interpolation and replay (:mod:`.methods`). Settings and grids:
:mod:`.settings`; the loop, resumable per (pair, seed, B length, setting): :mod:`.runner`; A's importance and the
cores: :mod:`.cores`; accuracy and NLL: :mod:`.evaluation`; bootstrap intervals, matched-gain forgetting, the Pareto
front and the validation choice: :mod:`.stats` and :mod:`.summary`; the table and the plot: :mod:`.report` and
:mod:`.plots`. docs/method.md defines the measures.
"""

from __future__ import annotations

from ...core.errors import DPIConfigError
from .runner import RESULTS_FILE, run_forgetting
from .settings import DEFAULT_GRIDS, METHODS, ForgettingSettings, Setting

__all__ = ["METHODS", "DEFAULT_GRIDS", "ForgettingSettings", "Setting", "RESULTS_FILE", "run_forgetting",
           "load_sequential_recipe", "chosen_settings"]


def _nested(section: dict, dotted: dict) -> dict:
    """``section`` with ``{"grids.ewc.lambda": [1, 10]}``-style keys set inside it."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in section.items()}
    for key, value in dotted.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[parts[-1]] = value
    return out


def load_sequential_recipe(path, overrides=(), section_overrides: dict | None = None):
    """Read a forgetting-benchmark recipe: an ordinary recipe plus the ``sequential:`` section.

    Args:
        path: the YAML file.
        overrides: recipe overrides, as :func:`~dpi_hf.run.reading.read_recipe` takes them (default none).
        section_overrides: keys of the ``sequential:`` section to replace; a dotted key sets a key inside it
            (``{"grids.ewc.lambda": [1, 10]}``) (default none).

    Returns:
        ``(recipe, settings, raw)``: the validated :class:`~dpi_hf.run.recipe.Recipe`, the
        :class:`ForgettingSettings`, and the resolved mapping (its keys say which training fields the recipe sets).
    """
    from ...run.environment import prepare_raw
    from ...run.reading import read_recipe
    from ...run.recipe import Recipe

    raw = read_recipe(path, overrides)
    section = _nested(raw.pop("sequential", None) or {}, section_overrides or {})
    prepare_raw(raw)  # before huggingface_hub is imported: offline when the recipe wants it
    recipe = Recipe.from_dict(raw, source=str(path))
    if len(recipe.tasks) < 2:
        raise DPIConfigError(f"a sequential recipe needs at least two tasks; {path} has {len(recipe.tasks)}.")
    return recipe, ForgettingSettings.from_dict(section, [t.name for t in recipe.tasks]), raw


def chosen_settings(results: dict, pair: str | None = None) -> tuple[str, dict[str, str]]:
    """The settings an earlier run's validation rows chose: ``(group, {line: setting label})``.

    Args:
        results: a ``forgetting.json`` mapping.
        pair: the pair (``"A->B"``) whose choice to take (default None: the first group that has one).

    Raises:
        DPIConfigError: no group (of ``pair``) has chosen settings.
    """
    for group, lines in (results.get("chosen") or {}).items():
        if lines and (pair is None or group.split(" | ")[0] == pair):
            return group, lines
    groups = list(results.get("chosen") or {})
    raise DPIConfigError(f"no chosen settings{f' for pair {pair!r}' if pair else ''} in those results (groups: "
                         f"{groups}); run the grid on that pair first (it needs a 'none' run and validation rows).")
