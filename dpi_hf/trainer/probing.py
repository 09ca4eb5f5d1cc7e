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

from datasets import Dataset, concatenate_datasets

from ..core import load_cores, plan_stages, read_cores_metadata, save_cores, select_core
from ..core.affinity import AffinityReport, affinity_report, gradient_dot, gradient_dot_file
from ..core.errors import DPIConfigError, ProbeDivergedError
from ..core.io import atomic_save_file
from ..core.planning import StagePlan, plan_from_groups, reorder_report
from ..core.reliability import ReliabilityReport, reliability_report
from ..core.sharded_mask import shard_mask
from ..core.signals import get_signal, pool_importance, threshold_ties, tie_warning
from .callbacks import CoreProbeCallback
from .fusion import importance_path, probe_model_path, save_core_importance, save_probe_model
from .importance import save_probe_importance
from .multitask import AlternatingHalvesSampler, safe_name, split_halves
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

    _affinity: AffinityReport | None = None  # the tasks' affinity, when the probes recorded their gradients
    _probe_sampler = None  # set while a one-pass split-half probe runs: its rows alternate between the halves

    @property
    def _one_pass_halves(self) -> bool:
        """Split-half probes read both halves in one pass (a gradient signal); the weight signal needs two probes."""
        return self.args.probes_split_half and get_signal(self.args.core_signal).reads_gradients

    def _halves(self, task: str) -> list[Dataset]:
        """The rows of each probe run of ``task``: its two halves for two separate probes (split-half reliability of
        a weight signal), else all its rows in one probe (one-pass split-half probes alternate the halves' rows)."""
        rows = self._task_train[task]
        if self.args.probes_split_half and not self._one_pass_halves:
            return split_halves(rows, self.args.seed)
        return [rows]

    def _get_train_sampler(self, train_dataset=None):
        if self._probe_sampler is not None:
            return self._probe_sampler
        return super()._get_train_sampler(train_dataset)

    def _probe_one(self, task: str, part: Dataset, theta0, half: int | None, n_parts: int) -> CoreProbeCallback:
        a = self.args
        steps, epochs = a.probe_steps, a.probe_epochs
        one_pass = self._one_pass_halves
        label = f"{task} (half {half}/{n_parts})" if half else task
        if theta0 is not None:  # None: probes that never step (probe_updates_weights=False) keep no θ0
            self._restore(theta0)
        if one_pass:  # rows of half 1, then half 2; the sampler alternates them step by step
            halves = split_halves(part, a.seed)
            part = concatenate_datasets(halves)
            probe_batch = a.probe_batch_size or a.per_device_train_batch_size
            block = probe_batch * a.gradient_accumulation_steps * a.world_size
            self._probe_sampler = AlternatingHalvesSampler(len(halves[0]), len(halves[1]), block, a.seed)
        # fusion keeps each task's importance at its core (to resolve elements several groups' cores claim)
        cb = CoreProbeCallback(a.core_fraction, a.core_scope, a.core_include, a.core_exclude, reference=theta0,
                               task_name=label, signal=a.core_signal,
                               keep_importance=n_parts > 1 or self._fuses or a.save_importance,
                               update_weights=a.probe_updates_weights, split_half=one_pass,
                               keep_gradient_sum=a.probe_affinity)
        name = f"probe-{safe_name(task)}" + (f"-half{half}" if half else "")
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            out = self._run_phase(self._phase_args(name, True, steps, epochs), part, callbacks=[cb])
        except ProbeDivergedError as e:
            raise ProbeDivergedError(f"the probe of task {task!r} diverged: {e}") from None
        finally:
            self._probe_sampler = None
        if self._fuses and self.is_world_process_zero():  # the probe model is kept for the fusion
            save_probe_model(self.model, probe_model_path(self._runs_dir, task, half))
        self.phase_records.append(PhaseRecord(
            kind=PROBE, name=f"probe {label}" + (" (two alternating halves)" if one_pass else ""), tasks=[task],
            steps=out.global_step, examples=self._phase_examples * self.args.world_size,
            tokens=self._phase_tokens * self.args.world_size,
            seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0, train_loss=out.training_loss,
            half=half))
        return cb

    def _probe_all(self, theta0, resume: bool):
        """Every task's core (and, with split-half probes, its two half-cores); with ``probe_affinity``, also the
        tasks' gradient dot products (``self._affinity``)."""
        a = self.args
        cores, half_cores = {}, {}
        gradients = {}  # task → {"dots": {earlier task: S_task · S_earlier}, "steps": T, "loss": L}
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
                meta = read_cores_metadata(path)
                self.phase_records += [PhaseRecord.from_dict(r) for r in meta["phases"]]
                if meta.get("gradient"):
                    gradients[task] = meta["gradient"]
                logger.info("DPI: probe %d/%d %s already done (%s)", i + 1, n, task, path)
                continue
            parts = self._halves(task)
            first = len(self.phase_records)
            logger.info("DPI: probe %d/%d %s (%s%s, signal %s%s)", i + 1, n, task,
                        f"{epochs} epochs" if epochs else f"{steps} steps",
                        ", two halves of its rows" + (" alternating in one pass" if self._one_pass_halves else "")
                        if a.probes_split_half else "", a.core_signal,
                        "" if a.probe_updates_weights else ", no optimizer step")
            probes = [self._probe_one(task, part, theta0, h + 1 if len(parts) > 1 else None, len(parts))
                      for h, part in enumerate(parts)]
            if len(probes) == 1:
                cores[task] = probes[0].core
                to_save = {task: cores[task]}
                if probes[0].half_cores is not None:  # one pass, two halves
                    half_cores[task] = probes[0].half_cores
                    to_save.update({f"{task}#half-1": half_cores[task][0], f"{task}#half-2": half_cores[task][1]})
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
            extra = {}
            if a.probe_affinity:
                gradients[task] = extra["gradient"] = self._record_gradient(task, probes[0], list(gradients),
                                                                            last=i == n - 1)
            to_save = gathered(to_save)  # sharded cores: the global masks, on rank 0 only
            if self.is_world_process_zero():
                save_cores(to_save, path, fingerprint=self._fingerprint, **self._settings(),
                           phases=[r.to_dict() for r in self.phase_records[first:]], **extra)
            self.accelerator.wait_for_everyone()
            kill_point(f"after-probe-{task}")
        self._affinity = self._affinity_of(gradients) if a.probe_affinity else None
        return cores, half_cores

    def _gradient_path(self, task: str):
        return self._runs_dir / "probes" / f"{safe_name(task)}.gradient.safetensors"

    def _record_gradient(self, task: str, probe: CoreProbeCallback, earlier: list[str], last: bool) -> dict:
        """The dot products of ``task``'s signed gradient sum with itself and every earlier task's, its step count and
        probe loss. Full sums (one process, DDP) are written for the later tasks and read back one tensor at a time;
        sharded sums (FSDP2: this rank's shards, a 1/world share of a model per task) stay in memory and their dot
        products are all-reduced over the mesh."""
        t0, c0 = time.perf_counter(), time.process_time()
        total = probe.gradient_sum
        probe.gradient_sum = None
        sharded = any(hasattr(v, "to_local") for v in total.values())
        kept = self.__dict__.setdefault("_sharded_gradient_sums", {})
        if sharded:
            dots = {t: gradient_dot(total, kept[t]) for t in earlier}
        else:
            dots = {t: gradient_dot_file(total, self._gradient_path(t)) for t in earlier}
        record = {"dots": dots, "steps": probe.gradient_steps, "loss": self.phase_records[-1].train_loss}
        record["dots"][task] = gradient_dot(total, total)
        if not last:  # the last task's sum is needed by no later task
            if sharded:
                kept[task] = total
            elif self.is_world_process_zero():
                atomic_save_file({n: v.detach().contiguous().cpu() for n, v in total.items()},
                                 self._gradient_path(task))
        else:
            kept.clear()
        del total
        self.accelerator.wait_for_everyone()
        last_record = self.phase_records[-1]  # the probe's cost includes its dot products and file
        last_record.seconds += time.perf_counter() - t0
        last_record.cpu_seconds += time.process_time() - c0
        return record

    def _affinity_of(self, gradients: dict) -> AffinityReport:
        """The tasks' affinity report from their recorded gradient rows; the saved gradient sums are deleted."""
        tasks = list(self.tasks)
        dots = [[0.0] * len(tasks) for _ in tasks]
        for i, a_ in enumerate(tasks):
            for j, b_ in enumerate(tasks[: i + 1]):
                dots[i][j] = dots[j][i] = float(gradients[a_]["dots"][b_])
        report = affinity_report(dots, tasks, {t: int(gradients[t]["steps"]) for t in tasks},
                                 {t: float(gradients[t]["loss"]) for t in tasks}, self.args.learning_rate)
        if self.is_world_process_zero():
            for t in tasks:  # every dot product is recorded: the model-sized files are no longer needed
                self._gradient_path(t).unlink(missing_ok=True)
        return report

    def _make_plan(self, cores, reliability: ReliabilityReport | None) -> StagePlan:
        a = self.args
        tasks = list(self.tasks)
        if a.staging == "dpi":
            sizes = {t: len(ds) for t, ds in self._task_train.items()}
            plan = plan_stages(cores, a.jaccard_threshold, order=a.stage_order, seed=a.seed, tasks=tasks, sizes=sizes,
                               reliability=reliability, overlap=a.overlap, affinity=self._affinity,
                               affinity_threshold=a.affinity_threshold)
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
        plan.affinity = self._affinity.reorder(tasks) if self._affinity is not None else None
        return plan

    def _cores_and_reliability(self, theta0, resume: bool):
        a = self.args
        self._affinity = None
        if self._preloaded_cores is not None:
            logger.info("DPI: reusing cores from %s (probes skipped)", a.masks_from)
            self._affinity = self._mask_source.get("affinity")
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
