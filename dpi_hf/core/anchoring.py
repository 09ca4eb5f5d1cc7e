"""Anchoring to earlier weights: the EWC / L2-SP pull of a model's parameters towards θ_A.

The penalty is ``λ/2 · Σ_i F_i (θ_i − θ_A,i)²`` over the anchored elements, with F the (normalised) importance of
the protected tasks (EWC) or F = 1 (L2-SP). It is applied in one of two forms:

* ``"loss"`` — its gradient ``λ F (θ − θ_A)`` is added to ``p.grad`` once per optimizer step
  (:meth:`AnchorPenalty.add_gradient`), so the optimizer treats it like any other gradient. Under Adam that also
  means it is divided by the per-element running RMS of the whole gradient: where the task's gradient is large the
  pull is scaled down, where it is small the pull is scaled up, so λ does not set the strength of the pull element by
  element the way it does under SGD;
* ``"decoupled"`` — after each optimizer step, ``θ ← θ − min(1, lr · λ · F) · (θ − θ_A)``
  (:meth:`AnchorPenalty.pull`), the way AdamW applies weight decay (towards θ_A instead of 0): no optimizer rescales
  it, and the ``min(1, ·)`` keeps a large ``lr · λ · F`` from overshooting θ_A.

Memory: θ_A is a float32 copy of every anchored element, on the parameter's device, and F a float32 copy where it is
not uniform — two model-sized float32 copies (8 bytes per element) with EWC over every element, one (4 bytes per
element) with L2-SP. With ``only`` (EWC on the cores alone) both are kept at the selected elements only, with their
flat indices (8 + 8 bytes per selected element).

Everything here is torch only; :class:`dpi_hf.trainer.ewc.AnchorCallback` wires it into a Trainer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import DPIConfigError
from .masks import CoreMask

FORMS = ("loss", "decoupled")


def normalise_importance(importance: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``importance`` divided by its mean over all its elements (float32), so that λ grids transfer between tasks,
    signals and probe lengths.

    Raises:
        DPIConfigError: no element, a non-finite value, or an importance that is zero everywhere.
    """
    total, count = 0.0, 0
    for name, t in importance.items():
        s = float(t.detach().to(torch.float64).sum())
        if not math.isfinite(s):
            raise DPIConfigError(f"the stored importance of {name!r} holds NaN or inf; probe the task again.")
        total += s
        count += t.numel()
    if count == 0 or total <= 0:
        raise DPIConfigError("the stored importance is zero everywhere (or empty): it weighs nothing; probe again.")
    mean = total / count
    return {n: t.detach().to(torch.float32) / mean for n, t in importance.items()}


