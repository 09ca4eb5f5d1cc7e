"""`CoreMask`: a set of selected elements per named parameter.

A core region is a set of element positions in a model's parameters. It is stored per tensor
as whichever of two encodings is smaller:

* sorted flat indices (int32 when the tensor has fewer than 2**31 elements, else int64): 32 bits per *selected*
  element, so 0.32 bits/param at p = 1%;
* a packed bitmask (``numpy.packbits``, little bit order): 1 bit per element of the tensor.

The class is immutable; set operations return new masks. Nothing here imports transformers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .errors import DPIConfigError

_INT32_LIMIT = 2**31 - 1


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@dataclass(frozen=True)
class _Entry:
    shape: tuple[int, ...]
    # exactly one of the two is set
    indices: torch.Tensor | None  # sorted, unique, int32/int64, 1-D
    bits: np.ndarray | None  # uint8 packed bitmask of numel bits, bitorder="little"
    count: int

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def encoding(self) -> str:
        return "indices" if self.indices is not None else "bitmask"

    def nbytes(self) -> int:
        if self.indices is not None:
            return self.indices.numel() * self.indices.element_size()
        return int(self.bits.nbytes)

    def flat_indices(self) -> torch.Tensor:
        if self.indices is not None:
            return self.indices.to(torch.int64)
        dense = np.unpackbits(self.bits, count=self.numel, bitorder="little")
        return torch.from_numpy(np.flatnonzero(dense).astype(np.int64))

    def packed(self) -> np.ndarray:
        if self.bits is not None:
            return self.bits
        dense = np.zeros(self.numel, dtype=np.uint8)
        dense[self.indices.numpy()] = 1
        return np.packbits(dense, bitorder="little")

    def dense_flat(self) -> torch.Tensor:
        if self.bits is not None:
            return torch.from_numpy(np.unpackbits(self.bits, count=self.numel, bitorder="little").astype(bool))
        out = torch.zeros(self.numel, dtype=torch.bool)
        out[self.indices.to(torch.int64)] = True
        return out


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel <= _INT32_LIMIT else torch.int64


def _make_entry(shape: tuple[int, ...], flat_sorted_indices: torch.Tensor, encoding: str = "auto") -> _Entry:
    """Build an entry from sorted unique int64 flat indices, choosing the smaller encoding."""
    numel = _numel(shape)
    k = int(flat_sorted_indices.numel())
    idx_dtype = _index_dtype(numel)
    idx_bytes = k * torch.tensor([], dtype=idx_dtype).element_size()
    bit_bytes = (numel + 7) // 8
    if encoding == "auto":
        encoding = "indices" if idx_bytes <= bit_bytes else "bitmask"
    if encoding == "indices":
        return _Entry(shape, flat_sorted_indices.to(idx_dtype).contiguous(), None, k)
    if encoding == "bitmask":
        dense = np.zeros(numel, dtype=np.uint8)
        dense[flat_sorted_indices.numpy()] = 1
        return _Entry(shape, None, np.packbits(dense, bitorder="little"), k)
    raise DPIConfigError(f"encoding={encoding!r} is not one of 'auto', 'indices', 'bitmask'.")


class CoreMask:
    """A set of selected elements per named parameter.

    Build one with :meth:`from_indices`, :meth:`from_dense` or :func:`dpi_hf.select_core`. Parameters without any
    selected element may be present (count 0) so that the mask remembers the shapes it was computed over.

    Args:
        entries: internal; use the constructors.
    """

    def __init__(self, entries: Mapping[str, _Entry] | None = None):
        self._entries: dict[str, _Entry] = dict(entries or {})

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_indices(
        cls,
        indices: Mapping[str, torch.Tensor],
        shapes: Mapping[str, Iterable[int]],
        encoding: str = "auto",
    ) -> CoreMask:
        """Mask from flat element indices per parameter.

        Args:
            indices: parameter name → 1-D integer tensor of flat (row-major) positions; duplicates are merged.
            shapes: parameter name → the parameter's shape. Names in ``shapes`` but not in ``indices`` get an empty
                selection.
            encoding: ``"auto"`` (default: the smaller of indices and bitmask), ``"indices"`` or ``"bitmask"``.
        """
        entries = {}
        for name, shape in shapes.items():
            shape = tuple(int(s) for s in shape)
            idx = indices.get(name)
            if idx is None:
                idx = torch.empty(0, dtype=torch.int64)
            idx = torch.as_tensor(idx).reshape(-1).to(torch.int64)
            if idx.numel():
                idx = torch.unique(idx)  # sorted
                if int(idx[0]) < 0 or int(idx[-1]) >= _numel(shape):
                    raise DPIConfigError(
                        f"indices for parameter {name!r} fall outside its shape {shape}; "
                        "pass flat positions in [0, numel)."
                    )
            entries[name] = _make_entry(shape, idx, encoding)
        unknown = set(indices) - set(shapes)
        if unknown:
            raise DPIConfigError(f"indices given for parameters without a shape: {sorted(unknown)}; add them to shapes.")
        return cls(entries)

    @classmethod
    def from_dense(cls, masks: Mapping[str, torch.Tensor], encoding: str = "auto") -> CoreMask:
        """Mask from boolean tensors (True = selected), one per parameter."""
        indices, shapes = {}, {}
        for name, m in masks.items():
            m = torch.as_tensor(m)
            shapes[name] = tuple(m.shape)
            indices[name] = torch.nonzero(m.reshape(-1).to(torch.bool), as_tuple=False).reshape(-1)
        return cls.from_indices(indices, shapes, encoding)

    @classmethod
    def _from_packed(cls, shape: tuple[int, ...], bits: np.ndarray) -> _Entry:
        numel = _numel(shape)
        bits = np.ascontiguousarray(bits, dtype=np.uint8)
        if bits.size != (numel + 7) // 8:
            raise DPIConfigError(f"a packed bitmask of {bits.size} bytes does not fit a tensor of shape {shape}.")
        dense = np.unpackbits(bits, count=numel, bitorder="little")
        # normalise: clear padding bits so equal masks compare equal byte-for-byte
        bits = np.packbits(dense, bitorder="little")
        return _Entry(shape, None, bits, int(dense.sum()))

    # ----------------------------------------------------------------------------------------------- queries
    def names(self) -> list[str]:
        """Names of the parameters this mask covers (selected or not), in insertion order."""
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of parameter ``name``."""
        return self._entry(name).shape

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: e.shape for n, e in self._entries.items()}

    def encoding(self, name: str) -> str:
        """``"indices"`` or ``"bitmask"``: how ``name`` is stored."""
        return self._entry(name).encoding

    def count(self, name: str | None = None) -> int:
        """Number of selected elements, in ``name`` or in total."""
        if name is not None:
            return self._entry(name).count
        return sum(e.count for e in self._entries.values())

    def numel(self, name: str | None = None) -> int:
        """Number of elements considered, in ``name`` or in total."""
        if name is not None:
            return self._entry(name).numel
        return sum(e.numel for e in self._entries.values())

    def fraction(self, name: str | None = None) -> float:
        """Selected fraction of the considered elements (of ``name`` or of all)."""
        n = self.numel(name)
        return self.count(name) / n if n else 0.0

    def nbytes(self) -> int:
        """Bytes used by the stored encodings."""
        return sum(e.nbytes() for e in self._entries.values())

    def indices(self, name: str) -> torch.Tensor:
        """Sorted flat int64 indices of the selected elements of ``name``."""
        return self._entry(name).flat_indices()

    def dense(self, name: str) -> torch.Tensor:
        """Bool tensor of ``name``'s shape, True where selected."""
        e = self._entry(name)
        return e.dense_flat().reshape(e.shape)

    def packed(self, name: str) -> np.ndarray:
        """Packed little-endian bitmask (uint8) of ``name``."""
        return self._entry(name).packed()

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise DPIConfigError(
                f"parameter {name!r} is not covered by this mask; known parameters: {self.names()[:5]}..."
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CoreMask):
            return NotImplemented
        if self.shapes() != other.shapes():
            return False
        return all(
            self.count(n) == other.count(n) and torch.equal(self.indices(n), other.indices(n)) for n in self.names()
        )

    def __repr__(self) -> str:
        return f"CoreMask({len(self)} tensors, {self.count():,}/{self.numel():,} selected = {100 * self.fraction():.3f}%)"

    # ----------------------------------------------------------------------------------------------- set algebra
    def _check_compatible(self, other: CoreMask, op: str) -> None:
        for n in set(self._entries) & set(other._entries):
            if self._entries[n].shape != other._entries[n].shape:
                raise DPIConfigError(
                    f"cannot take the {op} of masks whose parameter {n!r} has shapes "
                    f"{self._entries[n].shape} and {other._entries[n].shape}: they come from different models."
                )

    def union(self, other: CoreMask) -> CoreMask:
        """Elements selected in either mask (parameters of both are kept)."""
        self._check_compatible(other, "union")
        entries = {}
        for n in list(self._entries) + [m for m in other._entries if m not in self._entries]:
            a, b = self._entries.get(n), other._entries.get(n)
            if a is None or b is None:
                entries[n] = a or b
            elif a.indices is not None and b.indices is not None:
                entries[n] = _make_entry(a.shape, torch.unique(torch.cat([a.flat_indices(), b.flat_indices()])))
            else:
                entries[n] = self._from_packed(a.shape, np.bitwise_or(a.packed(), b.packed()))
                entries[n] = _make_entry(a.shape, entries[n].flat_indices())
        return CoreMask(entries)

    def intersection(self, other: CoreMask) -> CoreMask:
        """Elements selected in both masks (over the parameters both cover)."""
        self._check_compatible(other, "intersection")
        entries = {}
        for n in self._entries:
            if n not in other._entries:
                continue
            a, b = self._entries[n], other._entries[n]
            if a.indices is not None and b.indices is not None:
                ai, bi = a.flat_indices(), b.flat_indices()
                entries[n] = _make_entry(a.shape, ai[torch.isin(ai, bi)])
            else:
                packed = self._from_packed(a.shape, np.bitwise_and(a.packed(), b.packed()))
                entries[n] = _make_entry(a.shape, packed.flat_indices())
        return CoreMask(entries)

    def intersection_count(self, other: CoreMask) -> int:
        """|self ∩ other| without building the intersection."""
        self._check_compatible(other, "intersection")
        total = 0
        for n, a in self._entries.items():
            b = other._entries.get(n)
            if b is None or a.count == 0 or b.count == 0:
                continue
            if a.indices is not None and b.indices is not None:
                total += int(torch.isin(a.indices, b.indices).sum())
            else:
                total += int(np.bitwise_count(np.bitwise_and(a.packed(), b.packed())).sum())
        return total

    def jaccard(self, other: CoreMask) -> float:
        """|A ∩ B| / |A ∪ B|; 0.0 when both are empty."""
        inter = self.intersection_count(other)
        union = self.count() + other.count() - inter
        return inter / union if union else 0.0

    def restrict(self, names: Iterable[str]) -> CoreMask:
        """The same selection over only ``names``."""
        return CoreMask({n: self._entry(n) for n in names})

    @staticmethod
    def union_all(masks: Iterable[CoreMask]) -> CoreMask:
        """Union of any number of masks (empty mask for none); the first mask's own ``union`` is used, so the union
        of sharded masks (``ShardedCoreMask``) stays sharded."""
        out = None
        for m in masks:
            out = m if out is None else out.union(m)
        return out if out is not None else CoreMask()
