"""Exact, streaming selection of a core region: the ⌊p·N⌋ largest update magnitudes.

:func:`select_core` never concatenates the model. It runs an exact radix select on the float32 bit patterns of the
magnitudes (for non-negative floats the int32 bit pattern is monotone in the value), one tensor and one chunk at a
time, so the extra memory is a few chunk buffers plus the selected indices:

1. pass 1: a 65,536-bin ``torch.bincount`` histogram of the high 16 bits; it also validates the values (NaN/inf and
   negative values land in bins no finite magnitude reaches) and gives the bin ``b`` that holds the threshold;
2. pass 2: every element whose high 16 bits are above ``b`` is selected; the elements inside bin ``b`` are ranked by
   their low 16 bits, which fixes the exact threshold value ``T`` and how many elements equal to ``T`` are needed.
   While bin ``b`` is small (at most ``_MAX_BOUNDARY`` elements, the usual case) this pass keeps its elements and
   their positions and the selection is complete after it;
3. pass 3 (only when bin ``b`` is larger, i.e. massive ties such as many exact zeros): collect the indices of the
   values > ``T`` and the first needed ones == ``T``.

Ties are broken deterministically: among equal values the earlier tensor (in iteration order) and then the smaller
flat (row-major) index win. :func:`dpi_hf.core.signals.update_magnitudes` supplies the magnitudes |θ − θ0| lazily
from a model and its reference weights (a CPU state dict or safetensors files), one tensor at a time.

Elementwise work on chunks uses numpy (measured faster than torch for compare + nonzero on one thread); counting uses
``torch.bincount`` on int32 (measured several times faster than ``numpy.bincount``). Nothing here imports
transformers.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from .errors import DPIConfigError, ProbeDivergedError
from .masks import CoreMask, _make_entry
from .sharding import is_dtensor as _is_dtensor

__all__ = ["filter_parameter_names", "select_core"]

# Elements per chunk: 2**18 int32 = 1 MiB buffers stay in cache; measured as fast as 2**20 and faster than 2**16.
_CHUNK = 1 << 18
# Largest threshold bin whose elements pass 2 keeps in memory (index + position + low bits ≈ 20 bytes each, so at
# most ~80 MiB); a larger bin (massive ties) takes the third pass instead.
_MAX_BOUNDARY = 1 << 22
_BINS = 1 << 16
# High 16 bits of +inf; NaN lies above it and every value with the sign bit set (negatives, -0.0) at 0x8000 or
# above, so a histogram with counts from this bin on flags a tensor that needs a closer look.
_FIRST_BAD_BIN = 0x7F80
# High 16 bits of -0.0 (sign bit only). After the closer look has ruled out negative values it holds only -0.0.
_NEG_ZERO_BIN = 0x8000
_GLOB_CHARS = frozenset("*?[")


# ---------------------------------------------------------------------------------------------------- name patterns
def _patterns(patterns: str | Iterable[str] | None, arg: str) -> tuple[str, ...] | None:
    """Validate ``include``/``exclude``: None, one string, or an iterable of strings."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return (patterns,)
    try:
        out = tuple(patterns)
    except TypeError:
        raise DPIConfigError(
            f"{arg}={patterns!r} is not a list of name patterns; pass e.g. {arg}=['*embed_tokens*', 'norm']."
        ) from None
    bad = [p for p in out if not isinstance(p, str) or not p]
    if bad:
        raise DPIConfigError(f"{arg} holds {bad!r}, which are not non-empty strings; pass name patterns as strings.")
    return out


