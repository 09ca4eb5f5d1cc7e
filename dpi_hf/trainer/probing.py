"""The probe half of a `DPITrainer` run: probes → cores → reliability → plan.

:class:`ProbingMixin` holds the trainer's methods that run the probes (each task, or each of its two split halves,
trained alone from θ0 with the probe settings), pool the halves' importance, select each task's core, compute the
reliability report and make the stage plan. It is mixed into :class:`~dpi_hf.trainer.trainer.DPITrainer` and uses
its state and phase machinery (``self.args``, ``self.tasks``, ``self._task_train``, ``self._run_phase``,
``self._phase_args``, ``self._restore``, ``self._runs_dir``, ``self._settings``, ``self._fuses``, ...).
"""

from __future__ import annotations

import logging
import time

from datasets import Dataset

from ..core import load_cores, plan_stages, read_cores_metadata, save_cores, select_core
from ..core.errors import DPIConfigError, ProbeDivergedError
from ..core.planning import StagePlan, plan_from_groups, reorder_report
from ..core.reliability import ReliabilityReport, reliability_report
from ..core.sharded_mask import shard_mask
from ..core.signals import pool_importance, threshold_ties, tie_warning
from .callbacks import CoreProbeCallback
from .fusion import importance_path, probe_model_path, save_core_importance, save_probe_model
from .importance import save_probe_importance
from .multitask import safe_name, split_halves
from .phases import PROBE, PhaseRecord
from .run_state import kill_point
from .sharded import gathered

logger = logging.getLogger(__name__)


def _split_half_error(task: str, rows: int) -> DPIConfigError:
    return DPIConfigError(
        f"task {task!r} has {rows} training rows; probe_reliability='split_half' probes two disjoint halves of a "
        "task's rows and needs at least 2 rows per half. Give the task more rows or set probe_reliability='none' "
        "(and overlap='raw')."
    )


