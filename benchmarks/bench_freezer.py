"""Overhead and memory of exact freezing (ParameterFreezer) on a ~58M-parameter random Llama, one CPU thread.

A full train step (forward + backward + clip_grad_norm_ + AdamW step + zero_grad) on a fixed batch is timed with
the freezer attached and detached, in alternating blocks inside the same process (ABBA order, so that slow drifts
of a shared machine hit both modes alike), after a warm-up. Reported, as CPU time of the stepping thread and as wall
time: the median step time of each mode, their ratio, and the median of the per-round ratios; also the CPU time spent
inside the freezer (gradient zeroing + restore) during attached steps, in milliseconds and as a share of the detached
step — a direct measure that the noise of a shared machine disturbs less than a ratio of step times — and the
freezer's memory in bits per model parameter.

With ``--kernels`` it instead compares the candidate write kernels on the same model and mask (each pass writes every
frozen element of every parameter once, caches flushed before each pass, as after an optimizer step): int32 indices
with ``index_put_``, int64 indices with ``index_copy_``/``index_fill_``, and int32 indices widened per call.

    python benchmarks/bench_freezer.py                       # defaults: 3% frozen, batch 4 x 128, 12 rounds x 2 steps
    python benchmarks/bench_freezer.py --json out.json       # also write the figures as JSON
    python benchmarks/bench_freezer.py --kernels             # the write-kernel comparison
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dpi_hf.core import CoreMask, ParameterFreezer


def build_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def random_mask(model: torch.nn.Module, fraction: float, seed: int) -> CoreMask:
    """``round(fraction * numel)`` elements of every parameter, uniformly at random."""
    g = torch.Generator().manual_seed(seed)
    indices, shapes = {}, {}
    for name, p in model.named_parameters():
        shapes[name] = p.shape
        indices[name] = torch.randperm(p.numel(), generator=g)[: round(fraction * p.numel())]
    return CoreMask.from_indices(indices, shapes, encoding="indices")


def timed_step(model, optimizer, input_ids) -> tuple[float, float]:
    """One train step; returns (wall seconds, CPU seconds of this thread).

    With one torch thread the whole step (CPU autograd included) runs on the calling thread, so its CPU time is the
    step's cost without the time-slicing noise of a shared machine; wall time is reported alongside.
    """
    wall, cpu = time.perf_counter(), time.thread_time()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.thread_time() - cpu


def compare_kernels(model: torch.nn.Module, mask: CoreMask, repeats: int = 12) -> dict[str, float]:
    """Median CPU milliseconds of one pass writing every frozen element, per kernel and index dtype."""
    params = dict(model.named_parameters())
    flats = [params[n].detach().view(-1) for n in mask.names()]
    i64 = [mask.indices(n) for n in mask.names()]
    i32 = [i.to(torch.int32) for i in i64]
    values = [f[i] for f, i in zip(flats, i64)]
    zero = torch.zeros(())
    kernels = {
        "index_put_ int32 (values)": lambda: [f.index_put_((i,), v) for f, i, v in zip(flats, i32, values)],
        "index_put_ int32 (zero)": lambda: [f.index_put_((i,), zero) for f, i in zip(flats, i32)],
        "index_copy_ int64 stored": lambda: [f.index_copy_(0, i, v) for f, i, v in zip(flats, i64, values)],
        "index_fill_ int64 stored": lambda: [f.index_fill_(0, i, 0.0) for f, i in zip(flats, i64)],
        "index_copy_ int32 widened per call": lambda: [
            f.index_copy_(0, i.long(), v) for f, i, v in zip(flats, i32, values)
        ],
        "index_fill_ int32 widened per call": lambda: [f.index_fill_(0, i.long(), 0.0) for f, i in zip(flats, i32)],
    }
    # larger than the last-level cache, so every pass starts cold as it does right after an optimizer step
    flush_src = torch.ones(80_000_000)
    flush_dst = torch.empty_like(flush_src)
    times = {name: [] for name in kernels}
    for _ in range(repeats):
        for name, kernel in kernels.items():  # interleaved, so drifts of a shared machine hit all kernels alike
            flush_dst.copy_(flush_src)
            start = time.thread_time()
            kernel()
            times[name].append(time.thread_time() - start)
    return {name: 1e3 * statistics.median(t[2:]) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.03, help="frozen fraction of every tensor (default 0.03)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--rounds", type=int, default=12, help="ABBA rounds (default 12)")
    parser.add_argument("--steps", type=int, default=2, help="steps per block (default 2)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps per mode (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the mask and the batch (default 0)")
    parser.add_argument("--json", help="write the figures to this JSON file as well")
    parser.add_argument("--kernels", action="store_true", help="compare the write kernels instead of timing steps")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = build_model(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    mask = random_mask(model, args.fraction, args.seed + 1)
    if args.kernels:
        print(f"{mask.count():,} frozen elements in {len(mask)} tensors; median CPU ms per pass:")
        for name, ms in compare_kernels(model, mask).items():
            print(f"{name:36s} {ms:7.1f}")
        return
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    g = torch.Generator().manual_seed(args.seed + 2)
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
    freezer = ParameterFreezer(model, mask)

    # CPU time spent inside the freezer during a step: its gradient hooks call self._zero and its step hook calls
    # self.restore; both are looked up on the instance, so timing wrappers set as instance attributes see every call
    inside = [0.0]

    def timed(fn):
        def wrapper(*a, **kw):
            start = time.thread_time()
            fn(*a, **kw)
            inside[0] += time.thread_time() - start

        return wrapper

    freezer.restore = timed(freezer.restore)
    freezer._zero = timed(ParameterFreezer._zero)

    def block(attached: bool, n: int) -> tuple[list[tuple[float, float]], list[float]]:
        """``n`` steps with the freezer attached or not: (wall, cpu) per step, and freezer CPU time per step."""
        if attached:
            freezer.attach(optimizer)
        times, own = [], []
        for _ in range(n):
            inside[0] = 0.0
            times.append(timed_step(model, optimizer, input_ids))
            own.append(inside[0])
        if attached:
            nbytes[0] = freezer.nbytes
            freezer.detach()
        return times, own

    nbytes = [0]
    block(False, args.warmup)
    block(True, args.warmup)
    samples = {True: [], False: []}
    freezer_cpu = []
    round_ratios = {"wall": [], "cpu": []}
    for r in range(args.rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        times = {}
        for mode in order:
            times[mode], own = block(mode, args.steps)
            samples[mode] += times[mode]
            if mode:
                freezer_cpu += own
        for k, kind in enumerate(("wall", "cpu")):
            on = statistics.median(t[k] for t in times[True])
            off = statistics.median(t[k] for t in times[False])
            round_ratios[kind].append(on / off)

    def median_of(mode: bool, k: int) -> float:
        return statistics.median(t[k] for t in samples[mode])

    result = {
        "params": n_params,
        "frozen": mask.count(),
        "frozen_fraction": mask.count() / n_params,
        "batch": [args.batch, args.seq],
        "threads": args.threads,
        "steps_per_mode": len(samples[True]),
        "median_step_cpu_s_attached": median_of(True, 1),
        "median_step_cpu_s_detached": median_of(False, 1),
        "cpu_ratio_of_medians": median_of(True, 1) / median_of(False, 1),
        "cpu_median_round_ratio": statistics.median(round_ratios["cpu"]),
        "median_step_wall_s_attached": median_of(True, 0),
        "median_step_wall_s_detached": median_of(False, 0),
        "wall_ratio_of_medians": median_of(True, 0) / median_of(False, 0),
        "wall_median_round_ratio": statistics.median(round_ratios["wall"]),
        "cpu_round_ratios": [round(x, 4) for x in round_ratios["cpu"]],
        "freezer_cpu_ms_in_step": 1e3 * statistics.median(freezer_cpu),
        "freezer_share_of_detached_step": statistics.median(freezer_cpu) / median_of(False, 1),
        "freezer_nbytes": nbytes[0],
        "freezer_bits_per_param": nbytes[0] * 8 / n_params,
        "torch": torch.__version__,
    }
    for key, value in result.items():
        print(f"{key:34s} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
