"""Benchmark: exact streaming core selection vs ``torch.topk`` on a concatenation.

Synthetic update magnitudes |normal| with Llama-7B-like shapes (embeddings 32000×4096, then whole decoder layers:
q/k/v/o 4096×4096, gate/up 11008×4096, down 4096×11008, two norms of 4096, and a final norm) are generated tensor by
tensor; generation is not timed. Each (method, p) runs in a fresh subprocess on one thread, so that its peak memory
is its own: extra peak = the RSS high-water mark (``VmHWM``, restarted with ``/proc/self/clear_refs`` just before
the selection) after the selection minus the RSS before it (the deltas themselves are the baseline).
``torch.topk`` runs last because it needs ~10 GiB at 500M elements.

Both methods must select the same number of elements with the same threshold (the smallest selected value).
Targets: <= 5 s and <= 0.5 GiB extra peak memory at >= 500M elements.

    python benchmarks/bench_selection.py                      # >= 500M elements, p = 5% and 1%
    python benchmarks/bench_selection.py --elements 20000000  # a quick run
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

# run from a checkout without installing: the repository root holds the dpi_hf package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("select_core", "topk")


def llama_like_shapes(elements: int) -> list[tuple[str, tuple[int, ...]]]:
    """Llama-7B-like shapes with at least ``elements`` elements in total (dims scaled down for small budgets)."""
    hidden, inter, vocab = 4096, 11008, 32000
    per_layer = 4 * hidden * hidden + 3 * inter * hidden + 2 * hidden
    scale = min(1.0, math.sqrt(elements / (vocab * hidden + per_layer)))
    if scale < 1.0:
        hidden, inter, vocab = (max(64, round(d * scale / 64) * 64) for d in (hidden, inter, vocab))
        per_layer = 4 * hidden * hidden + 3 * inter * hidden + 2 * hidden
    layers = max(1, math.ceil((elements - vocab * hidden - hidden) / per_layer))
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{m}_proj.weight", (hidden, hidden)) for m in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden))]
        shapes += [(p + "mlp.down_proj.weight", (hidden, inter))]
        shapes += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    shapes.append(("model.norm.weight", (hidden,)))
    return shapes


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def _reset_peak_rss() -> bool:
    """Restart the kernel's RSS high-water mark at the current RSS (Linux >= 4.0); False where not allowed.

    Memory freed earlier (the generation's blocks) is first returned to the OS, so that the selection cannot reuse
    it unseen.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker(method: str, fraction: float, elements: int, dtype_name: str) -> dict:
    import torch

    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    deltas = {}
    for name, shape in llama_like_shapes(elements):
        t = torch.empty(shape, dtype=dtype)
        rows = t.view(-1, shape[-1])
        step = max(1, 2**22 // shape[-1])  # blocks of ~4M elements: no full-size float32 transient for bf16/fp16
        for i in range(0, rows.shape[0], step):
            rows[i : i + step] = torch.empty(rows[i : i + step].shape).normal_(generator=g).abs_()
        deltas[name] = t
    n = sum(t.numel() for t in deltas.values())
    k = math.floor(fraction * n)
    if method == "select_core":
        from dpi_hf.core.selection import select_core

        run = lambda: select_core(deltas, fraction)  # noqa: E731
    else:

        def run():
            flat = torch.cat([t.reshape(-1) for t in deltas.values()])
            return torch.topk(flat, k, sorted=False)

    _reset_peak_rss()  # so that the generation of the deltas cannot set the high-water mark
    rss_before, peak_before = _rss_kib(), _peak_rss_kib()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = run()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak_after = _peak_rss_kib()
    # outside the timed region: what was selected
    if method == "select_core":
        count = result.count()
        threshold = min(
            float(deltas[name].reshape(-1)[result.indices(name)].float().min())
            for name in result.names()
            if result.count(name)
        )
    else:
        count = result.values.numel()
        threshold = float(result.values.float().min())
    return {
        "method": method,
        "fraction": fraction,
        "dtype": dtype_name,
        "elements": n,
        "tensors": len(deltas),
        "largest_tensor": max(t.numel() for t in deltas.values()),
        "deltas_gib": sum(t.numel() * t.element_size() for t in deltas.values()) / 2**30,
        "k": k,
        "count": count,
        "threshold": threshold,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "baseline_rss_mib": rss_before / 1024,
        "extra_peak_mib": (peak_after - max(peak_before, rss_before)) / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=500_000_000, help="at least this many elements (500M)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.01], help="core fractions p")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "FRACTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], float(args.worker[1]), args.elements, args.dtype)))
        return 0

    import torch

    print(f"torch {torch.__version__}, 1 thread, dtype {args.dtype}, python {sys.version.split()[0]}")
    results = {}
    # topk last: it needs ~20 bytes per element on top of the deltas
    for method in [m for m in METHODS if m in args.methods]:
        for p in args.fractions:
            cmd = [sys.executable, __file__, "--worker", method, repr(p), "--elements", str(args.elements)]
            out = subprocess.run(cmd + ["--dtype", args.dtype], capture_output=True, text=True)
            if out.returncode:
                print(f"{method} p={p} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                return 1
            results[method, p] = json.loads(out.stdout.strip().splitlines()[-1])

    first = next(iter(results.values()))
    print(
        f"{first['elements']:,} elements in {first['tensors']} tensors (largest {first['largest_tensor']:,}), "
        f"deltas {first['deltas_gib']:.2f} GiB (process RSS before selecting "
        f"{first['baseline_rss_mib'] / 1024:.2f} GiB)"
    )
    header = ("method", "p", "selected", "wall s", "CPU s", "extra peak MiB", "threshold")
    print("{:<12} {:>5} {:>12} {:>7} {:>7} {:>15} {:>12}".format(*header))
    for (method, p), r in results.items():
        print(
            f"{method:<12} {p:>5} {r['count']:>12,} {r['seconds']:>7.2f} {r['cpu_seconds']:>7.2f} "
            f"{r['extra_peak_mib']:>15.0f} {r['threshold']:>12.7g}"
        )
    ok = True
    for p in args.fractions:
        s, t = results.get(("select_core", p)), results.get(("topk", p))
        if s:
            hit = s["seconds"] <= 5 and s["extra_peak_mib"] <= 512
            verdict = "met" if hit else "MISSED"
            if s["elements"] < 500_000_000:
                verdict += " (but the targets are stated for >= 500M elements)"
            print(f"p={p}: select_core targets (<= 5 s wall, <= 512 MiB extra): {verdict}")
        if s and t:
            same = s["count"] == t["count"] == s["k"] and s["threshold"] == t["threshold"]
            ok &= same
            print(
                f"p={p}: topk / select_core: time x{t['seconds'] / s['seconds']:.1f}, extra memory "
                f"x{t['extra_peak_mib'] / max(s['extra_peak_mib'], 1):.1f}; same count and threshold: {same}"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
