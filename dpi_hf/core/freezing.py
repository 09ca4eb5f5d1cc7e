"""Exact parameter freezing: selected elements stay bit-identical through any optimizer step.

A gradient hook that multiplies by a mask is not a freeze: decoupled weight decay, momentum carried
from earlier steps and 8-bit optimizer state all move masked elements. :class:`ParameterFreezer` does two things
that, together, held bit-identity in every case measured:

1. a ``register_post_accumulate_grad_hook`` on every affected parameter zeroes the frozen entries of ``p.grad`` once
   the gradient is accumulated, so gradient clipping norms and optimizer moments never see them;
2. after every optimizer step (``register_step_post_hook`` on the innermost torch optimizer, or an explicit
   :meth:`ParameterFreezer.restore` call) the saved values are written back.

Memory: only a compact copy is kept, per parameter with at least one frozen element: the flat indices (int32 when
the tensor has fewer than 2**31 elements) and the frozen values in the parameter's own dtype, on its device —
64 bits per frozen fp32 element, so 1.92 bits per model parameter at 3% frozen. A parameter frozen entirely keeps
its values only. Never a full snapshot of the model.

Speed: writes use ``index_copy_``/``index_fill_`` on a flat view. In torch 2.13 they only accept int64
indices; storing int64 would cost 2.88 bits/param at 3% frozen, so the int32 indices are widened per call (a
transient copy of one tensor's indices). The writes are memory-bound: widened int32, stored int64 and
``index_put_`` with int32 measured within ~10% of each other per pass and alike per train step (docs/benchmarks.md).

Sharded parameters: a DTensor parameter (FSDP2 ``fully_shard``) sharded on dim 0 is handled per local shard — the
full-tensor flat indices are mapped to the rows this rank holds (:func:`local_shard_indices`) and hooks write into
``to_local()`` views. Other placements raise :class:`NotImplementedError`.

This module is torch-only (no transformers/accelerate import); accelerate's optimizer wrapper is unwrapped by
duck-typing its ``.optimizer`` attribute.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .errors import DPIConfigError
from .masks import CoreMask

try:  # torch builds without distributed support have no DTensor; then no parameter can be one
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None
    Shard = None

_INT32_LIMIT = 2**31 - 1


@dataclass
class _Frozen:
    """The saved state of one parameter's frozen elements (on this rank)."""

    param: torch.nn.Parameter
    # flat positions within the (local) tensor; None when every element of it is frozen
    indices: torch.Tensor | None
    # saved values, same dtype/device as the parameter; flat when indices is set, else in the tensor's shape
    values: torch.Tensor

    def nbytes(self) -> int:
        n = self.values.numel() * self.values.element_size()
        if self.indices is not None:
            n += self.indices.numel() * self.indices.element_size()
        return n


def _is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory this process owns: the local shard of a DTensor, else the tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


# element dtype → integer dtype of the same width, for bit-exact writes through numpy
_NUMPY_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
               torch.float64: torch.int64}


@functools.lru_cache(maxsize=None)
def _bit_pattern(value: float, dtype: torch.dtype) -> int:
    """``value`` in ``dtype`` reinterpreted as the same-width integer (cached: called per parameter per step)."""
    return torch.tensor([value], dtype=dtype).view(_NUMPY_BITS[dtype]).item()


def _write(target: torch.Tensor, indices: torch.Tensor | None, values: torch.Tensor | float) -> None:
    """Write ``values`` (a tensor, or a scalar for every position) at flat row-major ``indices`` of ``target``.

    ``indices=None`` means every element. Contiguous CPU targets are written through a numpy view (int64 fancy
    indexing, measured ~2x faster than ``index_fill_``/``index_copy_``); other contiguous targets (GPU) take
    ``index_copy_``/``index_fill_`` on a flat view. Both need int64 indices, so stored int32 indices are widened per
    call (a transient copy of one tensor's indices, freed at once).
    """
    if indices is None:
        if isinstance(values, torch.Tensor):
            target.copy_(values)
        else:
            target.fill_(values)
    elif target.device.type == "cpu" and target.is_contiguous() and target.dtype in _NUMPY_BITS:
        # numpy's scatter with int64 indices runs ~2x faster than torch's index_fill_/index_copy_ on the CPU
        # (memory-bound scattered writes); dtypes are reinterpreted as same-width integers, so bf16 works and
        # every bit is written exactly
        bits = _NUMPY_BITS[target.dtype]
        flat = target.detach().view(-1).view(bits).numpy()
        positions = indices.long().numpy()
        if isinstance(values, torch.Tensor):
            flat[positions] = values.detach().view(-1).view(bits).numpy()
        else:
            flat[positions] = _bit_pattern(values, target.dtype)
    elif target.is_contiguous():
        flat = target.view(-1)
        if isinstance(values, torch.Tensor):
            flat.index_copy_(0, indices.long(), values)
        else:
            flat.index_fill_(0, indices.long(), values)
    else:
        # a flat view of a non-contiguous tensor would be a copy; address the elements by coordinates instead
        coordinates = torch.unravel_index(indices, target.shape)
        if not isinstance(values, torch.Tensor):
            values = torch.tensor(values, dtype=target.dtype, device=target.device)
        target.index_put_(coordinates, values)


