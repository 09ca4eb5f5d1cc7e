"""`DPITrainer`: SFTTrainer that runs probe → plan → staged training with exact freezing on several tasks.

One dataset without a task column: exactly `SFTTrainer`. Several tasks (a ``dict[str, Dataset]`` or a Dataset with
a task column): ``train()`` runs

1. probes — for each task, the model restored bit-exactly to θ0 (a CPU copy), a fresh optimizer and scheduler,
   ``probe_steps`` steps on that task alone, then its core = top-p of |θ − θ0|, saved at once;
2. the plan — ``plan_stages`` on the cores (or the baselines' fixed stages);
3. stages — from θ0, each stage trains on the mixture of its tasks with the earlier stages' cores frozen.

Each phase is an ordinary ``Trainer.train()`` call with its own output folder under ``output_dir/_dpi_runs/`` (so
checkpoints, resume and the progress bar work per phase) and a fresh optimizer: Adam moments built on earlier
tasks' data would keep pushing the next stage along those tasks' directions, and a stage that starts from its own
optimizer state can be resumed from its own checkpoint alone.

Resume (``train(resume_from_checkpoint=True)``): finished probes (``_dpi_runs/probes/<task>.safetensors``) and finished
stages (``_dpi_runs/progress.json``) are skipped, the model is reloaded from the last finished stage, and the interrupted
stage continues from its last checkpoint with the same frozen set.

Distributed (DDP): every rank runs the same probes on its shard of the data; gradients are all-reduced, so θ after
a probe — and therefore the core — is identical on every rank. Only the main process writes files.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict, concatenate_datasets
from safetensors.torch import load_file, save_file
from transformers.trainer_utils import SaveStrategy, TrainOutput, get_last_checkpoint
from trl import SFTTrainer

from .artifacts import (
    CORES_FILE,
    DPI_DIR,
    atomic_write_text,
    load_dpi_artifacts,
    save_dpi_artifacts,
    write_model_card,
)
from .callbacks import CoreProbeCallback, FreezeMaskCallback, snapshot_parameters
from .config import DPIConfig
from .core import load_cores, plan_stages, save_cores
from .core.errors import DPIConfigError, ProbeDivergedError
from .core.planning import StagePlan, plan_from_groups
from .phases import PROBE, STAGE, PhaseRecord, batch_rows

logger = logging.getLogger(__name__)
_library_logger = logging.getLogger("dpi_hf")
if not _library_logger.handlers:  # like transformers: the library's phase lines are visible without setup
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[dpi-hf] %(message)s"))
    _library_logger.addHandler(_handler)
    _library_logger.propagate = False

RUNS_DIR = "_dpi_runs"
_DATA_COLUMNS = ("prompt", "completion", "messages", "text", "input_ids", "labels", "tools", "chat_template_kwargs")


def _safe_name(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", task)


def split_tasks(dataset, task_column: str) -> dict[str, Dataset] | None:
    """Tasks of a multi-task training input, in first-appearance order, or None for a plain single dataset."""
    if dataset is None:
        return None
    if isinstance(dataset, (dict, DatasetDict)):
        if not dataset:
            raise DPIConfigError("train_dataset is an empty dict; pass at least one task's dataset.")
        for name, ds in dataset.items():
            if not isinstance(name, str) or not name:
                raise DPIConfigError(f"task name {name!r} must be a non-empty string.")
            if not isinstance(ds, Dataset):
                raise DPIConfigError(f"train_dataset[{name!r}] is a {type(ds).__name__}; pass a datasets.Dataset.")
            if len(ds) == 0:
                raise DPIConfigError(f"the dataset of task {name!r} is empty; give it examples or drop the task.")
        return dict(dataset)
    if isinstance(dataset, Dataset) and task_column in dataset.column_names:
        names = dataset[task_column]
        order = list(dict.fromkeys(names))
        if not order:
            raise DPIConfigError("train_dataset is empty; give it examples.")
        by_task: dict[str, list[int]] = {t: [] for t in order}
        for i, t in enumerate(names):
            by_task[t].append(i)
        return {str(t): dataset.select(idx) for t, idx in by_task.items()}
    return None


def _dpi_fields_changed(args: DPIConfig) -> list[str]:
    defaults = DPIConfig.__dataclass_fields__
    names = [
        "staging", "core_fraction", "jaccard_threshold", "core_scope", "core_include", "core_exclude", "probe_steps",
        "probe_epochs", "probe_learning_rate", "stage_order", "stage_groups", "masks_from", "freeze_cores",
    ]
    return [n for n in names if getattr(args, n) != defaults[n].default]


def allocate_steps(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` optimizer steps over stages in proportion to ``sizes`` (largest remainder, each ≥ 1)."""
    if total < len(sizes):
        raise DPIConfigError(
            f"max_steps={total} is smaller than the number of stages ({len(sizes)}); give every stage a step."
        )
    n = sum(sizes)
    raw = [total * s / n for s in sizes]
    steps = [max(1, math.floor(r)) for r in raw]
    order = sorted(range(len(sizes)), key=lambda i: -(raw[i] - math.floor(raw[i])))
    i = 0
    while sum(steps) < total:
        steps[order[i % len(order)]] += 1
        i += 1
    while sum(steps) > total:
        j = max(range(len(steps)), key=lambda k: steps[k])
        steps[j] -= 1
    return steps