def sum_importances(parts: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise sum of several (normalised) importance mappings; a parameter missing from some adds nothing."""
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        for n, t in part.items():
            t = t.detach().to(torch.float32)
            if n in out:
                if out[n].shape != t.shape:
                    raise DPIConfigError(f"the importances of {n!r} have different shapes {tuple(out[n].shape)} and "
                                         f"{tuple(t.shape)}: they were probed on different models.")
                out[n] = out[n] + t
            else:
                out[n] = t.clone()
    return out


@dataclass
class _Anchored:
    """One parameter's anchor: θ_A and F over all its elements (``indices`` None) or at ``indices`` only."""

    param: torch.nn.Parameter
    anchor: torch.Tensor  # float32 θ_A: the parameter's shape, or flat at indices
    weight: torch.Tensor | None  # float32 F like anchor; None: F = 1
    indices: torch.Tensor | None  # int64 flat positions, or None for every element

    def current(self) -> torch.Tensor:
        flat = self.param.detach().reshape(-1) if self.indices is not None else self.param.detach()
        return (flat[self.indices] if self.indices is not None else flat).to(torch.float32)

    def nbytes(self) -> int:
        n = self.anchor.numel() * 4 + (self.weight.numel() * 4 if self.weight is not None else 0)
        return n + (self.indices.numel() * 8 if self.indices is not None else 0)


class AnchorPenalty:
    """The pull of a model's parameters towards their values at construction, θ_A.

    Args:
        model: the module; θ_A is a float32 copy of its anchored parameters taken now.
        strength: λ ≥ 0.
        weights: name → F (a non-negative tensor of the parameter's shape) for EWC; parameters it does not name are
            not anchored. Default None: F = 1 on every trainable parameter (L2-SP).
        only: keep the anchor only on these elements (F = 0 elsewhere; EWC on the cores alone). Default None.
        exclude: elements left out (F = 0), e.g. elements that are frozen anyway. Default None.

    Raises:
        DPIConfigError: λ < 0, a name of ``weights``/``only`` the model does not have, a shape mismatch, or a sharded
            (DTensor) parameter (not supported).
    """

    def __init__(self, model: torch.nn.Module, strength: float, weights: Mapping[str, torch.Tensor] | None = None,
                 *, only: CoreMask | None = None, exclude: CoreMask | None = None):
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not strength >= 0:
            raise DPIConfigError(f"the anchor strength λ={strength!r} must be a number >= 0.")
        self.strength = float(strength)
        params = dict(model.named_parameters())
        names = list(weights) if weights is not None else [n for n, p in params.items() if p.requires_grad]
        for mask, what in ((only, "only"), (exclude, "exclude")):
            for n in (mask.names() if mask is not None else []):
                if n not in params:
                    raise DPIConfigError(f"{what} names parameter {n!r}, which the model does not have.")
        self._entries: list[_Anchored] = []
        with torch.no_grad():
            for n in names:
                p = params.get(n)
                if p is None:
                    raise DPIConfigError(f"the importance names parameter {n!r}, which the model does not have; it "
                                         "was probed on another model.")
                if hasattr(p, "to_local"):
                    raise DPIConfigError(f"parameter {n!r} is sharded (FSDP); EWC/L2-SP anchoring supports "
                                         "unsharded parameters (single process or DDP) only.")
                w = None
                if weights is not None:
                    w = weights[n].detach()
                    if tuple(w.shape) != tuple(p.shape):
                        raise DPIConfigError(f"the importance of {n!r} has shape {tuple(w.shape)} but the parameter "
                                             f"has {tuple(p.shape)}: it was probed on another model.")
                    w = w.to(device=p.device, dtype=torch.float32)
                entry = self._entry(n, p, w, only, exclude)
                if entry is not None:
                    self._entries.append(entry)

    @staticmethod
    def _entry(name, p, w, only, exclude) -> _Anchored | None:
        if only is not None:
            if name not in only or only.count(name) == 0:
                return None
            idx = only.indices(name).to(device=p.device, dtype=torch.int64)
            if exclude is not None and name in exclude and exclude.count(name):
                idx = idx[~torch.isin(idx, exclude.indices(name).to(device=p.device, dtype=torch.int64))]
            flat = p.detach().reshape(-1)
            return _Anchored(p, flat[idx].to(torch.float32), w.reshape(-1)[idx] if w is not None else None, idx)
        if exclude is not None and name in exclude and exclude.count(name):
            # frozen elements keep θ = θ_A anyway; F = 0 there keeps them out of the penalty's value too
            w = torch.ones(p.shape, dtype=torch.float32, device=p.device) if w is None else w.clone()
            w.view(-1)[exclude.indices(name).to(device=p.device, dtype=torch.int64)] = 0.0
        return _Anchored(p, p.detach().to(torch.float32, copy=True), w, None)

    # ----------------------------------------------------------------------------------------------- the penalty
    def _terms(self, e: _Anchored) -> tuple[torch.Tensor, torch.Tensor]:
        """(θ − θ_A, F·(θ − θ_A)) of one entry, float32."""
        diff = e.current() - e.anchor
        return diff, (diff * e.weight if e.weight is not None else diff)

    @torch.no_grad()
    def value(self) -> float:
        """λ/2 · Σ F (θ − θ_A)² at the current weights."""
        total = 0.0
        for e in self._entries:
            diff, weighted = self._terms(e)
            total += float((diff * weighted).sum(dtype=torch.float64))
        return 0.5 * self.strength * total

    @torch.no_grad()
    def add_gradient(self) -> float:
        """Add the penalty's gradient λ F (θ − θ_A) into every anchored ``p.grad`` (once per optimizer step, when the
        gradients are complete); returns the penalty's value at these weights. A parameter without a gradient this
        step (unused by the forward pass) gets none."""
        total = 0.0
        for e in self._entries:
            grad = e.param.grad
            if grad is None:
                continue
            diff, weighted = self._terms(e)
            total += float((diff * weighted).sum(dtype=torch.float64))
            step = (self.strength * weighted).to(grad.dtype)
            if e.indices is None:
                grad.add_(step)
            elif grad.is_contiguous():
                grad.view(-1).index_add_(0, e.indices, step)
            else:
                flat = grad.reshape(-1).index_add(0, e.indices, step)
                grad.copy_(flat.view_as(grad))
        return 0.5 * self.strength * total

    @torch.no_grad()
    def pull(self, lr) -> float:
        """The decoupled form: ``θ ← θ − min(1, lr · λ · F) · (θ − θ_A)`` (after the optimizer step).

        Args:
            lr: the learning rate of the step just taken: a float, or a callable ``param -> lr`` (per param group).

        Returns:
            The penalty's value λ/2 Σ F (θ − θ_A)² before the pull.
        """
        total = 0.0
        for e in self._entries:
            rate = float(lr(e.param) if callable(lr) else lr) * self.strength
            diff, weighted = self._terms(e)
            total += float((diff * weighted).sum(dtype=torch.float64))
            factor = torch.clamp(e.weight * rate, max=1.0) if e.weight is not None else min(1.0, rate)
            new = (e.current() - factor * diff).to(e.param.dtype)
            if e.indices is None:
                e.param.copy_(new)
            else:
                flat = e.param.data.view(-1) if e.param.is_contiguous() else None
                if flat is None:
                    raise DPIConfigError("the decoupled pull on selected elements needs contiguous parameters.")
                flat.index_copy_(0, e.indices, new)
        return 0.5 * self.strength * total

    # ----------------------------------------------------------------------------------------------- bookkeeping
    def follow_parameters(self) -> AnchorPenalty:
        """Move θ_A and F to their parameters' devices (after the model was moved, e.g. by the Trainer)."""
        for e in self._entries:
            dev = e.param.device
            if e.anchor.device != dev:
                e.anchor = e.anchor.to(dev)
                e.weight = e.weight.to(dev) if e.weight is not None else None
                e.indices = e.indices.to(dev) if e.indices is not None else None
        return self

    def check_parameters(self, model: torch.nn.Module) -> None:
        """Raise :class:`DPIConfigError` unless every anchored parameter is still a parameter of ``model`` (a model
        whose parameters were replaced since θ_A was taken, e.g. sharded by FSDP, would be pulled nowhere)."""
        current = {id(p) for p in model.parameters()}
        if any(id(e.param) not in current or hasattr(e.param, "to_local") for e in self._entries):
            raise DPIConfigError(
                "the model's parameters were replaced after θ_A was taken (sharded by FSDP, or reloaded); EWC/L2-SP "
                "anchoring supports unsharded parameters (single process or DDP) only."
            )

    @property
    def elements(self) -> int:
        """Number of anchored elements (F may still be 0 at some)."""
        return sum(e.anchor.numel() for e in self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held for θ_A, F and indices."""
        return sum(e.nbytes() for e in self._entries)

    def release(self) -> None:
        """Free θ_A and F."""
        self._entries = []
