"""Historical import path of :mod:`dpi_hf.trainer.protection` (the same module object, so every name resolves)."""

import sys

from .trainer import protection as _module

sys.modules[__name__] = _module
