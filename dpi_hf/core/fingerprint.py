"""Model fingerprints: which parameters (names, shapes, dtypes) and which weights a set of masks was computed on.

Masks index elements by position, so applying them to another model would freeze arbitrary weights. Every mask
file carries the fingerprint of the model it came from, and loading it against a model checks it: the names and
shapes always, and a content digest of the weights (a fixed, seeded sample of elements of every tensor) unless the
caller accepts masks from other weights of the same architecture (e.g. a base model's masks on its chat variant).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Mapping

import torch

from .errors import FingerprintMismatchError


def _named_tensors(model_or_params):
    if isinstance(model_or_params, torch.nn.Module):
        return [(n, p) for n, p in model_or_params.named_parameters()]
    if isinstance(model_or_params, Mapping):
        return list(model_or_params.items())
    if iter(model_or_params) is model_or_params:  # a one-shot iterator: read once and kept
        return list(model_or_params)
    # a re-iterable source of (name, tensor) pairs (e.g. a checkpoint read tensor by tensor): read once per pass, so
    # a checkpoint larger than memory can be fingerprinted
    return model_or_params


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# Elements sampled from every tensor for the content digest: enough that two checkpoints which differ anywhere
# meaningful (another fine-tune, another seed) differ in the sample, cheap for any model size.
_CONTENT_SAMPLES = 64


def content_digest(model_or_params) -> str:
    """sha256 of a fixed, seeded sample of elements of every parameter (at most 64 per tensor).

    Positions come from a generator seeded with the CRC32 of the parameter's name, so every process (and every run)
    samples the same elements; values are rounded to bfloat16 before hashing, so a float32 checkpoint and its bf16
    copy share a digest. Sharded (DTensor) parameters are read through ``full_tensor()``, one tensor at a time.
    """
    h = hashlib.sha256()
    for name, p in _named_tensors(model_or_params):
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        flat = t.reshape(-1)
        n = flat.numel()
        h.update(name.encode())
        if n == 0 or not t.is_floating_point():
            continue
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        idx = torch.randint(0, n, (min(n, _CONTENT_SAMPLES),), generator=g).to(flat.device)
        h.update(flat[idx].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()


def _checkpoint_name(model_or_params) -> str | None:
    config = getattr(model_or_params, "config", None)
    return getattr(config, "_name_or_path", None) or None


def model_fingerprint(model_or_params, only_trainable: bool = False) -> dict:
    """Fingerprint of a model: ``{"parameters": {name: [shape, dtype]}, "sha256": hex, "content": hex,
    "checkpoint": name or None}``.

    ``sha256`` covers the names, shapes and dtypes (the architecture); ``content`` the weights (see
    :func:`content_digest`); ``checkpoint`` is the model's ``config._name_or_path`` when it has one.

    Args:
        model_or_params: a ``torch.nn.Module``, a mapping name → tensor, or an iterable of ``(name, tensor)`` pairs
            (a re-iterable one is read lazily, once per pass, and never held whole).
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
    return {"parameters": params, "sha256": digest, "content": content_digest(model_or_params),
            "checkpoint": _checkpoint_name(model_or_params)}


def check_fingerprint(
    expected: Mapping, model_or_params, check_dtype: bool = False, names=None, check_content: bool = False
) -> None:
    """Raise :class:`FingerprintMismatchError` naming the first parameter that differs.

    Args:
        expected: a fingerprint from :func:`model_fingerprint` (e.g. read from a mask file).
        model_or_params: the model the masks are about to be applied to.
        check_dtype: also require equal dtypes (default False: masks index positions, which a cast keeps).
        names: check only these parameter names (default: every parameter in ``expected``).
        check_content: also require the same weights (the content digest), when ``expected`` records one (default
            False). A mismatch names both checkpoints.
    """
    fingerprint = model_fingerprint(model_or_params)
    actual = fingerprint["parameters"]
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
    if check_content and expected.get("content") and expected["content"] != fingerprint["content"]:
        theirs = expected.get("checkpoint") or "an unnamed checkpoint"
        ours = fingerprint.get("checkpoint") or "an unnamed checkpoint"
        raise FingerprintMismatchError(
            f"the masks were computed on other weights of this architecture: they come from {theirs!r} (content "
            f"{expected['content'][:12]}), this model is {ours!r} (content {fingerprint['content'][:12]}). Re-probe "
            "this model, or accept masks from other weights explicitly (allow_mask_mismatch=True in DPIConfig)."
        )
