"""Are the cores reliable? Split-half reliability and cross-task overlap against probe length, for every signal.

    python benchmarks/reliability_sweep.py recipes/compare-smollm2-cpu.yaml --data_dir DIR --steps 4 16 64 \\
        --out runs/reliability

For every task of the recipe, two probes from θ0 on two disjoint halves of its training rows (the probe settings
of DPIConfig: AdamW, weight decay 0, constant learning rate ``probe_learning_rate``). One probe run per half serves
every signal and every probe length: at each length in ``--steps`` the cores of |θ − θ0| ("update"), Σ g² ("fisher")
and |Σ g| ("gradsum") are selected (p = ``core_fraction``), so the lengths share their first steps exactly as
separate probes of those lengths would. Prints, and writes as JSON and Markdown: per signal and length, each task's
reliability r, the half-level cross-task overlap, the reliability-corrected overlap, the random level, and the
probe's CPU seconds; plus the time the gradient accumulators add to a probe step (a ratio in this run).

With ``--no_step`` the probes take no optimizer step (``probe_updates_weights=False``): the gradient signals are
accumulated over the same batches at θ0 and the gradients dropped before each step, so the table compares Σ g² at
the current weights with Σ g² along a probe fine-tune (the run without the flag) on the same rows and halves.

    python benchmarks/reliability_sweep.py recipes/compare-smollm2-cpu.yaml --data_dir DIR --steps 4 16 --no_step \\
        --out runs/rel-nostep
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from dpi_hf.callbacks import snapshot_parameters
from dpi_hf.core import select_core, update_magnitudes
from dpi_hf.core.reliability import reliability_report
from dpi_hf.core.signals import GRADIENT_SIGNALS, SIGNALS, ImportanceAccumulator
from dpi_hf.data import load_tasks
from dpi_hf.trainer.multitask import split_halves
from dpi_hf.quickstart import load_model_and_tokenizer
from dpi_hf.recipes import Recipe, read_recipe


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class MultiSignalProbe(TrainerCallback):
    """Accumulate every gradient signal; at each checkpoint step select the core of every signal."""

    def __init__(self, model, theta0, core_fraction, checkpoints, no_step=False):
        self.model, self.theta0, self.p = model, theta0, core_fraction
        self.no_step = no_step
        self.checkpoints = set(checkpoints)
        self.acc = {s: ImportanceAccumulator(model, s) for s in GRADIENT_SIGNALS}
        self.cores: dict[tuple[str, int], object] = {}
        self.cpu: dict[int, float] = {}
        self.accumulate_seconds = 0.0
        self.step_seconds = 0.0
        self._cpu0 = cpu_seconds()
        self._t_step = None
        self._select_seconds = 0.0

    def on_step_begin(self, args, state, control, **kw):
        self._t_step = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kw):
        t = time.perf_counter()
        for a in self.acc.values():
            a.accumulate()
        self.accumulate_seconds += (time.perf_counter() - t) / len(self.acc)  # one signal's share
        if self.no_step:  # as CoreProbeCallback(update_weights=False): the optimizer skips grad-less parameters
            for p in self.model.parameters():
                p.grad = None

    def on_step_end(self, args, state, control, **kw):
        self.step_seconds += time.perf_counter() - self._t_step
        step = state.global_step
        if step in self.checkpoints:
            t = time.perf_counter()
            c = cpu_seconds()
            self.cpu[step] = c - self._cpu0 - self._select_seconds
            if not self.no_step:
                self.cores[("update", step)] = select_core(update_magnitudes(self.model, self.theta0), self.p)
            for s, a in self.acc.items():
                self.cores[(s, step)] = select_core(a.importance(), self.p)
            self._select_seconds += cpu_seconds() - c
            print(f"  step {step}: cores selected ({time.perf_counter() - t:.1f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--data_dir", default=None, help="the recipe's ${data_dir}: the folder of the local dataset copies")
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--core_fraction", type=float, default=0.01)
    ap.add_argument("--learning_rate", type=float, default=1e-4)
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--max_length", type=int, default=256)
    ap.add_argument("--max_samples", type=int, default=256, help="training rows per task (split into two halves)")
    ap.add_argument("--tasks", nargs="*", default=None, help="subset of the recipe's tasks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="runs/reliability")
    ap.add_argument("--no_step", action="store_true", help="gradients at θ0, no optimizer step (gradient signals)")
    ns = ap.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    raw = read_recipe(ns.recipe, {"data_dir": ns.data_dir} if ns.data_dir else {})
    for section in ("compare", "sweep"):  # the comparison harness's sections; this script needs tasks and model
        raw.pop(section, None)
    recipe = Recipe.from_dict(raw, source=ns.recipe)
    specs = [t for t in recipe.tasks if ns.tasks is None or t.name in ns.tasks]
    for t in specs:
        t.max_samples = ns.max_samples
    data = {n: d["train"] for n, d in load_tasks(specs).items()}
    model, tok = load_model_and_tokenizer(recipe.model)
    theta0 = snapshot_parameters(model)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    last = max(ns.steps)
    halves: dict[str, list[MultiSignalProbe]] = {}
    for task, rows in data.items():
        halves[task] = []
        for h, half_rows in enumerate(split_halves(rows, ns.seed)):  # the halves DPITrainer's probes use
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(theta0[n])
            print(f"[sweep] {task} half {h + 1}/2: {last} steps on {len(half_rows)} rows", flush=True)
            probe = MultiSignalProbe(model, theta0, ns.core_fraction, ns.steps, no_step=ns.no_step)
            args = SFTConfig(output_dir=str(out / "tmp"), max_steps=last, per_device_train_batch_size=ns.batch_size,
                             learning_rate=ns.learning_rate, lr_scheduler_type="constant", weight_decay=0.0,
                             warmup_steps=0, max_length=ns.max_length, save_strategy="no", report_to=[],
                             logging_steps=max(1, last // 4), use_cpu=True, bf16=False,
                             activation_checkpointing=False, seed=ns.seed + h, disable_tqdm=True,
                             dataset_num_proc=None)
            trainer = SFTTrainer(model, args=args, train_dataset=half_rows, processing_class=tok,
                                 callbacks=[probe])
            trainer.train()
            for a in probe.acc.values():
                a.release()
            probe.acc = {}
            halves[task].append(probe)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(theta0[n])

    tasks = list(halves)
    rows = []
    for signal in (GRADIENT_SIGNALS if ns.no_step else SIGNALS):
        for steps in ns.steps:
            rep = reliability_report({t: (halves[t][0].cores[(signal, steps)], halves[t][1].cores[(signal, steps)])
                                      for t in tasks}, ns.core_fraction, tasks)
            n = len(tasks)
            cross = [rep.half_jaccard[i][j] for i in range(n) for j in range(i + 1, n)]
            corr = [rep.corrected_jaccard[i][j] for i in range(n) for j in range(i + 1, n)]
            cpu = sum(p.cpu[steps] for t in tasks for p in halves[t])
            label = signal + ("-nostep" if ns.no_step else "")
            rows.append({"signal": label, "steps": steps, "reliability": rep.reliability,
                         "half_jaccard": rep.half_jaccard, "corrected_jaccard": rep.corrected_jaccard,
                         "cross_min": min(cross), "cross_max": max(cross), "corrected_min": min(corr),
                         "corrected_max": max(corr), "random_level": rep.random_level,
                         "unreliable": sorted(rep.unreliable), "probe_cpu_seconds": cpu})
    acc = sum(p.accumulate_seconds for t in tasks for p in halves[t])
    step = sum(p.step_seconds for t in tasks for p in halves[t])
    result = {"tasks": tasks, "core_fraction": ns.core_fraction, "settings": vars(ns), "rows": rows,
              "accumulator_overhead": acc / max(step - 2 * acc, 1e-9),
              "accumulate_seconds_per_signal": acc, "step_seconds": step}
    (out / "reliability.json").write_text(json.dumps(result, indent=2))
    md = [f"p = {ns.core_fraction}, random level {rows[0]['random_level']:.4f}; r per task; cross = half-level "
          "overlap between tasks (min–max); corrected = H/sqrt(r_a r_b) (min–max); probe CPU s = both halves of "
          "every task up to that length.", "",
          "| signal | steps | " + " | ".join(f"r {t}" for t in tasks) + " | cross | corrected | probe CPU s |",
          "|---|---|" + "---|" * len(tasks) + "---|---|---|"]
    for r in rows:
        md.append(f"| {r['signal']} | {r['steps']} | " + " | ".join(f"{r['reliability'][t]:.3f}" for t in tasks)
                  + f" | {r['cross_min']:.3f}–{r['cross_max']:.3f} | {r['corrected_min']:.2f}–{r['corrected_max']:.2f}"
                  + f" | {r['probe_cpu_seconds']:.0f} |")
    md += ["", f"One gradient accumulator adds {100 * result['accumulator_overhead']:.2f}% to a probe step "
               f"({acc:.1f} s of {step:.1f} s of steps)."]
    text = "\n".join(md)
    (out / "reliability.md").write_text(text + "\n")
    print(text)
    if not math.isfinite(result["accumulator_overhead"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
