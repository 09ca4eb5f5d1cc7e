"""Historical import path of :mod:`dpi_hf.trainer.config` (the same module object, so every name resolves)."""

import sys

from .trainer import config as _module

sys.modules[__name__] = _module
