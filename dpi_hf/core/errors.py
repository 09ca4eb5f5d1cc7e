"""Errors raised by dpi-hf for bad input.

Every user-facing validation error is a :class:`DPIConfigError`, a subclass of :class:`ValueError`, so callers that
catch ``ValueError`` keep working. The message names the offending argument and how to fix it.
"""


class DPIConfigError(ValueError):
    """Bad input to dpi-hf: the message names the argument and the fix."""


class MaskFileError(DPIConfigError):
    """A mask file that is missing, truncated, corrupt or from another format version."""


class FingerprintMismatchError(DPIConfigError):
    """Masks that were computed on a model with different parameters (names, shapes or dtypes)."""


class ProbeDivergedError(DPIConfigError):
    """A probe fine-tune produced NaN/inf parameter updates."""
