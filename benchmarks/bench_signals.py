"""Overhead of the gradient importance signals (Σ g², |Σ g|) on a probe step, ~58M-parameter random Llama, 1 thread.

A probe step (forward + backward + AdamW step + zero_grad, fixed batch) is timed with and without one
``ImportanceAccumulator.accumulate()`` call before the optimizer step (where ``CoreProbeCallback`` calls it), in
alternating blocks (ABBA) inside one process, after a warm-up. Reported: the median step time of each mode, their
ratio, and the CPU time spent inside ``accumulate()`` as a share of a plain step (the direct measure, which the noise of
a shared machine disturbs less). Also the accumulator's memory in bytes per parameter.

    python benchmarks/bench_signals.py                    # defaults: fisher, batch 4 x 128, 10 rounds x 2 steps
    python benchmarks/bench_signals.py --signal gradsum
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_freezer import build_model
from dpi_hf.core.signals import GRADIENT_SIGNALS, ImportanceAccumulator


def step(model, optimizer, input_ids, accumulator=None) -> tuple[float, float, float]:
    """One probe step; returns (wall s, thread CPU s, thread CPU s inside accumulate())."""
    t0, c0 = time.perf_counter(), time.thread_time()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    inside = 0.0
    if accumulator is not None:
        a = time.thread_time()
        accumulator.accumulate()
        inside = time.thread_time() - a
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, time.thread_time() - c0, inside


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--signal", choices=GRADIENT_SIGNALS, default="fisher")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=2, help="steps per block")
    ns = ap.parse_args()
    torch.set_num_threads(1)
    model = build_model(0)
    n = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    ids = torch.randint(0, model.config.vocab_size, (ns.batch, ns.seq), generator=torch.Generator().manual_seed(1))
    acc = ImportanceAccumulator(model, ns.signal)
    for _ in range(2):  # warm-up, both modes
        step(model, optimizer, ids)
        step(model, optimizer, ids, acc)
    plain, signal, inside = [], [], []
    for r in range(ns.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        for with_signal in order:
            for _ in range(ns.steps):
                w, c, i = step(model, optimizer, ids, acc if with_signal else None)
                (signal if with_signal else plain).append(c)
                if with_signal:
                    inside.append(i)
    p, s, i = statistics.median(plain), statistics.median(signal), statistics.median(inside)
    print(f"{n / 1e6:.1f}M parameters, batch {ns.batch}x{ns.seq}, signal {ns.signal}, 1 thread, "
          f"{ns.rounds} rounds x {ns.steps} steps (ABBA)")
    print(f"median CPU s/step: plain {p:.3f}, with accumulator {s:.3f}, ratio {s / p:.3f}")
    print(f"inside accumulate(): {1000 * i:.1f} ms = {100 * i / p:.2f}% of a plain step")
    print(f"accumulator memory: {acc.nbytes / n:.1f} bytes per parameter ({acc.nbytes / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
