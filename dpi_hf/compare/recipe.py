"""Comparison recipes: an ordinary recipe plus the ``compare:`` and ``sweep:`` sections."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..core.errors import DPIConfigError
from ..utils import check_unknown_keys
from .settings import DEFAULT_METHODS, FUSION_FIELDS, RUNNER_FIELDS, EvalSettings


@dataclass
class CompareRecipe:
    """A comparison recipe: an ordinary :class:`~dpi_hf.recipes.Recipe` plus the ``compare:`` and ``sweep:`` sections.

    Attributes:
        recipe: the validated recipe (``model``, ``tasks``, ``eval``, ``runtime`` and the training fields).
        training: the DPIConfig fields the recipe sets (converted), shared by every run; without ``output_dir``.
        evaluation: the settings built from ``eval:`` and ``compare:`` (``nll_samples``, ``forgetting``).
        include_base: ``eval.before``: evaluate the base model as a reference row.
        methods, seeds, heuristic_groups, keep_stage_models, vary_rows: the ``compare:`` section.
        sweep: the ``sweep:`` section as :func:`run_sweep` keyword arguments.
        output_dir: where results go (the recipe's ``output_dir``, default ``runs/<recipe file stem>``).
    """

    recipe: Any
    training: dict
    evaluation: EvalSettings
    include_base: bool
    methods: list[str]
    seeds: list[int]
    heuristic_groups: list[list[str]] | None
    keep_stage_models: bool
    sweep: dict
    output_dir: str
    vary_rows: bool = False


COMPARE_SECTIONS = ("compare", "sweep")
_COMPARE_KEYS = ("methods", "seeds", "heuristic_groups", "nll_samples", "forgetting", "keep_stage_models",
                 "vary_rows")
_SWEEP_KEYS = ("core_fractions", "scopes", "seeds", "staging", "stage_groups", "reference")


def load_compare_recipe(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] = ()) -> CompareRecipe:
    """Read a comparison recipe: a :mod:`dpi_hf.recipes` recipe with two more sections.

    ``compare:`` — ``methods`` (default :data:`DEFAULT_METHODS`, the paper's four; ``cpi`` by name), ``seeds`` (default ``[0]``), ``heuristic_groups``
    (the stages of ``multistage_heuristic``), ``nll_samples`` (rows of each eval split used for the held-out NLL;
    default all), ``forgetting`` (``nll``/``all``/``none``, default ``nll``), ``keep_stage_models`` (default false),
    ``vary_rows`` (default false: seed s shifts every task's ``seed`` and ``eval_seed`` by s, so seeds draw other rows).
    ``sweep:`` — the keyword arguments of :func:`run_sweep` (``core_fractions``, ``scopes``, ``seeds``, ``staging``,
    ``stage_groups``, ``reference``). ``eval.max_samples`` is the number of rows each task's metric scores
    (``nll_samples`` and ``forgetting`` may also be given under ``eval:``; ``compare:`` wins);
    ``eval.before: false`` drops the base-model row. The training fields must not set what the runner sets per
    method and seed (``staging``, ``stage_groups``, ``seed``, ``save_stage_models``).

    Args:
        path: the YAML file.
        overrides: command-line tokens (``["--max_steps", "20", "--data_dir", "/data"]``) or a mapping of dotted
            keys to values, as :func:`dpi_hf.recipes.read_recipe` takes them (default none).

    Raises:
        DPIConfigError: what :func:`dpi_hf.recipes.load_recipe` raises, an unknown key in ``compare:`` or
            ``sweep:``, or a training field the runner owns.
    """
    from ..run.recipe import SECTIONS, Recipe
    from ..run.reading import read_recipe

    raw = read_recipe(path, overrides)
    compare = raw.pop("compare", None) or {}
    sweep = raw.pop("sweep", None) or {}
    check_unknown_keys(compare, _COMPARE_KEYS, "recipe: compare")
    check_unknown_keys(sweep, _SWEEP_KEYS, "recipe: sweep")
    owned = [k for k in RUNNER_FIELDS if k in raw and k != "output_dir"]
    if owned:
        raise DPIConfigError(f"recipe {str(path)!r}: {owned} are set by the comparison runner per method and seed; "
                             "remove them (use compare.methods / compare.heuristic_groups / compare.seeds).")
    # the cpi method's own fields: DPIConfig refuses them without fusion, which only the runner sets (for cpi)
    fusion = {k: _number(raw.pop(k), k, path) for k in FUSION_FIELDS if k in raw}
    recipe = Recipe.from_dict(raw, source=str(path))
    training = {k: getattr(recipe.args, k) for k in raw if k not in SECTIONS and k != "output_dir"} | fusion
    spec = recipe.eval
    # the recipe's eval settings, with every task's metrics spelled out and compare's nll_samples / forgetting
    evaluation = dataclasses.replace(
        spec, metrics={t.name: spec.metrics_for(t) for t in recipe.tasks},
        nll_samples=compare.get("nll_samples", spec.nll_samples), forgetting=compare.get("forgetting", spec.forgetting))
    return CompareRecipe(
        recipe=recipe, training=training, evaluation=evaluation, include_base=spec.before,
        methods=list(compare.get("methods", DEFAULT_METHODS)), seeds=list(compare.get("seeds", [0])),
        heuristic_groups=compare.get("heuristic_groups"), keep_stage_models=bool(compare.get("keep_stage_models")),
        vary_rows=_flag(compare.get("vary_rows", False), "compare.vary_rows", path),
        sweep=dict(sweep), output_dir=str(raw.get("output_dir") or Path("runs") / Path(path).stem))



def _flag(value, key: str, path) -> bool:
    if not isinstance(value, bool):
        raise DPIConfigError(f"recipe {str(path)!r}: {key}={value!r} must be true or false.")
    return value


def _number(value, key: str, path) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DPIConfigError(f"recipe {str(path)!r}: {key}={value!r} must be a number (it is the cpi method's "
                             "setting, see docs/recipes.md).") from None


def prepare_compare_recipe(path: str | Path, overrides: Sequence[str] = ()) -> CompareRecipe:
    """Read a comparison recipe the way ``dpi-hf train`` reads one: go offline first when the recipe wants it,
    then validate (:func:`load_compare_recipe`) and apply ``runtime.num_threads``.

    Args:
        path: the YAML file.
        overrides: command-line tokens (default none).
    """
    from ..run.environment import apply_runtime, prepare_raw
    from ..run.reading import read_recipe

    prepare_raw(read_recipe(path, overrides))  # before huggingface_hub is imported: it reads the variable once
    recipe = load_compare_recipe(path, overrides)
    apply_runtime(recipe.recipe)
    return recipe
