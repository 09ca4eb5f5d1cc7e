"""What every run of one comparison or sweep shares: the loaded tasks, the model loader, the evaluation settings."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ..core.errors import DPIConfigError
from .settings import RUNNER_FIELDS, TRAINING_DEFAULTS, EvalSettings


@dataclass
class RunContext:
    """What every run of one comparison or sweep shares."""

    output_dir: Path
    train_sets: dict
    eval_sets: dict
    task_metrics: dict[str, list[str]]
    tokenizer: Any
    load_model: Callable[[], tuple]
    load_stage_model: Callable[[Path], Any]
    model_id: str
    training: dict
    evaluation: EvalSettings
    judge: Any
    data_key: Any
    resume: bool
    keep_stage_models: bool
    specs: list | None = None  # the TaskSpecs the sets were loaded from (None: datasets were given)
    vary_rows: bool = False

    def for_seed(self, seed: int) -> "RunContext":
        """The context of one seed's runs: with ``vary_rows``, every task's ``seed`` (and ``eval_seed``) shifted by
        ``seed``, so that the seeds draw other training and held-out rows; otherwise this context."""
        if not self.vary_rows or seed == 0:
            return self
        from ..data import load_tasks

        specs = [dataclasses.replace(s, seed=s.seed + seed,
                                     eval_seed=None if s.eval_seed is None else s.eval_seed + seed)
                 for s in self.specs]
        loaded = load_tasks(specs)
        return dataclasses.replace(self, train_sets={t: d["train"] for t, d in loaded.items()},
                                   eval_sets={t: d["eval"] for t, d in loaded.items()},
                                   data_key=[dataclasses.asdict(s) for s in specs])

    def new_model(self):
        """A fresh copy of the model to train or evaluate; the first call also provides the tokenizer."""
        model, tokenizer = self.load_model()
        if self.tokenizer is None:
            self.tokenizer = tokenizer
        return model


def build_context(tasks, model, output_dir, training, evaluation, tokenizer, dtype, resume,
                  keep_stage_models, vary_rows: bool = False) -> RunContext:
    """Load the tasks, check them against the evaluation settings and build the model loaders: everything
    :func:`~dpi_hf.compare.run_comparison` checks before training (its arguments, same meaning)."""
    from ..data import TaskSpec, load_tasks

    evaluation = evaluation if isinstance(evaluation, EvalSettings) else EvalSettings.from_dict(evaluation)
    specs = None
    if isinstance(tasks, Mapping):
        if vary_rows:
            raise DPIConfigError("vary_rows draws other rows for each seed from the tasks' TaskSpecs, and the tasks "
                                 "were given as datasets; pass TaskSpecs (or their dicts), or vary_rows=False.")
        loaded, sources, data_key = dict(tasks), {t: None for t in tasks}, {
            t: [getattr(d, "_fingerprint", None) for d in dd.values()] for t, dd in tasks.items()}
    else:
        specs = [t if isinstance(t, TaskSpec) else TaskSpec.from_dict(t) for t in tasks]
        loaded, sources = load_tasks(specs), {s.name: s.source for s in specs}
        data_key = [dataclasses.asdict(s) for s in specs]
    if len(loaded) < 2:
        raise DPIConfigError(f"a comparison needs at least two tasks, got {list(loaded)}.")
    for name, splits in loaded.items():
        if "train" not in splits or "eval" not in splits or len(splits["eval"]) == 0:
            raise DPIConfigError(f"task {name!r} needs a train and a non-empty eval split; set eval_samples > 0 in "
                                 "its TaskSpec (the held-out rows every method is scored on).")
    unknown = [t for t in evaluation.metrics if t not in loaded]
    if unknown:
        raise DPIConfigError(f"eval.metrics names unknown tasks {unknown}; the tasks are {list(loaded)}.")
    task_metrics = {t: evaluation.metrics_for(t, sources[t]) for t in loaded}
    judge = evaluation.make_judge()

    training = {**TRAINING_DEFAULTS, **dict(training or {})}
    owned = [k for k in RUNNER_FIELDS if k in training]
    if owned:
        raise DPIConfigError(f"training fields {owned} are set by the comparison runner (per method and seed); "
                             "remove them (use methods / heuristic_groups / seeds / output_dir instead).")
    if callable(model):
        if tokenizer is None:
            raise DPIConfigError("model is a callable, so pass its tokenizer= as well.")
        # a callable has no identity that survives processes: resume trusts the output_dir to belong to this model
        load_model, model_id, trust_remote_code = (lambda: (model(), tokenizer)), "callable", False
        dtype = "auto"
    else:
        from ..run.model import ModelSpec, load_model_and_tokenizer, torch_dtype

        spec = model if isinstance(model, ModelSpec) else ModelSpec(name_or_path=str(model), dtype=dtype)
        model_id, trust_remote_code = json.dumps(dataclasses.asdict(spec), sort_keys=True), spec.trust_remote_code
        dtype = torch_dtype(spec.dtype)

        def load_model():
            """A fresh model and its tokenizer from the model spec."""
            return load_model_and_tokenizer(spec)

    def load_stage_model(directory: Path):
        """The model saved after a stage, loaded with the same dtype as the base model."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype,
                                                    trust_remote_code=trust_remote_code)

    return RunContext(output_dir=Path(output_dir), train_sets={t: d["train"] for t, d in loaded.items()},
                      eval_sets={t: d["eval"] for t, d in loaded.items()}, task_metrics=task_metrics,
                      tokenizer=tokenizer, load_model=load_model, load_stage_model=load_stage_model,
                      model_id=model_id, training=training, evaluation=evaluation, judge=judge, data_key=data_key,
                      resume=resume, keep_stage_models=keep_stage_models, specs=specs, vary_rows=bool(vary_rows))

