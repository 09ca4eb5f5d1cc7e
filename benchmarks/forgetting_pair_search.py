"""The pair search before the forgetting benchmark: which (A -> B) pairs of reasoning-gym tasks forget partially, in
verifier accuracy, on SmolLM2-135M-Instruct (offline) — A clearly learned, then B's training drops A's accuracy
without collapsing it while B's rises.

usage:
  python benchmarks/forgetting_pair_search.py base TASK ...                 # base accuracy of each task
  python benchmarks/forgetting_pair_search.py a TASK STEPS LR               # train A from the base model, save it
  python benchmarks/forgetting_pair_search.py b A_FILE A B STEPS LR [LR ...]  # from that A model, train B; A, B acc
  python benchmarks/forgetting_pair_search.py curve A_FILE A B LR STEP [STEP ...]  # one B run, A and B acc at each STEP

Environment: OUT (results folder, default runs/pair-search; results.jsonl is appended), NEVAL (held-out rows per
task, default 64), THREADS (torch threads, default 2). Rows come from each task's own generator seed (SEEDS below);
batch 8, constant lr, weight decay 0.01, greedy answers of at most 20 tokens scored by the task's verifier.
"""
import json, sys, time, os, itertools
from pathlib import Path
import torch
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from dpi_hf.data import TaskSpec, load_tasks
from dpi_hf.evaluation.generation import generate_completions
from dpi_hf.evaluation.reasoning_gym_eval import reasoning_gym_row_scores
from dpi_hf.run.model import load_model_and_tokenizer
from dpi_hf.run.recipe import ModelSpec
from dpi_hf.trainer.config import DPIConfig
from trl import SFTTrainer
from transformers import TrainerCallback
from safetensors.torch import save_file, load_file

OUT = Path(os.environ.get("OUT", "runs/pair-search")); OUT.mkdir(parents=True, exist_ok=True)
RES = OUT / "results.jsonl"
KW = {"chain_sum": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1},
      "basic_arithmetic": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}}
SEEDS = {"chain_sum": 11, "family_relationships": 12, "spell_backward": 13, "count_bits": 14, "basic_arithmetic": 15,
         "color_cube_rotation": 16, "number_sequence": 17, "calendar_arithmetic": 18}
NEVAL = int(os.environ.get("NEVAL", "64"))

def task(name):
    spec = TaskSpec(name=name, source="reasoning_gym", path=name, max_samples=512, eval_samples=NEVAL,
                    seed=SEEDS[name], kwargs=KW.get(name, {}))
    return load_tasks([spec])[name]

def acc(model, tok, ds):
    model.eval()
    comps = generate_completions(model, tok, list(ds["prompt"]), max_new_tokens=20, batch_size=32)
    s = reasoning_gym_row_scores(comps, list(ds["meta"]))
    return sum(s) / len(s), comps[:3]

def train(model, tok, ds, steps, lr, seed=0, bs=8, callbacks=()):
    args = DPIConfig(output_dir=str(OUT / "trainer"), max_steps=steps, learning_rate=lr, lr_scheduler_type="constant",
                     per_device_train_batch_size=bs, weight_decay=0.01, use_cpu=True, bf16=False,
                     activation_checkpointing=False, save_strategy="no", report_to=[], logging_steps=1000,
                     seed=seed, max_length=256, dataset_num_proc=None)
    t = time.time()
    SFTTrainer(model, args=args, train_dataset=ds, processing_class=tok, callbacks=list(callbacks)).train()
    return time.time() - t

def log(rec):
    rec["time"] = time.strftime("%H:%M:%S")
    print(json.dumps(rec), flush=True)
    with RES.open("a") as f: f.write(json.dumps(rec) + "\n")

class CurveCallback(TrainerCallback):
    """Scores A and B at the listed B steps of one training (the same run, so the lengths share their first steps)."""
    def __init__(self, steps, score):
        self.steps, self.score = set(steps), score

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            model.eval()
            self.score(state.global_step)
            model.train()

if __name__ == "__main__":
    mode = sys.argv[1]
    spec = ModelSpec(name_or_path="offline:smollm2-135m-instruct", dtype="float32")
    if mode == "base":
        model, tok = load_model_and_tokenizer(spec)
        for name in sys.argv[2:]:
            a, ex = acc(model, tok, task(name)["eval"]); log({"mode": "base", "task": name, "acc": a, "ex": ex})
    elif mode == "a":  # a TASK STEPS LR
        name, steps, lr = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
        model, tok = load_model_and_tokenizer(spec)
        d = task(name); sec = train(model, tok, d["train"], steps, lr)
        a, ex = acc(model, tok, d["eval"])
        f = OUT / f"A-{name}-{steps}-{lr:g}.safetensors"
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(f))
        log({"mode": "a", "task": name, "steps": steps, "lr": lr, "acc": a, "sec": sec, "ex": ex})
    elif mode == "b":  # b AFILE A B STEPS LR...
        afile, a_name, b_name, steps = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
        da, db = task(a_name), task(b_name)
        for lr in map(float, sys.argv[6:]):
            model, tok = load_model_and_tokenizer(spec)
            model.load_state_dict(load_file(afile), strict=False)
            a0, _ = acc(model, tok, da["eval"]); b0, _ = acc(model, tok, db["eval"])
            sec = train(model, tok, db["train"], steps, lr)
            a1, exa = acc(model, tok, da["eval"]); b1, exb = acc(model, tok, db["eval"])
            log({"mode": "b", "a": a_name, "b": b_name, "afile": afile, "steps": steps, "lr": lr, "a_after_a": a0,
                 "b_after_a": b0, "a_after_b": a1, "b_after_b": b1, "sec": sec, "ex_a": exa, "ex_b": exb})
    elif mode == "curve":  # curve AFILE A B LR STEP...
        afile, a_name, b_name, lr = sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
        steps = sorted(int(x) for x in sys.argv[6:])
        da, db = task(a_name), task(b_name)
        model, tok = load_model_and_tokenizer(spec)
        model.load_state_dict(load_file(afile), strict=False)
        a0, _ = acc(model, tok, da["eval"]); b0, _ = acc(model, tok, db["eval"])
        t0 = time.time()

        def score(step):
            a1, exa = acc(model, tok, da["eval"]); b1, exb = acc(model, tok, db["eval"])
            log({"mode": "curve", "a": a_name, "b": b_name, "afile": afile, "steps": step, "lr": lr, "a_after_a": a0,
                 "b_after_a": b0, "a_after_b": a1, "b_after_b": b1, "sec": time.time() - t0, "ex_a": exa, "ex_b": exb})
        train(model, tok, db["train"], steps[-1], lr, callbacks=[CurveCallback(steps, score)])
