"""Exact top-p selection over tensors sharded across processes (DTensors ``Shard(0)`` on a 1-D device mesh).

The same radix select as :mod:`dpi_hf.core.selection`, run on each rank's local shards, with the counts made global
by collectives over the mesh's process group:

1. pass 1: each rank builds the 65,536-bin histogram of the high 16 bits of its shards; one all-reduce (SUM) makes
   it global, and carries an error flag and a fingerprint of the tensor names and shapes, so that a rank that hits
   NaN/inf or reads different tensors makes every rank raise the same error instead of hanging;
2. pass 2: each rank keeps its elements in and above the threshold bin; the low-16-bit histogram of the threshold
   bin is all-reduced, which fixes the exact threshold value ``T`` and how many elements equal to ``T`` are taken
   (a threshold bin larger than ``max_boundary`` elements takes a third pass that collects instead of keeping);
3. ties at ``T``: the ranks exchange how many elements equal to ``T`` each holds per tensor (a world × tensors
   matrix) and take them in the one-process order — earlier tensor first, then smaller global flat index. Rank
   ``r``'s shard of a tensor holds the flat indices ``[offset_r, offset_r + n_r)`` and the offsets grow with ``r``,
   so global order within a tensor is (rank, local index);
4. each rank keeps the selected elements of its own shards: it returns a
   :class:`~dpi_hf.core.sharded_mask.ShardedCoreMask` (global indices and shapes, global counts from one all-reduce
   of the per-tensor counts). Gathered, the masks of all ranks are the elements one process selects from the
   gathered tensors; :meth:`~dpi_hf.core.sharded_mask.ShardedCoreMask.gather` does that on one rank when a global
   mask is needed (saving, inspection).

No rank ever holds more than its shards plus its part of the selection: the collectives move 65,536-bin histograms
and a world × tensors count matrix. A plain (non-DTensor) tensor among DTensors is taken to be the same on every
rank (replicated, like a DDP parameter): it is read on mesh coordinate 0 only and its selection is broadcast.

The passes are those of :mod:`dpi_hf.core.radix`; this module never imports :mod:`dpi_hf.core.selection`.
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

from .errors import DPIConfigError
from .radix import (
    _BINS,
    _bincount,
    _bit_chunks,
    _boundary,
    _check_size,
    _core_size,
    _first_eq_only,
    _histogram,
    _index_dtype,
    _Info,
)
from .sharded_mask import ShardedCoreMask, _Comm, _local_entry
from .sharding import dtensor_layout, is_dtensor

# fingerprint hashes are kept below 2**20 so that the sum of their squares over any world size fits in int64
_HASH_MASK = (1 << 20) - 1


@dataclass
class _Part:
    """One considered tensor: its global identity and this rank's shard of it."""

    name: str
    shape: tuple[int, ...]  # global
    numel: int  # global
    offset: int  # global flat index of the local shard's element 0
    info: _Info | None = None  # pass 1 on the local shard
    local_numel: int = 0  # elements of the local shard
    replicated: bool = False  # a plain tensor: every rank holds it whole (only coordinate 0 reads it)


def is_sharded(t) -> bool:
    """Whether ``select_core`` takes the distributed path for this value (a DTensor)."""
    return is_dtensor(t)


class _Resolver:
    """Turns values read from ``deltas`` into (local tensor, global offset), checking one common mesh."""

    def __init__(self):
        self.mesh = None
        self.comm: _Comm | None = None

    def __call__(self, name: str, t: torch.Tensor) -> tuple[torch.Tensor, int, tuple[int, ...]]:
        """(local tensor, global flat offset of its element 0, global shape)."""
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
    max_boundary: int,
    no_tensor_error: Callable[[], Exception],
) -> ShardedCoreMask:
    """The distributed counterpart of ``select_core``'s body; called by it when the first value is a DTensor.

    Args:
        first_pass: the first read of the considered (name, value) pairs (its first value is a DTensor).
        iterate: reads the considered pairs again (only ``wanted`` names when given), once per later pass.
        fraction: p, validated.
        scope: ``"global"`` or ``"per_tensor"``.
        chunk: elements per chunk.
        max_boundary: the largest threshold bin (elements, over all ranks) whose elements pass 2 keeps.
        no_tensor_error: builds the error for "nothing considered".

    Returns:
        This rank's :class:`ShardedCoreMask`: the selected elements of its own shards, with global counts.
    """
    resolve = _Resolver()
    if scope == "per_tensor":
        return _per_tensor(first_pass, resolve, fraction, chunk, max_boundary)
    parts: list[_Part] = []
    hist = np.zeros(_BINS, dtype=np.int64)
    error = None
    try:
        for name, t in first_pass:
            local, offset, shape = resolve(name, t)
            h, info = _histogram(name, local, chunk)
            hist += h
            parts.append(_Part(name, shape, math.prod(shape), offset, info, local.numel(), not is_dtensor(t)))
    except DPIConfigError as exc:  # ProbeDivergedError included; re-raised below on every rank together
        error = exc
    comm = resolve.comm
    if comm is None:  # the first DTensor itself was refused (e.g. a 2-D mesh): the same on every rank
        raise error if error is not None else no_tensor_error()
    hist = _sum_checked(comm, hist, parts, error)
    sizes = [p.numel for p in parts]
    _check_size(sizes, fraction, scope)
    k = _core_size(sum(sizes), fraction)
    selected = _select(iterate, resolve, parts, hist, k, chunk, max_boundary, comm)
    return _local_mask(comm, parts, selected)


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


