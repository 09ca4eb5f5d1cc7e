"""``python -m dpi_hf.cli``: the same program as ``dpi-hf`` (for ``torchrun -m`` / ``accelerate launch -m``)."""

import sys

from . import main

sys.exit(main())
