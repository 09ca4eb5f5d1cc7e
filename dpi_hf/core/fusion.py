"""CPI-FT fusion: one backbone from several fine-tuned models, their cores transplanted and the rest merged by SLERP.

The sibling method CPI-FT (arXiv 2508.21741) keeps the models its probes fine-tuned: each group's core elements are
transplanted from that group's own model into one backbone, every other element is the spherical linear
interpolation (SLERP) of the groups' task vectors τ_g = θ_g − θ0, and the staged SFT then starts from that backbone.

Rules (all per tensor, all arithmetic in float32, results cast back to the tensor's dtype):

* **SLERP of two task vectors** (:func:`slerp`): the arc between ``a`` and ``b`` at fraction ``t``, applied to the
  vectors as they are (not normalised), as mergekit does. When the angle is not defined or the arc degenerates —
  either vector is zero, or |cos| > :data:`COLINEAR_COS` (parallel *or* antiparallel) — it is the linear
  interpolation (1 − t)·a + t·b: the limit of SLERP for parallel vectors, and for antiparallel or zero vectors the
  one choice that needs no arbitrary direction and never divides by sin θ ≈ 0 (so no NaN).
* **More than two models** (:func:`merge_task_vectors`): sequential SLERP weighted by data size. With models
  1..k trained on n_1..n_k examples, m_1 = τ_1 and m_i = slerp(m_{i−1}, τ_i, t_i) with
  t_i = n_i / (n_1 + … + n_i): the running merge of the first i − 1 models carries their total weight. When the task
  vectors are parallel this is exactly the data-size-weighted average of the task vectors (order-independent);
  otherwise SLERP is not associative and the result depends on the order (the plan's stage order, then the tasks'
  order within a group), which is recorded.
* **Interpolation factor** λ (``factor``): the merged task vector of the non-core elements is scaled by λ,
  θ = θ0 + λ·m_k. The t_i are fixed by the data sizes; λ is the one thing sizes cannot say — how much of the merged
  update to keep (task arithmetic's scaling coefficient). λ = 1 (default) is the plain SLERP. Core elements are
  never scaled: they are copied from their owner's model.
* **Transplant**: a group's core elements take the group's model's values, bit for bit. An element in several
  groups' cores goes to the group with the largest importance there (ties: the earlier group); without importance,
  to the group whose model moved it most, |θ_g − θ0|. The owners are recorded in a :class:`TransplantMap`.

A group of several models (e.g. a group's tasks, or a task's two split-half probes) first becomes one model, θ0 plus
the sequential SLERP of its members' task vectors (no λ: it stands for the group's joint fine-tune), and then takes
part in the fusion like a single model.

Memory: :func:`fuse_models` reads the models from safetensors files with ``safe_open``, one tensor at a time, so that
besides θ0 and the fused result (one model) it holds at most one tensor of one file and a few tensor-sized float32
buffers (the running merges of that tensor) at any time — never a second model.

Nothing here imports transformers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import DPIConfigError, MaskFileError
from .io import atomic_save_file
from .masks import CoreMask

# |cos θ| above this: the arc between the two vectors is too short (or too close to a half-turn) for sin θ to be a
# safe divisor in float32 (sin θ < 0.032), and SLERP differs from LERP by less than float32 noise of the
# accumulated updates anyway — the threshold mergekit uses for the same reason
COLINEAR_COS = 0.9995

TRANSPLANT_FORMAT = "dpi-hf/transplant"
TRANSPLANT_VERSION = 1


def _lerp(x: torch.Tensor, y: torch.Tensor, t: float) -> torch.Tensor:
    return x * (1.0 - t) + y * t


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical linear interpolation of two task vectors, flattened, computed in float32.

    Args:
        a: the first vector (any shape); the result has its shape and dtype.
        b: the second vector, same number of elements.
        t: the fraction of the way from ``a`` to ``b``, in [0, 1] (0 gives ``a``, 1 gives ``b``).

    Returns:
        sin((1 − t)θ)/sin θ · a + sin(tθ)/sin θ · b with θ the angle between ``a`` and ``b``; the linear interpolation
        (1 − t)·a + t·b when either vector is zero or |cos θ| > :data:`COLINEAR_COS` (parallel or antiparallel).
    """
    if a.numel() != b.numel():
        raise DPIConfigError(f"slerp needs two vectors of the same size; got {tuple(a.shape)} and {tuple(b.shape)}.")
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise DPIConfigError(f"slerp: t={t!r} must be in [0, 1].")
    x = a.reshape(-1).to(torch.float32)
    y = b.reshape(-1).to(torch.float32)
    na, nb = float(torch.linalg.vector_norm(x)), float(torch.linalg.vector_norm(y))
    if not (math.isfinite(na) and math.isfinite(nb)):
        raise DPIConfigError("slerp: a task vector holds NaN or inf (a diverged fine-tune?); fix that model first.")
    if na == 0.0 or nb == 0.0:
        out = _lerp(x, y, t)
    else:
        cos = max(-1.0, min(1.0, float(torch.dot(x, y)) / (na * nb)))
        if abs(cos) > COLINEAR_COS:
            out = _lerp(x, y, t)
        else:
            theta = math.acos(cos)
            s = math.sin(theta)
            out = x * (math.sin((1.0 - t) * theta) / s) + y * (math.sin(t * theta) / s)
    return out.reshape(a.shape).to(a.dtype)