def _matches(name: str, pattern: str) -> bool:
    # A pattern with a glob character must match the whole name; a plain pattern matches anywhere in the name,
    # so "embed_tokens" and "*embed_tokens*" mean the same.
    if _GLOB_CHARS.intersection(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def filter_parameter_names(
    names: Iterable[str],
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> list[str]:
    """The names to consider, in input order.

    A name is kept when it matches at least one ``include`` pattern (every name does when ``include`` is None) and
    no ``exclude`` pattern. Matching is case-sensitive. A pattern that contains a glob character (``*``, ``?`` or
    ``[``) is an :mod:`fnmatch` glob matched against the whole name (``"*.bias"``, ``"model.layers.[0-3].*"``); any
    other pattern is a plain substring (``"embed_tokens"`` matches ``"model.embed_tokens.weight"``).

    Args:
        names: parameter names.
        include: patterns of names to consider; None (default) considers every name. A single string is one pattern.
        exclude: patterns of names to leave out; None (default) leaves out nothing. Exclusion wins over inclusion.

    Returns:
        The kept names, in the order of ``names``.
    """
    inc = _patterns(include, "include")
    exc = _patterns(exclude, "exclude")
    return [
        n
        for n in names
        if (inc is None or any(_matches(n, p) for p in inc)) and not (exc and any(_matches(n, p) for p in exc))
    ]


def _nothing_left_error(names: list[str], include, exclude) -> DPIConfigError:
    if not names:
        return DPIConfigError("deltas is empty; pass at least one (name, update magnitude tensor).")
    shown = ", ".join(repr(n) for n in names[:5]) + (", ..." if len(names) > 5 else "")
    return DPIConfigError(
        f"include={list(include) if include is not None else None} and exclude="
        f"{list(exclude) if exclude is not None else None} leave none of the {len(names)} parameters ({shown}); "
        "loosen the patterns (plain patterns match substrings, patterns with *?[ are globs over the whole name)."
    )


# ---------------------------------------------------------------------------------------------------- core size
CORE_SCOPES = ("global", "per_tensor")


def validate_core_fraction(core_fraction) -> float:
    """Return ``core_fraction`` as a float in (0, 1] or raise :class:`DPIConfigError` naming it and the fix."""
    return float(_check_fraction(core_fraction))


def validate_scope(scope) -> str:
    """Return ``scope`` if it is ``"global"`` or ``"per_tensor"``, else raise naming the choices."""
    if scope not in CORE_SCOPES:
        raise DPIConfigError(f"scope={scope!r} is not one of 'global' (the paper's default) and 'per_tensor'.")
    return scope


def _check_fraction(core_fraction) -> Fraction:
    if isinstance(core_fraction, bool) or not isinstance(core_fraction, numbers.Real):
        raise DPIConfigError(
            f"core_fraction={core_fraction!r} is not a real number; pass the fraction of elements to select, "
            "a number in (0, 1] such as 0.01."
        )
    value = float(core_fraction)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise DPIConfigError(
            f"core_fraction={core_fraction!r} must be a fraction in (0, 1], e.g. 0.01 for 1% (the paper's default)."
        )
    if isinstance(core_fraction, (numbers.Rational, Fraction)):
        return Fraction(core_fraction)
    # The decimal value as written: 0.29 must give 29 of 100 elements, not 28 from the binary float 0.28999...
    try:
        frac = Fraction(str(core_fraction))
    except ValueError:
        frac = Fraction(value)
    # a Decimal a hair above 1 passes the float check above; never select more than N
    return min(frac, Fraction(1))


def _core_size(numel: int, fraction: Fraction) -> int:
    """⌊p·n⌋ computed exactly."""
    return math.floor(fraction * numel)


def _too_small_error(fraction: Fraction, numel: int, scope: str) -> DPIConfigError:
    if numel == 0:
        return DPIConfigError(
            "the considered parameters have no elements, so core_fraction selects nothing; consider parameters "
            "with elements (check include/exclude)."
        )
    where = "the" if scope == "global" else "the largest considered tensor's"
    return DPIConfigError(
        f"core_fraction={float(fraction)!r} selects ⌊p·N⌋ = 0 of {where} {numel:,} elements (scope={scope!r}); "
        f"raise core_fraction to at least {1 / numel:.3g}"
        + (" or use scope='global'." if scope == "per_tensor" else " or consider more parameters.")
    )


# ---------------------------------------------------------------------------------------------------- input source
class _Source:
    """The considered (name, tensor) pairs of ``deltas``, readable once per selection pass.

    Keeps the names and shapes seen on the first pass and checks that every later pass yields the same ones.
    """

    def __init__(self, deltas, include, exclude, single_pass: bool):
        self._include, self._exclude = include, exclude
        self._mapping: Mapping | None = None
        self._factory: Callable[[], Iterable] | None = None
        self._names: list[str] | None = None  # considered names, known up front for a mapping
        self._shapes: list[tuple[int, ...]] | None = None
        self._passes = 0
        self._all: list[str] = []  # every name of the first pass, considered or not, for error messages
        if isinstance(deltas, Mapping):
            keys = list(deltas.keys())
            bad = [k for k in keys if not isinstance(k, str)]
            if bad:
                raise DPIConfigError(f"deltas has non-string keys {bad[:3]!r}; key it by parameter name.")
            self._names = filter_parameter_names(keys, include, exclude)
            if not self._names:
                raise _nothing_left_error(keys, include, exclude)
            self._mapping = deltas
        elif isinstance(deltas, torch.nn.Module):
            raise DPIConfigError(
                "deltas is a model; pass its update magnitudes instead: update_magnitudes(model, reference)."
            )
        elif isinstance(deltas, (torch.Tensor, str, bytes)):
            raise DPIConfigError(
                f"deltas is a {type(deltas).__name__}; pass a mapping name → magnitude tensor, an iterable of "
                "(name, tensor) pairs, or a callable returning such an iterator."
            )
        elif callable(deltas):
            self._factory = deltas
        elif isinstance(deltas, Iterable):
            if iter(deltas) is deltas and not single_pass:
                # A one-shot iterator (e.g. a generator) cannot be read three times: keep the tensors it yields
                # (references only, never concatenated) for the later passes.
                kept = [(n, t) for n, t in self._checked(deltas, self._all) if self._considered(n)]
                self._factory = lambda: iter(kept)
            else:
                self._factory = lambda: iter(deltas)
        else:
            raise DPIConfigError(
                f"deltas of type {type(deltas).__name__} is not supported; pass a mapping name → tensor, an "
                "iterable of (name, tensor) pairs, or a callable returning such an iterator."
            )

    def _considered(self, name: str) -> bool:
        return bool(filter_parameter_names([name], self._include, self._exclude))

    @staticmethod
    def _checked(pairs: Iterable, record: list[str] | None) -> Iterator[tuple[str, torch.Tensor]]:
        for item in pairs:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise DPIConfigError(
                    f"deltas yielded {type(item).__name__} {str(item)[:60]!r}; it must yield (name, tensor) pairs."
                )
            if record is not None:
                record.append(item[0])
            yield item

    def known_shapes(self) -> list[tuple[int, ...]] | None:
        """Shapes of the considered tensors when they are available without computing any (else None)."""
        if self._mapping is None:
            return None
        if callable(getattr(self._mapping, "shapes", None)):  # a lazy mapping (UpdateMagnitudes) knows them all
            shapes = self._mapping.shapes()
            return [shapes[n] for n in self._names]
        if isinstance(self._mapping, dict):
            values = [self._mapping[n] for n in self._names]
            if all(isinstance(v, torch.Tensor) for v in values):
                return [tuple(v.shape) for v in values]
        return None

    def iterate(self, wanted: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Considered pairs in order; with ``wanted``, only those names (a mapping never reads the others)."""
        first = self._passes == 0
        self._passes += 1
        if self._mapping is not None:
            for pos, name in enumerate(self._names):
                if wanted is None or name in wanted:
                    yield name, self._tensor(name, self._mapping[name], pos, first)
            return
        pairs = self._factory()
        if not isinstance(pairs, Iterable):
            raise DPIConfigError(
                f"the deltas callable returned {type(pairs).__name__}; it must return an iterator of (name, tensor)."
            )
        seen: list[str] = []
        # names are recorded on the first pass, unless a kept one-shot iterator recorded them already
        for name, value in self._checked(pairs, self._all if first and not self._all else None):
            if not self._considered(name):
                continue
            pos = len(seen)
            seen.append(name)
            if first:
                if name in seen[:-1]:
                    raise DPIConfigError(f"deltas yields parameter {name!r} twice; yield each parameter once.")
            elif pos >= len(self._names) or self._names[pos] != name:
                raise self._changed_error()
            if wanted is None or name in wanted:
                yield name, self._tensor(name, value, pos, first)
        if first:
            self._names = seen
        elif len(seen) != len(self._names):
            raise self._changed_error()

    def _tensor(self, name: str, value, pos: int, first: bool) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise DPIConfigError(
                f"deltas[{name!r}] is {getattr(value, 'dtype', type(value).__name__)}; pass a floating-point tensor "
                "of update magnitudes |θ − θ0|."
            )
        shape = tuple(value.shape)
        if first:
            if self._shapes is None:
                self._shapes = []
            self._shapes.append(shape)
        elif self._shapes[pos] != shape:
            raise self._changed_error()
        return value

    def _changed_error(self) -> DPIConfigError:
        return DPIConfigError(
            "deltas yielded different parameters (names, order or shapes) on a later pass; a global selection "
            "reads the deltas two or three times, so pass a mapping, a list, or a callable returning the same "
            "sequence each time."
        )

    def all_names(self) -> list[str]:
        """Every name ``deltas`` holds (considered or not), for error messages."""
        return list(self._mapping.keys()) if self._mapping is not None else list(self._all)


# ---------------------------------------------------------------------------------------------------- passes
@dataclass
class _Info:
    """What pass 1 learned about one tensor."""

    name: str
    shape: tuple[int, ...]
    numel: int
    top_bin: int  # highest non-empty high-16-bit bin (-1 when empty): tensors below the threshold bin are skipped
    neg_zero: bool  # holds -0.0, whose sign bit must be cleared so that it ranks as +0.0


def _bit_chunks(t: torch.Tensor, neg_zero: bool, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, int32 bit patterns of the float32 values) per chunk of ``t``'s flat view.

    A chunk may live in a reused buffer: use it before asking for the next one.
    """
    flat = t.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.to("cpu")
    n = flat.numel()
    if flat.dtype == torch.float32 and not neg_zero:
        bits = flat.numpy().view(np.int32)  # a view: no copy of the tensor
        for start in range(0, n, chunk):
            yield start, bits[start : start + chunk]
        return
    buf = torch.empty(min(chunk, n), dtype=torch.float32)
    buf_bits = buf.numpy().view(np.int32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        buf[: stop - start].copy_(flat[start:stop])  # converts bf16/fp16/fp64 one chunk at a time
        out = buf_bits[: stop - start]
        if neg_zero:
            np.bitwise_and(out, 0x7FFFFFFF, out=out)
        yield start, out


def _bincount(values: np.ndarray) -> np.ndarray:
    """65,536-bin histogram of int32 values in [0, 65536) (torch.bincount: ~4× numpy.bincount on one thread)."""
    return torch.bincount(torch.from_numpy(values), minlength=_BINS).numpy()


def _check_values(name: str, t: torch.Tensor) -> None:
    x = t.detach()
    if not bool(torch.isfinite(x).all()):
        raise ProbeDivergedError(
            f"the update magnitudes of parameter {name!r} contain NaN or inf: the probe diverged. Lower the probe "
            "learning rate (or shorten the probe, or enable gradient clipping) and run the probe again."
        )
    if bool((x < 0).any()):
        raise DPIConfigError(
            f"deltas[{name!r}] has negative values; select_core ranks update magnitudes |θ − θ0|, so pass "
            "(theta - theta0).abs() or use update_magnitudes(model, reference)."
        )


def _histogram(name: str, t: torch.Tensor, chunk: int) -> tuple[np.ndarray, _Info]:
    """Pass 1 for one tensor: the high-16-bit histogram, validated."""
    n = t.numel()
    hist = np.zeros(_BINS, dtype=np.int64)
    high = np.empty(min(chunk, n), dtype=np.uint32)
    for _, bits in _bit_chunks(t, False, chunk):
        out = high[: bits.size]
        # logical shift of the unsigned view: a set sign bit lands in bins >= 0x8000 instead of going negative
        np.right_shift(bits.view(np.uint32), 16, out=out)
        hist += _bincount(out.view(np.int32))
    neg_zero = False
    if hist[_FIRST_BAD_BIN:].any():
        _check_values(name, t)
        # no NaN, inf or negative value: what sits in the bad bins is -0.0, which ranks as +0.0
        neg_zero = True
        hist[0] += hist[_NEG_ZERO_BIN]
        hist[_NEG_ZERO_BIN] = 0
    nonzero = np.flatnonzero(hist)
    top = int(nonzero[-1]) if nonzero.size else -1
    return hist, _Info(name, tuple(t.shape), n, top, neg_zero)


def _boundary(hist: np.ndarray, k: int) -> tuple[int, int]:
    """(b, above): the bin holding the k-th largest element (1 <= k <= hist.sum()) and the count in bins above it."""
    at_or_above = np.cumsum(hist[::-1])[::-1]
    b = int(np.flatnonzero(at_or_above >= k)[-1])
    above = int(at_or_above[b + 1]) if b + 1 < hist.size else 0
    return b, above


def _index_dtype(numel: int):
    return np.int32 if numel < 2**31 else np.int64


def _first_eq_only(eq: np.ndarray, take: int) -> np.ndarray:
    """Mask keeping only the first ``take`` True entries of ``eq``."""
    keep = eq.copy()
    keep[np.flatnonzero(eq)[take:]] = False
    return keep


def _select(
    iterate: Callable[[set[str] | None], Iterator[tuple[str, torch.Tensor]]],
    infos: list[_Info],
    hist: np.ndarray,
    k: int,
    chunk: int,
) -> Iterator[tuple[str, np.ndarray]]:
    """Passes 2 (and 3): yield (name, sorted flat indices) of the k selected elements, in tensor order.

    Tensors without a selected element may be left out.
    """
    b, above = _boundary(hist, k)
    need = k - above  # elements still to take from bin b (>= 1)
    lo, hi = b << 16, (b + 1) << 16  # bin b holds the bit patterns in [lo, hi)
    by_name = {i.name: i for i in infos}
    wanted = {i.name for i in infos if i.top_bin >= b}
    if hist[b] <= _MAX_BOUNDARY:
        yield from _select_kept(iterate, by_name, wanted, lo, hi, need, chunk)
    else:
        yield from _select_three_passes(iterate, by_name, wanted, lo, hi, need, chunk)


def _select_kept(iterate, by_name, wanted, lo, hi, need, chunk):
    # Pass 2 keeps every element >= lo (all selected except those of bin b not chosen below) plus, for the
    # elements of bin b, their position among them and their low 16 bits.
    kept: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    lows: list[np.ndarray] = []
    for name, t in iterate(wanted):
        info = by_name[name]
        idx_dtype = _index_dtype(info.numel)
        idx_parts, pos_parts, count = [], [], 0
        ge = np.empty(min(chunk, info.numel), dtype=bool)
        for start, bits in _bit_chunks(t, info.neg_zero, chunk):
            at = np.flatnonzero(np.greater_equal(bits, lo, out=ge[: bits.size]))
            if not at.size:
                continue
            values = bits[at]
            in_bin = np.flatnonzero(values < hi)
            at += start
            idx_parts.append(at.astype(idx_dtype, copy=False))
            if in_bin.size:
                pos_parts.append(in_bin + count)
                lows.append(values[in_bin] & 0xFFFF)
            count += at.size
        if idx_parts:
            kept[name] = (np.concatenate(idx_parts), _concat(pos_parts, np.int64))
    low = _concat(lows, np.int32)
    del lows
    t_lo, above = _boundary(_bincount(low), need)
    eq = low == t_lo
    chosen = (low > t_lo) | _first_eq_only(eq, need - above)
    del low, eq
    offset = 0
    for name in list(kept):
        idx, pos = kept.pop(name)
        mine = chosen[offset : offset + pos.size]
        offset += pos.size
        keep = np.ones(idx.size, dtype=bool)
        keep[pos[~mine]] = False
        yield name, idx[keep]


def _select_three_passes(iterate, by_name, wanted, lo, hi, need, chunk):
    # Bin b is too large to keep: pass 2 only histograms its low 16 bits, pass 3 collects the selection.
    low_hist = np.zeros(_BINS, dtype=np.int64)
    for name, t in iterate(wanted):
        for _, bits in _bit_chunks(t, by_name[name].neg_zero, chunk):
            values = bits[np.flatnonzero(bits >= lo)]
            low_hist += _bincount(values[values < hi] & 0xFFFF)
    t_lo, above = _boundary(low_hist, need)
    threshold = lo | t_lo
    remaining = need - above  # elements == threshold still to take, earliest first
    for name, t in iterate(wanted):
        info = by_name[name]
        idx_dtype = _index_dtype(info.numel)
        parts = []
        for start, bits in _bit_chunks(t, info.neg_zero, chunk):
            if remaining:
                at = np.flatnonzero(bits >= threshold)
                eq = bits[at] == threshold
                n_eq = int(np.count_nonzero(eq))
                if n_eq > remaining:
                    at = at[~eq | _first_eq_only(eq, remaining)]
                    n_eq = remaining
                remaining -= n_eq
            else:
                at = np.flatnonzero(bits > threshold)
            if at.size:
                parts.append((at + start).astype(idx_dtype, copy=False))
        if parts:
            yield name, np.concatenate(parts)


def _concat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def _to_entry(shape: tuple[int, ...], idx: np.ndarray | None):
    # The indices are sorted and unique by construction, so the mask entry is built directly (CoreMask.from_indices
    # would re-sort them with torch.unique: ~4 s for the 25M indices of p = 5% at 500M elements).
    flat = torch.empty(0, dtype=torch.int64) if idx is None else torch.from_numpy(idx.astype(np.int64, copy=False))
    return _make_entry(shape, flat)


def _entries_in_order(infos: list[_Info], selected: Iterator[tuple[str, np.ndarray]]) -> dict:
    """Mask entries for every tensor in ``infos`` order, consuming ``selected`` (a subset, in the same order)."""
    entries = {}
    pending = next(selected, None)
    for info in infos:
        idx = None
        if pending is not None and pending[0] == info.name:
            idx = pending[1]
            pending = next(selected, None)
        entries[info.name] = _to_entry(info.shape, idx)
    return entries


# ---------------------------------------------------------------------------------------------------- public API
def select_core(
    deltas,
    core_fraction: float,
    scope: str = "global",
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> CoreMask:
    """The core region: exactly the ⌊p·N⌋ largest update magnitudes, streaming and exact.

    Every selected value is >= every unselected value. Ties are broken deterministically: among equal values the
    earlier tensor (in iteration order of ``deltas``) wins, then the smaller flat (row-major) index. Values are
    compared as float32 (bf16, fp16 and fp32 convert exactly; fp64 is rounded to float32 first). Zeros are legal and
    -0.0 ranks as +0.0.

    The model is never concatenated: the selection reads each tensor in chunks of 2**18 elements, so the extra
    memory is O(largest tensor) at most (a copy of a tensor only when it is not a contiguous CPU tensor) plus the
    selected indices. A global selection reads ``deltas`` two times (three with massive ties at the threshold);
    ``scope="per_tensor"`` reads it once.

    Args:
        deltas: the update magnitudes |θ − θ0| (non-negative floating tensors of any dtype and device), as

            * a mapping name → tensor (e.g. a dict, or :func:`update_magnitudes`, whose values are computed lazily
              and only for considered names);
            * a re-iterable iterable of ``(name, tensor)`` pairs (e.g. a list), read once per pass;
            * a zero-argument callable returning a fresh iterator of pairs, called once per pass;
            * a one-shot iterator (e.g. a generator): with ``scope="global"`` the tensors it yields are kept (as the
              list of tensors it yields, never concatenated) for the later passes, so memory is that of the deltas;
              with ``scope="per_tensor"`` it is read once and nothing is kept.
        core_fraction: p, the fraction of the considered elements to select, a real number in (0, 1] (paper default
            0.01). ⌊p·N⌋ is computed exactly on p's decimal value (``0.29`` of 100 elements is 29).
        scope: ``"global"`` (default): ⌊p·N⌋ over all considered elements together (as the paper); or
            ``"per_tensor"``: ⌊p·n_t⌋ of each tensor's n_t elements.
        include: name patterns of the parameters to consider (see :func:`filter_parameter_names`); None (default)
            considers every parameter.
        exclude: name patterns of parameters to leave out (e.g. ``["embed_tokens", "norm"]``); None (default).

    Sharded values (FSDP2): when the first considered value is a DTensor sharded ``Shard(0)`` on a 1-D device mesh,
    every process of the mesh must call ``select_core`` with the same names in the same order; each reads only its
    local shards and the exact selection runs with collectives over the mesh's process group (all-reduced 65,536-bin
    histograms, ties broken in global order: earlier tensor, then smaller global flat index). Every rank returns the
    same :class:`CoreMask` in global indices and global shapes: the elements one process selects from the gathered
    tensors. :func:`update_magnitudes` of a ``fully_shard`` model yields such DTensors. A signal held as local
    shards (e.g. an fp32 Σg² accumulator shaped like ``p.to_local()``) is passed as
    ``DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())``.
    A plain tensor among DTensors is taken to be identical on every rank (replicated) and counted once. Other
    placements (tensor parallel, ``Replicate``), 2-D meshes and mixed meshes raise :class:`DPIConfigError`; an
    error on one rank (e.g. NaN) is raised on every rank instead of leaving the others waiting.

    Returns:
        A :class:`CoreMask` over every considered parameter (with its shape), including those with nothing selected.

    Raises:
        DPIConfigError: bad ``core_fraction``, ``scope`` or patterns; empty ``deltas`` or every parameter excluded;
            non-floating or negative values; ⌊p·N⌋ = 0 (for ``per_tensor``: ⌊p·n_t⌋ = 0 for every tensor); a
            re-read source that yields different parameters.
        ProbeDivergedError: NaN or inf in a tensor (named in the message).
    """
    fraction = _check_fraction(core_fraction)
    validate_scope(scope)
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude")
    source = _Source(deltas, inc, exc, single_pass=(scope == "per_tensor"))
    shapes = source.known_shapes()
    if shapes is not None:
        _check_size([math.prod(s) for s in shapes], fraction, scope)
    chunk = _CHUNK
    pairs = source.iterate()
    first = next(pairs, None)
    if first is not None:
        if _is_dtensor(first[1]):
            from .distributed_selection import select_sharded

            return select_sharded(
                itertools.chain([first], pairs), source.iterate, fraction, scope, chunk,
                lambda: _nothing_left_error(source.all_names(), inc, exc),
            )
        pairs = itertools.chain([first], pairs)
    if scope == "per_tensor":
        entries, sizes = {}, []
        for name, t in pairs:
            hist, info = _histogram(name, t, chunk)
            sizes.append(info.numel)
            k = _core_size(info.numel, fraction)
            if k:
                entries.update(_entries_in_order([info], _select(lambda w: iter([(name, t)]), [info], hist, k, chunk)))
            else:
                entries[name] = _to_entry(info.shape, None)
        if not entries:
            raise _nothing_left_error(source.all_names(), inc, exc)
        _check_size(sizes, fraction, scope)
        return CoreMask(entries)

    infos, hist = [], np.zeros(_BINS, dtype=np.int64)
    for name, t in pairs:
        h, info = _histogram(name, t, chunk)
        hist += h
        infos.append(info)
    if not infos:
        raise _nothing_left_error(source.all_names(), inc, exc)
    sizes = [i.numel for i in infos]
    _check_size(sizes, fraction, scope)
    k = _core_size(sum(sizes), fraction)
    return CoreMask(_entries_in_order(infos, _select(source.iterate, infos, hist, k, chunk)))


def _check_size(sizes: list[int], fraction: Fraction, scope: str) -> None:
    if scope == "global":
        if _core_size(sum(sizes), fraction) == 0:
            raise _too_small_error(fraction, sum(sizes), scope)
    elif not any(_core_size(n, fraction) for n in sizes):
        raise _too_small_error(fraction, max(sizes, default=0), scope)
