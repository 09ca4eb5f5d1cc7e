"""One-GPU check (not collected by pytest), run in phases by ``bash tests/gpu/run.sh one-gpu``; each phase writes
its figures to ``$OUT/<phase>*.json`` as soon as it has them, so a run cut off later still reports.

Phases (a Llama-3.2-1B-shaped model from a config, random weights, tied embeddings; pre-tokenized random
``input_ids`` and a tokenizer built here, so no download):

* ``select``: ``select_core`` over the model's 1.24B elements (|normal| magnitudes on the GPU), timed at p = 1 % and 5 %.
* ``trainer`` (under ``accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 1``): plain
  ``SFTTrainer`` on task b, then multi-task ``DPITrainer`` (bf16 probes with Σg², the plan, two stages a → b with a's
  core frozen in stage 2) at p = 1 % and 5 %. Each stage checks at its end that every frozen element (this rank's
  shard) is bit-identical to the value saved when it began. Figures: stage tokens/s and peak GPU memory, as ratios to
  the SFTTrainer run on the same data, batch and steps.
* ``zero3`` (under ``--config_file recipes/accelerate/zero3.yaml --num_processes 1``): the multi-task DPITrainer's
  refusal under DeepSpeed, and the engine under ZeRO-3: θ0 from the fp32 partitions, a probe, the core, θ0 restored
  bit-exactly, a stage with ``ZeroFreezer`` keeping the core bit-identical.

``--tiny`` runs a tiny shape (the CPU check of the script itself: ``bash tests/gpu/run.sh one-gpu --cpu``).
Exits non-zero (AssertionError) when a check fails.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048, rope_theta=500000.0,
                   tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)


def write(out: Path, name: str, data: dict) -> None:
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    print(f"== {name}: {json.dumps(data)}", flush=True)


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_model(shape: dict, dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device(device()):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype)


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def task_data(task: int, rows: int, length: int, vocab: int):
    """Pre-tokenized rows; the two tasks draw from different halves of the vocabulary (different cores)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(task)
    half = vocab // 2
    ids = torch.randint(4, half, (rows, length), generator=g) + (task - 1) * (half - 4)
    return Dataset.from_dict({"input_ids": ids.tolist()})


# ------------------------------------------------------------------------------------------------ select
def phase_select(out: Path, shape: dict) -> None:
    from dpi_hf.core import select_core

    model = build_model(shape, torch.float32)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    del model
    g = torch.Generator(device=device()).manual_seed(0)
    deltas = {n: torch.empty(s, device=device()).normal_(generator=g).abs_() for n, s in shapes.items()}
    elements = sum(t.numel() for t in deltas.values())
    result = {"elements": elements, "device": str(device())}
    for p in (0.01, 0.05):
        sync()
        t0 = time.perf_counter()
        core = select_core(deltas, p)
        result[f"select_s_p{p}"] = round(time.perf_counter() - t0, 3)
        assert core.count() == int(p * elements) or abs(core.count() - p * elements) < 1
        result[f"count_p{p}"] = core.count()
        write(out, "select", result)


