"""Benchmark: distributed exact selection on FSDP2-style shards vs the one-process selection.

The synthetic |normal| update magnitudes of ``bench_selection.py`` (Llama-7B-like shapes, 535,842,816 elements at
``--scale 1``) are selected (1) by one process holding every tensor and (2) by ``--nproc`` processes (torchrun,
gloo, CPU) each holding only its ``Shard(0)`` rows of every tensor, wrapped with ``DTensor.from_local``. Generation
is not timed. Per process and p: wall and CPU seconds of ``select_core``, and its extra peak memory (the RSS
high-water mark during the call minus the RSS before it, restarted with ``/proc/self/clear_refs``). The sharded
``select_core`` returns each rank's part of the core (a ``ShardedCoreMask``); after the measurement, outside it, the
parts are gathered on rank 0 (``mask.gather()``), which must equal the one-process core (a SHA-256 of every selected
index), and the ranks' local counts must add up to the core size.

Targets: each rank's extra peak <= 0.6x the one-process figure at 2 ranks and <= 0.35x at 4 ranks; wall time
<= 1.5x.

    python benchmarks/bench_sharded_selection.py --nproc 2 4    # 535M elements, 2 and 4 ranks, p = 1% and 5%
    python benchmarks/bench_sharded_selection.py --scale 0.1    # a ~54M-element quick run, 2 ranks
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_selection import _peak_rss_kib, _reset_peak_rss, _rss_kib, llama_like_shapes  # noqa: E402

FULL_ELEMENTS = 500_000_000
TARGETS = {2: 0.6, 4: 0.35}  # extra peak per rank / one-process extra peak  # bench_selection's default: 535,842,816 elements once rounded to whole layers


def generate(elements: int, rank: int, world: int):
    """name → this rank's rows of every synthetic tensor (all of them when world == 1), plus global shapes."""
    import torch

    g = torch.Generator().manual_seed(0)
    out = {}
    for name, shape in llama_like_shapes(elements):
        full = torch.empty(shape).normal_(generator=g).abs_()
        out[name] = full if world == 1 else torch.chunk(full, world, dim=0)[rank].clone()
        del full
    return out


def digest(mask) -> str:
    h = hashlib.sha256()
    for n in mask.names():
        h.update(n.encode())
        h.update(mask.indices(n).long().numpy().tobytes())
    return h.hexdigest()


def measure(run):
    _reset_peak_rss()
    rss_before, peak_before = _rss_kib(), _peak_rss_kib()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = run()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    extra = (_peak_rss_kib() - max(peak_before, rss_before)) / 1024
    return result, {"seconds": seconds, "cpu_seconds": cpu, "extra_peak_mib": extra, "rss_before_mib": rss_before / 1024}


def worker(elements: int, fractions: list[float], out: str) -> None:
    import torch

    torch.set_num_threads(1)
    from dpi_hf.core import select_core

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        mesh = init_device_mesh("cpu", (world,))
        shapes = dict(llama_like_shapes(elements))
        local = generate(elements, rank, world)
        deltas = {n: DTensor.from_local(t, mesh, [Shard(0)], run_check=False, shape=torch.Size(shapes[n]),
                                        stride=_contiguous_stride(shapes[n]))
                  for n, t in local.items()}
        dist.barrier()
    else:
        rank = 0
        deltas = generate(elements, 0, 1)
    # warm-up on a small copy of the same path (DTensors and gloo, or plain tensors): the first call pages in library
    # code and sets up the process group's buffers, which is not the selection's working memory
    warm = {n: (DTensor.from_local(t.to_local()[:1].clone(), mesh, [Shard(0)], run_check=False) if world > 1
                else t[:1].clone()) for n, t in list(deltas.items())[:3]}
    select_core(warm, 0.5)
    del warm
    rows = []
    for p in fractions:
        if world > 1:
            dist.barrier()  # start together: the selection's collectives would otherwise time the slower rank's start
        mask, stats = measure(lambda: select_core(deltas, p))
        full = mask.gather() if world > 1 else mask  # not measured: the global mask, on rank 0 only
        stats.update(p=p, rank=rank, world=world, count=mask.count(),
                     local_count=mask.local_count() if world > 1 else mask.count(),
                     digest=digest(full) if full is not None else None,
                     elements=sum(math_prod(s) for _, s in llama_like_shapes(elements)),
                     local_elements=sum(t.numel() if world == 1 else t.to_local().numel() for t in deltas.values()))
        rows.append(stats)
        del mask, full
    Path(f"{out}.{world}.{rank}").write_text(json.dumps(rows))
    if world > 1:
        dist.destroy_process_group()


def _contiguous_stride(shape):
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))


def math_prod(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the 535M-element model (default 1)")
    parser.add_argument("--nproc", type=int, nargs="+", default=[2], help="ranks of the sharded runs (default 2)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05], help="core fractions p")
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--elements", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.elements, args.fractions, args.worker)
        return 0
    elements = max(1, int(FULL_ELEMENTS * args.scale))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--elements", str(elements), "--fractions", *map(str, args.fractions)]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "r")
        subprocess.run([sys.executable, __file__, "--worker", out, *common], env=env, check=True)
        for nproc in args.nproc:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                            "--master_addr", "127.0.0.1", "--master_port", str(port), __file__, "--worker", out,
                            *common], env=env, check=True)
        single = json.loads(Path(f"{out}.1.0").read_text())
        runs = {n: [json.loads(Path(f"{out}.{n}.{r}").read_text()) for r in range(n)] for n in args.nproc}
    import torch

    print(f"torch {torch.__version__}, 1 thread per process, {single[0]['elements']:,} elements, "
          f"{' and '.join(map(str, args.nproc))} ranks (torchrun, gloo)")
    print(f"{'p':>5} {'run':>12} {'local elements':>15} {'wall s':>7} {'CPU s':>7} {'extra peak MiB':>15} "
          f"{'core held':>11}  gathered = 1 proc")
    ok = True
    for i, p in enumerate(args.fractions):
        s = single[i]
        print(f"{p:>5} {'1 proc':>12} {s['local_elements']:>15,} {s['seconds']:>7.2f} {s['cpu_seconds']:>7.2f} "
              f"{s['extra_peak_mib']:>15.0f} {s['count']:>11,}")
        for nproc, ranks in runs.items():
            for r in ranks:
                x = r[i]
                same = x["digest"] == s["digest"] if x["rank"] == 0 else x["digest"] is None
                ok &= same and x["count"] == s["count"]
                run = f"rank {x['rank']} of {nproc}"
                print(f"{p:>5} {run:>12} "
                      f"{x['local_elements']:>15,} {x['seconds']:>7.2f} {x['cpu_seconds']:>7.2f} "
                      f"{x['extra_peak_mib']:>15.0f} {x['local_count']:>11,}  {same if x['rank'] == 0 else '-'}")
            ok &= sum(r[i]["local_count"] for r in ranks) == s["count"]
            target = TARGETS.get(nproc)
            worst_mem = max(r[i]["extra_peak_mib"] for r in ranks) / max(s["extra_peak_mib"], 1e-9)
            worst_time = max(r[i]["seconds"] for r in ranks) / s["seconds"]
            worst_cpu = max(r[i]["cpu_seconds"] for r in ranks) / s["cpu_seconds"]
            print(f"p={p}, {nproc} ranks: worst rank / 1 proc: extra peak x{worst_mem:.2f}"
                  f"{f' (target <= {target})' if target else ''}, wall x{worst_time:.2f} (target <= 1.5), "
                  f"CPU x{worst_cpu:.2f}")
    print("gathered core equals the one-process core, local counts add up:", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
