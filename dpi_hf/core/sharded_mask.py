"""`ShardedCoreMask`: a core selected over FSDP2 shards, each rank holding only the elements of its own rows.

The distributed :func:`~dpi_hf.core.select_core` returns one to every rank: rank ``r``'s mask holds the selected
elements that lie in its ``Shard(0)`` rows of each tensor (as global, row-major flat indices inside
``[offset_r, offset_r + n_r)``), so its memory is about 1/W of a global :class:`~dpi_hf.core.CoreMask`. What needs the
whole core works as follows:

* :meth:`~ShardedCoreMask.count`, :meth:`~CoreMask.fraction` and :meth:`~CoreMask.numel` are global (the per-tensor
  global counts are known from the selection, no collective);
* :meth:`~ShardedCoreMask.intersection_count` (hence :meth:`~CoreMask.jaccard`, so stage planning),
  :meth:`~ShardedCoreMask.union` and :meth:`~ShardedCoreMask.intersection` are collectives: every rank of the mesh
  calls them in the same order and gets the same global counts;
* :meth:`~ShardedCoreMask.gather` builds the global :class:`CoreMask` on one rank (rank 0 by default), one tensor at a
  time, for :func:`~dpi_hf.core.save_cores`, inspection and the Hub;
* :class:`~dpi_hf.core.ParameterFreezer` takes it as it is: it maps global indices to the local shard and the rows of
  this rank are all it needs.

:func:`shard_mask` turns a global mask (loaded from a file, the same on every rank) into this rank's part.
Torch only; collectives go over the mesh's process group (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

from .errors import DPIConfigError, ProbeDivergedError
from .masks import CoreMask, _Entry, _make_entry
from .sharding import dtensor_layout, is_dtensor

__all__ = ["ShardedCoreMask", "shard_mask"]


class _Comm:
    """A 1-D mesh's process group, this rank's coordinate on it, and the collectives the selection needs."""

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

    def gather_to(self, values: np.ndarray, counts: np.ndarray, dst: int) -> list[np.ndarray] | None:
        """Every rank's ``values`` (``counts[r]`` on coordinate r, same dtype everywhere) on coordinate ``dst``
        only (None elsewhere)."""
        longest = int(counts.max()) if counts.size else 0
        buf = torch.zeros(longest, dtype=torch.from_numpy(values[:0]).dtype)
        buf[: values.size] = torch.from_numpy(values)
        buf = buf.to(self.device)
        out = [torch.empty_like(buf) for _ in range(self.size)] if self.coord == dst else None
        self.dist.gather(buf, out, dst=self.dist.get_global_rank(self.group, dst), group=self.group)
        if out is None:
            return None
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


def _local_entry(shape: tuple[int, ...], idx: torch.Tensor) -> _Entry:
    # always indices: a bitmask would cover the global tensor, W times this rank's share
    idx = idx.reshape(-1)
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    dtype = torch.int32 if numel <= 2**31 - 1 else torch.int64
    return _Entry(shape, idx.to(dtype).contiguous(), None, int(idx.numel()))


class ShardedCoreMask(CoreMask):
    """This rank's part of a core selected over ``Shard(0)`` shards (see the module docstring).

    Built by the distributed :func:`~dpi_hf.core.select_core` and by :func:`shard_mask`; not meant to be constructed
    directly.

    Args:
        entries: name → entry holding this rank's selected global flat indices (sorted, inside ``ranges[name]``).
        ranges: name → ``(start, stop)``, the global flat indices of this rank's shard of that tensor.
        global_counts: name → selected elements of that tensor over all ranks.
        comm: the mesh's collectives.
        replicated: names of plain (not sharded) tensors, which every rank holds whole, with the same selection.
    """

    def __init__(self, entries: Mapping[str, _Entry], ranges: Mapping[str, tuple[int, int]],
                 global_counts: Mapping[str, int], comm: _Comm, replicated: Iterable[str] = ()):
        super().__init__(entries)
        self._ranges = dict(ranges)
        self._global = {n: int(global_counts[n]) for n in self._entries}
        self._comm = comm
        self._replicated = {n for n in replicated if n in self._entries}

    def _counted_here(self, name: str) -> bool:
        # a replicated tensor's elements are on every rank: only coordinate 0 adds them to a global count
        return name not in self._replicated or self._comm.coord == 0

    # ------------------------------------------------------------------------------------------------ queries
    def count(self, name: str | None = None) -> int:
        """Selected elements over ALL ranks, in ``name`` or in total (no collective)."""
        if name is not None:
            self._entry(name)
            return self._global[name]
        return sum(self._global.values())

    def local_count(self, name: str | None = None) -> int:
        """Selected elements this rank holds, in ``name`` or in total."""
        return super().count(name)

    def local_range(self, name: str) -> tuple[int, int]:
        """``(start, stop)``: the global flat indices of this rank's shard of ``name``."""
        self._entry(name)
        return self._ranges[name]

    def indices(self, name: str) -> torch.Tensor:
        """Sorted global flat int64 indices of the selected elements of ``name`` that THIS rank holds."""
        return super().indices(name)

    def __repr__(self) -> str:
        return (f"ShardedCoreMask({len(self)} tensors, {self.count():,}/{self.numel():,} selected = "
                f"{100 * self.fraction():.3f}%, {self.local_count():,} on rank {self._comm.coord} of "
                f"{self._comm.size})")

    def __eq__(self, other: object) -> bool:
        """Local comparison: the same names, shapes and local elements (not a collective)."""
        if not isinstance(other, CoreMask):
            return NotImplemented
        if self.shapes() != other.shapes():
            return False
        return all(torch.equal(self.indices(n), other.indices(n)) for n in self.names())

    # ------------------------------------------------------------------------------------------------ collectives
    def _localized(self, other: CoreMask, op: str) -> ShardedCoreMask:
        """``other`` as this rank's part: a ShardedCoreMask on the same mesh, or a global mask restricted."""
        self._check_compatible(other, op)
        if isinstance(other, ShardedCoreMask):
            if other._comm.group is not self._comm.group or any(
                    other._ranges[n] != self._ranges[n] for n in other.names() if n in self._ranges):
                raise DPIConfigError(
                    f"cannot take the {op} of sharded masks selected on different meshes or shardings; select both "
                    "on the same sharded model."
                )
            return other
        # a global mask (e.g. loaded from a file, the same on every rank): keep the part in this rank's rows
        entries, counts, ranges = {}, {}, {}
        # names this mask has no layout for are taken as held whole by every rank (counted once)
        replicated = self._replicated | {n for n in other.names() if n not in self._ranges}
        for n in other.names():
            idx = other.indices(n)
            lo, hi = self._ranges.get(n, (0, other.numel(n)))
            a, b = (int(x) for x in torch.searchsorted(idx, torch.tensor([lo, hi], dtype=torch.int64)))
            entries[n], counts[n], ranges[n] = _local_entry(other.shape(n), idx[a:b]), other.count(n), (lo, hi)
        return ShardedCoreMask(entries, ranges, counts, self._comm, replicated)

    def _with_global_counts(self, entries: dict[str, _Entry], ranges: dict, replicated: set) -> ShardedCoreMask:
        out = ShardedCoreMask(entries, ranges, {n: 0 for n in entries}, self._comm, replicated)
        local = np.array([e.count if out._counted_here(n) else 0 for n, e in entries.items()], dtype=np.int64)
        out._global = dict(zip(entries, self._comm.sum(local).tolist())) if local.size else {}
        return out

    def union(self, other: CoreMask) -> ShardedCoreMask:
        """Elements selected in either mask (a collective: call it on every rank)."""
        other = self._localized(other, "union")
        entries, ranges = {}, {}
        for n in self.names() + [m for m in other.names() if m not in self._entries]:
            a, b = self._entries.get(n), other._entries.get(n)
            ranges[n] = self._ranges[n] if n in self._ranges else other._ranges[n]
            if a is None or b is None:
                entries[n] = a or b
            else:
                entries[n] = _local_entry(a.shape, torch.unique(torch.cat([a.flat_indices(), b.flat_indices()])))
        return self._with_global_counts(entries, ranges, self._replicated | other._replicated)

    def intersection(self, other: CoreMask) -> ShardedCoreMask:
        """Elements selected in both masks (a collective: call it on every rank)."""
        other = self._localized(other, "intersection")
        entries = {}
        for n in self.names():
            if n in other._entries:
                ai, bi = self._entries[n].flat_indices(), other._entries[n].flat_indices()
                entries[n] = _local_entry(self._entries[n].shape, ai[torch.isin(ai, bi)])
        return self._with_global_counts(entries, {n: self._ranges[n] for n in entries}, self._replicated)

    def intersection_count(self, other: CoreMask) -> int:
        """|self ∩ other| over all ranks (a collective: call it on every rank)."""
        other = self._localized(other, "intersection")
        local = 0
        for n, a in self._entries.items():
            b = other._entries.get(n)
            if b is not None and a.count and b.count and self._counted_here(n):
                local += int(torch.isin(a.indices, b.indices).sum())
        return int(self._comm.sum(np.array([local]))[0])

    def restrict(self, names: Iterable[str]) -> ShardedCoreMask:
        """The same selection over only ``names`` (local, no collective)."""
        names = list(names)
        return ShardedCoreMask({n: self._entry(n) for n in names}, {n: self._ranges[n] for n in names},
                               {n: self._global[n] for n in names}, self._comm, self._replicated)

    def gather(self, dst: int = 0) -> CoreMask | None:
        """The global :class:`CoreMask` on mesh coordinate ``dst`` (None on the other ranks); a collective.

        One tensor at a time: coordinate ``dst`` receives every rank's indices of one tensor and turns them into that
        tensor's entry before the next tensor is sent, so its transient memory is one tensor's selection; the other
        ranks only send what they hold.
        """
        names = self.names()
        counts = self._comm.rows(np.array([self._entries[n].count if self._counted_here(n) else 0 for n in names],
                                          dtype=np.int64))
        entries = {}
        for i, n in enumerate(names):
            e = self._entries[n]
            mine = e.indices.numpy() if self._counted_here(n) else e.indices.numpy()[:0]
            parts = self._comm.gather_to(mine, counts[:, i], dst)
            if parts is not None:
                # shards hold increasing flat ranges in coordinate order, so the concatenation is sorted
                idx = np.concatenate(parts).astype(np.int64, copy=False)
                entries[n] = _make_entry(e.shape, torch.from_numpy(idx))
        return CoreMask(entries) if self._comm.coord == dst else None


