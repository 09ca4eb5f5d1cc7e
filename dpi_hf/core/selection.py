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

The passes live in :mod:`dpi_hf.core.radix` (shared with :mod:`dpi_hf.core.distributed_selection`, which runs them
on DTensor shards), the name patterns and the input source in :mod:`dpi_hf.core.selection_input`.

Elementwise work on chunks uses numpy (measured faster than torch for compare + nonzero on one thread); counting uses
``torch.bincount`` on int32 (measured several times faster than ``numpy.bincount``). Nothing here imports
transformers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import numpy as np

from .distributed_selection import select_sharded
from .masks import CoreMask
from .radix import (  # noqa: F401  (CORE_SCOPES and the validators are re-exported)
    _BINS,
    CORE_SCOPES,
    _check_fraction,
    _check_size,
    _core_size,
    _entries_in_order,
    _histogram,
    _select,
    _to_entry,
    validate_core_fraction,
    validate_scope,
)
from .selection_input import _nothing_left_error, _patterns, _Source, filter_parameter_names
from .sharding import is_dtensor as _is_dtensor

__all__ = ["filter_parameter_names", "select_core"]

# Elements per chunk: 2**18 int32 = 1 MiB buffers stay in cache; measured as fast as 2**20 and faster than 2**16.
_CHUNK = 1 << 18
# Largest threshold bin whose elements pass 2 keeps in memory (index + position + low bits ≈ 20 bytes each, so at
# most ~80 MiB); a larger bin (massive ties) takes the third pass instead.
_MAX_BOUNDARY = 1 << 22


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
    histograms, ties broken in global order: earlier tensor, then smaller global flat index). Each rank returns its
    part, a :class:`~dpi_hf.core.sharded_mask.ShardedCoreMask`: the selected elements of its own rows, in global
    indices and global shapes, with global counts; the parts of all ranks together are the elements one process
    selects from the gathered tensors, and ``mask.gather()`` (on every rank) builds that global :class:`CoreMask` on
    rank 0. :func:`update_magnitudes` of a ``fully_shard`` model yields such DTensors. A signal held as local
    shards (e.g. an fp32 Σg² accumulator shaped like ``p.to_local()``) is passed as
    ``DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())``.
    A plain tensor among DTensors is taken to be identical on every rank (replicated) and counted once. Other
    placements (tensor parallel, ``Replicate``), 2-D meshes and mixed meshes raise :class:`DPIConfigError`; an
    error on one rank (e.g. NaN) is raised on every rank instead of leaving the others waiting.

    Returns:
        A :class:`CoreMask` over every considered parameter (with its shape), including those with nothing selected
        (for sharded values this rank's :class:`~dpi_hf.core.sharded_mask.ShardedCoreMask`).

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
            return select_sharded(
                itertools.chain([first], pairs), source.iterate, fraction, scope, chunk, _MAX_BOUNDARY,
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
                one = _select(lambda w: iter([(name, t)]), [info], hist, k, chunk, _MAX_BOUNDARY)
                entries.update(_entries_in_order([info], one))
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
    return CoreMask(_entries_in_order(infos, _select(source.iterate, infos, hist, k, chunk, _MAX_BOUNDARY)))
