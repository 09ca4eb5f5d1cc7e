"""The exact radix select's building blocks, shared by the one-process and the distributed core selection.

:mod:`dpi_hf.core.selection` (one process) and :mod:`dpi_hf.core.distributed_selection` (DTensor shards) both run
the same passes over the float32 bit patterns of the update magnitudes (for non-negative floats the int32 bit
pattern is monotone in the value), one tensor and one chunk at a time:

* :func:`_histogram` (pass 1): a 65,536-bin ``torch.bincount`` histogram of the high 16 bits, which also validates
  the values (NaN/inf and negative values land in bins no finite magnitude reaches);
* :func:`_boundary`: the bin that holds the k-th largest value;
* :func:`_select` (passes 2 and 3 of one process): the selected flat indices per tensor.

It also holds the checks of p and the scope, and ⌊p·N⌋. Both selection modules import from here and never from
each other's privates. Torch and numpy only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from .errors import DPIConfigError, ProbeDivergedError
from .masks import _make_entry

_BINS = 1 << 16
# High 16 bits of +inf; NaN lies above it and every value with the sign bit set (negatives, -0.0) at 0x8000 or
# above, so a histogram with counts from this bin on flags a tensor that needs a closer look.
_FIRST_BAD_BIN = 0x7F80
# High 16 bits of -0.0 (sign bit only). After the closer look has ruled out negative values it holds only -0.0.
_NEG_ZERO_BIN = 0x8000

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



def _check_size(sizes: list[int], fraction: Fraction, scope: str) -> None:
    if scope == "global":
        if _core_size(sum(sizes), fraction) == 0:
            raise _too_small_error(fraction, sum(sizes), scope)
    elif not any(_core_size(n, fraction) for n in sizes):
        raise _too_small_error(fraction, max(sizes, default=0), scope)



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
    max_boundary: int,
) -> Iterator[tuple[str, np.ndarray]]:
    """Passes 2 (and 3): yield (name, sorted flat indices) of the k selected elements, in tensor order.

    ``max_boundary``: the largest threshold bin (in elements) that pass 2 keeps in memory; a larger one takes the
    third pass. Tensors without a selected element may be left out.
    """
    b, above = _boundary(hist, k)
    need = k - above  # elements still to take from bin b (>= 1)
    lo, hi = b << 16, (b + 1) << 16  # bin b holds the bit patterns in [lo, hi)
    by_name = {i.name: i for i in infos}
    wanted = {i.name for i in infos if i.top_bin >= b}
    if hist[b] <= max_boundary:
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

