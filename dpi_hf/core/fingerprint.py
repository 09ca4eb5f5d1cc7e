"""Model fingerprints: which parameters (names, shapes, dtypes) a set of masks was computed on.

Masks index elements by position, so applying them to another model would freeze arbitrary weights. Every mask
file carries the fingerprint of the model it came from, and loading it against a model checks it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch

from .errors import FingerprintMismatchError


def _named_tensors(model_or_params) -> list[tuple[str, torch.Tensor]]:
    if isinstance(model_or_params, torch.nn.Module):
        return [(n, p) for n, p in model_or_params.named_parameters()]
    if isinstance(model_or_params, Mapping):
        return list(model_or_params.items())
    return list(model_or_params)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def model_fingerprint(model_or_params, only_trainable: bool = False) -> dict:
    """Fingerprint of a model: ``{"parameters": {name: [shape, dtype]}, "sha256": hex}``.

    Args:
        model_or_params: a ``torch.nn.Module`` or a mapping/iterable of ``(name, tensor)``.
        only_trainable: keep only parameters with ``requires_grad`` (default False: all parameters, so that
            freezing some of them later does not change the fingerprint).

    For sharded (DTensor) parameters the global shape is used, so every rank computes the same fingerprint.
    """
    params = {}
    for name, p in _named_tensors(model_or_params):
        if only_trainable and not getattr(p, "requires_grad", True):
            continue
        params[name] = [list(p.shape), _dtype_name(p.dtype)]
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    return {"parameters": params, "sha256": digest}


def check_fingerprint(expected: Mapping, model_or_params, check_dtype: bool = False, names=None) -> None:
    """Raise :class:`FingerprintMismatchError` naming the first parameter that differs.

    Args:
        expected: a fingerprint from :func:`model_fingerprint` (e.g. read from a mask file).
        model_or_params: the model the masks are about to be applied to.
        check_dtype: also require equal dtypes (default False: masks index positions, which a cast keeps).
        names: check only these parameter names (default: every parameter in ``expected``).
    """
    actual = model_fingerprint(model_or_params)["parameters"]
    exp = expected.get("parameters", expected)
    for name in names if names is not None else exp:
        if name not in exp:
            raise FingerprintMismatchError(f"the mask file has no fingerprint entry for parameter {name!r}.")
        shape, dtype = exp[name]
        if name not in actual:
            raise FingerprintMismatchError(
                f"the masks were computed on a model with parameter {name!r}, which this model does not have: "
                "they come from another model. Re-probe this model or load the masks that belong to it."
            )
        a_shape, a_dtype = actual[name]
        if list(shape) != list(a_shape) or (check_dtype and dtype != a_dtype):
            raise FingerprintMismatchError(
                f"parameter {name!r} is {a_shape} {a_dtype} in this model but {shape} {dtype} in the model the masks "
                "were computed on: they come from another model. Re-probe this model or load its own masks."
            )
