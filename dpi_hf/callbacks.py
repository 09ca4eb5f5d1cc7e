"""Historical import path of :mod:`dpi_hf.trainer.callbacks` (the same module object, so every name resolves)."""

import sys

from .trainer import callbacks as _module

sys.modules[__name__] = _module
