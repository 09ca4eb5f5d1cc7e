"""Reference weights θ0, read one tensor at a time: from a mapping (a CPU state dict) or from safetensors files.

The update signal (:func:`dpi_hf.core.signals.update_magnitudes`) reads θ0 through :func:`open_reference`, so that a
model-sized reference is never loaded whole: files are memory-mapped and a sharded parameter's rows can be read alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import DPIConfigError


def open_reference(reference) -> SafetensorsReference | MappingReference:
    """θ0 as a reader: a mapping name → tensor, a ``.safetensors`` file, or a checkpoint directory
    (``model.safetensors``, a sharded checkpoint with ``model.safetensors.index.json``, or ``*.safetensors`` shards)."""
    if isinstance(reference, Mapping):
        return MappingReference(reference)
    if isinstance(reference, (str, os.PathLike)):
        return SafetensorsReference(Path(reference))
    raise DPIConfigError(
        f"reference is a {type(reference).__name__}; pass a state dict (name → tensor), a .safetensors file "
        "or a checkpoint directory."
    )


class SafetensorsReference:
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


class MappingReference:
    """θ0 held as a mapping name → tensor (e.g. a CPU state dict or :func:`~dpi_hf.core.snapshot_parameters`)."""

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
