"""The seesaw search: does any task end worse in the multitask mixture than trained alone on the same examples?

For a task set, a budget (optimizer steps in all) and a seed, it trains SmolLM2-135M-Instruct (offline, CPU) twice
over: once on the uniform mixture of the tasks (``DPITrainer(staging="multitask")``) for ``budget`` steps, and once
per task on that task alone for ``budget / n_tasks`` steps — the examples of the task the mixture sees. Each task
is then scored on its held-out rows: greedy answers checked by the reasoning-gym verifier, or LogiQA's option
log-likelihood; the held-out NLL beside it. Negative transfer is mixture − single < 0 beyond the 95 % interval
(bootstrap over seeds and held-out rows, paired by seed: both models are scored on the same rows).

The seed varies the rows drawn: every task's generator seed (and eval_seed) is shifted by 1000 × seed, and the
LogiQA records are permuted with it. Each (set, budget, seed, model) is one JSON file under OUT; a rerun skips the
finished ones. ``--summarise`` writes results.json, results.md and seesaw.png from every finished run.

usage:
  python benchmarks/seesaw_search.py --set formats --budget 32 --seeds 0 1 2 --data_dir DIR [--out runs/seesaw]
  python benchmarks/seesaw_search.py --summarise --out runs/seesaw --results docs/results/seesaw-search
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

TASK_SETS = {
    # different answer formats: a number, one word, Yes/No, a reversed word
    "formats": [
        {"name": "chain_sum", "source": "reasoning_gym", "path": "chain_sum", "seed": 11,
         "kwargs": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}},
        {"name": "family_relationships", "source": "reasoning_gym", "path": "family_relationships", "seed": 12},
        {"name": "syllogism", "source": "reasoning_gym", "path": "syllogism", "seed": 13},
        {"name": "spell_backward", "source": "reasoning_gym", "path": "spell_backward", "seed": 14},
    ],
    # one answer format (a number) from four different skills
    "numbers": [
        {"name": "basic_arithmetic", "source": "reasoning_gym", "path": "basic_arithmetic", "seed": 21,
         "kwargs": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}},
        # 1-2 digits: single digits give 100 questions, and the held-out rows would repeat the 8 no training row has
        {"name": "products", "source": "reasoning_gym", "path": "products", "seed": 22,
         "kwargs": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}},
        {"name": "leg_counting", "source": "reasoning_gym", "path": "leg_counting", "seed": 23,
         "kwargs": {"min_animals": 1, "max_animals": 2, "max_instances": 3}},
        {"name": "letter_counting", "source": "reasoning_gym", "path": "letter_counting", "seed": 24},
    ],
    # with a real dataset (LogiQA by option log-likelihood, --data_dir): not run on 2 cores, because a LogiQA row is
    # about four times a reasoning-gym row and every mixed batch pads to it (the mixture's steps cost ~4x)
    "real": [
        {"name": "chain_sum", "source": "reasoning_gym", "path": "chain_sum", "seed": 11,
         "kwargs": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}},
        {"name": "family_relationships", "source": "reasoning_gym", "path": "family_relationships", "seed": 12},
        {"name": "syllogism", "source": "reasoning_gym", "path": "syllogism", "seed": 13},
        {"name": "logiqa", "source": "logiqa_txt", "path": "{data_dir}/logiqa/Eval.txt", "seed": 14},
    ],
}
TRAIN_ROWS, EVAL_ROWS = 256, int(os.environ.get("EVAL_ROWS", "64"))  # EVAL_ROWS: smaller only for a smoke run
TRAINING = dict(per_device_train_batch_size=4, learning_rate=1e-4, lr_scheduler_type="constant", weight_decay=0.0,
                max_length=512, use_cpu=True, bf16=False, activation_checkpointing=False, save_strategy="no",
                report_to="none", logging_steps=1000, dataset_num_proc=None, dataloader_drop_last=True)
MAX_NEW_TOKENS, EVAL_BATCH = 24, 16


def task_specs(set_name: str, seed: int, data_dir: str | None):
    from dpi_hf.data import TaskSpec

    specs = []
    for t in TASK_SETS[set_name]:
        t = dict(t)
        if "{data_dir}" in t["path"]:
            if not data_dir:
                sys.exit(f"task set {set_name!r} reads {t['path']}: pass --data_dir DIR, the folder of the local "
                         "copies.")
            t["path"] = t["path"].format(data_dir=data_dir)
        t["seed"] += 1000 * seed
        if t["source"] == "reasoning_gym":
            t["eval_seed"] = t["seed"] + 500  # held-out rows from another generator seed, training duplicates dropped
        specs.append(TaskSpec(max_samples=TRAIN_ROWS, eval_samples=EVAL_ROWS, **t))
    return specs


def score_task(model, tok, name, rows) -> dict:
    """Per-row scores of one task (verifier or LogiQA option log-likelihood) and its held-out NLL."""
    import torch

    from dpi_hf.evaluation.nll import heldout_nll

    source = json.loads(rows[0]["meta"]).get("source")
    model.eval()
    with torch.no_grad():
        if source == "reasoning_gym":
            from dpi_hf.compare.forgetting.evaluation import score_rows

            out = score_rows(model, tok, rows, max_new_tokens=MAX_NEW_TOKENS, batch_size=EVAL_BATCH)
            return {"scores": out["scores"], "accuracy": out["accuracy"], "nll": out["nll"]}
        from dpi_hf.evaluation.logiqa import _loglik_predictions

        metas = [json.loads(m) for m in rows["meta"]]
        options = [m["options"] for m in metas]
        preds = _loglik_predictions(model, tok, list(rows["prompt"]), options, "mean", EVAL_BATCH)
        scores = [float(p == r) for p, r in zip(preds, rows["reference"])]
        nll = heldout_nll(model, tok, rows, batch_size=EVAL_BATCH)["nll"]
        return {"scores": scores, "accuracy": sum(scores) / len(scores), "nll": nll}


def train(datasets_, steps: int, seed: int, out_dir: Path):
    """A fresh SmolLM2 trained ``steps`` steps on one dataset, or on the uniform mixture of several."""
    from dpi_hf import DPIConfig, DPITrainer
    from dpi_hf.run.model import ModelSpec, load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ModelSpec(name_or_path="offline:smollm2-135m-instruct", dtype="float32"))
    staging = {"staging": "multitask"} if len(datasets_) > 1 else {}
    args = DPIConfig(output_dir=str(out_dir), max_steps=steps, seed=seed, **staging, **TRAINING)
    data = datasets_ if len(datasets_) > 1 else next(iter(datasets_.values()))
    trainer = DPITrainer(model, args=args, train_dataset=data, processing_class=tok)
    t0 = time.process_time()
    trainer.train()
    return trainer.model, tok, time.process_time() - t0


def run_cell(set_name: str, budget: int, seed: int, out: Path, data_dir: str | None) -> None:
    from dpi_hf.data import load_tasks

    specs = task_specs(set_name, seed, data_dir)
    tasks = load_tasks(specs)
    names = [s.name for s in specs]
    if budget % len(names):
        sys.exit(f"--budget {budget} must be a multiple of the {len(names)} tasks (each alone gets budget / tasks).")
    cell = out / set_name / f"budget-{budget}" / f"seed-{seed}"
    cell.mkdir(parents=True, exist_ok=True)
    jobs = [("mixture", names, budget)] + [(f"single-{n}", [n], budget // len(names)) for n in names]
    for label, members, steps in jobs:
        path = cell / f"{label}.json"
        if path.is_file():
            print(f"seesaw: {path} done, skipped", flush=True)
            continue
        print(f"seesaw: {set_name} budget {budget} seed {seed}: {label} ({steps} steps)", flush=True)
        model, tok, cpu = train({n: tasks[n]["train"] for n in members}, steps, seed, cell / "trainer")
        record = {"set": set_name, "budget": budget, "seed": seed, "model": label, "steps": steps,
                  "train_cpu_seconds": cpu, "tasks": {n: score_task(model, tok, n, tasks[n]["eval"]) for n in members},
                  "eval_rows": {n: list(tasks[n]["eval"]["prompt"]) for n in members},
                  "specs": [dataclasses.asdict(s) for s in specs if s.name in members]}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, default=str))
        tmp.rename(path)
        print(f"seesaw: {label}: " + ", ".join(f"{n} {r['accuracy']:.3f} (NLL {r['nll']:.3f})"
                                              for n, r in record["tasks"].items()), flush=True)
        del model


def summarise(out: Path, results: Path) -> None:
    """Per (set, budget, task): mixture and single accuracy and NLL, and mixture − single with its interval."""
    import numpy as np

    from dpi_hf.compare.forgetting.stats import Bootstrap

    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*/budget-*/seed-*/*.json"))]
    cells = {}
    for r in runs:
        cells.setdefault((r["set"], r["budget"]), {}).setdefault(r["seed"], {})[r["model"]] = r
    rows = []
    for (set_name, budget), by_seed in sorted(cells.items()):
        names = [t["name"] for t in TASK_SETS[set_name]]
        complete = {s: m for s, m in by_seed.items() if "mixture" in m and all(f"single-{n}" in m for n in names)}
        if not complete:
            continue
        majority = _majority(complete)
        for n in names:
            # the mixture and the single model were scored on the same rows of each seed
            for s, m in complete.items():
                assert m["mixture"]["eval_rows"][n] == m[f"single-{n}"]["eval_rows"][n], (set_name, budget, s, n)
            mix = {s: np.array(m["mixture"]["tasks"][n]["scores"]) for s, m in complete.items()}
            one = {s: np.array(m[f"single-{n}"]["tasks"][n]["scores"]) for s, m in complete.items()}
            boot = Bootstrap({s: {n: len(v)} for s, v in mix.items()}, reps=4000, seed=budget)
            diff = boot.interval(n, {s: mix[s] - one[s] for s in mix})
            nll_mix = [m["mixture"]["tasks"][n]["nll"] for m in complete.values()]
            nll_one = [m[f"single-{n}"]["tasks"][n]["nll"] for m in complete.values()]
            d = np.array(nll_mix) - np.array(nll_one)
            half = _t_half_width(d)
            rows.append({"set": set_name, "budget": budget, "task": n, "seeds": sorted(complete),
                         "mixture": float(np.mean([v.mean() for v in mix.values()])),
                         "single": float(np.mean([v.mean() for v in one.values()])),
                         "difference": diff.to_dict(), "negative_transfer": diff.hi < 0,
                         "majority": float(np.mean(majority[n])),
                         "nll_mixture": float(np.mean(nll_mix)), "nll_single": float(np.mean(nll_one)),
                         "nll_difference": {"mean": float(d.mean()), "lo": float(d.mean() - half),
                                            "hi": float(d.mean() + half)}})
    results.mkdir(parents=True, exist_ok=True)
    (results / "runs.json").write_text(json.dumps(runs, indent=1, default=str))
    (results / "results.json").write_text(json.dumps({"rows": rows, "settings": {
        "task_sets": TASK_SETS, "train_rows": TRAIN_ROWS, "eval_rows": EVAL_ROWS, "training": TRAINING,
        "max_new_tokens": MAX_NEW_TOKENS}}, indent=1))
    (results / "results.md").write_text(_markdown(rows))
    _plot(rows, results / "seesaw.png")
    print((results / "results.md").read_text())


def _majority(cells: dict) -> dict:
    """Per task, the accuracy of always giving the most frequent training answer, per seed (from the specs the
    runs recorded: the same rows)."""
    from dpi_hf.compare.forgetting.evaluation import majority_baseline
    from dpi_hf.data import TaskSpec, load_tasks

    out = {}
    for models in cells.values():
        specs = [TaskSpec(**spec) for spec in models["mixture"]["specs"]]
        for name, splits in load_tasks(specs).items():
            out.setdefault(name, []).append(majority_baseline(splits["train"], splits["eval"])["accuracy"])
    return out


def _t_half_width(d) -> float:
    """The 95 % t-interval half width of the mean of ``d`` (paired NLL differences by seed)."""
    import numpy as np

    from dpi_hf.compare.summary import t_quantile_975

    if len(d) < 2:
        return float("nan")
    return float(t_quantile_975(len(d) - 1) * np.std(d, ddof=1) / np.sqrt(len(d)))


def _markdown(rows) -> str:
    lines = ["| set | budget (steps) | task | seeds | majority answer | single | mixture | mixture − single (95 % CI) | "
             "NLL single | NLL mixture | NLL mixture − single (95 % CI) |", "|---" * 11 + "|"]
    for r in rows:
        d, n = r["difference"], r["nll_difference"]
        verdict = "**negative transfer**" if r["negative_transfer"] else (
            "positive" if d["lo"] > 0 else "no difference")
        lines.append(f"| {r['set']} | {r['budget']} | {r['task']} | {len(r['seeds'])} | {r['majority']:.3f} | "
                     f"{r['single']:.3f} | "
                     f"{r['mixture']:.3f} | {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] {verdict} | "
                     f"{r['nll_single']:.3f} | {r['nll_mixture']:.3f} | {n['mean']:+.3f} "
                     + (f"[{n['lo']:+.3f}, {n['hi']:+.3f}] |" if n["lo"] == n["lo"] else "(one seed) |"))
    return "\n".join(lines) + "\n"


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    labels = [f"{r['task']}\n{r['set']} @ {r['budget']}" for r in rows]
    means = [r["difference"]["mean"] for r in rows]
    err = [[r["difference"]["mean"] - r["difference"]["lo"] for r in rows],
           [r["difference"]["hi"] - r["difference"]["mean"] for r in rows]]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4))
    colors = ["tab:red" if r["negative_transfer"] else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), means, yerr=err, color=colors, capsize=3)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("accuracy: mixture − single (95 % CI)")
    ax.set_title("Negative transfer search (red: below 0 beyond the interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", choices=list(TASK_SETS))
    p.add_argument("--budget", type=int, nargs="+", default=[32])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data_dir")
    p.add_argument("--out", default="runs/seesaw")
    p.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "1")))
    p.add_argument("--summarise", action="store_true")
    p.add_argument("--results", default="docs/results/seesaw-search")
    a = p.parse_args()
    print("seesaw search:", "summary" if a.summarise else f"set {a.set}, budgets {a.budget}, seeds {a.seeds}",
          flush=True)
    if a.summarise:
        return summarise(Path(a.out), Path(a.results))
    if a.set is None:
        p.error("--set is required (or --summarise)")
    import torch

    torch.set_num_threads(a.threads)
    for budget in a.budget:
        for seed in a.seeds:
            run_cell(a.set, budget, seed, Path(a.out), a.data_dir)


if __name__ == "__main__":
    main()