# ------------------------------------------------------------------------------------------------ trainer
class StageMeter:
    """Per phase: step times (after 2 warm-up steps), peak GPU memory; in DPI stages, the freeze check."""

    def __init__(self):
        from transformers import TrainerCallback

        meter = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                meter.times, meter.phase = [], args.output_dir
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()

            def on_step_end(self, args, state, control, **kw):
                sync()
                meter.times.append(time.perf_counter())

            def on_train_end(self, args, state, control, **kw):
                # runs before FreezeMaskCallback.on_train_end (added later), while its freezer is attached
                freezer = next((c.freezer for c in meter.handler.callbacks
                                if type(c).__name__ == "FreezeMaskCallback" and c.freezer is not None), None)
                record = {"phase": Path(args.output_dir).name, "steps": len(meter.times),
                          "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0}
                diffs = [b - a for a, b in zip(meter.times[2:], meter.times[3:])]
                record["step_s"] = statistics.median(diffs) if diffs else None
                if freezer is not None:
                    record["frozen_elements"] = freezer.frozen_count
                    record["frozen_identical"] = frozen_identical(freezer)
                meter.records.append(record)

        self.callback = _CB()
        self.records: list[dict] = []
        self.handler = None


def frozen_identical(freezer) -> bool:
    """Every saved frozen value (this rank's shard) equals the parameter now, bit for bit."""
    from dpi_hf.core.freezing import _local

    ok = True
    for record in freezer._records:
        now = _local(record.param).detach()
        now = now.reshape(-1)[record.indices.long()] if record.indices is not None else now
        ok &= torch.equal(now.contiguous().view(torch.int16 if now.element_size() == 2 else torch.int32),
                          record.values.contiguous().view(torch.int16 if now.element_size() == 2 else torch.int32))
    return bool(ok)


def phase_trainer(out: Path, shape: dict, tiny: bool) -> None:
    from trl import SFTConfig, SFTTrainer

    from dpi_hf import DPIConfig, DPITrainer

    length, batch, steps = (32, 2, 6) if tiny else (512, 4, 12)
    tokens = length * batch
    a, b = task_data(1, 64, length, shape["vocab_size"]), task_data(2, 64, length, shape["vocab_size"])
    tok = build_tokenizer()
    common = dict(per_device_train_batch_size=batch, learning_rate=1e-4, logging_steps=1, save_strategy="no",
                  report_to=[], bf16=not tiny, use_cpu=tiny, gradient_checkpointing=False, max_length=length,
                  seed=0, disable_tqdm=True, dataset_num_proc=None)
    summary = {"shape": "tiny" if tiny else "llama-3.2-1b", "tokens_per_step": tokens, "steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        meter = StageMeter()
        sft = SFTTrainer(build_model(shape), args=SFTConfig(output_dir=f"{tmp}/sft", max_steps=steps, **common),
                         train_dataset=b, processing_class=tok, callbacks=[meter.callback])
        meter.handler = sft.callback_handler
        sft.train()
        base = meter.records[-1]
        summary["sft"] = base
        write(out, "trainer", summary)
        del sft
        for p in (0.01, 0.05):
            meter = StageMeter()
            dpi = DPITrainer(build_model(shape), args=DPIConfig(
                output_dir=f"{tmp}/dpi-{p}", max_steps=2 * steps, probe_steps=4, core_fraction=p,
                core_signal="fisher", staging="given", stage_groups=[["a"], ["b"]], freeze_cores=True, probe_reliability="none",
                overlap="raw", **common), train_dataset={"a": a, "b": b}, processing_class=tok,
                callbacks=[meter.callback])
            meter.handler = dpi.callback_handler
            dpi.train()
            stages = [r for r in meter.records if r["phase"].startswith("stage-")]
            assert len(stages) == 2, meter.records
            frozen = stages[1]
            assert frozen.get("frozen_identical") is True, frozen
            assert frozen["frozen_elements"] == dpi.plan.core_counts["a"]
            summary[f"dpi_p{p}"] = {
                "phases": meter.records, "cores": dpi.plan.core_counts,
                "stage2_tokens_per_s_ratio": base["step_s"] / frozen["step_s"] if frozen["step_s"] else None,
                "stage2_step_time_ratio": frozen["step_s"] / base["step_s"] if frozen["step_s"] else None,
                "stage2_peak_ratio": frozen["peak_gib"] / base["peak_gib"] if base["peak_gib"] else None,
                "sharded_cores": type(dpi.cores["a"]).__name__,
            }
            write(out, "trainer", summary)
            del dpi


# ------------------------------------------------------------------------------------------------ zero3
def phase_zero3(out: Path, shape: dict) -> None:
    from accelerate import Accelerator
    from deepspeed.utils import safe_get_full_fp32_param

    from dpi_hf import DPIConfig, DPITrainer
    from dpi_hf.core import restore_parameters, select_core, snapshot_parameters
    from dpi_hf.core.errors import DPIConfigError
    from dpi_hf.core.sharding import ZeroFreezer, check_deepspeed_config, zero3_local_indices

    acc = Accelerator()
    result = {}
    try:  # the multi-task trainer under DeepSpeed: one clear error before any work
        DPITrainer(build_model(TINY), args=DPIConfig(output_dir=tempfile.mkdtemp(), max_steps=4, report_to=[],
                                                   bf16=True, max_length=16),
                   train_dataset={"a": task_data(1, 8, 16, 512), "b": task_data(2, 8, 16, 512)},
                   processing_class=build_tokenizer())
        result["trainer_refusal"] = None
    except DPIConfigError as exc:
        result["trainer_refusal"] = str(exc)
    assert result["trainer_refusal"] and "DeepSpeed" in result["trainer_refusal"]
    write(out, "zero3", result)

    check_deepspeed_config(acc.state.deepspeed_plugin.deepspeed_config)
    model = build_model(shape)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    model, opt = acc.prepare(model, opt)  # the DeepSpeed engine
    theta0 = snapshot_parameters(model)
    vocab = shape["vocab_size"]
    result["engine"] = type(model).__name__

    def steps(n, task, freezer=None):
        times = []
        for i in range(n):
            ids = torch.randint(4, vocab, (4, 512), generator=torch.Generator().manual_seed(task * 100 + i))
            ids = ids.to(acc.device)
            sync()
            t0 = time.perf_counter()
            # the engine loop of ZeroFreezer: backward, zero the frozen gradients, step, write the frozen values back
            model.backward(model(input_ids=ids, labels=ids).loss)
            if freezer is not None:
                freezer.zero_frozen_grads()
            model.step()
            if freezer is not None:
                freezer.restore()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[2:]) if n > 3 else None

    steps(3, 1)
    # |θ − θ0|; with one process θ0's local partition is the whole tensor
    mags = {n: (safe_get_full_fp32_param(p).reshape(-1).cpu() - theta0[n].reshape(-1).cpu()).abs().reshape(p.ds_shape)
            for n, p in model.named_parameters()}
    core = select_core(mags, 0.01)
    del mags
    restore_parameters(model, theta0)
    again = snapshot_parameters(model)
    result["theta0_restored_exact"] = all(torch.equal(again[n], theta0[n]) for n in theta0)
    freezer = ZeroFreezer(model, core)
    result["stage_step_s"] = steps(6, 2, freezer)
    after = snapshot_parameters(model)
    ok = True
    for n, p in model.named_parameters():
        loc, _, _ = zero3_local_indices(core.indices(n), int(p.ds_numel), 1, 0)
        ok &= torch.equal(after[n].reshape(-1)[loc].view(torch.int32), theta0[n].reshape(-1)[loc].view(torch.int32))
    result.update(core=core.count(), frozen_identical=bool(ok))
    write(out, "zero3", result)
    assert result["theta0_restored_exact"] and ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["select", "trainer", "zero3"])
    parser.add_argument("--tiny", action="store_true", help="a tiny shape (the CPU check of this script)")
    args = parser.parse_args()
    out = Path(os.environ.get("OUT") or "gpu-out")
    out.mkdir(parents=True, exist_ok=True)
    shape = TINY if args.tiny else LLAMA_32_1B
    {"select": lambda: phase_select(out, shape), "trainer": lambda: phase_trainer(out, shape, args.tiny),
     "zero3": lambda: phase_zero3(out, shape)}[args.phase]()