def _validate_sizes(sizes: Sequence[int], what: str) -> list[int]:
    out = []
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DPIConfigError(f"{what}: sizes must be positive integers (training examples); got {n!r}.")
        out.append(n)
    return out


def merge_task_vectors(vectors: Sequence[torch.Tensor], sizes: Sequence[int]) -> torch.Tensor:
    """The sequential, data-size-weighted SLERP of task vectors (see the module docstring).

    Args:
        vectors: the task vectors, in merge order, all the same size.
        sizes: each vector's weight, its number of training examples (positive integers).

    Returns:
        m_k, with m_1 = vectors[0] and m_i = slerp(m_{i−1}, vectors[i−1], n_i / (n_1 + … + n_i)); float32.
    """
    if not vectors or len(vectors) != len(sizes):
        raise DPIConfigError(f"merge_task_vectors: {len(vectors)} vectors and {len(sizes)} sizes; give one size each.")
    sizes = _validate_sizes(sizes, "merge_task_vectors")
    merged, total = vectors[0].to(torch.float32), sizes[0]
    for v, n in zip(vectors[1:], sizes[1:]):
        total += n
        merged = slerp(merged, v.to(torch.float32), n / total)
    return merged


class TransplantMap:
    """Which group owns each transplanted core element: per tensor, the sorted flat indices of the union of the groups'
    cores and the owner group (its index in the fusion's group order) of each.

    Args:
        entries: parameter name → (int64 sorted flat indices, int8/int16 owner per index).
        shapes: parameter name → shape (of every fused tensor, so the map can be checked against a model).
        groups: the groups, in fusion order (e.g. each group's task names).
        contested: number of elements that were in more than one group's core.
        importance: ``"given"`` (resolved by the groups' importance) or ``"update"`` (by |θ_g − θ0|).
    """

    def __init__(self, entries: Mapping[str, tuple[torch.Tensor, torch.Tensor]], shapes: Mapping[str, tuple],
                 groups: Sequence, contested: int, importance: str):
        self.entries = dict(entries)
        self.shapes = {n: tuple(int(s) for s in shape) for n, shape in shapes.items()}
        self.groups = list(groups)
        self.contested = int(contested)
        self.importance = importance

    def owned_count(self, group: int) -> int:
        """Number of elements group ``group`` (an index into :attr:`groups`) owns."""
        return sum(int((owner == group).sum()) for _, owner in self.entries.values())

    def owned(self, group: int) -> CoreMask:
        """The elements group ``group`` owns, as a CoreMask over every fused tensor."""
        idx = {n: i[owner == group] for n, (i, owner) in self.entries.items()}
        return CoreMask.from_indices(idx, self.shapes)

    def summary(self) -> dict:
        """JSON-ready: the groups, elements owned per group, contested elements and how they were resolved."""
        return {"groups": self.groups, "owned": [self.owned_count(g) for g in range(len(self.groups))],
                "contested": self.contested, "resolved_by": self.importance}

    def save(self, path, **metadata) -> Path:
        """Write the map to a safetensors file atomically: tensors ``"<name>::indices"`` and ``"<name>::owner"``
        per tensor with transplanted elements, and the groups, shapes and :meth:`summary` as JSON metadata.

        Args:
            path: the ``.safetensors`` file.
            **metadata: JSON-serialisable extras (e.g. the fusion factor).
        """
        tensors = {}
        for n, (idx, owner) in self.entries.items():
            tensors[f"{n}::indices"] = idx.to(torch.int64).contiguous()
            tensors[f"{n}::owner"] = owner.contiguous()
        dpi = {**self.summary(), "shapes": {n: list(s) for n, s in self.shapes.items()}, **metadata}
        meta = {"format": TRANSPLANT_FORMAT, "format_version": str(TRANSPLANT_VERSION),
                "dpi": json.dumps(dpi, default=str)}
        return atomic_save_file(tensors, path, metadata=meta)

    @classmethod
    def load(cls, path) -> TransplantMap:
        """Read a map written by :meth:`save`."""
        path = Path(path)
        dpi = json.loads(cls._checked_metadata(path)["dpi"])
        with safe_open(str(path), framework="pt") as f:
            names = sorted({k.rsplit("::", 1)[0] for k in f.keys()})
            entries = {n: (f.get_tensor(f"{n}::indices"), f.get_tensor(f"{n}::owner")) for n in names}
        order = {n: i for i, n in enumerate(dpi["shapes"])}
        entries = dict(sorted(entries.items(), key=lambda kv: order.get(kv[0], len(order))))
        return cls(entries, dpi["shapes"], dpi["groups"], dpi["contested"], dpi["resolved_by"])

    @staticmethod
    def read_summary(path) -> dict:
        """The :meth:`summary` of the map saved at ``path`` (and its extra metadata), read from the header alone."""
        meta = TransplantMap._checked_metadata(Path(path))
        return {k: v for k, v in json.loads(meta["dpi"]).items() if k != "shapes"}

    @staticmethod
    def _checked_metadata(path: Path) -> dict:
        """The header metadata of the map at ``path``; a missing file or another format is a MaskFileError."""
        if not path.is_file():
            raise MaskFileError(f"no transplant map at {str(path)!r}; it is written by a run with fusion='cpi'.")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != TRANSPLANT_FORMAT:
            raise MaskFileError(f"{str(path)!r} is not a dpi-hf transplant map (format {meta.get('format')!r}).")
        return meta

    def __repr__(self) -> str:
        owned = ", ".join(str(c) for c in self.summary()["owned"])
        return f"TransplantMap({len(self.groups)} groups, owned [{owned}], {self.contested:,} contested)"


