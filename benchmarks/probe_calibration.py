"""Calibrate the one-pass split-half probes: the pooled core's reliability, τ on the corrected scale, task affinity.

    python benchmarks/probe_calibration.py --batches 4 --out runs/probe-calibration

For each reasoning-gym task (six by default, of different kinds and answer formats), one probe pass with no optimizer
step (``probe_updates_weights=False``) at SmolLM2-135M-Instruct's weights θ0 reads 4·n batches; batch s goes into
Σg² accumulator s mod 4 (batches alternate, as a split-half probe alternates them into its two halves). From the four
parts of n batches each:

1. **Spearman–Brown check.** The reliability of a core of n batches, r_n (the Jaccard of two cores of n batches each,
   averaged over the pairs (0,1) and (2,3)), is compared with the measured reliability of cores of 2n batches (the
   pooled cores of parts 0+1 and 2+3) and with two predictions from r_n: Spearman–Brown on the Jaccard itself,
   2J/(1+J), and Spearman–Brown on the phi correlation of the two cores' membership indicators (what
   :func:`dpi_hf.core.reliability.pooled_reliability` uses).
2. **τ on the corrected scale.** Each task's parts (0,1) and (2,3) are two independent split-half measurements
   of the same task (halves of n batches): their reliability-corrected overlap is the value a task scores against
   itself. The same statistic between different tasks (halves (0,1) of each) is the corrected cross-task overlap.
3. **Affinity.** Each task's signed gradient sum over its 4·n batches and its mean loss at θ0 give the first-order
   TAG affinity of every pair (η = ``--learning_rate``), and the two halves of one task (parts 0+1 against 2+3, as
   two signed sums) give a task's affinity with itself, the scale a cross-task value is read against.

Prints the tables and writes them (JSON and Markdown) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from dpi_hf.core import select_core
from dpi_hf.core.affinity import affinity_report, gradient_dot
from dpi_hf.core.reliability import pooled_reliability, random_jaccard, reliability_report
from dpi_hf.core.signals import ImportanceAccumulator
from dpi_hf.data import TaskSpec, load_tasks
from dpi_hf.run.model import ModelSpec, load_model_and_tokenizer

TASKS = {
    "chain_sum": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1},
    "syllogism": {},
    "family_relationships": {},
    "spell_backward": {},
    "leg_counting": {},
    "word_sorting": {},
    "letter_counting": {},
    "basic_arithmetic": {},
}
PARTS = 4


class PartedProbe(TrainerCallback):
    """Route step s's gradients into Σg² part s mod 4 and into the signed half (s mod 4) // 2; never step."""

    def __init__(self, model):
        self.model = model
        self.fisher = ImportanceAccumulator(model, "fisher", parts=PARTS)
        self.signed = ImportanceAccumulator(model, "gradsum", parts=2, keep_signed_sum=True)
        self.losses: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, **kw):
        part = state.global_step % PARTS
        self.fisher.accumulate(part)
        self.signed.accumulate(part // 2)
        for p in self.model.parameters():
            p.grad = None


def sb_jaccard(j: float) -> float:
    """Spearman–Brown applied to the Jaccard itself (for comparison)."""
    return 2 * j / (1 + j)


def jaccard_pairs(cores, pairs):
    return statistics.mean(cores[a].jaccard(cores[b]) for a, b in pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=4, help="n: batches per part (4 parts per task)")
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--core_fraction", type=float, default=0.01)
    ap.add_argument("--learning_rate", type=float, default=5e-5, help="η of the affinity lookahead")
    ap.add_argument("--max_length", type=int, default=256)
    ap.add_argument("--tasks", nargs="*", default=list(TASKS)[:6])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/probe-calibration")
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    n, p = ns.batches, ns.core_fraction
    rows = PARTS * n * ns.batch_size  # one epoch: no row is read twice, so the parts are disjoint
    specs = [TaskSpec(name=t, source="reasoning_gym", path=t, kwargs=TASKS.get(t, {}), max_samples=rows,
                      seed=100 + i) for i, t in enumerate(ns.tasks)]
    data = {name: d["train"] for name, d in load_tasks(specs).items()}
    model, tok = load_model_and_tokenizer(ModelSpec(name_or_path="offline:smollm2-135m-instruct", dtype="float32"))
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    sums_dir = out / "signed"
    sums_dir.mkdir(exist_ok=True)
    cores: dict[str, dict] = {}
    steps, losses, half_sums = {}, {}, {}
    t_start = time.perf_counter()
    for task, task_rows in data.items():
        t0 = time.perf_counter()
        probe = PartedProbe(model)
        args = SFTConfig(output_dir=str(out / "tmp"), max_steps=PARTS * n, per_device_train_batch_size=ns.batch_size,
                         learning_rate=ns.learning_rate, lr_scheduler_type="constant", weight_decay=0.0,
                         max_length=ns.max_length, save_strategy="no", report_to=[], logging_steps=PARTS * n,
                         use_cpu=True, bf16=False, activation_checkpointing=False, seed=ns.seed, disable_tqdm=True,
                         dataset_num_proc=None)
        result = SFTTrainer(model, args=args, train_dataset=task_rows, processing_class=tok, callbacks=[probe]).train()
        losses[task], steps[task] = float(result.training_loss), PARTS * n
        f = probe.fisher
        c = {k: select_core(f.importance(k), p) for k in range(PARTS)}

        def pooled(parts):
            return {name: sum(f.importance(k)[name] for k in parts) for name in f.importance(0)}

        for parts in ((0, 1), (2, 3)):
            c[parts] = select_core(pooled(parts), p)
        cores[task] = c
        # the signed sum of each half (gradsum's parts are signed; importance() would be their magnitude)
        half_sums[task] = [{name: probe.signed._parts[h][name].clone() for name in probe.signed._parts[h]}
                           for h in (0, 1)]
        torch.save(half_sums[task], sums_dir / f"{task}.pt")
        del half_sums[task]
        f.release()
        probe.signed.release()
        print(f"[calibration] {task}: {PARTS * n} batches, loss {losses[task]:.3f}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)

    tasks = list(cores)
    level = random_jaccard(p)
    # 1. Spearman–Brown
    sb_rows = []
    for t in tasks:
        c = cores[t]
        r_n = jaccard_pairs(c, [(0, 1), (2, 3)])
        r_2n = c[(0, 1)].jaccard(c[(2, 3)])
        sb_rows.append({"task": t, "r_n": r_n, "r_2n": r_2n, "sb_jaccard_2n": sb_jaccard(r_n),
                        "sb_phi_2n": pooled_reliability(r_n, p)})
    # 2. τ: same task (two independent split-half measurements) vs different tasks
    tau_rows = []
    for label, h1, h2, h3, h4 in (("n", 0, 1, 2, 3),):
        same = {}
        for t in tasks:
            rep = reliability_report({"a": (cores[t][h1], cores[t][h2]), "b": (cores[t][h3], cores[t][h4])}, p)
            same[t] = rep.corrected_jaccard[0][1]
        rep = reliability_report({t: (cores[t][h1], cores[t][h2]) for t in tasks}, p, tasks)
        k = len(tasks)
        cross = {f"{tasks[i]}~{tasks[j]}": rep.corrected_jaccard[i][j] for i in range(k) for j in range(i + 1, k)}
        tau_rows.append({"halves": label, "same_task": same, "cross_task": cross, "reliability": rep.reliability,
                         "half_jaccard": rep.half_jaccard})
    # 3. affinity: the tasks' signed sums over all their batches, and each task's two halves against each other
    sums = {t: torch.load(sums_dir / f"{t}.pt") for t in tasks}
    total = {t: {name: sums[t][0][name] + sums[t][1][name] for name in sums[t][0]} for t in tasks}
    dots = [[gradient_dot(total[a], total[b]) for b in tasks] for a in tasks]
    aff = affinity_report(dots, tasks, steps, losses, ns.learning_rate)
    self_aff = {}
    for t in tasks:  # halves of 2n batches each: the lookahead of one half on the other, symmetrised
        half = affinity_report([[gradient_dot(sums[t][a], sums[t][b]) for b in (0, 1)] for a in (0, 1)],
                               ["h1", "h2"], {"h1": 2 * n, "h2": 2 * n}, {"h1": losses[t], "h2": losses[t]},
                               ns.learning_rate)
        self_aff[t] = half.symmetric[0][1]
    norms = {t: dots[i][i] ** 0.5 for i, t in enumerate(tasks)}
    cosine = [[dots[i][j] / (norms[a] * norms[b]) for j, b in enumerate(tasks)] for i, a in enumerate(tasks)]
    for f in sums_dir.glob("*.pt"):
        f.unlink()
    sums_dir.rmdir()

    result = {"settings": vars(ns), "random_level": level, "spearman_brown": sb_rows, "tau": tau_rows,
              "affinity": aff.to_dict(), "self_affinity": self_aff, "gradient_cosine": cosine,
              "seconds": time.perf_counter() - t_start}
    (out / "calibration.json").write_text(json.dumps(result, indent=2))
    md = [f"SmolLM2-135M-Instruct, no-step Σg² probes, batch {ns.batch_size}, p = {p} (random level {level:.4f}); "
          f"n = {n} batches per part, 4 parts per task.", "",
          "**Spearman–Brown** (r at n and 2n batches measured; predictions of the 2n value from r_n):", "",
          "| task | r_n | r_2n measured | SB on J | SB on phi |", "|---|---|---|---|---|"]
    for r in sb_rows:
        md.append(f"| {r['task']} | {r['r_n']:.3f} | {r['r_2n']:.3f} | {r['sb_jaccard_2n']:.3f} | "
                  f"{r['sb_phi_2n']:.3f} |")
    for row in tau_rows:
        same, cross = row["same_task"], row["cross_task"]
        md += ["", f"**Corrected overlap, halves of {row['halves']} batches**: same task (two independent split-half "
                   "measurements) vs different tasks:", "",
               "| same task | " + " | ".join(f"{t}" for t in tasks) + " |", "|---|" + "---|" * len(tasks),
               "| corrected | " + " | ".join(f"{same[t]:.3f}" for t in tasks) + " |", "",
               f"same task: {min(same.values()):.3f}–{max(same.values()):.3f}; different tasks: "
               f"{min(cross.values()):.3f}–{max(cross.values()):.3f} (median {statistics.median(cross.values()):.3f})",
               "", "| pair | corrected |", "|---|---|",
               *(f"| {k} | {v:.3f} |" for k, v in sorted(cross.items(), key=lambda kv: -kv[1]))]
    md += ["", f"**Affinity** (first-order TAG, η = {ns.learning_rate:g}; symmetric; diagonal: a task's two halves "
               "against each other):", "", "| | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for i, t in enumerate(tasks):
        md.append(f"| {t} | " + " | ".join(f"{self_aff[t]:.2e}" if i == j else f"{aff.symmetric[i][j]:.2e}"
                                           for j in range(len(tasks))) + " |")
    md += ["", "gradient cosine: " + "; ".join(f"{tasks[i]}~{tasks[j]} {cosine[i][j]:.3f}" for i in range(len(tasks))
                                               for j in range(i + 1, len(tasks))),
           "", "loss at θ0: " + ", ".join(f"{t} {losses[t]:.3f}" for t in tasks),
           f"({result['seconds']:.0f} s)"]
    text = "\n".join(md)
    (out / "calibration.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
