"""A protected single-dataset run (SFT + protect_method) on the tiny test model, for the torchrun DDP test.

usage: run_protect.py OUT_DIR SOURCE_DIR --steps N [--method l2sp --lam X --form loss|decoupled]
Trains with plain SGD (constant lr 0.05, no clipping, no weight decay), per-device batch 2, and writes, per rank,
OUT_DIR.rank<r>.safetensors (the final parameters), OUT_DIR.rank<r>.step<k>.safetensors (the parameters after
optimizer step k) and OUT_DIR.rank<r>.json (the logged protect_penalty values).
"""

import argparse
import gc
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import build_tokenizer, make_tasks, tiny_llama  # noqa: E402

from dpi_hf import DPIConfig, DPITrainer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


class SaveEveryStep(TrainerCallback):
    """The parameters after each optimizer step: one run gives the plain DDP weights after step 1 and step 2."""

    def __init__(self, out):
        self.out = out

    def on_step_end(self, args, state, control, model=None, **kwargs):
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()},
                  f"{self.out}.rank{args.process_index}.step{state.global_step}.safetensors")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("source")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--method", default=None)
    ap.add_argument("--lam", type=float, default=None)
    ap.add_argument("--form", default="loss")
    ns = ap.parse_args()
    torch.set_num_threads(1)
    gc.freeze()  # the imported modules' objects out of the full gc.collect() that ends Trainer.train()
    tok = build_tokenizer()
    protect = {} if ns.method is None else dict(protect_cores_from=ns.source, protect_method=ns.method,
                                                 protect_lambda=ns.lam, protect_ewc_form=ns.form)
    args = DPIConfig(output_dir=ns.out, per_device_train_batch_size=2, learning_rate=0.05, optim="sgd",
                     lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, max_steps=ns.steps,
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                     gradient_checkpointing=False, max_length=64, seed=0, disable_tqdm=True, **protect)
    trainer = DPITrainer(tiny_llama(tok), args=args, train_dataset=make_tasks()["rev"], processing_class=tok,
                         callbacks=[SaveEveryStep(ns.out)])
    trainer.train()
    rank = trainer.args.process_index
    save_file({n: p.detach().contiguous() for n, p in trainer.model.named_parameters()}, f"{ns.out}.rank{rank}.safetensors")
    penalties = [h["protect_penalty"] for h in trainer.state.log_history if "protect_penalty" in h]
    Path(f"{ns.out}.rank{rank}.json").write_text(json.dumps({"penalties": penalties,
                                                              "world_size": trainer.args.world_size}))


if __name__ == "__main__":
    main()
