"""`DPITrainer`: SFTTrainer that runs probe → plan → staged training with exact freezing on several tasks.

One dataset without a task column: exactly `SFTTrainer`. Several tasks (a ``dict[str, Dataset]`` or a Dataset with
a task column): ``train()`` runs

1. probes — for each task (and with ``probe_reliability="split_half"``, for each of two disjoint halves of its rows),
   the model restored bit-exactly to θ0 (a CPU copy, local shards when sharded), a fresh optimizer and scheduler with
   the probe-only settings, ``probe_steps`` steps on that data alone, then its core = the top p of the importance
   (``core_signal``: Σg², |Σg| or |θ − θ0|; pooled over the two halves), saved at once;
2. the plan — ``plan_stages`` on the cores, grouping on the raw or the reliability-corrected overlap (or the
   baselines' fixed stages); ``probe()`` stops here;
3. stages — from θ0, each stage trains on the mixture of its tasks with the earlier stages' cores frozen.

Each phase is an ordinary ``Trainer.train()`` call with its own output folder under ``output_dir/_dpi_runs/`` (so
checkpoints, resume and the progress bar work per phase) and a fresh optimizer: Adam moments built on earlier
tasks' data would keep pushing the next stage along those tasks' directions, and a stage that starts from its own
optimizer state can be resumed from its own checkpoint alone.

Resume (``train(resume_from_checkpoint=True)``): the run identity (:mod:`dpi_hf.run_state`) must match the
interrupted run's; finished probes (``_dpi_runs/probes/<task>.safetensors``) and finished stages
(``_dpi_runs/progress.json``) are skipped, the model is reloaded from the last finished stage, and the interrupted
stage continues from its last checkpoint (or the one named) with the same frozen set.

Distributed (DDP): every rank runs the same probes on its shard of the data; gradients are all-reduced, so θ after
a probe — and therefore the core — is identical on every rank. Only the main process writes files.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from datasets import Dataset, concatenate_datasets
from transformers.trainer_utils import SaveStrategy, TrainOutput, get_last_checkpoint
from trl import SFTTrainer

from ..artifacts import DPI_DIR, PROTECTED_FILE, save_dpi_artifacts, write_model_card
from .callbacks import FreezeMaskCallback, snapshot_parameters
from .config import DPIConfig
from ..core import model_fingerprint
from ..core.errors import DPIConfigError
from ..core.io import atomic_write_text
from ..core.fusion import TransplantMap
from ..core.masks import CoreMask
from ..core.planning import StagePlan
from ..core.sharding import restore_parameters
from ..offline import hub_model_id
from .fusion import TRANSPLANT_FILE, FusionMixin
from .multitask import (  # noqa: F401  (split_tasks and allocate_steps are re-exported)
    DATA_COLUMNS,
    allocate_steps,
    mixture,
    safe_name,
    split_tasks,
)
from .phases import PROBE, STAGE, PhaseRecord, batch_rows, batch_tokens
from .probing import ProbingMixin, _split_half_error
from .run_state import (  # noqa: F401  (RUNS_DIR and check_output_dir are re-exported)
    IDENTITY_FILE,
    RUNS_DIR,
    check_explicit_checkpoint,
    check_output_dir,
    clear_run_state,
    dpi_fields_changed,
    dpi_settings,
    kill_point,
    check_protection_source,
    load_protected_cores,
    load_run_masks,
    protected_run_identity,
    resume_state,
    run_identity,
)
from ..utils import check_each_task_once
from .ewc import PENALTY_LOG_KEY, AnchorCallback, build_anchor
from .importance import collect_importance
from .run_state import MASK_SETTINGS, PROTECT_FIELDS
from .sharded import ShardedRunMixin, gathered

logger = logging.getLogger(__name__)

# DPI fields that also apply to a single dataset (then DPITrainer is SFTTrainer plus the protection)
PROTECTION_FIELDS = ("protect_cores_from", "protect_tasks", *PROTECT_FIELDS)


class DPITrainer(ProbingMixin, FusionMixin, ShardedRunMixin, SFTTrainer):
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
    # probe_cores probes the cores of a single task too (a training run of one task is plain SFT)
    _single_task_probes = False

    def __init__(self, model, args=None, data_collator=None, train_dataset=None, eval_dataset=None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = DPIConfig(f"{str(name).split('/')[-1]}-DPI")
        elif not isinstance(args, DPIConfig):
            d = args.to_dict()
            d["hub_token"] = args.hub_token
            args = DPIConfig(**{k: v for k, v in d.items() if k in DPIConfig.__dataclass_fields__})
        self.tasks: dict[str, Dataset] | None = split_tasks(train_dataset, args.task_column)
        if self.tasks is not None and len(self.tasks) == 1 and not self._single_task_probes:
            changed = [f for f in dpi_fields_changed(args) if f not in PROTECTION_FIELDS]
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
        self._phase_tokens = 0
        self.protected, self.protection = None, None  # the frozen union of protect_cores_from, and its record
        self._anchor_callback = None  # protect_method ewc / freeze_ewc / l2sp: the pull towards θ_A
        if args.protects:  # before the Trainer creates output_dir or anything else
            # no model needed: the artifact, its cores (and importance), the protected task names, no peft_config
            check_protection_source(args, peft_config=kwargs.get("peft_config"))
            if not isinstance(model, str):
                self._load_protection(args, model)
        if self.tasks is None:
            super().__init__(model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, **kwargs)
            self._refuse_sharded_anchor(args)
            if args.protects:  # SFTTrainer plus the protection: the cores stay frozen through the whole train()
                if self.protection is None:
                    self._load_protection(args, self.model)
                # the anchor first: its decoupled pull must come before the freezer's restore (trainer/ewc.py)
                if self._anchor_callback is not None:
                    self.add_callback(self._anchor_callback)
                if args.freezes_protected:
                    self.add_callback(FreezeMaskCallback(self.protected))
            return

        self._validate_multitask(args)
        self._preloaded_cores = None
        self._mask_source = None
        if args.masks_from is not None and args.needs_probes and not isinstance(model, str):
            self._preloaded_cores = self._load_masks(args, model)
        eval_split = eval_dataset
        if isinstance(eval_dataset, Dataset):  # a task column → one eval set per task, logged as eval_<task>_loss
            eval_split = split_tasks(eval_dataset, args.task_column) or eval_dataset
        mixed = mixture(self.tasks, args.task_column)
        super().__init__(model, args=args, data_collator=data_collator, train_dataset=mixed,
                         eval_dataset=eval_split, **kwargs)
        if getattr(self, "is_deepspeed_enabled", False):
            # accelerate runs DeepSpeed's optimizer step inside backward, before any callback event, so neither the
            # gradient signals nor the exact freeze can hook in: refuse rather than freeze inexactly
            raise DPIConfigError(
                "a multi-task DPITrainer run under DeepSpeed is not supported: its engine steps inside backward, "
                "before the probe signals and the freeze can act. Shard with FSDP2 instead (`accelerate launch "
                "--config_file recipes/accelerate/fsdp2.yaml`), or run under DDP (docs/distributed.md)."
            )
        self._refuse_sharded_anchor(args)
        if getattr(self, "is_fsdp_enabled", False) and args.fusion == "cpi":
            # the fusion reads whole probe models on rank 0
            raise DPIConfigError(
                "fusion='cpi' is not supported under FSDP (the fusion reads whole probe models on one rank); run it "
                "under DDP, or set fusion='none' for a sharded run."
            )
        self._task_train = self._tokenized_tasks(kwargs.get("formatting_func"))
        if args.masks_from is not None and args.needs_probes and self._preloaded_cores is None:
            self._preloaded_cores = self._load_masks(args, self.model)
        if args.protects and self.protection is None:
            self._load_protection(args, self.model)

    def _refuse_sharded_anchor(self, args: DPIConfig) -> None:
        # the EWC / L2-SP anchor keeps whole θ_A and F tensors: under FSDP it would only fail when a stage (after the
        # probes) or the training starts, so refuse now
        if args.anchors and (getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False)):
            raise DPIConfigError(
                f"protect_method={args.protect_method!r} is not supported under FSDP or DeepSpeed (its anchor θ_A "
                "and importance F are whole, unsharded tensors); run it in one process or under DDP, or protect "
                "with protect_method='freeze'."
            )

    def _load_protection(self, args: DPIConfig, model) -> None:
        # now, before any probe or step: a wrong artifact, an unknown task or masks of other weights fail at once
        self.protected, self.protection = load_protected_cores(args, model)
        logger.info("DPI: protecting %s elements (%.3f%%), the cores of %s from %s", f"{self.protected.count():,}",
                    100 * self.protection["fraction"], self.protection["tasks"], self.protection["source"])
        if args.anchors:  # θ_A = the weights now, before any training (the weights the cores were probed on)
            anchor = build_anchor(args, model, self.protected, self.protection["tasks"])
            self._anchor_callback = AnchorCallback(anchor, args.protect_ewc_form)

    def _load_masks(self, args: DPIConfig, model):
        cores, self._mask_source = load_run_masks(args, model, list(self.tasks))
        return cores

    # ----------------------------------------------------------------------------------------------- set-up
    def _validate_multitask(self, args: DPIConfig) -> None:
        tasks = list(self.tasks)
        if args.staging == "given":
            check_each_task_once(args.stage_groups, tasks, "stage_groups")
        by_file: dict[str, str] = {}
        for t in tasks:  # task names become file and folder names: two must not become the same one
            other = by_file.setdefault(safe_name(t), t)
            if other != t:
                raise DPIConfigError(f"tasks {other!r} and {t!r} both become the file name {safe_name(t)!r}; rename one.")
        if args.max_steps is not None and args.max_steps > 0:
            # the most stages this run can have: known before any probe, so a too-small budget fails now
            k = {"given": len(args.stage_groups or []), "multitask": 1,
                 "random": min(args.num_random_stages, len(tasks))}.get(args.staging, len(tasks))
            if args.stage_max_steps < k:
                fused = (f" (× fusion_stage_fraction {args.fusion_stage_fraction} = {args.stage_max_steps} staged "
                         "steps)") if args.fusion == "cpi" else ""
                raise DPIConfigError(
                    f"max_steps={args.max_steps}{fused} is smaller than the number of stages this run can have ({k}"
                    f"{' if every task gets its own stage' if args.staging == 'dpi' else ''}); every stage needs at "
                    f"least one step: raise max_steps{' or fusion_stage_fraction' if fused else ''}."
                )
        for name, ds in self.tasks.items():
            if args.probes_split_half and len(ds) < 4:
                raise _split_half_error(name, len(ds))
            if not any(c in ds.column_names for c in DATA_COLUMNS):
                raise DPIConfigError(
                    f"task {name!r} has none of the columns SFT trains on ({DATA_COLUMNS[:4]}); it has "
                    f"{ds.column_names}."
                )

    def _tokenized_tasks(self, formatting_func) -> dict[str, Dataset]:
        col = self.args.task_column
        if col in self.train_dataset.column_names:
            by_task = split_tasks(self.train_dataset, col) if len(self.train_dataset) else {}
            out = {t: by_task.get(t, self.train_dataset.select([])) for t in self.tasks}
        else:  # packing drops extra columns: tokenize each task on its own
            out = {
                t: self._prepare_dataset(ds, self.processing_class, self.args, self.args.packing, formatting_func,
                                         f"train-{t}")
                for t, ds in ((t, mixture({t: ds}, col).remove_columns(col)) for t, ds in self.tasks.items())
            }
        for t, ds in out.items():
            if len(ds) == 0:
                raise DPIConfigError(
                    f"task {t!r} has no usable example after tokenization (all truncated away?); raise max_length."
                )
            if self.args.probes_split_half and len(ds) < 4:  # again: tokenization may drop rows
                raise _split_half_error(t, len(ds))
        return out

    # ----------------------------------------------------------------------------------------------- training
    @property
    def stage_history(self) -> list[dict]:
        """The probes and stages run so far, as dicts (see :class:`~dpi_hf.phases.PhaseRecord`)."""
        return [r.to_dict() for r in self.phase_records]

    def log(self, logs: dict, *args, **kwargs) -> None:
        # the protection penalty, measured once per optimizer step, logged as its mean over the logging interval
        if self._anchor_callback is not None and "loss" in logs:
            penalty = self._anchor_callback.pop_mean()
            if penalty is not None:
                logs[PENALTY_LOG_KEY] = penalty
        super().log(logs, *args, **kwargs)

    def training_step(self, model, inputs, *args, **kwargs):
        # count the examples each phase steps on, where the batch is known (reported in the phase records)
        self._phase_examples += batch_rows(inputs)
        self._phase_tokens += batch_tokens(inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Train: plain SFT for one dataset; probes → plan → stages for several tasks.

        Args:
            resume_from_checkpoint: ``True`` resumes the interrupted multi-task run in ``output_dir`` (finished
                probes and stages are kept, the interrupted stage continues from its last checkpoint); a path to a
                checkpoint of the stage that was interrupted (``output_dir/_dpi_runs/stage-<k>/checkpoint-<n>``)
                continues that stage from that checkpoint. Resuming with other settings than the interrupted run's is
                an error that lists the changed fields.
        """
        if self.tasks is None:
            if self.protection is not None:
                self._check_protected_run(resume_from_checkpoint)
            out = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
            if self.protection is not None and self.is_world_process_zero():
                self._write_json(self._dpi_dir / PROTECTED_FILE, self.protection)
                write_model_card(self.args.output_dir, None, {"protected": self.protection})
            return out
        return self._train_staged(resume_from_checkpoint, train_stages=True)

    def _check_protected_run(self, resume_from_checkpoint) -> None:
        """A protected single-dataset run has an identity too: a resume must train the same rows with the same budget
        and protect the same cores of the same weights (see :func:`~dpi_hf.run_state.protected_run_identity`)."""
        self._base_output_dir = self.args.output_dir
        identity = protected_run_identity(self.args, self.train_dataset, model_fingerprint(self.model),
                                          self.protection["digest"])
        if resume_from_checkpoint:
            resume_state(self._runs_dir, resume_from_checkpoint, identity)
            return
        used = check_output_dir(self.args, resume=False)  # every rank checks before rank 0 writes (no race)
        self.accelerator.wait_for_everyone()
        if used and self.is_world_process_zero():
            clear_run_state(self.args.output_dir)
        self._write_json(self._runs_dir / IDENTITY_FILE, identity)
        self.accelerator.wait_for_everyone()

    def probe(self) -> StagePlan:
        """Run the probes and plan, write ``dpi/cores.safetensors``, ``dpi/plan.json`` (with the reliability report)
        and the overlap plot, and train no stage. The model is left at its initial weights.

        ``masks_from=<output_dir>`` then reuses these cores, so a plan can be checked before paying for the stages.
        """
        if self.tasks is None:
            raise DPIConfigError("probe() needs several tasks (a dict of datasets or a task column); got one dataset.")
        self._train_staged(None, train_stages=False)
        return self.plan

    @property
    def _dpi_dir(self) -> Path:
        return Path(self._base_output_dir) / DPI_DIR

    @property
    def _runs_dir(self) -> Path:
        # resume state and per-phase checkpoints; the leading "_" keeps them out of Trainer.push_to_hub's upload
        return Path(self._base_output_dir) / RUNS_DIR

    def _settings(self) -> dict:
        settings = dpi_settings(self.args)
        if not self.args.needs_probes:
            settings["masks_from"] = None  # a run that never uses cores ignores masks_from
        if self._mask_source is not None:  # the masks' own settings, not the config's, describe these cores
            settings.update(self._mask_source["settings"])
            if self._mask_source["mismatches"]:
                settings["masks_mismatch"] = "; ".join(self._mask_source["mismatches"])
            if self._mask_source["other_weights"]:
                settings["masks_other_weights"] = self._mask_source["other_weights"]
        return settings

    def _run_identity(self) -> dict:
        digest = self._mask_source["digest"] if self._mask_source is not None else None
        protect = self.protection["digest"] if self.protection is not None else None
        return run_identity(self.args, self._task_train, self._fingerprint, digest, protect)

    def _write_json(self, path: Path, obj) -> None:
        if self.is_world_process_zero():
            atomic_write_text(path, json.dumps(obj, indent=2))

    def _restore(self, state: dict[str, torch.Tensor]) -> None:
        restore_parameters(self.model, state)  # bit-exact; local shards of sharded parameters

    # ----------------------------------------------------------------------------------------------- run state
    def _prepare_run_dir(self, resume_from_checkpoint, identity: dict) -> tuple[dict, str | None]:
        """Check ``output_dir`` against this run before any work; return (progress, explicit checkpoint or None)."""
        if resume_from_checkpoint:
            return resume_state(self._runs_dir, resume_from_checkpoint, identity)
        used = check_output_dir(self.args, resume=False)
        if self.is_world_process_zero():
            if used:  # stale probe/stage checkpoints must never be resumed from
                logger.info("DPI: overwrite_output_dir: deleting the previous run's DPI state in %s", self.args.output_dir)
                clear_run_state(self.args.output_dir)
            shutil.rmtree(self._runs_dir, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._write_json(self._runs_dir / IDENTITY_FILE, identity)
        self.accelerator.wait_for_everyone()
        return {}, None

    def _checkpoint_for(self, k: int, explicit: str | None, resume: bool) -> str | None:
        stage_dir = self._runs_dir / f"stage-{k}"
        if explicit is not None and Path(explicit).resolve().parent == stage_dir.resolve():
            return str(Path(explicit).resolve())
        if resume and stage_dir.is_dir():
            return get_last_checkpoint(str(stage_dir))
        return None

    # ----------------------------------------------------------------------------------------------- phases
    def _phase_args(self, name: str, probe: bool, max_steps: int, epochs: float | None) -> DPIConfig:
        a = self.args
        kw = dict(output_dir=str(self._runs_dir / name), max_steps=max_steps if epochs is None else -1)
        if epochs is not None:
            kw["num_train_epochs"] = epochs
        if probe:
            kw.update(
                learning_rate=a.probe_learning_rate or a.learning_rate, weight_decay=a.probe_weight_decay,
                warmup_steps=a.probe_warmup_steps, optim=a.probe_optim or a.optim,
                lr_scheduler_type=a.probe_lr_scheduler_type, save_strategy=SaveStrategy.NO,
                per_device_train_batch_size=a.probe_batch_size or a.per_device_train_batch_size,
            )
            if a.probe_lr_scheduler_type != a.lr_scheduler_type:
                kw["lr_scheduler_kwargs"] = {}
        # a shallow copy with fields set, not dataclasses.replace: re-running TrainingArguments.__post_init__ would
        # reset accelerate's process state; the run's own arguments are never edited
        phase = copy.copy(a)
        for key, value in kw.items():
            setattr(phase, key, value)
        return phase

    def _drop_optimizer(self) -> None:
        # each phase builds its own optimizer and scheduler; accelerate keeps every prepared object in its registry
        # (and saves every registered optimizer in checkpoints), so the previous phase's must leave it:
        # free_memory() is accelerate's own call for "between two trainings with different optimizers"
        self.optimizer, self.lr_scheduler = None, None
        self._created_lr_scheduler = False
        self.accelerator.free_memory()

    def _run_phase(self, phase_args: DPIConfig, dataset: Dataset, callbacks=(), checkpoint: str | None = None):
        """One ordinary Trainer.train() on ``dataset`` under ``phase_args``, with a fresh optimizer and scheduler."""
        base_args, base_batch, base_data = self.args, self._train_batch_size, self.train_dataset
        self.args, self._train_batch_size = phase_args, phase_args.train_batch_size
        self.train_dataset = dataset
        self._drop_optimizer()
        for cb in callbacks:
            self.add_callback(cb)
        self._phase_examples = 0
        self._phase_tokens = 0
        try:
            return SFTTrainer.train(self, resume_from_checkpoint=checkpoint)
        finally:
            for cb in callbacks:
                self.remove_callback(cb)
            self.args, self._train_batch_size, self.train_dataset = base_args, base_batch, base_data
            self._drop_optimizer()

    def _artifact_record(self, identity: dict) -> dict:
        probes = [r for r in self.phase_records if r.kind == PROBE]
        record = {
            **self._settings(),
            "run_identity": identity,
            # the model card's base_model: a Hub id, never a local path (an offline checkpoint names its source)
            "base_model": hub_model_id(getattr(getattr(self.model, "config", None), "_name_or_path", None)),
            "probe_cost": {"phases": len(probes), "steps": sum(r.steps for r in probes),
                           "examples": sum(r.examples for r in probes), "tokens": sum(r.tokens for r in probes)},
        }
        if self._mask_source is not None:
            record["masks_source"] = {k: v for k, v in self._mask_source.items() if k not in ("reliability", "affinity")}
        if self.protection is not None:
            record["protected"] = self.protection
        return record

    def _train_staged(self, resume_from_checkpoint, train_stages: bool) -> TrainOutput:
        a = self.args
        self._stages_follow = train_stages
        self._base_output_dir = a.output_dir
        t_start = time.perf_counter()
        resume = bool(resume_from_checkpoint)
        # fingerprint once, on every rank: its content digest reads sharded tensors with collectives
        self._fingerprint = model_fingerprint(self.model)
        identity = self._run_identity()
        progress, explicit = self._prepare_run_dir(resume_from_checkpoint, identity)
        self._shard_model()  # FSDP2: before θ0 is copied
        self.phase_records = []

        cores, reliability = None, None
        if a.needs_probes:
            # θ0 only when probes will run from it: a model-sized CPU copy for nothing otherwise
            theta0 = snapshot_parameters(self.model) \
                if self._preloaded_cores is None and a.probe_updates_weights else None
            cores, reliability = self._cores_and_reliability(theta0, resume)
            if theta0 is not None:
                self._restore(theta0)
                del theta0
        plan = self._make_plan(cores, reliability)
        global_cores = gathered(cores)  # sharded cores: the global masks, gathered on rank 0 only
        # trainer.cores: the global masks (on rank 0 of a sharded run; the other ranks keep their own rows' part)
        self.cores, self.plan = (global_cores if global_cores is not None else cores), plan
        logger.info("DPI plan:\n%s", plan.describe())
        self._check_reliability(reliability)
        if explicit is not None:
            finished = progress.get("finished_stages", [])
            check_explicit_checkpoint(explicit, self._runs_dir, [k for k in range(len(plan.stages)) if k not in finished])
        artifact = self._artifact_record(identity)
        if self.is_world_process_zero():
            save_dpi_artifacts(self._base_output_dir, global_cores, plan, fingerprint=self._fingerprint, **artifact)
            if a.save_importance:
                collect_importance(self._runs_dir, self._base_output_dir, list(self.tasks), self._fingerprint,
                                   signal=a.core_signal, **{k: v for k, v in self._settings().items()
                                                            if k in MASK_SETTINGS})
        if self.protection is not None:  # beside plan.json's copy: the same file a one-dataset protected run writes
            self._write_json(self._dpi_dir / PROTECTED_FILE, self.protection)
        kill_point("after-plan")
        self.log({f"dpi/core_size/{t}": float(c) for t, c in plan.core_counts.items()}
                 | {"dpi/num_stages": float(len(plan.stages))})
        if not train_stages:
            if self.is_world_process_zero():
                write_model_card(self._base_output_dir, plan, {**artifact, "stages_trained": False})
            return TrainOutput(0, 0.0, {"train_runtime": time.perf_counter() - t_start, "dpi_stages": 0})

        sizes = [sum(len(self._task_train[t]) for t in s) for s in plan.stages]
        # with fusion the stages get fusion_stage_fraction of the budget
        epochs = None if a.max_steps and a.max_steps > 0 else a.stage_num_train_epochs
        steps = allocate_steps(a.stage_max_steps, sizes) if epochs is None else [-1] * len(plan.stages)

        finished = list(progress.get("finished_stages", []))
        self.phase_records += [PhaseRecord.from_dict(r) for r in progress.get("stages", [])]
        if finished:
            self._restore(self._load_stage_state(max(finished)))
            logger.info("DPI: resuming after stage %d", max(finished) + 1)
        if self._fuses:  # the card says how the transplant went, on resume too
            artifact["fusion_transplant"] = (self._fuse(plan, cores) if not finished else
                                             TransplantMap.read_summary(self._dpi_dir / TRANSPLANT_FILE))
        forgetting = progress.get("forgetting", [])
        total_loss, total_steps = 0.0, 0
        for k, stage in enumerate(plan.stages):
            if k in finished:
                continue
            frozen = plan.frozen_before(k) if plan.freeze else None
            if self.protected is not None and a.freezes_protected:  # frozen in every stage, on top of the plan's
                frozen = self.protected if frozen is None else CoreMask.union_all([self.protected, frozen])
            n_frozen = frozen.count() if frozen is not None else 0
            logger.info("DPI: stage %d/%d %s frozen %.3f%% (%s elements)", k + 1, len(plan.stages), stage,
                        100 * n_frozen / max(plan.total_elements, 1), f"{n_frozen:,}")
            data = concatenate_datasets([self._task_train[t] for t in stage]) if len(stage) > 1 else \
                self._task_train[stage[0]]
            # the anchor first: its decoupled pull must come before the freezer's restore (trainer/ewc.py)
            callbacks = ([self._anchor_callback] if self._anchor_callback is not None else []) + \
                ([FreezeMaskCallback(frozen)] if n_frozen else [])
            t0, c0 = time.perf_counter(), time.process_time()
            checkpoint = self._checkpoint_for(k, explicit, resume)
            out = self._run_phase(self._phase_args(f"stage-{k}", False, steps[k], epochs), data,
                                  callbacks=callbacks, checkpoint=checkpoint)
            kill_point(f"after-stage-{k}-train")
            total_loss += out.training_loss * out.global_step
            total_steps += out.global_step
            record = PhaseRecord(kind=STAGE, name=f"stage {k + 1}", tasks=list(stage), steps=out.global_step,
                                 examples=self._phase_examples * a.world_size, seconds=time.perf_counter() - t0,
                                 tokens=self._phase_tokens * a.world_size, cpu_seconds=time.process_time() - c0,
                                 train_loss=out.training_loss, frozen=n_frozen, resumed_from=checkpoint)
            if self.eval_dataset is not None:
                metrics = self.evaluate()
                record.eval = metrics
                forgetting.append({"stage": k + 1, **{key: v for key, v in metrics.items() if key.endswith("_loss")}})
            self.phase_records.append(record)
            if a.save_stage_models:  # every rank: save_model synchronises the processes itself
                self.save_model(str(Path(self._base_output_dir) / f"stage-{k}"))
            # the weights after stage k, under a name of their own: a kill before progress.json records stage k
            # leaves the previous stage's file (the one a resume restores) intact
            self._save_stage_state(k)
            kill_point(f"after-stage-{k}-save")
            finished.append(k)
            self._write_json(self._runs_dir / "progress.json", {
                "finished_stages": finished, "stages": [r.to_dict() for r in self.phase_records if r.kind == STAGE],
                "forgetting": forgetting})
            for older in finished[:-1]:
                self._stage_state_path(older).unlink(missing_ok=True)
            self.accelerator.wait_for_everyone()
        if forgetting:
            self._write_json(self._dpi_dir / "forgetting.json", forgetting)
        if self.is_world_process_zero():
            write_model_card(self._base_output_dir, plan, artifact)
        kill_point("after-card")
        metrics = {"train_runtime": time.perf_counter() - t_start, "dpi_stages": len(plan.stages)}
        return TrainOutput(total_steps, total_loss / max(total_steps, 1), metrics)

    # ----------------------------------------------------------------------------------------------- hub
    def create_model_card(self, *args, **kwargs):
        super().create_model_card(*args, **kwargs)  # TRL rewrites README.md: put the DPI section back
        if self.plan is not None and self.is_world_process_zero():
            write_model_card(self.args.output_dir, self.plan, self._settings())
        elif self.protection is not None and self.is_world_process_zero():
            write_model_card(self.args.output_dir, None, {"protected": self.protection})



