"""The comparison harness: the paper's four methods under one training budget, evaluated on every task, and the
core-fraction ablation.

:func:`run_comparison` trains, for each seed, the paper's four methods through DPITrainer's single code path —

- ``multitask``: one stage on the uniform mixture of all tasks (``staging="multitask"``);
- ``multistage_random``: K = ``num_random_stages`` (default 3) stages, tasks assigned at random with the seed
  (``staging="random"``);
- ``multistage_heuristic``: the stages named in ``heuristic_groups`` (``staging="given"``), no freezing;
- ``dpi``: probes → plan → staged training with earlier stages' cores frozen (``staging="dpi"``);

— evaluates the base model and every trained model on every task (the task's metric on its held-out split, and the
held-out NLL per token of the reference completions), evaluates the model after each stage of the staged methods
(the forgetting table), and writes into ``output_dir``:

- ``results.json``: every run's record (scores, NLL, plan, per-phase timings, examples trained on) and the summary;
- ``results.md``: a table like the paper's Table 1 (one row per method, one column per task metric, the macro
  score; mean ± std over seeds), held-out NLL, the training budget and DPI's probe cost, the forgetting tables and
  DPI's diagnostics (core overlaps, groups, frozen fraction per stage);
- ``scores.png`` (scores per task and method) and ``forgetting.png`` (a heatmap per staged method: each task's
  NLL change from the base model after each stage).

:func:`run_sweep` is the paper's Figure 2 ablation: one DPI run per ``core_fraction`` × ``core_scope``, written as
``sweep.json``, ``sweep.md`` and ``sweep.png`` (macro score and forgetting against p).

Same budget: every method trains on the same number of examples. DPITrainer splits the total ``max_steps`` over
stages in proportion to their data (with epochs, each stage runs the epochs over its own data), and this module
sets ``dataloader_drop_last=True`` unless the recipe says otherwise, so no stage ends an epoch with a short batch
that would make one method see fewer examples than another. The examples each phase actually trained on are
counted at the training step and recorded (``train_examples``); probes are counted and timed separately
(``probe_examples``, ``probe_seconds``) and reported beside DPI's scores.

Forgetting: for a task trained in stage s of K, forgetting = NLL after stage K − NLL after stage s (nats/token;
positive means the later stages undid some of what stage s learned). A method's forgetting is the mean over its
tasks trained before the last stage (none for ``multitask``).

Runs are resumable: each (seed, method) writes ``runs/seed-<s>/<method>/compare_run.json`` when done, and a later
call with the same settings reuses it instead of training again.

Layout: :mod:`~dpi_hf.compare.settings` (methods, evaluation settings, checks), :mod:`~dpi_hf.compare.recipe`
(``compare:``/``sweep:`` recipes), :mod:`~dpi_hf.compare.context` (what the runs share),
:mod:`~dpi_hf.compare.runs` (one run), :mod:`~dpi_hf.compare.runner` (the two entry points),
:mod:`~dpi_hf.compare.summary`, :mod:`~dpi_hf.compare.tables`, :mod:`~dpi_hf.compare.plots` and
:mod:`~dpi_hf.compare.report` (writing). The ``dpi-hf compare`` and ``dpi-hf sweep`` verbs are
:mod:`dpi_hf.cli.compare` and :mod:`dpi_hf.cli.sweep`; they import this package, never the reverse.
"""

from .recipe import COMPARE_SECTIONS, CompareRecipe, load_compare_recipe, prepare_compare_recipe
from .runner import run_comparison, run_sweep
from .runs import evaluate_model
from .settings import DEFAULT_METHODS, FORGETTING_MODES, METHODS, EvalSettings

__all__ = ["METHODS", "DEFAULT_METHODS", "FORGETTING_MODES", "EvalSettings", "run_comparison", "run_sweep",
           "evaluate_model", "CompareRecipe", "COMPARE_SECTIONS", "load_compare_recipe", "prepare_compare_recipe"]