def group_core_importance(cores: Sequence[CoreMask], importance: Sequence[Mapping[str, torch.Tensor]]):
    """One group's core and importance from its tasks': the union of the tasks' cores, and at each of its elements
    the largest importance any of the group's tasks has there (the group's strongest claim on that element).

    Args:
        cores: the group's tasks' cores (CoreMasks over the same parameters).
        importance: per task, parameter name → float tensor of the importance at that task's core elements (aligned
            with ``core.indices(name)``), as :func:`core_importance` returns.

    Returns:
        (union CoreMask, name → float32 importance aligned with ``union.indices(name)``).
    """
    if not cores or len(cores) != len(importance):
        raise DPIConfigError(f"group_core_importance: {len(cores)} cores and {len(importance)} importance maps.")
    union = CoreMask.union_all(cores)
    out = {}
    for n in union.names():
        idx = union.indices(n)
        best = torch.full((idx.numel(),), -math.inf, dtype=torch.float32)
        for core, imp in zip(cores, importance):
            if n not in core or core.count(n) == 0:
                continue
            values = _aligned(imp, n, core, "group_core_importance")
            pos = torch.searchsorted(idx, core.indices(n))
            best[pos] = torch.maximum(best[pos], values)
        out[n] = best
    return union, out


def core_importance(importance: Mapping[str, torch.Tensor], core: CoreMask) -> dict[str, torch.Tensor]:
    """The importance at a core's elements only (name → float32, aligned with ``core.indices(name)``): p of the
    importance's size, what a fusion needs to resolve elements several cores claim.

    Args:
        importance: parameter name → dense importance (the parameter's shape).
        core: the core selected from it.
    """
    return {n: importance[n].reshape(-1).to(torch.float32)[core.indices(n)].contiguous()
            for n in core.names() if core.count(n)}


