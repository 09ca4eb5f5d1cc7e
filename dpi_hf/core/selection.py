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
flat (row-major) index win. :func:`update_magnitudes` supplies the magnitudes |θ − θ0| lazily from a model and its
reference weights (a CPU state dict or safetensors files), one tensor at a time.

The passes live in :mod:`dpi_hf.core.radix` (shared with :mod:`dpi_hf.core.distributed_selection`, which runs them
on DTensor shards), the name patterns and the input source in :mod:`dpi_hf.core.selection_input`.

Elementwise work on chunks uses numpy (measured faster than torch for compare + nonzero on one thread); counting uses
``torch.bincount`` on int32 (measured several times faster than ``numpy.bincount``). Nothing here imports
transformers.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from .distributed_selection import select_sharded
from .errors import DPIConfigError
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
from .sharding import dtensor_layout, is_dtensor as _is_dtensor

__all__ = ["UpdateMagnitudes", "filter_parameter_names", "select_core", "update_magnitudes"]

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


# ---------------------------------------------------------------------------------------------------- |θ − θ0|
class _SafetensorsReference:
    """θ0 read from safetensors files one tensor at a time (the files are memory-mapped, never loaded whole)."""

    def __init__(self, path: Path):
        self._handles: dict[Path, object] = {}
        if path.is_file():
            self._files = {name: path for name in self._open(path).keys()}
            return
        if not path.is_dir():
            raise DPIConfigError(
                f"reference={str(path)!r} does not exist; pass a state dict, a .safetensors file or a checkpoint dir."
            )
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise DPIConfigError(f"{index} is not a safetensors index (no 'weight_map'): {exc}") from None
            self._files = {name: path / fname for name, fname in weight_map.items()}
            return
        single = path / "model.safetensors"
        files = [single] if single.is_file() else sorted(path.glob("*.safetensors"))
        if not files:
            raise DPIConfigError(
                f"reference directory {str(path)!r} holds no model.safetensors, index or *.safetensors file; "
                "save the reference with model.save_pretrained(dir) or safetensors.torch.save_file."
            )
        self._files = {}
        for f in files:
            for name in self._open(f).keys():
                if name in self._files:
                    raise DPIConfigError(
                        f"tensor {name!r} is in both {self._files[name].name} and {f.name} under {str(path)!r}; "
                        "add a model.safetensors.index.json or keep one checkpoint per directory."
                    )
                self._files[name] = f

    def _open(self, file: Path):
        from safetensors import safe_open

        handle = self._handles.get(file)
        if handle is None:
            if not file.is_file():
                raise DPIConfigError(f"reference file {str(file)!r} (named in the index) does not exist.")
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types for unreadable headers
                raise DPIConfigError(f"cannot read {str(file)!r} as a safetensors file: {exc}") from None
            self._handles[file] = handle
        return handle

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def keys(self) -> list[str]:
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._files[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._open(self._files[name]).get_tensor(name)

    def get_rows(self, name: str, first: int, last: int) -> torch.Tensor:
        """Rows ``[first, last)`` only (a sharded parameter's part of a full checkpoint tensor)."""
        return self._open(self._files[name]).get_slice(name)[first:last]


class _MappingReference:
    def __init__(self, mapping: Mapping):
        self._mapping = mapping

    def __contains__(self, name: str) -> bool:
        return name in self._mapping

    def keys(self) -> list[str]:
        return list(self._mapping.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._mapping[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self._mapping[name]

    def get_rows(self, name: str, first: int, last: int) -> torch.Tensor:
        return self._mapping[name][first:last]


class UpdateMagnitudes(Mapping):
    """A lazy mapping name → |θ − θ0| (float32, CPU), computed from the current parameters when a value is read.

    Returned by :func:`update_magnitudes`; re-iterable, and only one magnitude tensor exists at a time when it is
    read in a loop (plus that parameter's reference tensor). Pass it straight to :func:`select_core`.
    """

    def __init__(
        self,
        params: dict[str, torch.Tensor],
        reference: _MappingReference | _SafetensorsReference,
        rows: dict[str, tuple[int, int]] | None = None,
    ):
        self._params = params
        self._reference = reference
        # DTensor parameters whose reference is the full tensor: the rows [first, last) of this rank's shard
        self._rows = rows or {}

    def __getitem__(self, name: str) -> torch.Tensor:
        current = self._params[name].detach()
        if name in self._rows:
            ref = self._reference.get_rows(name, *self._rows[name])
        else:
            ref = self._reference.get(name)
        if _is_dtensor(current):
            # the local shard's |θ − θ0|, computed on the shard's device and wrapped as a DTensor of the global
            # shape, so that select_core selects over all ranks (distributed_selection)
            from torch.distributed.tensor import DTensor

            local = current.to_local()
            delta = local.to(dtype=torch.float32, copy=True)
            delta.sub_(ref.detach().to(local.device))
            return DTensor.from_local(delta.abs_(), current.device_mesh, current.placements, run_check=False,
                                      shape=current.shape, stride=current.stride())
        delta = current.to(device="cpu", dtype=torch.float32, copy=True)
        delta.sub_(ref.detach().to("cpu"))  # promotes bf16/fp16 references into the float32 buffer
        return delta.abs_()

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name → shape of every magnitude tensor, without computing any."""
        return {n: tuple(p.shape) for n, p in self._params.items()}


def update_magnitudes(
    model_or_named_params,
    reference,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> UpdateMagnitudes:
    """Update magnitudes |θ − θ0| of a model against its reference weights, computed one tensor at a time.

    Args:
        model_or_named_params: the fine-tuned parameters θ: a ``torch.nn.Module`` (its ``named_parameters()`` that
            require grad) or a mapping name → tensor (all of them).
        reference: θ0, keyed by the same names: a mapping name → tensor (held on the CPU), a path to a
            ``.safetensors`` file, or a directory with ``model.safetensors``, a sharded checkpoint with
            ``model.safetensors.index.json``, or ``*.safetensors`` shards. Files are read one tensor at a time.
        include: name patterns of the parameters to keep (see :func:`filter_parameter_names`); None (default) keeps
            all.
        exclude: name patterns of parameters to leave out; None (default).

    Sharded models (FSDP2 ``fully_shard``): for a DTensor parameter the reference may be this rank's local shard
    (as :func:`~dpi_hf.core.snapshot_parameters` keeps it) or the full tensor (only the local rows are read, from
    files too); the value is the local |θ − θ0| in float32 on the shard's device, wrapped as a DTensor with the
    parameter's global shape and placements, which :func:`select_core` selects over all ranks.

    Returns:
        An :class:`UpdateMagnitudes` mapping name → float32 CPU tensor (a DTensor for DTensor parameters),
        re-iterable and lazy: memory O(largest tensor) while it is iterated. Values reflect the parameters at the
        time they are read.

    Raises:
        DPIConfigError: no parameter left, a parameter missing from the reference, a shape mismatch, a non-floating
            parameter, or an unreadable reference.
    """
    if isinstance(model_or_named_params, torch.nn.Module):
        params = {n: p for n, p in model_or_named_params.named_parameters() if p.requires_grad}
    elif isinstance(model_or_named_params, Mapping):
        params = dict(model_or_named_params.items())
    else:
        raise DPIConfigError(
            f"model_or_named_params is a {type(model_or_named_params).__name__}; pass a torch.nn.Module or a "
            "mapping name → parameter tensor."
        )
    names = filter_parameter_names(params, include, exclude)
    if not names:
        if not params:
            raise DPIConfigError(
                "model_or_named_params has no trainable parameter (requires_grad) to compare; unfreeze some."
            )
        raise _nothing_left_error(list(params), _patterns(include, "include"), _patterns(exclude, "exclude"))
    params = {n: params[n] for n in names}

    if isinstance(reference, Mapping):
        ref = _MappingReference(reference)
    elif isinstance(reference, (str, os.PathLike)):
        ref = _SafetensorsReference(Path(reference))
    else:
        raise DPIConfigError(
            f"reference is a {type(reference).__name__}; pass a state dict (name → tensor), a .safetensors file "
            "or a checkpoint directory."
        )
    rows: dict[str, tuple[int, int]] = {}
    for name, p in params.items():
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise DPIConfigError(
                f"parameter {name!r} is {getattr(p, 'dtype', type(p).__name__)}; update magnitudes need floating "
                "tensors: exclude it (exclude=[...])."
            )
        if name not in ref:
            known = ref.keys()
            raise DPIConfigError(
                f"parameter {name!r} is missing from the reference ({len(known)} tensors, e.g. {known[:3]!r}); key "
                "the reference by the same names as named_parameters() (no 'module.'/'base_model.' prefixes) or "
                "exclude the parameter."
            )
        ref_shape = ref.shape(name)
        if _is_dtensor(p):
            # a sharded parameter: the reference is this rank's local shard (snapshot_parameters) or the full tensor
            # (a checkpoint), of which only the rows of the local shard are read
            layout = dtensor_layout(name, p)
            local_shape = tuple(p.to_local().shape)
            if ref_shape == local_shape:
                continue
            if ref_shape == tuple(p.shape):
                rows[name] = (layout.first_row, layout.last_row)
                continue
            raise DPIConfigError(
                f"parameter {name!r} is sharded (global shape {tuple(p.shape)}, local shard {local_shape}) but the "
                f"reference has {ref_shape}; pass this rank's snapshot_parameters(model) or the full θ0 weights."
            )
        if ref_shape != tuple(p.shape):
            raise DPIConfigError(
                f"parameter {name!r} has shape {tuple(p.shape)} but the reference has {ref_shape}; pass the "
                "reference weights of this very model."
            )
    return UpdateMagnitudes(params, ref, rows)
