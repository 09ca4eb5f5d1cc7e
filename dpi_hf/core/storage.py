"""Core masks at rest: one safetensors file holding one core per task, with metadata.

Layout of the file:

* tensors ``"{task_index}.{param_index}.indices"`` (int32/int64 sorted flat indices) or
  ``"{task_index}.{param_index}.bitmask"`` (uint8, ``numpy.packbits`` little bit order) — whichever is smaller for
  that tensor; parameters with no selected element store nothing;
* metadata (strings): ``format`` = ``"dpi-hf/cores"``, ``format_version``, and ``dpi`` = a JSON object with
  ``tasks``, ``parameters`` ([name, shape] in order), ``counts`` (task → selected elements), ``fingerprint`` (of the
  model: parameter names, shapes, dtypes) and any user metadata (core_fraction, scope, ...).

Writes are atomic (temporary file + rename), so a failed save never leaves a partial file behind.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from .errors import DPIConfigError, MaskFileError
from .fingerprint import check_fingerprint, model_fingerprint
from .io import atomic_save_file
from .masks import CoreMask, _Entry, _make_entry

FORMAT = "dpi-hf/cores"
FORMAT_VERSION = 1


def _validate_cores(cores) -> list[str]:
    if not isinstance(cores, Mapping) or not cores:
        raise DPIConfigError("cores must be a non-empty dict of task name → CoreMask; got nothing to save.")
    tasks = list(cores)
    for t in tasks:
        if not isinstance(t, str) or not t:
            raise DPIConfigError(f"task name {t!r} is not a non-empty string; name every task.")
        if not isinstance(cores[t], CoreMask):
            raise DPIConfigError(f"cores[{t!r}] is a {type(cores[t]).__name__}, not a CoreMask.")
        if hasattr(cores[t], "gather"):  # a ShardedCoreMask holds one rank's rows only
            raise DPIConfigError(
                f"cores[{t!r}] is this rank's part of a sharded core; build the global mask first with "
                "mask.gather() on every rank and save the result on rank 0."
            )
    shapes = cores[tasks[0]].shapes()
    for t in tasks[1:]:
        if cores[t].shapes() != shapes:
            raise DPIConfigError(
                f"the cores of {tasks[0]!r} and {t!r} cover different parameters; compute them on the same model."
            )
    return tasks


def save_cores(cores: Mapping[str, CoreMask], path, *, model=None, **metadata) -> Path:
    """Save one core per task into a safetensors file.

    Args:
        cores: task name → CoreMask, all over the same parameters.
        path: destination file (parent directories are created).
        model: the model the cores were computed on; its fingerprint (names, shapes, dtypes of all parameters) is
            stored. Default None: ``metadata["fingerprint"]`` is used if given, else a fingerprint of the masks'
            shapes (dtype ``"unknown"``).
        **metadata: JSON-serialisable extras stored with the cores, e.g. ``core_fraction=0.01``,
            ``scope="global"``.

    Returns:
        The path written.
    """
    tasks = _validate_cores(cores)
    names = cores[tasks[0]].names()
    shapes = cores[tasks[0]].shapes()
    if model is not None:
        fingerprint = model_fingerprint(model)
    elif "fingerprint" in metadata:
        fingerprint = metadata.pop("fingerprint")
    else:
        # no model at hand: the masks' own shapes are still enough to refuse masks from another architecture
        fingerprint = {"parameters": {n: [list(shapes[n]), "unknown"] for n in names}, "sha256": None}
    tensors, stored = {}, set()
    for ti, t in enumerate(tasks):
        for pi, n in enumerate(names):
            e = cores[t]._entry(n)
            if e.count == 0:
                continue
            if e.indices is not None:
                key, value = f"{ti}.{pi}.indices", e.indices.contiguous()
            else:
                key, value = f"{ti}.{pi}.bitmask", torch.from_numpy(np.ascontiguousarray(e.bits))
            if value.data_ptr() in stored:  # one mask under two task names: safetensors refuses shared memory
                value = value.clone()
            stored.add(value.data_ptr())
            tensors[key] = value
    info = {
        **metadata,
        "tasks": tasks,
        "parameters": [[n, list(shapes[n])] for n in names],
        "counts": {t: cores[t].count() for t in tasks},
        "fingerprint": fingerprint,
    }
    try:
        info_text = json.dumps(info)
    except TypeError as e:
        raise DPIConfigError(f"metadata for save_cores must be JSON-serialisable: {e}.")
    return atomic_save_file(tensors, path,
                            metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION), "dpi": info_text})


def read_cores_metadata(path) -> dict:
    """The ``dpi`` metadata of a cores file (tasks, parameters, counts, fingerprint, user extras)."""
    path = Path(path)
    if not path.is_file():
        raise MaskFileError(f"mask file {str(path)!r} does not exist; check the path or run the probes first.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise MaskFileError(
            f"mask file {str(path)!r} is truncated or corrupt ({e}); delete it and save the cores again."
        ) from None
    if meta.get("format") != FORMAT:
        raise MaskFileError(f"{str(path)!r} is a safetensors file but not a dpi-hf cores file (format={meta.get('format')!r}).")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise MaskFileError(
            f"{str(path)!r} has cores format version {meta.get('format_version')!r}; this dpi-hf reads version "
            f"{FORMAT_VERSION}. Upgrade dpi-hf or re-create the file."
        )
    try:
        return json.loads(meta["dpi"])
    except (KeyError, json.JSONDecodeError) as e:
        raise MaskFileError(f"mask file {str(path)!r} has corrupt metadata ({e}); save the cores again.") from None


def load_cores(path, model=None, *, tasks=None, check_content: bool = False) -> dict[str, CoreMask]:
    """Load the cores saved by :func:`save_cores`.

    Args:
        path: the ``.safetensors`` file.
        model: if given, the stored fingerprint is checked against it and a mismatch raises
            :class:`~dpi_hf.core.errors.FingerprintMismatchError` naming the first differing parameter.
        tasks: load only these tasks (default: all); a name not in the file is an error listing the known ones.
        check_content: with ``model``, also require the same weights as the model the masks were computed on (its
            content digest); default False (names and shapes only).

    Returns:
        task name → CoreMask, in the saved task order.
    """
    info = read_cores_metadata(path)
    if model is not None:
        check_fingerprint(info["fingerprint"], model, names=[n for n, _ in info["parameters"]],
                          check_content=check_content)
    saved = info["tasks"]
    wanted = list(tasks) if tasks is not None else saved
    unknown = [t for t in wanted if t not in saved]
    if unknown:
        raise DPIConfigError(f"tasks {unknown} are not in {str(path)!r}; it holds {saved}.")
    params = [(n, tuple(s)) for n, s in info["parameters"]]
    out = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for t in wanted:
                ti = saved.index(t)
                entries = {}
                for pi, (n, shape) in enumerate(params):
                    k_idx, k_bits = f"{ti}.{pi}.indices", f"{ti}.{pi}.bitmask"
                    if k_idx in keys:
                        idx = f.get_tensor(k_idx)
                        entries[n] = _checked_indices(idx, shape, path, t, n)
                    elif k_bits in keys:
                        entries[n] = CoreMask._from_packed(shape, f.get_tensor(k_bits).numpy())
                    else:
                        entries[n] = _make_entry(shape, torch.empty(0, dtype=torch.int64))
                mask = CoreMask(entries)
                if mask.count() != int(info["counts"][t]):
                    raise MaskFileError(
                        f"mask file {str(path)!r}: task {t!r} decodes to {mask.count()} elements but the file "
                        f"records {info['counts'][t]}; the file is corrupt, save the cores again."
                    )
                out[t] = mask
    except MaskFileError:
        raise
    except DPIConfigError as e:
        raise MaskFileError(f"mask file {str(path)!r} is corrupt: {e}") from None
    except Exception as e:
        raise MaskFileError(
            f"mask file {str(path)!r} is truncated or corrupt ({type(e).__name__}: {e}); save the cores again."
        ) from None
    return out


def _checked_indices(idx: torch.Tensor, shape, path, task, name) -> _Entry:
    numel = 1
    for s in shape:
        numel *= s
    if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise MaskFileError(f"mask file {str(path)!r}: indices of {task!r}/{name!r} are not a 1-D integer tensor.")
    if idx.numel() and (
        int(idx.min()) < 0 or int(idx.max()) >= numel or (idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()))
    ):
        raise MaskFileError(
            f"mask file {str(path)!r}: indices of {task!r}/{name!r} are out of range or unsorted; the file is corrupt."
        )
    return _make_entry(tuple(shape), idx.to(torch.int64))