class ProbingMixin:
    """DPITrainer's probes, core selection, reliability report and stage plan (see the module docstring)."""

    def _halves(self, task: str) -> list[Dataset]:
        rows = self._task_train[task]
        return split_halves(rows, self.args.seed) if self.args.probes_split_half else [rows]

    def _probe_one(self, task: str, part: Dataset, theta0, half: int | None, n_parts: int) -> CoreProbeCallback:
        a = self.args
        steps, epochs = a.probe_steps, a.probe_epochs
        label = f"{task} (half {half}/{n_parts})" if half else task
        if theta0 is not None:  # None: probes that never step (probe_updates_weights=False) keep no θ0
            self._restore(theta0)
        # fusion keeps each task's importance at its core (to resolve elements several groups' cores claim)
        cb = CoreProbeCallback(a.core_fraction, a.core_scope, a.core_include, a.core_exclude, reference=theta0,
                               task_name=label, signal=a.core_signal,
                               keep_importance=n_parts > 1 or self._fuses or a.save_importance,
                               update_weights=a.probe_updates_weights)
        name = f"probe-{safe_name(task)}" + (f"-half{half}" if half else "")
        t0 = time.perf_counter()
        try:
            out = self._run_phase(self._phase_args(name, True, steps, epochs), part, callbacks=[cb])
        except ProbeDivergedError as e:
            raise ProbeDivergedError(f"the probe of task {task!r} diverged: {e}") from None
        if self._fuses and self.is_world_process_zero():  # the probe model is kept for the fusion
            save_probe_model(self.model, probe_model_path(self._runs_dir, task, half))
        self.phase_records.append(PhaseRecord(
            kind=PROBE, name=f"probe {label}", tasks=[task], steps=out.global_step,
            examples=self._phase_examples * self.args.world_size,
            seconds=time.perf_counter() - t0, train_loss=out.training_loss, half=half))
        return cb

    def _probe_all(self, theta0, resume: bool):
        """Every task's core (and, with split-half probes, its two half-cores)."""
        a = self.args
        cores, half_cores = {}, {}
        steps, epochs = a.probe_steps, a.probe_epochs
        n = len(self.tasks)
        for i, task in enumerate(self.tasks):
            path = self._runs_dir / "probes" / f"{safe_name(task)}.safetensors"
            if resume and path.is_file():
                # this rank's rows of the saved cores when the model is sharded
                saved = {k: shard_mask(m, self.model) for k, m in load_cores(path, model=self.model).items()}
                cores[task] = saved[task]
                if f"{task}#half-1" in saved:
                    half_cores[task] = (saved[f"{task}#half-1"], saved[f"{task}#half-2"])
                self.phase_records += [PhaseRecord.from_dict(r) for r in read_cores_metadata(path)["phases"]]
                logger.info("DPI: probe %d/%d %s already done (%s)", i + 1, n, task, path)
                continue
            parts = self._halves(task)
            first = len(self.phase_records)
            logger.info("DPI: probe %d/%d %s (%s%s, signal %s)", i + 1, n, task,
                        f"{epochs} epochs" if epochs else f"{steps} steps",
                        ", two halves of its rows" if len(parts) > 1 else "", a.core_signal)
            probes = [self._probe_one(task, part, theta0, h + 1 if len(parts) > 1 else None, len(parts))
                      for h, part in enumerate(parts)]
            if len(probes) == 1:
                cores[task] = probes[0].core
                to_save = {task: cores[task]}
                if self._fuses and self.is_world_process_zero():
                    save_core_importance(probes[0].importance, cores[task], importance_path(self._runs_dir, task))
                if a.save_importance and self.is_world_process_zero():
                    save_probe_importance(self._runs_dir, task, probes[0].importance, probes[0].batches)
                probes[0].importance = None
            else:
                pooled = pool_importance([p.importance for p in probes], inplace=True)  # the probes' own copies
                for p in probes:
                    p.importance = None
                cores[task] = select_core(pooled, a.core_fraction, scope=a.core_scope)
                message = tie_warning(threshold_ties(pooled, cores[task]), f"pooled core of {task!r}")
                if message:
                    logger.warning(message)
                if self._fuses and self.is_world_process_zero():
                    save_core_importance(pooled, cores[task], importance_path(self._runs_dir, task))
                if a.save_importance and self.is_world_process_zero():  # the mean over both halves' steps
                    save_probe_importance(self._runs_dir, task, pooled, sum(p.batches for p in probes))
                del pooled
                half_cores[task] = (probes[0].core, probes[1].core)
                to_save = {task: cores[task], f"{task}#half-1": probes[0].core, f"{task}#half-2": probes[1].core}
            to_save = gathered(to_save)  # sharded cores: the global masks, on rank 0 only
            if self.is_world_process_zero():
                save_cores(to_save, path, fingerprint=self._fingerprint, **self._settings(),
                           phases=[r.to_dict() for r in self.phase_records[first:]])
            self.accelerator.wait_for_everyone()
            kill_point(f"after-probe-{task}")
        return cores, half_cores


    def _make_plan(self, cores, reliability: ReliabilityReport | None) -> StagePlan:
        a = self.args
        tasks = list(self.tasks)
        if a.staging == "dpi":
            sizes = {t: len(ds) for t, ds in self._task_train.items()}
            plan = plan_stages(cores, a.jaccard_threshold, order=a.stage_order, seed=a.seed, tasks=tasks, sizes=sizes,
                               reliability=reliability, overlap=a.overlap)
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
        plan = plan_from_groups(cores, stages, tasks=tasks, freeze=a.freezes,
                                jaccard_threshold=a.jaccard_threshold, stage_order=a.staging)
        plan.reliability = reorder_report(reliability, tasks) if reliability is not None else None
        return plan

    def _cores_and_reliability(self, theta0, resume: bool):
        a = self.args
        if self._preloaded_cores is not None:
            logger.info("DPI: reusing cores from %s (probes skipped)", a.masks_from)
            return self._preloaded_cores, self._mask_source.get("reliability")
        cores, half_cores = self._probe_all(theta0, resume)
        if not half_cores:
            return cores, None
        return cores, reliability_report(half_cores, a.core_fraction, tasks=list(self.tasks), signal=a.core_signal)

    def _check_reliability(self, reliability: ReliabilityReport | None) -> None:
        if reliability is None or not reliability.unreliable:
            return
        if self.args.strict_reliability:
            raise DPIConfigError(
                "strict_reliability: " + " | ".join(reliability.unreliable.values())
                + " No stage was trained; fix the probes or set strict_reliability=False."
            )
        for message in reliability.unreliable.values():
            logger.warning("DPI: unreliable core: %s", message)
