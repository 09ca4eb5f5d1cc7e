"""Sharded models in the engine: local shards of θ0, index maps of FSDP2 and DeepSpeed ZeRO-3, per-rank memory.

Under FSDP2 (``fully_shard``) every parameter is a DTensor sharded ``Shard(0)`` on a 1-D device mesh: rank ``r``
holds rows ``[r·⌈R/W⌉, min((r+1)·⌈R/W⌉, R))`` of an ``R``-row tensor (``torch.chunk`` semantics), i.e. one
contiguous range of the tensor's row-major flat indices. The engine never gathers such a tensor:

* :func:`snapshot_parameters` keeps θ0 as the local shard of every DTensor parameter (a CPU copy), so θ0 costs each
  rank 1/W of the model;
* :func:`restore_parameters` writes such a snapshot back bit-exactly (local shards into ``to_local()``);
* :func:`~dpi_hf.core.update_magnitudes` yields the local |θ − θ0| wrapped as a DTensor and
  :func:`~dpi_hf.core.select_core` selects over all ranks with all-reduced histograms (``distributed_selection``);
* :class:`~dpi_hf.core.ParameterFreezer` freezes per local shard.

DeepSpeed ZeRO-3 partitions each parameter's flat elements instead of its rows: rank ``r`` holds flat indices
``[r·⌈n/W⌉, min((r+1)·⌈n/W⌉, n))`` (the partition is padded to ⌈n/W⌉ elements). :func:`zero3_partition` and
:func:`zero3_local_indices` give that map; :class:`ZeroFreezer` applies a frozen mask to the fp32 master partitions
through DeepSpeed's public accessors (``deepspeed.utils.safe_get_local_fp32_param`` and friends). deepspeed is
imported lazily, inside the functions that need it.

This module is torch-only (no transformers/accelerate import).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import DPIConfigError
from .masks import CoreMask

try:  # torch builds without distributed support have no DTensor; then no tensor can be one
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None
    Shard = None

__all__ = [
    "ShardLayout",
    "ZeroFreezer",
    "dtensor_layout",
    "engine_memory_per_rank",
    "restore_parameters",
    "snapshot_parameters",
    "zero3_local_indices",
    "zero3_partition",
]


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(t, DTensor)


def _shard_rows(rows: int, num_shards: int, shard_index: int) -> tuple[int, int]:
    """``[first, last)`` rows of shard ``shard_index`` when ``rows`` rows are split by ``torch.chunk`` semantics."""
    chunk_rows = -(-rows // num_shards)  # ceil
    first = min(shard_index * chunk_rows, rows)
    return first, min(first + chunk_rows, rows)


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's part of a ``Shard(0)`` DTensor lies in the full tensor.

    Attributes:
        shape: the full (global) shape.
        num_shards: the size of the (1-D) device mesh.
        index: this rank's coordinate on the mesh.
        first_row, last_row: the rows ``[first_row, last_row)`` this rank holds.
        offset: the full tensor's flat (row-major) index of the local shard's element 0.
        local_numel: elements in the local shard.
    """

    shape: tuple[int, ...]
    num_shards: int
    index: int
    first_row: int
    last_row: int
    offset: int
    local_numel: int


