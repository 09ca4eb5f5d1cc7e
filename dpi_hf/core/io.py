"""Atomic file writes: the one place that writes a file under a temporary name and moves it into place.

A reader (another rank, a resumed run, ``dpi-hf inspect``) never sees a half-written file: the content goes to a
temporary file in the same folder, which :func:`os.replace` then renames over the target in one step.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping


@contextmanager
def _temporary_sibling(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file name beside ``path`` (its folder created); on success move it onto ``path``.

    The temporary file is removed when the body raises, so a failed write leaves the old file (or nothing).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent folders are created); returns ``path`` as a Path."""
    with _temporary_sibling(path) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically, encoded with ``encoding`` (default UTF-8); returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_save_file(tensors: Mapping, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """:func:`safetensors.torch.save_file` of ``tensors`` (name → tensor) to ``path`` atomically.

    Args:
        tensors: the tensors to store.
        path: the ``.safetensors`` file.
        metadata: string → string header metadata (default None: none).
    """
    from safetensors.torch import save_file

    with _temporary_sibling(path) as tmp:
        save_file(dict(tensors), tmp, metadata=dict(metadata) if metadata is not None else None)
    return Path(path)