def shard_mask(mask: CoreMask, model: torch.nn.Module) -> CoreMask:
    """This rank's part of a global ``mask`` over a model whose parameters are ``Shard(0)`` DTensors (FSDP2).

    Returns ``mask`` itself when no parameter it names is a DTensor (a plain or DDP model: every rank holds all).
    Every rank must call it (it needs the mesh of the model's parameters, no collective is run).

    Args:
        mask: a global :class:`CoreMask` over ``model``'s parameter names (e.g. loaded with ``load_cores``).
        model: the sharded model.
    """
    if isinstance(mask, ShardedCoreMask):
        return mask
    params = dict(model.named_parameters(remove_duplicate=False))
    sharded = [n for n in mask.names() if n in params and is_dtensor(params[n])]
    if not sharded:
        return mask
    comm = _Comm(params[sharded[0]].device_mesh)
    entries, ranges, counts, replicated = {}, {}, {}, []
    for n in mask.names():
        p = params.get(n)
        if p is not None and is_dtensor(p):
            layout = dtensor_layout(n, p)
            lo, hi = layout.offset, layout.offset + layout.local_numel
        else:  # a replicated (plain) tensor: every rank holds all of it
            lo, hi = 0, mask.numel(n)
            replicated.append(n)
        idx = mask.indices(n)
        a, b = (int(x) for x in torch.searchsorted(idx, torch.tensor([lo, hi], dtype=torch.int64)))
        entries[n], ranges[n], counts[n] = _local_entry(mask.shape(n), idx[a:b]), (lo, hi), mask.count(n)
    return ShardedCoreMask(entries, ranges, counts, comm, replicated)