def dtensor_layout(name: str, t) -> ShardLayout:
    """The :class:`ShardLayout` of a DTensor sharded ``Shard(0)`` on a 1-D mesh, else a :class:`DPIConfigError`.

    Args:
        name: the parameter's name, for the error message.
        t: a DTensor (a parameter after FSDP2 ``fully_shard``, or a value wrapped with ``DTensor.from_local``).

    Raises:
        DPIConfigError: a 2-D (or larger) mesh (HSDP, FSDP + TP), a placement other than ``Shard(0)`` (tensor
            parallel, ``Replicate``, ``Partial``), a rank outside the mesh, or a local shard that is not the
            ``torch.chunk`` share of the rows.
    """
    mesh = t.device_mesh
    placements = tuple(t.placements)
    if mesh.ndim != 1:
        raise DPIConfigError(
            f"parameter {name!r} is a DTensor on a {mesh.ndim}-D device mesh (placements {placements}); the DPI "
            "engine supports a 1-D mesh only: shard with fully_shard over one mesh dimension (no HSDP, no tensor "
            "parallel)."
        )
    placement = placements[0]
    if type(placement) is not Shard or placement.dim != 0:
        raise DPIConfigError(
            f"parameter {name!r} is a DTensor with placement {placement}; the DPI engine supports Shard(0) only "
            "(FSDP2 fully_shard): drop tensor parallelism / custom shard placements for DPI runs."
        )
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise DPIConfigError(
            f"parameter {name!r}: this rank is not in its device mesh; run the DPI engine on the mesh's ranks only."
        )
    shape = tuple(int(s) for s in t.shape)
    if not shape:
        raise DPIConfigError(f"parameter {name!r} is a 0-dim DTensor, which cannot be Shard(0); keep it replicated.")
    num_shards, index = mesh.size(0), coordinate[0]
    first, last = _shard_rows(shape[0], num_shards, index)
    row_numel = math.prod(shape[1:])
    local_numel = t.to_local().numel()
    if local_numel != (last - first) * row_numel:
        raise DPIConfigError(
            f"parameter {name!r}: the local shard has {local_numel} elements, but torch.chunk sharding of shape "
            f"{shape} over {num_shards} ranks gives {(last - first) * row_numel}; padded or uneven custom "
            "shardings are not supported: use FSDP2 fully_shard's default Shard(0)."
        )
    return ShardLayout(shape, num_shards, index, first, last, first * row_numel, local_numel)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


def _is_deepspeed_param(p: torch.Tensor) -> bool:
    # ZeRO-3 marks its partitioned parameters with ds_id / ds_tensor (deepspeed.runtime.zero.partition_parameters)
    return hasattr(p, "ds_id") and hasattr(p, "ds_tensor")


# ---------------------------------------------------------------------------------------------------- θ0 snapshots
def snapshot_parameters(model: torch.nn.Module, include_frozen: bool = False) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's parameters (θ0 for the probes), keeping only what this rank holds.

    * a plain parameter (single process, DDP) is copied whole;
    * a DTensor parameter (FSDP2 ``fully_shard``) is copied as its local shard (``to_local()``, shape
      ``[last_row - first_row, *shape[1:]]``), so each of W ranks holds about 1/W of θ0;
    * a DeepSpeed ZeRO-3 parameter is copied as this rank's fp32 master partition
      (``deepspeed.utils.safe_get_local_fp32_param``, 1-D, ⌈n/W⌉ elements at most, padding removed).

    Values keep the parameter's dtype (the fp32 partition for ZeRO-3), so :func:`restore_parameters` is bit-exact.

    Args:
        model: the module whose parameters to copy.
        include_frozen: also copy parameters with ``requires_grad=False`` (default False: trainable ones only).

    Returns:
        name → CPU tensor, in ``named_parameters()`` order.
    """
    out = {}
    for name, p in model.named_parameters():
        if not (include_frozen or p.requires_grad):
            continue
        if _is_deepspeed_param(p):
            out[name] = _zero3_local_fp32(p).detach().to("cpu", copy=True)
        else:
            out[name] = _local(p).detach().to("cpu", copy=True)
    return out


def restore_parameters(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Write a :func:`snapshot_parameters` copy back into ``model`` bit-exactly (local shards for DTensors).

    Args:
        model: the module the snapshot was taken from (same sharding, same world size).
        snapshot: name → tensor, as returned by :func:`snapshot_parameters` on this rank.

    Raises:
        DPIConfigError: a name the model does not have, or a shape that differs from the local shard (a snapshot
            from another rank or another world size).
    """
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, saved in snapshot.items():
            p = params.get(name)
            if p is None:
                raise DPIConfigError(
                    f"snapshot holds {name!r}, which the model does not have; restore a snapshot of this model."
                )
            if _is_deepspeed_param(p):
                _zero3_set_local_fp32(p, saved)
                continue
            target = _local(p)
            if tuple(target.shape) != tuple(saved.shape):
                raise DPIConfigError(
                    f"snapshot of {name!r} has shape {tuple(saved.shape)} but this rank holds {tuple(target.shape)}; "
                    "restore each rank's own snapshot with the same world size it was taken with."
                )
            target.copy_(saved)  # same dtype: an exact copy