def _aligned(imp: Mapping[str, torch.Tensor], name: str, core: CoreMask, what: str) -> torch.Tensor:
    """``imp[name]`` as float32 values aligned with ``core.indices(name)``: given so, or dense (the tensor's size)."""
    if name not in imp:
        raise DPIConfigError(f"{what}: no importance for {name!r}, where the core holds {core.count(name)} elements.")
    v = imp[name].reshape(-1).to(torch.float32)
    if v.numel() == core.count(name):
        return v
    if v.numel() == core.numel(name):
        return v[core.indices(name)]
    raise DPIConfigError(
        f"{what}: the importance of {name!r} has {v.numel()} values; give one per core element "
        f"({core.count(name)}) or one per element of the tensor ({core.numel(name)})."
    )


def _as_members(entry, what: str) -> list:
    if isinstance(entry, (str, os.PathLike)):
        return [entry]
    if isinstance(entry, int):
        return [entry]
    members = list(entry)
    if not members:
        raise DPIConfigError(f"{what}: a group has no model; give every group at least one file.")
    return members


def fuse_models(theta0_state: Mapping[str, torch.Tensor], group_files: Sequence, cores: Sequence[CoreMask],
                sizes: Sequence, importance: Sequence[Mapping[str, torch.Tensor]] | None = None,
                factor: float = 1.0, groups: Sequence | None = None):
    """CPI-FT fusion of several groups' models into one backbone (see the module docstring for the rules).

    Args:
        theta0_state: parameter name → θ0 tensor (any device; read one tensor at a time). Every name is fused;
            the fused tensors have θ0's dtypes and shapes.
        group_files: per group, the safetensors file of its model, or a list of files (the group's members, e.g. its
            tasks' probe models), each holding every name of ``theta0_state``.
        cores: per group, its core (a CoreMask over names of ``theta0_state``; names it lacks have no core).
        sizes: per group, its number of training examples, or a list with one per member (the SLERP weights).
        importance: per group, name → importance at its core elements (aligned with ``cores[g].indices(name)``, or
            dense of the tensor's size), which decides the owner of an element in several cores; default None: the
            update magnitude |θ_g − θ0| of each group's model decides.
        factor: λ, the scale of the merged task vector on the non-core elements (default 1.0: plain SLERP).
        groups: labels of the groups recorded in the transplant map (default None: "0", "1", ...).

    Returns:
        (fused state dict name → tensor on the CPU, :class:`TransplantMap`).
    """
    k = len(group_files)
    if k < 1 or len(cores) != k or len(sizes) != k:
        raise DPIConfigError(f"fuse_models: {k} groups of files, {len(cores)} cores and {len(sizes)} sizes; give one "
                             "of each per group.")
    members = [[Path(p) for p in _as_members(g, "fuse_models")] for g in group_files]
    weights = []
    for g, s in enumerate(sizes):
        s = _validate_sizes(_as_members(s, "fuse_models"), "fuse_models")
        if len(s) != len(members[g]):
            raise DPIConfigError(f"fuse_models: group {g} has {len(members[g])} files but {len(s)} sizes.")
        weights.append(s)
    if importance is not None and len(importance) != k:
        raise DPIConfigError(f"fuse_models: {len(importance)} importance maps for {k} groups; give one per group "
                             "or None.")
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
        raise DPIConfigError(f"fuse_models: factor={factor!r} must be a positive number.")
    if k > torch.iinfo(torch.int16).max:
        raise DPIConfigError(f"fuse_models: {k} groups; at most {torch.iinfo(torch.int16).max} are supported.")
    owner_dtype = torch.int8 if k <= torch.iinfo(torch.int8).max else torch.int16
    for g, core in enumerate(cores):
        if not isinstance(core, CoreMask):
            raise DPIConfigError(f"fuse_models: cores[{g}] is a {type(core).__name__}, not a CoreMask.")
        for n in core.names():
            if n not in theta0_state:
                raise DPIConfigError(f"fuse_models: cores[{g}] covers {n!r}, which θ0 does not have.")
            if core.shape(n) != tuple(theta0_state[n].shape):
                raise DPIConfigError(f"fuse_models: cores[{g}] gives {n!r} the shape {core.shape(n)}, θ0 "
                                     f"{tuple(theta0_state[n].shape)}: they come from different models.")

    fused, entries, shapes, contested = {}, {}, {}, 0
    with ExitStack() as stack:
        handles = [[stack.enter_context(safe_open(str(p), framework="pt", device="cpu")) for p in ms]
                   for ms in members]
        for g, hs in enumerate(handles):
            for p, h in zip(members[g], hs):
                keys = set(h.keys())
                missing = [n for n in theta0_state if n not in keys]
                if missing:
                    raise DPIConfigError(f"fuse_models: {str(p)!r} lacks {missing[:3]} of θ0's tensors; every model "
                                         "must hold every parameter.")
        for name, ref in theta0_state.items():
            out, entry, n_contested = _fuse_tensor(name, ref, members, handles, weights, cores, importance, factor,
                                                   owner_dtype)
            fused[name] = out
            shapes[name] = tuple(ref.shape)
            contested += n_contested
            if entry is not None:
                entries[name] = entry
    labels = list(groups) if groups is not None else [str(g) for g in range(k)]
    return fused, TransplantMap(entries, shapes, labels, contested, "update" if importance is None else "given")