def _shard_rows(rows: int, num_shards: int, shard_index: int) -> tuple[int, int]:
    """``[first, last)`` rows of shard ``shard_index`` when ``rows`` rows are split by ``torch.chunk`` semantics."""
    chunk_rows = -(-rows // num_shards)  # ceil
    first = min(shard_index * chunk_rows, rows)
    return first, min(first + chunk_rows, rows)


def local_shard_indices(
    flat_indices: torch.Tensor, shape: tuple[int, ...], num_shards: int, shard_index: int
) -> tuple[torch.Tensor, int, int]:
    """Map flat indices of a full tensor to the dim-0 shard that one rank holds.

    The shards follow ``torch.chunk`` semantics, as FSDP2 ``fully_shard`` and DTensor ``Shard(0)`` do: every shard
    has ``ceil(shape[0] / num_shards)`` rows except the last non-empty one; trailing shards may be empty.

    Args:
        flat_indices: sorted 1-D integer tensor of row-major positions in the full tensor.
        shape: shape of the full (unsharded) tensor.
        num_shards: number of shards along dim 0 (the mesh dimension's size).
        shard_index: which shard this rank holds, in ``[0, num_shards)``.

    Returns:
        ``(local, start, stop)``: ``local`` the flat positions inside the shard (int64, sorted), and
        ``flat_indices[start:stop]`` the full-tensor positions they come from.
    """
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise DPIConfigError(
            f"shard_index={shard_index} with num_shards={num_shards}: need num_shards >= 1 and "
            "0 <= shard_index < num_shards."
        )
    if len(shape) == 0:
        raise DPIConfigError("a 0-dim tensor cannot be sharded on dim 0; pass the shape of a tensor with ndim >= 1.")
    row_numel = math.prod(int(s) for s in shape[1:])
    first_row, last_row = _shard_rows(int(shape[0]), num_shards, shard_index)
    flat = flat_indices.to(torch.int64)
    bounds = torch.tensor([first_row * row_numel, last_row * row_numel], dtype=torch.int64)
    start, stop = (int(b) for b in torch.searchsorted(flat, bounds))
    return flat[start:stop] - first_row * row_numel, start, stop


def _dtensor_shard(name: str, p: torch.Tensor) -> tuple[int, int] | None:
    """``(num_shards, shard_index)`` of this rank for a DTensor parameter; None when this rank holds no part of it.

    Supported placements: ``Shard(0)`` on at most one mesh dimension, ``Replicate()`` on the others (FSDP2 and HSDP).
    """
    placements = tuple(p.placements)
    sharded = [d for d, pl in enumerate(placements) if not pl.is_replicate()]
    unsupported = [placements[d] for d in sharded if type(placements[d]) is not Shard or placements[d].dim != 0]
    if unsupported or len(sharded) > 1:
        raise NotImplementedError(
            f"parameter {name!r} is a DTensor with placements {placements}; ParameterFreezer supports Shard(0) on at "
            "most one mesh dimension (FSDP2 fully_shard, HSDP) and Replicate() elsewhere."
        )
    coordinate = p.device_mesh.get_coordinate()
    if coordinate is None:
        return None
    if not sharded:
        return 1, 0
    d = sharded[0]
    return p.device_mesh.size(d), coordinate[d]


def innermost_optimizer(optimizer: object) -> object:
    """The innermost object of a ``.optimizer`` chain that has ``register_step_post_hook``.

    accelerate's ``AcceleratedOptimizer`` subclasses ``torch.optim.Optimizer`` without calling its ``__init__`` and
    overrides ``step``, so hooks registered on it never fire: the deepest capable object is the one that steps.
    """
    chain = [optimizer]
    while getattr(chain[-1], "optimizer", None) is not None and all(chain[-1].optimizer is not o for o in chain):
        chain.append(chain[-1].optimizer)
    for candidate in reversed(chain):
        if callable(getattr(candidate, "register_step_post_hook", None)):
            return candidate
    raise DPIConfigError(
        f"optimizer={type(optimizer).__name__} (unwrapped through .optimizer: "
        f"{[type(o).__name__ for o in chain]}) has no register_step_post_hook; pass a torch.optim.Optimizer, or "
        "call attach() without an optimizer and ParameterFreezer.restore() after every optimizer step."
    )


class ParameterFreezer:
    """Keep selected elements of a model's parameters bit-identical during training.

    Construction validates the mask against the model and saves the frozen values (a compact copy); :meth:`attach`
    installs the gradient-zeroing hooks and, given an optimizer, the post-step restore. Typical use::

        freezer = ParameterFreezer(model, frozen_mask).attach(optimizer)
        ...  # train as usual: backward, clip, optimizer.step()
        freezer.detach()

    or ``with ParameterFreezer(model, frozen_mask).attach(optimizer): ...``. Without an optimizer, call
    :meth:`restore` after every optimizer step yourself (e.g. from a Trainer callback's ``on_optimizer_step``);
    the gradient hooks alone are not exact under weight decay.

    Args:
        model: the module whose parameters are frozen in part.
        frozen: the elements to freeze; its names are parameter names of ``model`` as in ``named_parameters()``
            (aliases of tied parameters are accepted) and its shapes must equal the parameters' (full, unsharded)
            shapes. Parameters missing from the mask are left alone.
        strict: when True (default) a mask name that is not a parameter of ``model`` is an error; when False such
            names are ignored.

    Raises:
        DPIConfigError: ``model``/``frozen`` of the wrong type, an unknown name (strict), or a shape mismatch.
        NotImplementedError: a DTensor parameter with placements other than Shard(0)/Replicate.
    """

    def __init__(self, model: torch.nn.Module, frozen: CoreMask, strict: bool = True):
        if not isinstance(model, torch.nn.Module):
            raise DPIConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not isinstance(frozen, CoreMask):
            raise DPIConfigError(
                f"frozen must be a CoreMask, got {type(frozen).__name__}; build one with CoreMask.from_indices or "
                "CoreMask.from_dense."
            )
        self._mask = frozen
        # every name a parameter is reachable by, tied aliases included, mapped to the parameter itself
        by_name = dict(model.named_parameters(remove_duplicate=False))
        self._total_params = sum(p.numel() for p in model.parameters())
        # parameter id -> (canonical name, parameter, mask names that address it)
        self._targets: dict[int, tuple[str, torch.nn.Parameter, list[str]]] = {}
        for name in frozen.names():
            p = by_name.get(name)
            if p is None:
                if strict:
                    raise DPIConfigError(
                        f"frozen names parameter {name!r}, which the model does not have; pass masks computed on "
                        "this model, or strict=False to ignore unknown names."
                    )
                continue
            if tuple(p.shape) != frozen.shape(name):
                raise DPIConfigError(
                    f"frozen mask for parameter {name!r} has shape {frozen.shape(name)} but the parameter has shape "
                    f"{tuple(p.shape)}; the mask was computed on a different model."
                )
            if frozen.count(name) == 0:
                continue
            self._targets.setdefault(id(p), (name, p, []))[2].append(name)
        self._frozen_count = sum(self._full_indices(names).numel() for _, _, names in self._targets.values())
        self._records: list[_Frozen] | None = None
        self._handles: list = []
        self._attached = False
        self._capture()

    # ------------------------------------------------------------------------------------------------ saved values
    def _full_indices(self, names: list[str]) -> torch.Tensor:
        """Sorted int64 flat indices of one parameter, merged over the mask names (tied aliases) addressing it."""
        if len(names) == 1:
            return self._mask.indices(names[0])
        return torch.unique(torch.cat([self._mask.indices(n) for n in names]))

    def _capture(self) -> None:
        """Save the current values of the frozen elements (this rank's part of them)."""
        records = []
        with torch.no_grad():
            for name, p, names in self._targets.values():
                flat = self._full_indices(names)
                local = _local(p)
                if _is_dtensor(p):
                    shard = _dtensor_shard(name, p)
                    if shard is None:
                        continue
                    flat, _, _ = local_shard_indices(flat, tuple(p.shape), *shard)
                    if flat.numel() == 0:
                        continue
                    first, last = _shard_rows(p.shape[0], *shard)
                    expected = (last - first) * math.prod(p.shape[1:])
                    if local.numel() != expected:
                        raise NotImplementedError(
                            f"parameter {name!r}: the local shard has {local.numel()} elements, but torch.chunk "
                            f"sharding of shape {tuple(p.shape)} over {shard[0]} shards gives {expected}; padded or "
                            "custom shardings are not supported."
                        )
                if flat.numel() == local.numel():
                    records.append(_Frozen(p, None, local.detach().clone()))
                    continue
                index_dtype = torch.int32 if local.numel() <= _INT32_LIMIT else torch.int64
                indices = flat.to(device=local.device, dtype=index_dtype)
                # advanced indexing gathers into a new tensor: the saved values share no memory with the parameter
                if local.is_contiguous():
                    values = local.view(-1)[indices]
                else:
                    values = local[torch.unravel_index(indices, local.shape)]
                records.append(_Frozen(p, indices, values))
        self._records = records

    # ------------------------------------------------------------------------------------------------ public API
    def attach(self, optimizer: object | None = None) -> ParameterFreezer:
        """Install the hooks; returns ``self``.

        Args:
            optimizer: the optimizer that steps the model (default None). A torch optimizer, or a wrapper exposing
                it as ``.optimizer`` (accelerate's ``AcceleratedOptimizer``, possibly nested): the restore hook goes
                on the innermost one that has ``register_step_post_hook``. With None only the gradient hooks are
                installed and :meth:`restore` must be called after each optimizer step.

        After :meth:`detach`, attaching again saves the values the parameters hold at that moment.
        """
        if self._attached:
            raise DPIConfigError("this ParameterFreezer is already attached; call detach() before attaching again.")
        inner = innermost_optimizer(optimizer) if optimizer is not None else None
        if self._records is None:
            self._capture()
        handles = []
        for record in self._records:
            if record.param.requires_grad:
                handles.append(record.param.register_post_accumulate_grad_hook(self._grad_hook(record)))
        if inner is not None:
            handles.append(inner.register_step_post_hook(lambda _opt, _args, _kwargs: self.restore()))
        self._handles = handles
        self._attached = True
        return self

    def detach(self) -> None:
        """Remove every hook and free the saved copies; safe to call more than once."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._records = None
        self._attached = False

    def restore(self) -> None:
        """Write the saved values back into the parameters now (exact: same dtype, same bits)."""
        if self._records is None:
            raise DPIConfigError("this ParameterFreezer was detached and holds no saved values; call attach() first.")
        with torch.no_grad():
            for record in self._records:
                _write(_local(record.param), record.indices, record.values)

    def zero_frozen_grads(self) -> None:
        """Zero the frozen entries of every existing ``p.grad`` now (what the attached hooks do after backward)."""
        if self._records is None:
            raise DPIConfigError("this ParameterFreezer was detached and holds no saved values; call attach() first.")
        with torch.no_grad():
            for record in self._records:
                if record.param.grad is not None:
                    self._zero(record.param.grad, record)

    @staticmethod
    def _zero(grad: torch.Tensor, record: _Frozen) -> None:
        _write(_local(grad), record.indices, 0.0)

    def _grad_hook(self, record: _Frozen):
        def hook(param: torch.Tensor) -> None:
            # runs once the gradient is fully accumulated into param.grad, before clipping and the optimizer
            with torch.no_grad():
                self._zero(param.grad, record)

        return hook

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def attached(self) -> bool:
        """Whether the hooks are installed."""
        return self._attached

    @property
    def frozen_count(self) -> int:
        """Number of frozen elements over the whole model (full tensors, not only this rank's shards)."""
        return self._frozen_count

    @property
    def nbytes(self) -> int:
        """Bytes held by this process for the saved indices and values (0 after :meth:`detach`)."""
        return sum(r.nbytes() for r in self._records) if self._records is not None else 0

    @property
    def bits_per_parameter(self) -> float:
        """``nbytes * 8`` divided by the number of parameters of the model (full tensors)."""
        return self.nbytes * 8 / self._total_params if self._total_params else 0.0

    def frozen_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """``(name, parameter)`` of every parameter with at least one frozen element."""
        for name, p, _ in self._targets.values():
            yield name, p

    def __enter__(self) -> ParameterFreezer:
        if not self._attached:
            self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return (
            f"ParameterFreezer({self._frozen_count:,} frozen elements in {len(self._targets)} parameters, "
            f"{self.bits_per_parameter:.2f} bits/param, {state})"
        )