# ---------------------------------------------------------------------------------------------------- DeepSpeed
def zero3_partition(numel: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` flat indices of a ZeRO-3 parameter of ``numel`` elements held by ``rank``.

    DeepSpeed's ``partition_parameters`` gives every rank ``⌈numel / world_size⌉`` elements of the flattened tensor
    (the last ones padded); ranks past the end hold padding only (an empty range here).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise DPIConfigError(f"rank={rank} with world_size={world_size}: need 0 <= rank < world_size.")
    size = -(-numel // world_size)
    start = min(rank * size, numel)
    return start, min(start + size, numel)


def zero3_local_indices(
    flat_indices: torch.Tensor, numel: int, world_size: int, rank: int
) -> tuple[torch.Tensor, int, int]:
    """Map sorted full-tensor flat indices to positions in ``rank``'s ZeRO-3 partition.

    Returns:
        ``(local, start, stop)``: ``local`` int64 positions inside the partition and ``flat_indices[start:stop]``
        the full-tensor indices they come from.
    """
    first, last = zero3_partition(numel, world_size, rank)
    flat = flat_indices.to(torch.int64)
    start, stop = (int(b) for b in torch.searchsorted(flat, torch.tensor([first, last], dtype=torch.int64)))
    return flat[start:stop] - first, start, stop


def _deepspeed_utils():
    try:
        from deepspeed import utils
    except ImportError:
        raise DPIConfigError(
            "the model holds DeepSpeed ZeRO-3 parameters but deepspeed is not importable; pip install 'dpi-hf[deepspeed]'."
        ) from None
    return utils


def _zero3_local_fp32(p: torch.Tensor) -> torch.Tensor:
    value = _deepspeed_utils().safe_get_local_fp32_param(p)
    if value is None:
        raise DPIConfigError(
            "safe_get_local_fp32_param returned None: the DeepSpeed engine has no optimizer yet; snapshot θ0 after "
            "accelerator.prepare(model, optimizer)."
        )
    start, stop = zero3_partition(p.ds_numel, _world(p), _rank(p))
    return value.reshape(-1)[: stop - start]  # the partition's tail is padding


def _zero3_set_local_fp32(p: torch.Tensor, saved: torch.Tensor) -> None:
    utils = _deepspeed_utils()
    current = utils.safe_get_local_fp32_param(p)
    flat = current.reshape(-1)
    if saved.numel() > flat.numel():
        raise DPIConfigError(
            f"a snapshot of {saved.numel()} elements does not fit the local ZeRO-3 partition of {flat.numel()}; "
            "restore each rank's own snapshot with the same world size."
        )
    flat[: saved.numel()].copy_(saved.to(flat.device))
    utils.safe_set_local_fp32_param(p, current)


def _world(p) -> int:
    group = getattr(p, "ds_process_group", None)
    return torch.distributed.get_world_size(group) if torch.distributed.is_initialized() else 1


def _rank(p) -> int:
    group = getattr(p, "ds_process_group", None)
    return torch.distributed.get_rank(group) if torch.distributed.is_initialized() else 0


def check_deepspeed_config(ds_config: dict) -> None:
    """Raise :class:`DPIConfigError` for DeepSpeed settings under which the freeze cannot be exact.

    Supported: ZeRO stages 0–3 with fp32 master weights on the accelerator. Refused: ZeRO++ (quantized weights or
    gradients, hierarchical partitioning: ``zero_quantized_weights``, ``zero_quantized_gradients``,
    ``zero_hpz_partition_size`` > 1) and optimizer/parameter CPU/NVMe offload (the master partitions then live in
    the offload engine, out of reach of ``safe_set_local_fp32_param`` between steps).

    Args:
        ds_config: the DeepSpeed config dict (``accelerator.state.deepspeed_plugin.deepspeed_config``).
    """
    zero = ds_config.get("zero_optimization", {}) or {}
    if zero.get("zero_quantized_weights") or zero.get("zero_quantized_gradients") or \
            int(zero.get("zero_hpz_partition_size", 1) or 1) > 1:
        raise DPIConfigError(
            "DeepSpeed ZeRO++ (quantized weights/gradients or hpZ) is on; DPI needs exact fp32 master partitions: "
            "turn off zero_quantized_weights, zero_quantized_gradients and zero_hpz_partition_size."
        )
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            raise DPIConfigError(
                f"DeepSpeed {key}.device={device!r}; DPI's exact freeze needs the fp32 master partitions on the "
                f"accelerator: set zero_optimization.{key}.device to 'none'."
            )


class ZeroFreezer:
    """Keep frozen elements bit-identical on DeepSpeed ZeRO-3 fp32 master partitions.

    The ZeRO counterpart of :class:`~dpi_hf.core.ParameterFreezer`. DeepSpeed owns the optimizer step, so the two
    halves of the exact freeze go through its public accessors:

    * :meth:`zero_frozen_grads` (call after ``backward``, before ``step``): zeroes the frozen entries of the local
      fp32 gradient partition (``safe_get_local_grad`` / ``safe_set_local_grad``), so clipping and optimizer moments
      never see them;
    * :meth:`restore` (call after every ``step``): writes the saved fp32 master values back
      (``safe_get_local_fp32_param`` / ``safe_set_local_fp32_param``), undoing weight decay and momentum.

    Only this rank's partition of each frozen set is saved: int32 positions + fp32 values.

    Args:
        model: the DeepSpeed-wrapped module (its parameters carry ``ds_id``/``ds_numel``).
        frozen: a :class:`CoreMask` in full-tensor indices (as :func:`~dpi_hf.core.select_core` returns).
        world_size: the ZeRO data-parallel world size (default None: from the parameter's process group).
        rank: this rank in that group (default None: from the process group).
    """

    def __init__(self, model: torch.nn.Module, frozen: CoreMask, world_size: int | None = None,
                 rank: int | None = None):
        if not isinstance(frozen, CoreMask):
            raise DPIConfigError(f"frozen must be a CoreMask, got {type(frozen).__name__}.")
        params = dict(model.named_parameters())
        self._records = []
        for name in frozen.names():
            if frozen.count(name) == 0:
                continue
            p = params.get(name)
            if p is None or not _is_deepspeed_param(p):
                raise DPIConfigError(
                    f"frozen names {name!r}, which is not a ZeRO-3 parameter of the model; use ParameterFreezer for "
                    "unsharded / FSDP2 models."
                )
            if tuple(p.ds_shape) != frozen.shape(name):
                raise DPIConfigError(
                    f"frozen mask for {name!r} has shape {frozen.shape(name)} but the parameter has "
                    f"{tuple(p.ds_shape)}; the mask was computed on a different model."
                )
            w = world_size if world_size is not None else _world(p)
            r = rank if rank is not None else _rank(p)
            local, _, _ = zero3_local_indices(frozen.indices(name), int(p.ds_numel), w, r)
            if local.numel():
                self._records.append([p, local, None])
        self.capture()

    def capture(self) -> None:
        """Save the current fp32 master values of the frozen elements (called on construction)."""
        utils = _deepspeed_utils()
        for record in self._records:
            p, local, _ = record
            master = utils.safe_get_local_fp32_param(p).reshape(-1)
            record[2] = master[local.to(master.device)].clone()

    def restore(self) -> None:
        """Write the saved fp32 master values back (exact); call after every optimizer step."""
        utils = _deepspeed_utils()
        with torch.no_grad():
            for p, local, values in self._records:
                master = utils.safe_get_local_fp32_param(p)
                master.reshape(-1).index_copy_(0, local.to(master.device), values)
                utils.safe_set_local_fp32_param(p, master)

    def zero_frozen_grads(self) -> None:
        """Zero the frozen entries of the local fp32 gradient partitions; call after backward, before clipping."""
        utils = _deepspeed_utils()
        with torch.no_grad():
            for p, local, _ in self._records:
                grad = utils.safe_get_local_grad(p)
                if grad is None:
                    continue
                grad.reshape(-1).index_fill_(0, local.to(grad.device), 0.0)
                utils.safe_set_local_grad(p, grad)

    @property
    def nbytes(self) -> int:
        """Bytes held by this rank for saved positions and values."""
        return sum(r[1].numel() * 4 + r[2].numel() * r[2].element_size() for r in self._records)


# ---------------------------------------------------------------------------------------------------- memory model
_INT32_LIMIT = 2**31 - 1


def engine_memory_per_rank(
    num_parameters: int,
    world_size: int = 8,
    param_dtype: torch.dtype = torch.bfloat16,
    core_fraction: float = 0.01,
    frozen_fraction: float = 0.03,
    num_tasks: int = 5,
    largest_tensor: int = 0,
) -> dict[str, float]:
    """Bytes per rank that the DPI engine adds to a sharded (FSDP2 / ZeRO-3) run, from the engine's own sizes.

    Args:
        num_parameters: trainable parameters of the model (e.g. 6,738,415,616 for Llama-2-7B).
        world_size: ranks the model is sharded over (default 8).
        param_dtype: dtype of the parameters θ0 is copied from (default bf16; fp32 master weights: torch.float32).
        core_fraction: p, the fraction of elements in each task's core (default 0.01).
        frozen_fraction: the fraction of elements frozen in a stage (default 0.03: three 1% cores).
        num_tasks: cores kept in memory at once (default 5, the paper's tasks); each rank holds its part of each
            (a :class:`~dpi_hf.core.sharded_mask.ShardedCoreMask`: the core elements of its own rows, about 1/W).
        largest_tensor: elements of the largest parameter (default 0: ignore): indices of a tensor with more than
            2**31 − 1 elements are int64.

    Returns:
        A dict with bytes per rank for ``theta0_shard`` (:func:`snapshot_parameters`: one ``param_dtype`` value per
        local element), ``signal`` (an fp32 accumulator per local element, e.g. Σg² or |θ − θ0|), ``frozen`` (the
        :class:`~dpi_hf.core.ParameterFreezer` copy: an int32 position + a ``param_dtype`` value per frozen local
        element), ``cores`` (this rank's part of ``num_tasks`` cores:
        int32 indices of its rows' core elements, or a 1-bit mask over its rows, the smaller), and
        ``bytes_per_parameter`` with the same keys divided by ``num_parameters`` (bytes per model parameter, per
        rank).
    """
    if num_parameters < 1 or world_size < 1:
        raise DPIConfigError("num_parameters and world_size must be >= 1.")
    local = math.ceil(num_parameters / world_size)
    value_bytes = torch.tensor([], dtype=param_dtype).element_size()
    index_bytes = 8 if largest_tensor > _INT32_LIMIT else 4
    per_core = min(math.floor(core_fraction * local) * index_bytes, math.ceil(local / 8))
    sizes = {
        "theta0_shard": local * value_bytes,
        "signal": local * 4,
        "frozen": math.floor(frozen_fraction * local) * (index_bytes + value_bytes),
        "cores": num_tasks * per_core,
    }
    sizes["total"] = sum(sizes.values())
    sizes["bytes_per_parameter"] = {k: v / num_parameters for k, v in sizes.items()}
    return sizes
