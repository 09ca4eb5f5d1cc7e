"""Exact top-p selection over tensors sharded across processes (DTensors ``Shard(0)`` on a 1-D device mesh).

The same radix select as :mod:`dpi_hf.core.selection`, run on each rank's local shards, with the counts made global
by collectives over the mesh's process group:

1. pass 1: each rank builds the 65,536-bin histogram of the high 16 bits of its shards; one all-reduce (SUM) makes
   it global, and carries an error flag and a fingerprint of the tensor names and shapes, so that a rank that hits
   NaN/inf or reads different tensors makes every rank raise the same error instead of hanging;
2. pass 2: each rank keeps its elements in and above the threshold bin; the low-16-bit histogram of the threshold
   bin is all-reduced, which fixes the exact threshold value ``T`` and how many elements equal to ``T`` are taken;
   (a threshold bin larger than ``_MAX_BOUNDARY`` elements takes a third pass that collects instead of keeping);
3. ties at ``T``: the ranks exchange how many elements equal to ``T`` each holds per tensor (a world × tensors
   matrix) and take them in the one-process order — earlier tensor first, then smaller global flat index. Rank
   ``r``'s shard of a tensor holds the flat indices ``[offset_r, offset_r + n_r)`` and the offsets grow with ``r``,
   so global order within a tensor is (rank, local index);
4. the selected global indices are all-gathered, so every rank returns the same :class:`CoreMask` in global
   indices and global shapes — the elements one process selects from the gathered tensors.

No rank ever holds more than its shards plus the selection: the collectives move 65,536-bin histograms, a
world × tensors count matrix and the selected indices. A plain (non-DTensor) tensor among DTensors is taken to be
the same on every rank (replicated, like a DDP parameter) and is read on mesh coordinate 0 only.

Collectives run on the mesh's process group, on the mesh's device type (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from .errors import DPIConfigError, ProbeDivergedError
from .masks import CoreMask
from .sharding import dtensor_layout, is_dtensor
from .selection import (
    _BINS,
    _MAX_BOUNDARY,
    _bincount,
    _bit_chunks,
    _boundary,
    _check_size,
    _core_size,
    _first_eq_only,
    _histogram,
    _index_dtype,
    _Info,
    _to_entry,
)
from .masks import _Entry

# fingerprint hashes are kept below 2**20 so that the sum of their squares over any world size fits in int64
_HASH_MASK = (1 << 20) - 1


class _Comm:
    """The mesh's process group, this rank's coordinate on it, and the collectives the selection needs."""

    def __init__(self, mesh):
        import torch.distributed as dist

        self.dist = dist
        self.mesh = mesh
        self.group = mesh.get_group(0)
        self.size = mesh.size(0)
        self.coord = mesh.get_coordinate()[0]
        if mesh.device_type == "cpu":
            self.device = torch.device("cpu")
        else:  # NCCL and friends reduce device tensors only
            module = getattr(torch, mesh.device_type)
            self.device = torch.device(mesh.device_type, module.current_device())

    def sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise int64 sum over the ranks."""
        t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)).to(self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM, group=self.group)
        return t.cpu().numpy()

    def rows(self, row: np.ndarray) -> np.ndarray:
        """``[size, len(row)]``: every rank's ``row``, indexed by mesh coordinate."""
        m = np.zeros((self.size, row.size), dtype=np.int64)
        m[self.coord] = row
        return self.sum(m.reshape(-1)).reshape(self.size, row.size)

    def gather(self, values: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
        """Every rank's ``values`` (``counts[r]`` of them on rank r, same dtype everywhere), by mesh coordinate."""
        longest = int(counts.max()) if counts.size else 0
        buf = torch.zeros(longest, dtype=torch.from_numpy(values[:0]).dtype)
        buf[: values.size] = torch.from_numpy(values)
        buf = buf.to(self.device)
        out = [torch.empty_like(buf) for _ in range(self.size)]
        self.dist.all_gather(out, buf, group=self.group)
        return [o[: int(c)].cpu().numpy() for o, c in zip(out, counts)]

    def raise_if_failed(self, failed: bool, error: Exception | None) -> None:
        """Raise the same error on every rank when any rank failed (the lowest failing coordinate's message)."""
        objects = [None] * self.size
        mine = None if error is None else (type(error).__name__, str(error))
        self.dist.all_gather_object(objects, mine, group=self.group)
        for coord, item in enumerate(objects):
            if item is not None:
                if error is not None and coord == self.coord:
                    raise error
                cls = ProbeDivergedError if item[0] == "ProbeDivergedError" else DPIConfigError
                raise cls(f"rank {coord}: {item[1]}")


@dataclass
class _Part:
    """One considered tensor: its global identity and this rank's shard of it."""

    name: str
    shape: tuple[int, ...]  # global
    numel: int  # global
    offset: int  # global flat index of the local shard's element 0
    info: _Info | None = None  # pass 1 on the local shard


def is_sharded(t) -> bool:
    """Whether ``select_core`` takes the distributed path for this value (a DTensor)."""
    return is_dtensor(t)


class _Resolver:
    """Turns values read from ``deltas`` into (local tensor, global offset), checking one common mesh."""

    def __init__(self):
        self.mesh = None
        self.comm: _Comm | None = None

    def __call__(self, name: str, t: torch.Tensor) -> tuple[torch.Tensor, int, tuple[int, ...]]:
        if is_dtensor(t):
            layout = dtensor_layout(name, t)
            if self.mesh is None:
                self.mesh, self.comm = t.device_mesh, _Comm(t.device_mesh)
            elif t.device_mesh != self.mesh:
                raise DPIConfigError(
                    f"deltas[{name!r}] lives on another device mesh than the first DTensor; shard every parameter "
                    "over the same mesh (one fully_shard mesh for the whole model)."
                )
            return t.to_local(), layout.offset, layout.shape
        # a plain tensor among DTensors: the same on every rank, so only coordinate 0 counts it
        shape = tuple(t.shape)
        if self.comm.coord == 0:
            return t, 0, shape
        return t.detach().reshape(-1)[:0], 0, shape


def select_sharded(
    first_pass: Iterator[tuple[str, torch.Tensor]],
    iterate: Callable[[set[str] | None], Iterator[tuple[str, torch.Tensor]]],
    fraction: Fraction,
    scope: str,
    chunk: int,
    no_tensor_error: Callable[[], Exception],
) -> CoreMask:
    """The distributed counterpart of ``select_core``'s body; called by it when the first value is a DTensor.

    Args:
        first_pass: the first read of the considered (name, value) pairs (its first value is a DTensor).
        iterate: reads the considered pairs again (only ``wanted`` names when given), once per later pass.
        fraction: p, validated.
        scope: ``"global"`` or ``"per_tensor"``.
        chunk: elements per chunk.
        no_tensor_error: builds the error for "nothing considered".
    """
    resolve = _Resolver()
    if scope == "per_tensor":
        return _per_tensor(first_pass, resolve, fraction, chunk)
    parts: list[_Part] = []
    hist = np.zeros(_BINS, dtype=np.int64)
    error = None
    try:
        for name, t in first_pass:
            local, offset, shape = resolve(name, t)
            h, info = _histogram(name, local, chunk)
            hist += h
            parts.append(_Part(name, shape, math.prod(shape), offset, info))
    except DPIConfigError as exc:  # ProbeDivergedError included; re-raised below on every rank together
        error = exc
    comm = resolve.comm
    if comm is None:  # the first DTensor itself was refused (e.g. a 2-D mesh): the same on every rank
        raise error if error is not None else no_tensor_error()
    hist = _sum_checked(comm, hist, parts, error)
    sizes = [p.numel for p in parts]
    _check_size(sizes, fraction, scope)
    k = _core_size(sum(sizes), fraction)
    selected = _select(iterate, resolve, parts, hist, k, chunk, comm)
    return _gather_mask(comm, parts, selected)


def _fingerprint(parts: list[_Part]) -> int:
    text = ";".join(f"{p.name}:{p.shape}" for p in parts)
    return zlib.crc32(text.encode()) & _HASH_MASK


def _sum_checked(comm: _Comm, hist: np.ndarray, parts: list[_Part], error: Exception | None) -> np.ndarray:
    """All-reduce a histogram together with an error flag and the fingerprint of ``parts``; raise on any mismatch."""
    h = _fingerprint(parts)
    total = comm.sum(np.concatenate([hist, [int(error is not None), h, h * h]]))
    if total[_BINS]:
        comm.raise_if_failed(True, error)
    s1, s2 = int(total[_BINS + 1]), int(total[_BINS + 2])
    if comm.size * s2 != s1 * s1:  # equality in Cauchy–Schwarz: every rank hashed the same names and shapes
        raise DPIConfigError(
            "the ranks passed different tensors (names, order or global shapes) to select_core; pass the same "
            "considered parameters, in the same order, on every rank."
        )
    return total[:_BINS]


def _per_tensor(pairs, resolve: _Resolver, fraction: Fraction, chunk: int) -> CoreMask:
    parts, selected = [], []
    for name, t in pairs:
        error = None
        try:
            local, offset, shape = resolve(name, t)
            hist, info = _histogram(name, local, chunk)
        except DPIConfigError as exc:
            if resolve.comm is None:  # no mesh known yet: this cannot be coordinated, and no rank waits
                raise
            error, hist, info, shape, offset = exc, np.zeros(_BINS, dtype=np.int64), None, tuple(t.shape), 0
        part = _Part(name, shape, math.prod(shape), offset, info)
        hist = _sum_checked(resolve.comm, hist, [part], error)
        parts.append(part)
        k = _core_size(part.numel, fraction)
        if k:
            one = lambda wanted, _n=name, _t=t: iter([(_n, _t)])  # noqa: E731
            selected.append(_select(one, resolve, [part], hist, k, chunk, resolve.comm)[0])
        else:
            selected.append(np.empty(0, dtype=np.int64))
    _check_size([p.numel for p in parts], fraction, "per_tensor")
    return _gather_mask(resolve.comm, parts, selected)


def _select(iterate, resolve, parts, hist, k, chunk, comm) -> list[np.ndarray]:
    """Passes 2 (and 3): this rank's selected GLOBAL flat indices (sorted; int32 below 2**31 elements) per part."""
    b, above = _boundary(hist, k)
    need = k - above
    lo, hi = b << 16, (b + 1) << 16
    position = {p.name: i for i, p in enumerate(parts)}
    wanted = {p.name for p in parts if p.info.top_bin >= b}
    if hist[b] <= _MAX_BOUNDARY:
        local = _kept(iterate, resolve, parts, position, wanted, lo, hi, need, chunk, comm)
    else:
        local = _three_passes(iterate, resolve, parts, position, wanted, lo, hi, need, chunk, comm)
    return local


def _local_pairs(iterate, resolve, wanted) -> Iterator[tuple[str, torch.Tensor]]:
    for name, t in iterate(wanted):
        yield name, resolve(name, t)[0]


def _quotas(comm: _Comm, counts: np.ndarray, take: int) -> np.ndarray:
    """How many of this rank's elements equal to the threshold to take, per tensor, in the one-process order.

    ``counts[i]``: this rank's elements equal to the threshold in tensor ``i``; ``take``: how many are needed over
    all ranks. The global order is tensor-major, then mesh coordinate (shards hold increasing flat ranges).
    """
    matrix = comm.rows(counts)  # [coordinate, tensor]
    order = matrix.T.reshape(-1)  # tensor-major, then coordinate
    before = (np.cumsum(order) - order).reshape(matrix.shape[1], matrix.shape[0]).T  # exclusive prefix
    return np.clip(take - before[comm.coord], 0, counts)


def _kept(iterate, resolve, parts, position, wanted, lo, hi, need, chunk, comm) -> list[np.ndarray]:
    # Pass 2 keeps this rank's elements >= lo, and for those inside bin b their position and low 16 bits.
    kept: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for name, t in _local_pairs(iterate, resolve, wanted):
        i = position[name]
        idx_parts, pos_parts, low_parts, count = [], [], [], 0
        n = t.numel()
        ge = np.empty(min(chunk, n), dtype=bool)
        for start, bits in _bit_chunks(t, parts[i].info.neg_zero, chunk):
            at = np.flatnonzero(np.greater_equal(bits, lo, out=ge[: bits.size]))
            if not at.size:
                continue
            values = bits[at]
            in_bin = np.flatnonzero(values < hi)
            at += start + parts[i].offset  # global flat indices, stored as compactly as the 1-process path
            idx_parts.append(at.astype(_index_dtype(parts[i].numel), copy=False))
            if in_bin.size:
                pos_parts.append(in_bin + count)
                low_parts.append(values[in_bin] & 0xFFFF)
            count += at.size
        if idx_parts:
            kept[i] = (np.concatenate(idx_parts), _cat(pos_parts, np.int64), _cat(low_parts, np.int32))
    low_hist = np.zeros(_BINS, dtype=np.int64)
    for _, _, low in kept.values():
        low_hist += _bincount(low)
    t_lo, above = _boundary(comm.sum(low_hist), need)
    counts = np.zeros(len(parts), dtype=np.int64)
    for i, (_, _, low) in kept.items():
        counts[i] = np.count_nonzero(low == t_lo)
    quota = _quotas(comm, counts, need - above)
    out = []
    for i in range(len(parts)):
        if i not in kept:
            out.append(np.empty(0, dtype=np.int64))
            continue
        idx, pos, low = kept.pop(i)
        chosen = (low > t_lo) | _first_eq_only(low == t_lo, int(quota[i]))
        keep = np.ones(idx.size, dtype=bool)
        keep[pos[~chosen]] = False
        out.append(idx[keep])
    return out


def _three_passes(iterate, resolve, parts, position, wanted, lo, hi, need, chunk, comm) -> list[np.ndarray]:
    # Bin b is too large to keep: pass 2 histograms its low 16 bits, pass 3 collects the values >= threshold,
    # keeping at most `take` of those equal to it (no rank's share of the ties can exceed the global need).
    low_hist = np.zeros(_BINS, dtype=np.int64)
    for name, t in _local_pairs(iterate, resolve, wanted):
        for _, bits in _bit_chunks(t, parts[position[name]].info.neg_zero, chunk):
            values = bits[np.flatnonzero(bits >= lo)]
            low_hist += _bincount(values[values < hi] & 0xFFFF)
    t_lo, above = _boundary(comm.sum(low_hist), need)
    threshold = lo | t_lo
    take = need - above
    room = take
    counts = np.zeros(len(parts), dtype=np.int64)
    found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for name, t in _local_pairs(iterate, resolve, wanted):
        i = position[name]
        idx_parts, eq_parts = [], []
        for start, bits in _bit_chunks(t, parts[i].info.neg_zero, chunk):
            at = np.flatnonzero(bits >= threshold)
            if not at.size:
                continue
            eq = bits[at] == threshold
            n_eq = int(np.count_nonzero(eq))
            counts[i] += n_eq
            if n_eq > room:
                keep = ~eq | _first_eq_only(eq, room)
                at, eq = at[keep], eq[keep]
                n_eq = room
            room -= n_eq
            idx_parts.append((at + (start + parts[i].offset)).astype(_index_dtype(parts[i].numel), copy=False))
            eq_parts.append(eq)
        if idx_parts:
            found[i] = (np.concatenate(idx_parts), np.concatenate(eq_parts))
    quota = _quotas(comm, counts, take)
    out = []
    for i in range(len(parts)):
        if i not in found:
            out.append(np.empty(0, dtype=np.int64))
            continue
        idx, eq = found.pop(i)
        out.append(idx[~eq | _first_eq_only(eq, int(quota[i]))])
    return out


def _cat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def _gather_mask(comm: _Comm, parts: list[_Part], selected: list[np.ndarray]) -> CoreMask:
    """All-gather every rank's selected global indices into one CoreMask, identical on every rank.

    One tensor at a time, so that the transient buffers are those of one tensor (as in the one-process path), and
    each rank's selection is freed as soon as it is sent.
    """
    counts = np.array([s.size for s in selected], dtype=np.int64)
    matrix = comm.rows(counts)  # [coordinate, part]
    entries = {}
    for i, part in enumerate(parts):
        dtype = _index_dtype(part.numel)
        mine, selected[i] = selected[i].astype(dtype, copy=False), None
        # shards hold increasing flat ranges in coordinate order, so the concatenation is sorted
        idx = np.concatenate(comm.gather(mine, matrix[:, i]))
        del mine
        entries[part.name] = _entry(part.shape, part.numel, idx)
    return CoreMask(entries)


def _entry(shape: tuple[int, ...], numel: int, idx: np.ndarray):
    # int32 indices go into the mask as they are (no int64 transient) when they are the smaller encoding
    if idx.dtype == np.int32 and idx.size * 4 <= (numel + 7) // 8:
        return _Entry(shape, torch.from_numpy(idx), None, int(idx.size))
    return _to_entry(shape, idx)
