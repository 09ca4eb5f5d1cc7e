"""Historical import path of :mod:`dpi_hf.trainer.phases` (the same module object, so every name resolves)."""

import sys

from .trainer import phases as _module

sys.modules[__name__] = _module
