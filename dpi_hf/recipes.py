"""Recipes: one YAML file that names the model, the tasks, the evaluation and every training field of a DPI run.

The implementation lives in the run layer: :mod:`dpi_hf.run.reading` (YAML, overrides, variables),
:mod:`dpi_hf.run.recipe` (validation), :mod:`dpi_hf.run.model` (``model:``), :mod:`dpi_hf.evaluation.settings`
(``eval:``) and :mod:`dpi_hf.run.environment` (offline mode). This module keeps the public names in one place;
see docs/recipes.md for the format.
"""

from .evaluation.settings import DEFAULT_METRICS, FALLBACK_METRICS, EvalSpec
from .run.environment import set_offline_environment, wants_offline
from .run.model import DTYPES, ModelSpec
from .run.reading import SECTIONS, parse_overrides, parse_value, read_recipe, resolve_recipe
from .run.recipe import Recipe, RuntimeSpec, build_training_args, load_recipe, recipe_fields_help

__all__ = ["SECTIONS", "DTYPES", "DEFAULT_METRICS", "FALLBACK_METRICS", "ModelSpec", "EvalSpec", "RuntimeSpec",
           "Recipe", "read_recipe", "resolve_recipe", "load_recipe", "parse_overrides", "parse_value",
           "build_training_args", "wants_offline", "set_offline_environment", "recipe_fields_help"]