def _fuse_tensor(name, ref, members, handles, weights, cores, importance, factor, owner_dtype):
    """One tensor of :func:`fuse_models`: returns (fused tensor, (union indices, owners) or None, contested count)."""
    dtype, shape = ref.dtype, tuple(ref.shape)
    t0 = ref.detach().reshape(-1).to("cpu", torch.float32)
    group_idx = [c.indices(name) if name in c else torch.empty(0, dtype=torch.int64) for c in cores]
    union = torch.unique(torch.cat(group_idx)) if any(i.numel() for i in group_idx) else None
    if union is not None:
        best_imp = torch.full((union.numel(),), -math.inf, dtype=torch.float32)
        best_owner = torch.full((union.numel(),), -1, dtype=owner_dtype)
        best_val = torch.empty(union.numel(), dtype=dtype)
        claims = torch.zeros(union.numel(), dtype=torch.int32)
    merged, total = None, 0
    for g, hs in enumerate(handles):
        idx = group_idx[g]
        group_tv, group_n, core_values = None, 0, None
        for path, h, n in zip(members[g], hs, weights[g]):
            raw = h.get_tensor(name)
            if tuple(raw.shape) != shape:
                raise DPIConfigError(f"fuse_models: {name!r} has the shape {tuple(raw.shape)} in {str(path)!r}, "
                                     f"{shape} in θ0: the files come from another model.")
            if len(hs) == 1 and idx.numel():  # the group's model is this file: its core values are copied bit for bit
                core_values = raw.reshape(-1)[idx].to(dtype)
            tv = raw.reshape(-1).to(torch.float32) - t0
            del raw  # the file's tensor is freed before the next one is read
            if not bool(torch.isfinite(tv).all()):
                raise DPIConfigError(f"fuse_models: {name!r} in {str(path)!r} holds NaN or inf (a diverged probe?).")
            group_n += n
            group_tv = tv if group_tv is None else slerp(group_tv, tv, n / group_n)
            del tv
        if idx.numel():
            if core_values is None:  # a merged group: its model is θ0 + the merge, in the tensor's dtype
                core_values = (t0[idx] + group_tv[idx]).to(dtype)
            if importance is not None:
                claim = _aligned(importance[g], name, cores[g], f"fuse_models: importance[{g}]")
                if not bool(torch.isfinite(claim).all()):
                    raise DPIConfigError(f"fuse_models: importance[{g}] of {name!r} holds NaN or inf.")
            else:  # the fallback: the group's own update magnitude |θ_g − θ0| at the element
                claim = group_tv[idx].abs()
            pos = torch.searchsorted(union, idx)
            claims[pos] += 1
            wins = claim > best_imp[pos]  # strict: an equal claim leaves the element with the earlier group
            best_imp[pos[wins]] = claim[wins]
            best_owner[pos[wins]] = g
            best_val[pos[wins]] = core_values[wins]
        total += group_n
        merged = group_tv if merged is None else slerp(merged, group_tv, group_n / total)
        del group_tv
    out = (t0 + merged * factor) if factor != 1.0 else (t0 + merged)
    out = out.to(dtype)
    entry, n_contested = None, 0
    if union is not None:
        out[union] = best_val
        entry = (union, best_owner)
        n_contested = int((claims > 1).sum())
    return out.reshape(shape), entry, n_contested
