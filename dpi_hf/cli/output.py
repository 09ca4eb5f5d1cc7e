"""What the command line prints besides a command's own output: the library's log lines and the error line.

The library only creates loggers (``logging.getLogger("dpi_hf....")``), as transformers and TRL do; the command line
decides where they go: :func:`setup_output` sends the ``dpi_hf`` loggers to stderr as ``[dpi-hf] message``, at INFO
on the main process and WARNING on the others, and hides third-party start-up noise a user cannot act on.
"""

from __future__ import annotations

import logging
import os
import sys

from ..core.errors import DPIConfigError

LOG_FORMAT = "[dpi-hf] %(message)s"
# Messages logged while other libraries are imported that say nothing about this run, by logger name. Importing TRL
# imports peft, which imports bitsandbytes; on a CPU with AVX512-BF16, bitsandbytes then asks the `kernels` package
# for an optional Hub kernel (a Hub lookup at import time) and logs the outcome: with the Hub offline (as the
# quickstart runs) `kernels` logs that it skips the publisher check, and bitsandbytes that the kernel did not load;
# it falls back to its own CPU code either way. Nobody configured logging then, so Python's last-resort handler prints
# the records to stderr, ahead of the command's own first line: the filters must be on these loggers before
# TRL is imported, i.e. when dpi_hf.cli is imported (see install_noise_filters).
_NOISE = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    "kernels._internals.hf_hub": "Skipping publisher trust check",
}


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is when a record is emitted (so that redirecting
    or capturing stderr after set-up still takes the log lines)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def is_main_process() -> bool:
    """Whether this process has rank 0 under ``torchrun`` / ``accelerate launch`` (``RANK``; default: yes)."""
    return os.environ.get("RANK", "0") in ("", "0")


def install_noise_filters() -> None:
    """Drop the import-time messages of :data:`_NOISE` (once per logger); called when :mod:`dpi_hf.cli` is imported,
    before any verb imports TRL."""
    for name, prefix in _NOISE.items():
        noisy = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in noisy.filters):
            noisy.addFilter(_DropPrefix(prefix))


def setup_output() -> None:
    """Install the ``[dpi-hf]`` log handler on the ``dpi_hf`` logger (once) and the noise filters."""
    library = logging.getLogger("dpi_hf")
    if not library.handlers:  # one handler, whoever installed it
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        library.addHandler(handler)
        library.propagate = False
    library.setLevel(logging.INFO if is_main_process() else logging.WARNING)
    install_noise_filters()


def one_line(err: BaseException) -> str:
    """``err`` as one line: its message with white space folded; for an unexpected error type, its type name and
    the hint to run with ``--debug``."""
    text = " ".join(str(err).split()) or type(err).__name__
    if not isinstance(err, DPIConfigError):
        text = f"{type(err).__name__}: {text} (run with --debug for the traceback)"
    return text