class DPITrainer(SFTTrainer):
    """SFTTrainer with Dynamic Parameter Isolation across several tasks.

    Args:
        model, data_collator, processing_class, callbacks, ...: as in `trl.SFTTrainer`.
        args (`DPIConfig`): training arguments plus the DPI fields; a plain `SFTConfig`/`TrainingArguments` is
            converted (DPI fields at their defaults).
        train_dataset (`Dataset` or `dict[str, Dataset]`): one dataset (plain SFT), a dict of task name → dataset,
            or a dataset whose `args.task_column` names each example's task.
        eval_dataset (`Dataset` or `dict[str, Dataset]`, optional): evaluated per task (a dict, or a dataset with a
            task column, is split per task and logged as `eval_<task>_loss`). With several tasks, every stage ends
            with an evaluation whose losses form the forgetting table `dpi/forgetting.json`.

    After `train()`: `self.cores` (task → CoreMask), `self.plan` (StagePlan), `self.phase_records` (one
    :class:`~dpi_hf.phases.PhaseRecord` per probe and stage: kind, tasks, steps, examples, seconds, loss) and
    `self.stage_history` (the same records as dicts).
    """

    _tag_names = ["trl", "sft", "dpi-hf"]

    def __init__(self, model, args=None, data_collator=None, train_dataset=None, eval_dataset=None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = DPIConfig(f"{str(name).split('/')[-1]}-DPI")
        elif not isinstance(args, DPIConfig):
            d = args.to_dict()
            d["hub_token"] = args.hub_token
            args = DPIConfig(**{k: v for k, v in d.items() if k in DPIConfig.__dataclass_fields__})
        self.tasks: dict[str, Dataset] | None = split_tasks(train_dataset, args.task_column)
        if self.tasks is not None and len(self.tasks) == 1:
            changed = _dpi_fields_changed(args)
            if changed:
                raise DPIConfigError(
                    f"only one task ({next(iter(self.tasks))!r}) was given but DPI fields are set ({changed}); "
                    "DPI needs at least two tasks. Add tasks, or drop the DPI fields to train plain SFT."
                )
            train_dataset = next(iter(self.tasks.values()))
            self.tasks = None
        self.cores = None
        self.plan: StagePlan | None = None
        self.phase_records: list[PhaseRecord] = []
        self._phase_examples = 0
        if self.tasks is None:
            super().__init__(model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, **kwargs)
            return

        self._validate_multitask(args)
        self._preloaded_cores = None
        if args.masks_from is not None and args.needs_probes and not isinstance(model, str):
            self._preloaded_cores = self._load_masks(args, model)
        _library_logger.setLevel(logging.INFO if args.process_index == 0 else logging.WARNING)
        eval_split = eval_dataset
        if isinstance(eval_dataset, Dataset):  # a task column → one eval set per task, logged as eval_<task>_loss
            eval_split = split_tasks(eval_dataset, args.task_column) or eval_dataset
        mixture = self._mixture(self.tasks, args.task_column)
        super().__init__(model, args=args, data_collator=data_collator, train_dataset=mixture,
                         eval_dataset=eval_split, **kwargs)
        self._task_train = self._tokenized_tasks(kwargs.get("formatting_func"))
        if args.masks_from is not None and args.needs_probes and self._preloaded_cores is None:
            self._preloaded_cores = self._load_masks(args, self.model)

    def _load_masks(self, args: DPIConfig, model):
        # fail now, not after hours of training: the masks must exist, fit this model and cover every task
        cores, _ = load_dpi_artifacts(args.masks_from, model=model, tasks=list(self.tasks))
        if cores is None:
            raise DPIConfigError(f"masks_from={args.masks_from!r} holds a plan but no {CORES_FILE}.")
        return cores

    # ----------------------------------------------------------------------------------------------- set-up
    def _validate_multitask(self, args: DPIConfig) -> None:
        tasks = list(self.tasks)
        if args.staging == "given":
            named = [t for g in args.stage_groups for t in g]
            unknown = [t for t in named if t not in self.tasks]
            if unknown:
                raise DPIConfigError(f"stage_groups name unknown tasks {unknown}; the tasks are {tasks}.")
            missing = [t for t in tasks if t not in named]
            if missing or len(named) != len(set(named)):
                raise DPIConfigError(
                    f"stage_groups must name every task exactly once; missing {missing}, tasks are {tasks}."
                )
        if args.max_steps is not None and args.max_steps > 0:
            k = len(args.stage_groups) if args.staging == "given" else 1
            if args.max_steps < k:
                raise DPIConfigError(f"max_steps={args.max_steps} is smaller than the number of stages ({k}).")
        for name, ds in self.tasks.items():
            if not any(c in ds.column_names for c in _DATA_COLUMNS):
                raise DPIConfigError(
                    f"task {name!r} has none of the columns SFT trains on ({_DATA_COLUMNS[:4]}); it has "
                    f"{ds.column_names}."
                )

    @staticmethod
    def _mixture(tasks: dict[str, Dataset], task_column: str) -> Dataset:
        parts = []
        for name, ds in tasks.items():
            keep = [c for c in ds.column_names if c in _DATA_COLUMNS]
            ds = ds.select_columns(keep)
            parts.append(ds.add_column(task_column, [name] * len(ds)))
        return concatenate_datasets(parts)

    def _tokenized_tasks(self, formatting_func) -> dict[str, Dataset]:
        col = self.args.task_column
        if col in self.train_dataset.column_names:
            by_task = split_tasks(self.train_dataset, col) if len(self.train_dataset) else {}
            out = {t: by_task.get(t, self.train_dataset.select([])) for t in self.tasks}
        else:  # packing drops extra columns: tokenize each task on its own
            out = {
                t: self._prepare_dataset(ds, self.processing_class, self.args, self.args.packing, formatting_func,
                                         f"train-{t}")
                for t, ds in ((t, self._mixture({t: ds}, col).remove_columns(col)) for t, ds in self.tasks.items())
            }
        for t, ds in out.items():
            if len(ds) == 0:
                raise DPIConfigError(
                    f"task {t!r} has no usable example after tokenization (all truncated away?); raise max_length."
                )
        return out

    # ----------------------------------------------------------------------------------------------- training
    @property
    def stage_history(self) -> list[dict]:
        """The probes and stages run so far, as dicts (see :class:`~dpi_hf.phases.PhaseRecord`)."""
        return [r.to_dict() for r in self.phase_records]

    def training_step(self, model, inputs, *args, **kwargs):
        # count the examples each phase steps on, where the batch is known (reported in the phase records)
        self._phase_examples += batch_rows(inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if self.tasks is None:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                 ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        return self._train_staged(bool(resume_from_checkpoint))

    @property
    def _dpi_dir(self) -> Path:
        return Path(self._base_output_dir) / DPI_DIR

    @property
    def _runs_dir(self) -> Path:
        # resume state and per-phase checkpoints; the leading "_" keeps them out of Trainer.push_to_hub's upload
        return Path(self._base_output_dir) / RUNS_DIR

    def _settings(self) -> dict:
        a = self.args
        return {
            "staging": a.staging,
            "core_fraction": a.core_fraction,
            "core_scope": a.core_scope,
            "core_include": a.core_include,
            "core_exclude": a.core_exclude,
            "jaccard_threshold": a.jaccard_threshold,
            "stage_order": a.stage_order,
            "probe_steps": a.probe_steps if a.probe_epochs is None else None,
            "probe_epochs": a.probe_epochs,
            "freeze": a.freezes,
        }

    def _progress(self) -> dict:
        path = self._runs_dir / "progress.json"
        return json.loads(path.read_text()) if path.is_file() else {"finished_stages": [], "stage_history": []}

    def _write_json(self, path: Path, obj) -> None:
        if self.is_world_process_zero():
            atomic_write_text(path, json.dumps(obj, indent=2))

    def _restore(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n in state:
                    p.data.copy_(state[n])

    def _run_phase(self, name: str, dataset: Dataset, *, max_steps: int, epochs: float | None, lr: float,
                   callbacks=(), resume: bool = False, save: bool = True):
        """One ordinary Trainer.train() on ``dataset`` with a fresh optimizer/scheduler and its own output dir."""
        a = self.args
        saved = (a.output_dir, a.max_steps, a.num_train_epochs, a.learning_rate, a.run_name, a.save_strategy)
        if not save:
            a.save_strategy = SaveStrategy.NO
        a.output_dir = str(self._runs_dir / name)
        a.max_steps = max_steps if epochs is None else -1
        if epochs is not None:
            a.num_train_epochs = epochs
        a.learning_rate = lr
        self.train_dataset = dataset
        # fresh optimizer and scheduler; drop the previous phase's from accelerate's registry so their state is freed
        self.optimizer, self.lr_scheduler = None, None
        self._created_lr_scheduler = False
        self.accelerator._optimizers.clear()
        self.accelerator._schedulers.clear()
        checkpoint = get_last_checkpoint(a.output_dir) if resume and Path(a.output_dir).is_dir() else None
        for cb in callbacks:
            self.add_callback(cb)
        self._phase_examples = 0
        try:
            out = SFTTrainer.train(self, resume_from_checkpoint=checkpoint)
        finally:
            for cb in callbacks:
                self.remove_callback(cb)
            a.output_dir, a.max_steps, a.num_train_epochs, a.learning_rate, a.run_name, a.save_strategy = saved
            self.optimizer, self.lr_scheduler = None, None
            self.accelerator._optimizers.clear()
            self.accelerator._schedulers.clear()
        return out

    def _phase_budget(self, probe: bool):
        a = self.args
        if probe:
            return (a.probe_steps, a.probe_epochs) if a.probe_epochs is not None else (a.probe_steps, None)
        return a.max_steps, (None if a.max_steps and a.max_steps > 0 else a.num_train_epochs)

    def _probe_all(self, theta0, resume: bool) -> dict:
        a = self.args
        if self._preloaded_cores is not None:
            logger.info("DPI: reusing cores from %s (probes skipped)", a.masks_from)
            return self._preloaded_cores
        cores = {}
        steps, epochs = self._phase_budget(probe=True)
        lr = a.probe_learning_rate or a.learning_rate
        n = len(self.tasks)
        for i, task in enumerate(self.tasks):
            path = self._runs_dir / "probes" / f"{_safe_name(task)}.safetensors"
            if resume and path.is_file():
                cores[task] = load_cores(path, model=self.model)[task]
                logger.info("DPI: probe %d/%d %s already done (%s)", i + 1, n, task, path)
                continue
            logger.info("DPI: probe %d/%d %s (%s)", i + 1, n, task, f"{epochs} epochs" if epochs else f"{steps} steps")
            self._restore(theta0)
            probe = CoreProbeCallback(a.core_fraction, a.core_scope, a.core_include, a.core_exclude,
                                      reference=theta0, task_name=task)
            t0 = time.perf_counter()
            try:
                out = self._run_phase(f"probe-{_safe_name(task)}", self._task_train[task], max_steps=steps, epochs=epochs,
                                lr=lr, callbacks=[probe], save=False)  # a killed probe restarts from θ0
            except ProbeDivergedError as e:
                raise ProbeDivergedError(f"the probe of task {task!r} diverged: {e}") from None
            cores[task] = probe.core
            self.phase_records.append(PhaseRecord(
                kind=PROBE, name=f"probe {task}", tasks=[task], steps=out.global_step, examples=self._phase_examples,
                seconds=time.perf_counter() - t0, train_loss=out.training_loss))
            if self.is_world_process_zero():
                save_cores({task: probe.core}, path, model=self.model, **self._settings())
            self.accelerator.wait_for_everyone()
        return cores

    def _make_plan(self, cores) -> StagePlan:
        a = self.args
        tasks = list(self.tasks)
        if a.staging == "dpi":
            sizes = {t: len(ds) for t, ds in self._task_train.items()}
            plan = plan_stages(cores, a.jaccard_threshold, order=a.stage_order, seed=a.seed, tasks=tasks, sizes=sizes)
            if not a.freezes:  # DPI grouping without isolation (an ablation)
                plan.freeze = False
                plan.frozen_counts = [0] * len(plan.stages)
            return plan
        if a.staging == "multitask":
            stages = [tasks]
        elif a.staging == "given":
            stages = a.stage_groups
        else:  # random: K stages, tasks assigned at random (seeded), no stage left empty
            import random

            k = min(a.num_random_stages, len(tasks))
            shuffled = tasks[:]
            random.Random(a.seed).shuffle(shuffled)
            stages = [shuffled[i::k] for i in range(k)]
        return plan_from_groups(cores, stages, tasks=tasks, freeze=a.freezes,
                                jaccard_threshold=a.jaccard_threshold, stage_order=a.staging)

    def _train_staged(self, resume: bool) -> TrainOutput:
        a = self.args
        self._base_output_dir = a.output_dir
        t_start = time.perf_counter()
        progress = self._progress() if resume else {"finished_stages": [], "stage_history": []}
        if not resume and self.is_world_process_zero() and (self._runs_dir / "progress.json").exists():
            (self._runs_dir / "progress.json").unlink()
        theta0 = snapshot_parameters(self.model)

        cores = self._probe_all(theta0, resume) if a.needs_probes else None
        self._restore(theta0)
        plan = self._make_plan(cores)
        self.cores, self.plan = cores, plan
        if self.is_world_process_zero():
            save_dpi_artifacts(self._base_output_dir, cores, plan, model=self.model, **self._settings())
        logger.info("DPI plan:\n%s", plan.describe())
        self.log({f"dpi/core_size/{t}": float(c) for t, c in plan.core_counts.items()}
                 | {"dpi/num_stages": float(len(plan.stages))})

        sizes = [sum(len(self._task_train[t]) for t in s) for s in plan.stages]
        budget, epochs = self._phase_budget(probe=False)
        steps = allocate_steps(budget, sizes) if epochs is None else [budget] * len(plan.stages)

        finished = progress["finished_stages"]
        self.phase_records = [PhaseRecord.from_dict(r) for r in progress.get("stage_history", [])] + self.phase_records
        if finished:
            last = max(finished)
            self._restore(load_file(str(self._runs_dir / "last-stage.safetensors")))
            logger.info("DPI: resuming after stage %d", last + 1)
        forgetting = progress.get("forgetting", [])
        total_loss, total_steps = 0.0, 0
        for k, stage in enumerate(plan.stages):
            if k in finished:
                continue
            frozen = plan.frozen_before(k) if plan.freeze else None
            n_frozen = frozen.count() if frozen is not None else 0
            logger.info("DPI: stage %d/%d %s frozen %.3f%% (%s elements)", k + 1, len(plan.stages), stage,
                        100 * n_frozen / max(plan.total_elements, 1), f"{n_frozen:,}")
            data = concatenate_datasets([self._task_train[t] for t in stage]) if len(stage) > 1 else \
                self._task_train[stage[0]]
            callbacks = [FreezeMaskCallback(frozen)] if n_frozen else []
            t0 = time.perf_counter()
            out = self._run_phase(f"stage-{k}", data, max_steps=steps[k], epochs=epochs, lr=a.learning_rate,
                                  callbacks=callbacks, resume=resume)
            total_loss += out.training_loss * out.global_step
            total_steps += out.global_step
            record = PhaseRecord(kind=STAGE, name=f"stage {k + 1}", tasks=list(stage), steps=out.global_step,
                                 examples=self._phase_examples, seconds=time.perf_counter() - t0,
                                 train_loss=out.training_loss, frozen=n_frozen)
            if self.eval_dataset is not None:
                metrics = self.evaluate()
                record.eval = metrics
                forgetting.append({"stage": k + 1, **{key: v for key, v in metrics.items() if key.endswith("_loss")}})
            self.phase_records.append(record)
            if a.save_stage_models:  # every rank: save_model synchronises the processes itself
                self.save_model(str(Path(self._base_output_dir) / f"stage-{k}"))
            if self.is_world_process_zero():
                state = {n: p.detach().contiguous().cpu() for n, p in self.model.named_parameters()}
                runs = self._runs_dir
                runs.mkdir(parents=True, exist_ok=True)
                save_file(state, str(runs / "last-stage.safetensors.tmp"))
                (runs / "last-stage.safetensors.tmp").replace(runs / "last-stage.safetensors")
            finished.append(k)
            self._write_json(self._runs_dir / "progress.json", {"finished_stages": finished, "stage_history": self.stage_history,
                                               "forgetting": forgetting})
            self.accelerator.wait_for_everyone()
        if forgetting:
            self._write_json(self._dpi_dir / "forgetting.json", forgetting)
        if self.is_world_process_zero():
            write_model_card(self._base_output_dir, plan, self._settings())
        metrics = {"train_runtime": time.perf_counter() - t_start, "dpi_stages": len(plan.stages)}
        return TrainOutput(total_steps, total_loss / max(total_steps, 1), metrics)

    # ----------------------------------------------------------------------------------------------- hub
    def create_model_card(self, *args, **kwargs):
        super().create_model_card(*args, **kwargs)
        if self.plan is not None and self.is_world_process_zero():
            write_model_card(self.args.output_dir, self.plan, self._settings())
