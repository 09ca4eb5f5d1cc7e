"""Importance signals of a probe: which parameter elements a task relies on.

* ``"update"`` — the paper's |θ − θ0| after the probe (no accumulator: θ0 is the reference snapshot). With Adam every
  element moves by about the learning rate per step whatever its gradient's size, so after a short probe this
  ranks elements mostly by how steady their gradient's sign was, which is noisy.
* ``"fisher"`` — Σ_t g_t², the diagonal empirical Fisher accumulated over the probe's optimizer steps.
* ``"gradsum"`` — |Σ_t g_t|, the magnitude of the summed gradient.

The gradient signals read each parameter's ``.grad`` once per optimizer step, after gradient accumulation and the
data-parallel all-reduce (so every DDP rank accumulates identical values without any extra communication) and add it
into one float32 buffer per considered parameter, on the parameter's device: 4 bytes per considered element, whatever
the parameter dtype. For a sharded (DTensor) parameter the buffer holds the local shard only.

Everything here is torch only; :class:`dpi_hf.CoreProbeCallback` wires :class:`ImportanceAccumulator` into a Trainer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .errors import DPIConfigError, ProbeDivergedError
from .masks import CoreMask
from .selection import filter_parameter_names

SIGNALS = ("update", "fisher", "gradsum")
GRADIENT_SIGNALS = ("fisher", "gradsum")


def validate_signal(signal) -> str:
    """Return ``signal`` if it is one of :data:`SIGNALS`, else raise :class:`DPIConfigError` naming the choices."""
    if signal not in SIGNALS:
        raise DPIConfigError(
            f"core_signal={signal!r} is not one of {SIGNALS}: 'update' is the paper's |θ−θ0|, 'fisher' the "
            "accumulated squared gradient Σg², 'gradsum' the summed gradient |Σg|."
        )
    return signal


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class ImportanceAccumulator:
    """Accumulate a gradient importance signal (``"fisher"`` or ``"gradsum"``) over a probe's optimizer steps.

    Args:
        model_or_named_params: a ``torch.nn.Module`` (its parameters that require grad) or a mapping name → parameter.
        signal: ``"fisher"`` (Σ g², default) or ``"gradsum"`` (|Σ g|).
        include: parameter-name patterns to consider (see :func:`dpi_hf.core.selection.filter_parameter_names`);
            None (default) considers every trainable parameter.
        exclude: patterns to leave out; None (default).
        parts: how many separate accumulators to keep (default 1). A split-half probe keeps 2 and adds each step's
            gradients into one of them (``accumulate(part)``), so that one pass over a task's rows yields two
            independent half-importances and their pooled importance; each part is one float32 buffer per considered
            element.
        keep_signed_sum: also keep the signed sum Σ g over all parts (default False), the task's gradient that
            :mod:`dpi_hf.core.affinity` needs. For ``"gradsum"`` it is the sum of the parts' own (signed) buffers, at
            no extra memory; for ``"fisher"`` it is one more float32 buffer per considered element.

    Call :meth:`accumulate` once per optimizer step, when the gradients the step will use are complete (after
    accumulation and all-reduce), then read :meth:`importance`. A parameter without a gradient at a step adds nothing.
    """

    def __init__(self, model_or_named_params, signal: str = "fisher", include=None, exclude=None, parts: int = 1,
                 keep_signed_sum: bool = False):
        if validate_signal(signal) not in GRADIENT_SIGNALS:
            raise DPIConfigError(f"ImportanceAccumulator accumulates {GRADIENT_SIGNALS}, not {signal!r}.")
        if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
            raise DPIConfigError(f"parts={parts!r} must be a positive integer (2 for a split-half probe).")
        if isinstance(model_or_named_params, torch.nn.Module):
            params = {n: p for n, p in model_or_named_params.named_parameters() if p.requires_grad}
        else:
            params = dict(model_or_named_params)
        names = filter_parameter_names(params, include, exclude)
        if not names:
            raise DPIConfigError(
                f"no trainable parameter is left to accumulate {signal!r} on (include={include}, exclude={exclude}); "
                "loosen the patterns or unfreeze parameters."
            )
        self.signal = signal
        self.parts = parts
        self._params = {n: params[n] for n in names}

        def zeros():
            return {n: torch.zeros(_local(p).shape, dtype=torch.float32, device=_local(p).device)
                    for n, p in self._params.items()}

        self._parts = [zeros() for _ in range(parts)]
        # fisher squares the gradient, so its signed sum needs a buffer of its own; gradsum's parts are signed sums
        self._signed = zeros() if keep_signed_sum and signal == "fisher" else None
        self.keep_signed_sum = bool(keep_signed_sum)
        self.part_steps = [0] * parts
        self.steps = 0

    @property
    def _buffers(self) -> dict[str, torch.Tensor]:
        return self._parts[0]

    @torch.no_grad()
    def accumulate(self, part: int = 0) -> None:
        """Add the current gradients (float32) into accumulator ``part`` (default 0); one call per optimizer step."""
        if not 0 <= part < self.parts:
            raise DPIConfigError(f"part={part!r} is outside 0..{self.parts - 1}.")
        buffers = self._parts[part]
        for n, p in self._params.items():
            g = p.grad
            if g is None:
                continue
            g = _local(g).to(torch.float32)
            if self.signal == "fisher":
                buffers[n].addcmul_(g, g)
                if self._signed is not None:
                    self._signed[n].add_(g)
            else:
                buffers[n].add_(g)
        self.part_steps[part] += 1
        self.steps += 1

    def _wrap(self, n: str, v: torch.Tensor) -> torch.Tensor:
        p = self._params[n]
        if hasattr(p, "to_local"):
            from torch.distributed.tensor import DTensor

            return DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        return v

    def _value(self, n: str, part: int | None) -> torch.Tensor:
        if part is not None:
            v = self._parts[part][n]
        elif self.parts == 1:
            v = self._parts[0][n]
        else:  # pooled: the parts' sum, built per tensor when read (never a second model-sized buffer)
            v = self._parts[0][n].clone()
            for other in self._parts[1:]:
                v.add_(other[n])
        return v if self.signal == "fisher" else v.abs()

    def importance(self, part: int | None = None) -> Mapping[str, torch.Tensor]:
        """Name → non-negative float32 importance of accumulator ``part``, or (``part=None``, the default) of all parts
        pooled: Σ g² over every step for fisher, |Σ g| over every step for gradsum (the sum of the signed parts, so
        the pooled gradsum is not the sum of the parts' magnitudes).

        With one part the values are the accumulator itself (fisher) or its magnitude; with several, the pooled
        values are computed per tensor when read. For a sharded (DTensor) parameter the value is the local shard
        wrapped as a DTensor with the parameter's layout, which :func:`~dpi_hf.core.select_core` selects over with all
        ranks together.
        """
        if part is not None and not 0 <= part < self.parts:
            raise DPIConfigError(f"part={part!r} is outside 0..{self.parts - 1}.")
        return _LazyImportance(list(self._params), lambda n: self._wrap(n, self._value(n, part)))

    def signed_sum(self) -> Mapping[str, torch.Tensor]:
        """Name → the signed float32 gradient sum Σ g over every accumulated step (all parts), local shards for
        sharded parameters (dot products of these are summed across ranks, see
        :func:`dpi_hf.core.affinity.gradient_dot`). Needs ``keep_signed_sum=True``."""
        if not self.keep_signed_sum:
            raise DPIConfigError("this accumulator keeps no signed sum; create it with keep_signed_sum=True.")
        if self._signed is not None:
            return dict(self._signed)

        def summed(n):
            v = self._parts[0][n].clone() if self.parts > 1 else self._parts[0][n]
            for other in self._parts[1:]:
                v.add_(other[n])
            return v

        return _LazyImportance(list(self._params), summed)

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulators (4 per considered element and part, +4 for a fisher signed sum)."""
        buffers = [*self._parts, *([self._signed] if self._signed is not None else [])]
        return sum(b.numel() * b.element_size() for d in buffers for b in d.values())

    def release(self) -> None:
        """Free the accumulators."""
        self._parts = [{} for _ in range(self.parts)]
        self._signed = None
        self._params = {}


class _LazyImportance(Mapping):
    """A read-only mapping name → tensor whose values are computed when read (one tensor at a time)."""

    def __init__(self, names: list[str], compute):
        self._names, self._compute = names, compute

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._compute(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name) -> bool:
        return name in self._names


def cpu_copy(importance: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A float32 CPU copy of an importance mapping (lazy mappings such as update magnitudes are materialised)."""
    return {n: importance[n].detach().to("cpu", torch.float32, copy=True) for n in importance}


def pool_importance(parts: Iterable[Mapping[str, torch.Tensor]], inplace: bool = False) -> dict[str, torch.Tensor]:
    """Element-wise sum of several importance mappings over the same parameters (e.g. the two halves of a probe).

    Args:
        parts: the mappings name → non-negative tensor.
        inplace: add into the first mapping's tensors instead of new ones (default False); they must be float32 CPU
            tensors the caller owns (e.g. :func:`cpu_copy` results), and it saves a model-sized copy.
    """
    parts = list(parts)
    if not parts:
        raise DPIConfigError("pool_importance needs at least one importance mapping.")
    names = list(parts[0])
    for other in parts[1:]:
        if list(other) != names:
            raise DPIConfigError("the importance mappings to pool cover different parameters; probe the same model.")
    out = {}
    for n in names:
        first = parts[0][n].detach()
        acc = first if inplace else first.to("cpu", torch.float32, copy=True)
        for other in parts[1:]:
            acc.add_(other[n].detach().to("cpu", torch.float32))
        out[n] = acc
    return out


def threshold_ties(importance: Mapping[str, torch.Tensor], core: CoreMask) -> dict:
    """How the selection threshold sits among the values: a huge tied block means the ranking there is arbitrary.

    Returns a dict with ``threshold`` (the smallest selected value), ``tied`` (elements anywhere equal to it),
    ``tied_selected`` (of those, how many the core holds) and ``core_size``. Pure-bf16 training, for instance, leaves
    many elements with an update of exactly 0, and a core that has to take some of them is partly arbitrary.
    """
    if any(hasattr(importance[n], "to_local") for n in core.names()):
        # sharded importance: every rank would need the others' values; the selection itself is exact regardless
        return {"threshold": None, "tied": 0, "tied_selected": 0, "core_size": core.count()}
    threshold = None
    for n in core.names():
        idx = core.indices(n)
        if idx.numel():
            v = float(importance[n].detach().reshape(-1)[idx.to(torch.int64)].to(torch.float32).min())
            threshold = v if threshold is None else min(threshold, v)
    if threshold is None:
        return {"threshold": None, "tied": 0, "tied_selected": 0, "core_size": 0}
    tied = tied_selected = 0
    for n in core.names():
        t = importance[n].detach().to(torch.float32)
        if not bool(torch.isfinite(t).all()):
            raise ProbeDivergedError(f"the importance of parameter {n!r} holds NaN or inf: the probe diverged.")
        eq = t.reshape(-1) == threshold
        tied += int(eq.sum())
        idx = core.indices(n)
        if idx.numel():
            tied_selected += int(eq[idx.to(torch.int64)].sum())
    return {"threshold": threshold, "tied": tied, "tied_selected": tied_selected, "core_size": core.count()}


def tie_warning(report: dict, what: str) -> str | None:
    """A one-line warning when the core's threshold falls on exact zeros or inside a large tied block, else None."""
    k = report["core_size"]
    if not k or report["threshold"] is None:
        return None
    if report["threshold"] == 0.0:
        return (
            f"{what}: fewer elements than the core size have non-zero importance, so {report['tied_selected']:,} of "
            f"the {k:,} core elements are exact zeros picked by position. Lengthen the probe, lower core_fraction, or "
            "train the probe in float32 (pure-bf16 updates round small changes to 0)."
        )
    if report["tied"] > k // 2 and report["tied"] > report["tied_selected"]:
        return (
            f"{what}: the selection threshold {report['threshold']:.3g} is shared by {report['tied']:,} elements "
            f"({report['tied_selected']:,} of them in the core of {k:,}): the core is partly decided by position, "
            "not importance. Lengthen the probe or use another core_signal."
        )
    return None