def _per_tensor(pairs, resolve: _Resolver, fraction: Fraction, chunk: int, max_boundary: int) -> ShardedCoreMask:
    parts, selected = [], []
    for name, t in pairs:
        error = None
        try:
            local, offset, shape = resolve(name, t)
            hist, info = _histogram(name, local, chunk)
            n_local = local.numel()
        except DPIConfigError as exc:
            if resolve.comm is None:  # no mesh known yet: this cannot be coordinated, and no rank waits
                raise
            error, hist, info, shape, offset = exc, np.zeros(_BINS, dtype=np.int64), None, tuple(t.shape), 0
            n_local = 0
        part = _Part(name, shape, math.prod(shape), offset, info, n_local, not is_dtensor(t))
        hist = _sum_checked(resolve.comm, hist, [part], error)
        parts.append(part)
        k = _core_size(part.numel, fraction)
        if k:
            one = lambda wanted, _n=name, _t=t: iter([(_n, _t)])  # noqa: E731
            selected.append(_select(one, resolve, [part], hist, k, chunk, max_boundary, resolve.comm)[0])
        else:
            selected.append(np.empty(0, dtype=np.int64))
    _check_size([p.numel for p in parts], fraction, "per_tensor")
    return _local_mask(resolve.comm, parts, selected)


def _select(iterate, resolve, parts, hist, k, chunk, max_boundary, comm) -> list[np.ndarray]:
    """Passes 2 (and 3): this rank's selected GLOBAL flat indices (sorted; int32 below 2**31 elements) per part."""
    b, above = _boundary(hist, k)
    need = k - above
    lo, hi = b << 16, (b + 1) << 16
    position = {p.name: i for i, p in enumerate(parts)}
    wanted = {p.name for p in parts if p.info.top_bin >= b}
    if hist[b] <= max_boundary:
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


def _local_mask(comm: _Comm, parts: list[_Part], selected: list[np.ndarray]) -> ShardedCoreMask:
    """This rank's :class:`ShardedCoreMask` from its selected global indices; one all-reduce of the per-tensor
    counts makes the global counts known on every rank.

    A replicated (plain) tensor is read on coordinate 0 only; its selection is broadcast so that every rank, which
    holds that tensor whole, holds its whole selection too.
    """
    counts = comm.sum(np.array([s.size for s in selected], dtype=np.int64))
    entries, ranges, replicated = {}, {}, []
    for i, part in enumerate(parts):
        idx, selected[i] = selected[i], None
        if part.replicated:
            replicated.append(part.name)
            idx = _broadcast(comm, idx.astype(_index_dtype(part.numel), copy=False), int(counts[i]))
            ranges[part.name] = (0, part.numel)
        else:
            ranges[part.name] = (part.offset, part.offset + part.local_numel)
        entries[part.name] = _local_entry(part.shape, torch.from_numpy(np.ascontiguousarray(idx)))
    return ShardedCoreMask(entries, ranges, dict(zip((p.name for p in parts), counts.tolist())), comm, replicated)


def _broadcast(comm: _Comm, values: np.ndarray, count: int) -> np.ndarray:
    """Coordinate 0's ``values`` (``count`` of them) on every rank."""
    buf = torch.zeros(count, dtype=torch.from_numpy(values[:0]).dtype)
    if comm.coord == 0:
        buf[:] = torch.from_numpy(values)
    buf = buf.to(comm.device)
    comm.dist.broadcast(buf, src=comm.dist.get_global_rank(comm.group, 0), group=comm.group)
    return buf.cpu().numpy()
