"""A DPI run on the tiny test model, driven from tests in a separate process (kill/resume and torchrun DDP tests):
a script for torchrun, and :func:`run_in_child` for a child forked from a server that imported this module once.

usage: run_dpi.py OUT_DIR [--kill-at PHASE:STEP | --kill-point NAME] [--resume [PATH]] [--report FILE]
  --kill-at probe-rev:2         SIGKILL this process when phase `probe-rev` reaches optimizer step 2
  --kill-point after-plan       SIGKILL it at a named point of the trainer (DPI_HF_KILL_AT)
  --resume [PATH]               resume (from the latest checkpoint, or from the checkpoint PATH)
  --fusion                      fusion="cpi" (the stages start from the fused probe models)
  --report FILE           write per-rank facts (parameter hash, cores, plan) as JSON to FILE.<rank>
"""

import argparse
import gc
import hashlib
import logging
import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import build_tokenizer, make_tasks, tiny_llama  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from dpi_hf import DPIConfig, DPITrainer  # noqa: E402


class KillAt(TrainerCallback):
    def __init__(self, phase, step):
        self.phase, self.step = phase, step

    def on_step_end(self, args, state, control, **kwargs):
        if Path(args.output_dir).name == self.phase and state.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class ReportStart(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        print(f"[run_dpi] {Path(args.output_dir).name} begins at step {state.global_step}", flush=True)


def run_in_child(argv, stdout_path, stderr_path):
    """``main(argv)`` in a child of a multiprocessing forkserver that preloaded this module: a fresh process without
    the ~6 CPU-seconds of importing torch, transformers and trl; its output goes to the two files."""
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    main(argv)
    sys.stdout.flush()
    sys.stderr.flush()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--kill-at")
    ap.add_argument("--kill-point")
    ap.add_argument("--no-checkpoints", action="store_true", help="save_strategy='no' (stages resume from scratch)")
    ap.add_argument("--resume", nargs="?", const=True, default=None)
    ap.add_argument("--fusion", action="store_true")
    ap.add_argument("--report")
    ns = ap.parse_args(argv)
    torch.set_num_threads(1)
    # every phase ends in accelerate's free_memory(), a full gc.collect() that scans every object of the loaded
    # torch/transformers/trl modules (~0.9 s each, 27 per run); the objects alive now live as long as the process
    gc.freeze()
    logging.basicConfig(level=logging.WARNING, format="[dpi-hf] %(message)s")
    logging.getLogger("dpi_hf").setLevel(logging.INFO)
    if ns.kill_point:
        os.environ["DPI_HF_KILL_AT"] = ns.kill_point
    tok = build_tokenizer()
    args = DPIConfig(output_dir=ns.out, per_device_train_batch_size=2, learning_rate=1e-2, max_steps=12,
                     probe_steps=4, core_fraction=0.05, jaccard_threshold=1.0, logging_steps=1, save_strategy="steps",
                     save_steps=1, report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False,
                     max_length=64, seed=0, disable_tqdm=True, save_stage_models=True, weight_decay=0.1,
                     overlap="raw",  # τ = 1 on the raw Jaccard: one stage per task, whatever the cores
                     # in the constructor: it decides the probes' default (cpi fuses probe fine-tunes)
                     fusion="cpi" if ns.fusion else "none")
    if ns.no_checkpoints:
        args.save_strategy = "no"
    callbacks = [ReportStart()]
    if ns.kill_at:
        phase, step = ns.kill_at.split(":")
        callbacks.append(KillAt(phase, int(step)))
    trainer = DPITrainer(tiny_llama(tok), args=args, train_dataset=make_tasks(), processing_class=tok,
                         callbacks=callbacks)
    trainer.train(resume_from_checkpoint=ns.resume)
    if ns.report:
        h = hashlib.sha256()
        for n, p in trainer.model.named_parameters():
            h.update(p.detach().cpu().numpy().tobytes())
        report = {"params": h.hexdigest(), "stages": trainer.plan.stages, "jaccard": trainer.plan.jaccard,
                  "cores": {t: c.indices(c.names()[0]).tolist()[:50] + [c.count()] for t, c in trainer.cores.items()},
                  "world_size": trainer.args.world_size}
        Path(f"{ns.report}.{trainer.args.process_index}").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
