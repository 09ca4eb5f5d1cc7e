"""Trainer-level overhead of DPI, as ratios measured in one process with interleaved runs.

1. Stage step time with freezing vs SFTTrainer: the same model, data and config; one `SFTTrainer` plus
   `FreezeMaskCallback(frozen)` (exactly what a DPI stage runs) against the plain `SFTTrainer`, alternating
   `--rounds` rounds of `--steps` optimizer steps each (the first step of each round is warm-up and not counted).
2. Single-dataset `DPITrainer` vs `SFTTrainer` (DPITrainer must add nothing).
3. Probe cost as a fraction of the staged training for given settings: n_tasks × probe_steps × (probe step time) /
   (max_steps × stage step time), from the same measured step times (probes run without a freezer).

usage: python benchmarks/bench_trainer.py [--model offline:smollm2-135m-instruct | random-60m] [--frozen 0.03]
           [--rounds 6] [--steps 4] [--tasks 3 --probe-steps 100 --max-steps 1000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainerCallback
from trl import SFTConfig, SFTTrainer

from dpi_hf import CoreMask, DPIConfig, DPITrainer, FreezeMaskCallback


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)


def load(model_name: str):
    from dpi_hf.offline import resolve_model_path

    path = resolve_model_path("offline:smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    if model_name == "random-60m":
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg), tok
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(model_name), dtype=torch.float32), tok


def data(n=256):
    rows = []
    for i in range(n):
        q = f"Compute {i} plus {2 * i + 7} and explain the steps briefly."
        a = f"We add {i} and {2 * i + 7}. The sum is {3 * i + 7}. Answer: {3 * i + 7}"
        rows.append({"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]})
    return Dataset.from_list(rows)


def random_mask(model, fraction: float) -> CoreMask:
    g = torch.Generator().manual_seed(0)
    dense = {n: torch.rand(p.shape, generator=g) < fraction for n, p in model.named_parameters()}
    return CoreMask.from_dense(dense)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="offline:smollm2-135m-instruct")
    ap.add_argument("--frozen", type=float, default=0.03, help="fraction of elements frozen (default 0.03)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per round and configuration")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--probe-steps", type=int, default=100)
    ap.add_argument("--max-steps", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    model, tok = load(ns.model)
    n_params = sum(p.numel() for p in model.parameters())
    frozen = random_mask(model, ns.frozen)
    ds = data()
    common = dict(per_device_train_batch_size=ns.batch, learning_rate=1e-5, weight_decay=0.1, max_steps=ns.steps,
                  logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                  gradient_checkpointing=False, max_length=128, seed=0, disable_tqdm=True, max_grad_norm=1.0)

    timers = {"sft": StepTimer(), "sft+freeze": StepTimer(), "dpi-single": StepTimer()}
    sft = SFTTrainer(model, args=SFTConfig(output_dir="/tmp/bench_sft", **common), train_dataset=ds,
                     processing_class=tok, callbacks=[timers["sft"]])
    frz = SFTTrainer(model, args=SFTConfig(output_dir="/tmp/bench_frz", **common), train_dataset=ds,
                     processing_class=tok, callbacks=[timers["sft+freeze"], FreezeMaskCallback(frozen)])
    dpi = DPITrainer(model, args=DPIConfig(output_dir="/tmp/bench_dpi", **common), train_dataset=ds,
                     processing_class=tok, callbacks=[timers["dpi-single"]])
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    per_round = {k: [] for k in timers}
    for r in range(ns.rounds):
        order = [("sft", sft), ("sft+freeze", frz), ("dpi-single", dpi)]
        if r % 2:
            order.reverse()  # alternate the order so drift in machine load does not favour one configuration
        for name, trainer in order:
            model.load_state_dict(snapshot)
            trainer.optimizer, trainer.lr_scheduler = None, None
            t = timers[name]
            t.times.clear()
            trainer.train()
            per_round[name].extend(t.times[1:])  # the first step of each round warms up
    med = {k: statistics.median(v) for k, v in per_round.items()}
    print(f"model {ns.model}: {n_params / 1e6:.1f}M parameters, {frozen.count() / n_params:.2%} frozen, "
          f"batch {ns.batch}, {ns.threads} thread(s), {ns.rounds} rounds x {ns.steps - 1} timed steps")
    print("| configuration | median step s | ratio vs SFTTrainer |")
    print("|---|---|---|")
    for k in timers:
        print(f"| {k} | {med[k]:.3f} | {med[k] / med['sft']:.3f} |")
    probe_cost = ns.tasks * ns.probe_steps * med["sft"] / (ns.max_steps * med["sft+freeze"])
    print(f"freezing overhead ratio (median step): {med['sft+freeze'] / med['sft']:.3f}")
    print(f"single-dataset DPITrainer ratio: {med['dpi-single'] / med['sft']:.3f}")
    print(f"probe cost for {ns.tasks} tasks x {ns.probe_steps} probe steps vs {ns.max_steps} stage steps: "
          f"{probe_cost:.1%} of the staged training time")


if __name__ == "__main__":
    main()
