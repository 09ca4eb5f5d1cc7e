"""Distributed exact selection on DTensors vs the one-process selection, launched with torchrun (2 processes, gloo).

Every rank builds the same random full tensors (uneven row counts, empty shards, heavy ties, -0.0), shards them
``Shard(0)`` with ``DTensor.from_local`` and runs ``select_core`` on the shards; the result must equal the
one-process ``select_core`` on the full tensors, element for element, for both scopes and every selection path:
each rank's ShardedCoreMask holds exactly the expected elements of its own rows (with the global counts), and its
gather() on rank 0 is the one-process mask. Writes OUT.<rank> with {"cases": n, "digest": ..., "errors": {...}}.
"""

import hashlib
import json
import sys
from unittest import mock

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from dpi_hf.core import selection
from dpi_hf.core.errors import DPIConfigError, ProbeDivergedError
from dpi_hf.core.selection import select_core
from dpi_hf.core.sharded_mask import ShardedCoreMask


def full_tensors(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (1, 9), (3,), (2, 3, 4), (11, 2), (5,), (4, 4)]  # rank 1 holds no row of (1, 9)
    out = {}
    for i, shape in enumerate(shapes):
        if i % 3 == 0:  # heavy ties: a handful of distinct values, exact zeros and -0.0 among them
            t = torch.randint(0, 4, shape, generator=g).float() * 0.5
            t.view(-1)[:: 5] = -0.0
        else:
            t = torch.rand(shape, generator=g)
        out[f"layer{i}.weight"] = t.to(dtype)
    out["tied.everywhere"] = torch.full((6, 3), 0.5, dtype=dtype)  # one value for all: ties across both ranks
    return out


def shard(full, mesh):
    rank, world = mesh.get_coordinate()[0], mesh.size(0)
    out = {}
    for name, t in full.items():
        chunks = list(torch.chunk(t, world, dim=0))
        local = chunks[rank] if rank < len(chunks) else t[:0]
        out[name] = DTensor.from_local(local.clone(), mesh, [Shard(0)], run_check=False, shape=t.shape,
                                       stride=t.stride())
    return out


def digest(mask):
    h = hashlib.sha256()
    for n in mask.names():
        h.update(n.encode())
        h.update(bytes(str(mask.shape(n)), "utf8"))
        h.update(mask.indices(n).numpy().tobytes())
    return h.hexdigest()


def same(a, b):
    assert a.names() == b.names(), (a.names(), b.names())
    for n in a.names():
        assert a.shape(n) == b.shape(n), n
        assert torch.equal(a.indices(n).long(), b.indices(n).long()), n


def same_sharded(got, expected):
    """``got`` (this rank's ShardedCoreMask) holds exactly ``expected``'s elements in its rows, knows the global
    counts, and gathers to ``expected`` on rank 0 (None elsewhere)."""
    assert isinstance(got, ShardedCoreMask), type(got)
    assert got.names() == expected.names()
    assert got.count() == expected.count()
    local = 0
    for n in got.names():
        assert got.shape(n) == expected.shape(n) and got.count(n) == expected.count(n), n
        lo, hi = got.local_range(n)
        idx = expected.indices(n)
        mine = idx[(idx >= lo) & (idx < hi)]
        assert torch.equal(got.indices(n), mine), n
        local += mine.numel()
    assert got.local_count() == local
    gathered = got.gather()
    if dist.get_rank() == 0:
        same(gathered, expected)
    else:
        assert gathered is None


def main(out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    cases, digests = 0, []
    for seed in range(3):
        for dtype in (torch.float32, torch.bfloat16):
            full = full_tensors(seed, dtype)
            sharded = shard(full, mesh)
            for scope in ("global", "per_tensor"):
                for p in (0.05, 0.3, 0.5, 1.0):
                    # default path, chunk edges everywhere, and the three-pass path (threshold bin never kept)
                    for chunk, limit in ((selection._CHUNK, selection._MAX_BOUNDARY), (3, selection._MAX_BOUNDARY),
                                         (4, 0)):
                        with mock.patch.object(selection, "_CHUNK", chunk), \
                                mock.patch.object(selection, "_MAX_BOUNDARY", limit):
                            expected = select_core(full, p, scope=scope)
                            got = select_core(sharded, p, scope=scope)
                            same_sharded(got, expected)
                            # include/exclude and a one-shot generator take the same path
                            gen = ((n, v) for n, v in sharded.items())
                            same_sharded(select_core(gen, p, scope=scope, exclude=["layer3"]),
                                 select_core(full, p, scope=scope, exclude=["layer3"]))
                            digests.append(digest(expected))
                            cases += 2
    # a plain tensor among DTensors is replicated: counted once
    full = full_tensors(7)
    mixed = shard(full, mesh)
    mixed["layer2.weight"] = full["layer2.weight"]
    got, expected = select_core(mixed, 0.3), select_core(full, 0.3)
    same_sharded(got, expected)
    # the replicated tensor's whole selection is on every rank (each rank holds that tensor whole)
    assert torch.equal(got.indices("layer2.weight"), expected.indices("layer2.weight"))
    cases += 1

    errors = {}
    # NaN on one rank only: every rank raises instead of hanging
    bad = shard(full_tensors(1), mesh)
    if rank == 1:
        bad["layer4.weight"].to_local()[0, 0] = float("nan")
    for scope in ("global", "per_tensor"):
        try:
            select_core(bad, 0.1, scope=scope)
        except ProbeDivergedError as exc:
            errors[f"nan_{scope}"] = str(exc)
    # different tensors on the ranks
    diff = shard(full_tensors(1), mesh)
    if rank == 0:
        diff.pop("layer5.weight")
    try:
        select_core(diff, 0.1)
    except DPIConfigError as exc:
        errors["different"] = str(exc)
    # unsupported placements: Shard(1) (tensor parallel), Replicate, a 2-D mesh
    t = torch.rand(4, 6)
    for key, value in [("shard1", distribute_tensor(t, mesh, [Shard(1)])),
                       ("replicate", distribute_tensor(t, mesh, [Replicate()])),
                       ("mesh2d", distribute_tensor(t, init_device_mesh("cpu", (1, 2)), [Replicate(), Shard(0)]))]:
        try:
            select_core({"w": value}, 0.5)
        except DPIConfigError as exc:
            errors[key] = str(exc)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"cases": cases, "digest": hashlib.sha256("".join(digests).encode()).hexdigest(),
                   "errors": errors}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
