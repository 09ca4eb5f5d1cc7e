"""``dpi-hf train RECIPE.yaml`` from Python: :func:`run_recipe` scores the base model, trains with DPITrainer and
scores again (``recipes/quickstart.yaml`` is the canonical example).

The implementation is :mod:`dpi_hf.run.train` (and :mod:`dpi_hf.run.model` for model loading); this module keeps
the public names.
"""

from .run.model import load_model_and_tokenizer
from .run.train import (
    LOWER_IS_BETTER,
    SCORES_FILE,
    RunReport,
    evaluate_tasks,
    format_report,
    format_table,
    run_recipe,
    summary_rows,
)

__all__ = ["SCORES_FILE", "LOWER_IS_BETTER", "RunReport", "load_model_and_tokenizer", "evaluate_tasks",
           "summary_rows", "format_table", "run_recipe", "format_report"]
