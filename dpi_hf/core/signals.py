"""Importance signals of a probe: which parameter elements a task relies on — one registry, :data:`SIGNAL_REGISTRY`.

A signal's name (DPIConfig's ``core_signal``, CoreProbeCallback's ``signal``) looks up a :class:`Signal` record that
says how it is computed (from each optimizer step's gradients into a float32 accumulator, or from the weights' change
θ − θ0 at the end of the probe), what it needs (a reference θ0, optimizer steps, unscaled gradients) and how cores
from it are judged (the fix an unreliable core's warning suggests). Every module asks the registry; adding a signal is
one :func:`register_signal` call (or one entry here).

* ``"fisher"`` (default) — Σ_t g_t², the diagonal empirical Fisher accumulated over the probe's optimizer steps.
* ``"gradsum"`` — |Σ_t g_t|, the magnitude of the summed gradient.
* ``"update"`` — the paper's |θ − θ0| after the probe (no accumulator: θ0 is the reference snapshot, read through
  :mod:`dpi_hf.core.reference`). With Adam every element moves by about the learning rate per step whatever its
  gradient's size, so after a short probe this ranks elements mostly by how steady their gradient's sign was, which
  is noisy.

The gradient signals read each parameter's ``.grad`` once per optimizer step, after gradient accumulation and the
data-parallel all-reduce (so every DDP rank accumulates identical values without any extra communication) and add it
into one float32 buffer per considered parameter, on the parameter's device: 4 bytes per considered element, whatever
the parameter dtype. For a sharded (DTensor) parameter the buffer holds the local shard only.

Everything here is torch only; :class:`dpi_hf.CoreProbeCallback` wires the signals into a Trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from .errors import DPIConfigError, ProbeDivergedError
from .masks import CoreMask
from .reference import MappingReference, SafetensorsReference, open_reference
from .selection import _nothing_left_error, _patterns, filter_parameter_names
from .sharding import dtensor_layout, is_dtensor


# ---------------------------------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Signal:
    """One importance signal: how it is computed, what it needs, and how its cores are judged.

    Args:
        name: the name ``core_signal`` / ``signal`` takes (stored with the cores as ``core_signal``).
        formula: the short formula shown in logs, cards and errors (e.g. ``"Σg²"``).
        description: one phrase for help texts and error messages.
        accumulate: for a gradient signal, ``accumulate(buffer, grad)`` adds one optimizer step's float32 gradient
            into the float32 buffer in place; None for a weight signal.
        finish: for a gradient signal, ``finish(buffer)`` turns the buffer into the non-negative importance (it may
            return the buffer itself); None for a weight signal.
        from_weights: for a weight signal, ``from_weights(model, reference, include, exclude)`` returns the mapping
            name → non-negative importance of the trained model against θ0; None for a gradient signal.
        unreliable_fix: what the reliability warning suggests when a core from this signal is probe noise.
    """

    name: str
    formula: str
    description: str
    accumulate: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    finish: Callable[[torch.Tensor], torch.Tensor] | None = None
    from_weights: Callable[..., Mapping[str, torch.Tensor]] | None = None
    unreliable_fix: str = "lengthen the probe (probe_steps) or give it more rows (probe_batch_size)"

    def __post_init__(self):
        gradient = self.accumulate is not None and self.finish is not None
        partial = (self.accumulate is None) != (self.finish is None)
        if partial or gradient == (self.from_weights is not None):
            raise DPIConfigError(
                f"signal {self.name!r} must be computed one way: give accumulate and finish (a gradient signal) or "
                "from_weights (a weight signal)."
            )

    @property
    def reads_gradients(self) -> bool:
        """Computed from the probe's gradients (an accumulator per element, read at each optimizer step): needs
        gradients that are neither loss-scaled (fp16) nor partitioned away (ZeRO-3), and no optimizer step."""
        return self.accumulate is not None

    @property
    def needs_steps(self) -> bool:
        """Zero everywhere unless the probe takes optimizer steps (a weight signal compares θ with θ0)."""
        return not self.reads_gradients

    @property
    def needs_reference(self) -> bool:
        """Needs the probe's starting weights θ0 (a CPU snapshot, or the caller's reference)."""
        return self.from_weights is not None


SIGNAL_REGISTRY: dict[str, Signal] = {}
DEFAULT_SIGNAL = "fisher"


def register_signal(signal: Signal) -> Signal:
    """Add ``signal`` to :data:`SIGNAL_REGISTRY` (a name already there is an error); return it."""
    if signal.name in SIGNAL_REGISTRY:
        raise DPIConfigError(f"a signal named {signal.name!r} is already registered.")
    SIGNAL_REGISTRY[signal.name] = signal
    return signal


def get_signal(name) -> Signal:
    """The :class:`Signal` called ``name``, or :class:`DPIConfigError` naming every registered signal."""
    signal = SIGNAL_REGISTRY.get(name) if isinstance(name, str) else None
    if signal is None:
        choices = ", ".join(f"{s.name!r} ({s.formula}: {s.description})" for s in SIGNAL_REGISTRY.values())
        raise DPIConfigError(f"core_signal={name!r} is not a known signal; choose one of {choices}.")
    return signal


def validate_signal(signal) -> str:
    """Return ``signal`` if it names a registered :class:`Signal`, else raise :class:`DPIConfigError` naming the
    choices."""
    return get_signal(signal).name


def gradient_signals() -> tuple[str, ...]:
    """The names of the registered signals computed from gradients (usable without optimizer steps)."""
    return tuple(n for n, s in SIGNAL_REGISTRY.items() if s.reads_gradients)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class ImportanceAccumulator:
    """Accumulate a gradient importance signal (``"fisher"``, ``"gradsum"``: see :data:`SIGNAL_REGISTRY`) over a probe's
    optimizer steps.

    Args:
        model_or_named_params: a ``torch.nn.Module`` (its parameters that require grad) or a mapping name → parameter.
        signal: ``"fisher"`` (Σ g², default) or ``"gradsum"`` (|Σ g|).
        include: parameter-name patterns to consider (see :func:`dpi_hf.core.selection.filter_parameter_names`);
            None (default) considers every trainable parameter.
        exclude: patterns to leave out; None (default).

    Call :meth:`accumulate` once per optimizer step, when the gradients the step will use are complete (after
    accumulation and all-reduce), then read :meth:`importance`. A parameter without a gradient at a step adds nothing.
    """

    def __init__(self, model_or_named_params, signal: str = DEFAULT_SIGNAL, include=None, exclude=None):
        if not get_signal(signal).reads_gradients:
            raise DPIConfigError(f"ImportanceAccumulator accumulates {gradient_signals()}, not {signal!r}.")
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
        self._signal = get_signal(signal)
        self._params = {n: params[n] for n in names}
        self._buffers = {
            n: torch.zeros(_local(p).shape, dtype=torch.float32, device=_local(p).device)
            for n, p in self._params.items()
        }
        self.steps = 0

    @torch.no_grad()
    def accumulate(self) -> None:
        """Add the current gradients (float32) into the accumulators; one call per optimizer step."""
        for n, p in self._params.items():
            g = p.grad
            if g is None:
                continue
            self._signal.accumulate(self._buffers[n], _local(g).to(torch.float32))
        self.steps += 1

    def importance(self) -> dict[str, torch.Tensor]:
        """Name → non-negative float32 importance (the signal's ``finish`` of each accumulator: the accumulator itself
        for fisher, |sum| for gradsum).

        For a sharded (DTensor) parameter the value is the local shard wrapped as a DTensor with the parameter's
        layout, which :func:`~dpi_hf.core.select_core` selects over with all ranks together.
        """
        out = {}
        for n, b in self._buffers.items():
            v = self._signal.finish(b)
            p = self._params[n]
            if hasattr(p, "to_local"):
                from torch.distributed.tensor import DTensor

                v = DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            out[n] = v
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulators (4 per considered element)."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def release(self) -> None:
        """Free the accumulators."""
        self._buffers = {}
        self._params = {}


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


# ---------------------------------------------------------------------------------------------------- |θ − θ0|
class UpdateMagnitudes(Mapping):
    """A lazy mapping name → |θ − θ0| (float32, CPU), computed from the current parameters when a value is read.

    Returned by :func:`update_magnitudes`; re-iterable, and only one magnitude tensor exists at a time when it is
    read in a loop (plus that parameter's reference tensor). Pass it straight to :func:`~dpi_hf.core.select_core`.
    """

    def __init__(
        self,
        params: dict[str, torch.Tensor],
        reference: MappingReference | SafetensorsReference,
        rows: dict[str, tuple[int, int]] | None = None,
    ):
        self._params = params
        self._reference = reference
        # DTensor parameters whose reference is the full tensor: the rows [first, last) of this rank's shard
        self._rows = rows or {}

    def __getitem__(self, name: str) -> torch.Tensor:
        current = self._params[name].detach()
        if name in self._rows:
            ref = self._reference.get_rows(name, *self._rows[name])
        else:
            ref = self._reference.get(name)
        if is_dtensor(current):
            # the local shard's |θ − θ0|, computed on the shard's device and wrapped as a DTensor of the global
            # shape, so that select_core selects over all ranks (distributed_selection)
            from torch.distributed.tensor import DTensor

            local = current.to_local()
            delta = local.to(dtype=torch.float32, copy=True)
            delta.sub_(ref.detach().to(local.device))
            return DTensor.from_local(delta.abs_(), current.device_mesh, current.placements, run_check=False,
                                      shape=current.shape, stride=current.stride())
        delta = current.to(device="cpu", dtype=torch.float32, copy=True)
        delta.sub_(ref.detach().to("cpu"))  # promotes bf16/fp16 references into the float32 buffer
        return delta.abs_()

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name → shape of every magnitude tensor, without computing any."""
        return {n: tuple(p.shape) for n, p in self._params.items()}


def update_magnitudes(
    model_or_named_params,
    reference,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> UpdateMagnitudes:
    """Update magnitudes |θ − θ0| of a model against its reference weights, computed one tensor at a time.

    Args:
        model_or_named_params: the fine-tuned parameters θ: a ``torch.nn.Module`` (its ``named_parameters()`` that
            require grad) or a mapping name → tensor (all of them).
        reference: θ0, keyed by the same names: a mapping name → tensor (held on the CPU), a path to a
            ``.safetensors`` file, or a directory with ``model.safetensors``, a sharded checkpoint with
            ``model.safetensors.index.json``, or ``*.safetensors`` shards. Files are read one tensor at a time.
        include: name patterns of the parameters to keep (see
            :func:`~dpi_hf.core.selection.filter_parameter_names`); None (default) keeps all.
        exclude: name patterns of parameters to leave out; None (default).

    Sharded models (FSDP2 ``fully_shard``): for a DTensor parameter the reference may be this rank's local shard
    (as :func:`~dpi_hf.core.snapshot_parameters` keeps it) or the full tensor (only the local rows are read, from
    files too); the value is the local |θ − θ0| in float32 on the shard's device, wrapped as a DTensor with the
    parameter's global shape and placements, which :func:`~dpi_hf.core.select_core` selects over all ranks.

    Returns:
        An :class:`UpdateMagnitudes` mapping name → float32 CPU tensor (a DTensor for DTensor parameters),
        re-iterable and lazy: memory O(largest tensor) while it is iterated. Values reflect the parameters at the
        time they are read.

    Raises:
        DPIConfigError: no parameter left, a parameter missing from the reference, a shape mismatch, a non-floating
            parameter, or an unreadable reference.
    """
    if isinstance(model_or_named_params, torch.nn.Module):
        params = {n: p for n, p in model_or_named_params.named_parameters() if p.requires_grad}
    elif isinstance(model_or_named_params, Mapping):
        params = dict(model_or_named_params.items())
    else:
        raise DPIConfigError(
            f"model_or_named_params is a {type(model_or_named_params).__name__}; pass a torch.nn.Module or a "
            "mapping name → parameter tensor."
        )
    names = filter_parameter_names(params, include, exclude)
    if not names:
        if not params:
            raise DPIConfigError(
                "model_or_named_params has no trainable parameter (requires_grad) to compare; unfreeze some."
            )
        raise _nothing_left_error(list(params), _patterns(include, "include"), _patterns(exclude, "exclude"))
    params = {n: params[n] for n in names}

    ref = open_reference(reference)
    rows: dict[str, tuple[int, int]] = {}
    for name, p in params.items():
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise DPIConfigError(
                f"parameter {name!r} is {getattr(p, 'dtype', type(p).__name__)}; update magnitudes need floating "
                "tensors: exclude it (exclude=[...])."
            )
        if name not in ref:
            known = ref.keys()
            raise DPIConfigError(
                f"parameter {name!r} is missing from the reference ({len(known)} tensors, e.g. {known[:3]!r}); key "
                "the reference by the same names as named_parameters() (no 'module.'/'base_model.' prefixes) or "
                "exclude the parameter."
            )
        ref_shape = ref.shape(name)
        if is_dtensor(p):
            # a sharded parameter: the reference is this rank's local shard (snapshot_parameters) or the full tensor
            # (a checkpoint), of which only the rows of the local shard are read
            layout = dtensor_layout(name, p)
            local_shape = tuple(p.to_local().shape)
            if ref_shape == local_shape:
                continue
            if ref_shape == tuple(p.shape):
                rows[name] = (layout.first_row, layout.last_row)
                continue
            raise DPIConfigError(
                f"parameter {name!r} is sharded (global shape {tuple(p.shape)}, local shard {local_shape}) but the "
                f"reference has {ref_shape}; pass this rank's snapshot_parameters(model) or the full θ0 weights."
            )
        if ref_shape != tuple(p.shape):
            raise DPIConfigError(
                f"parameter {name!r} has shape {tuple(p.shape)} but the reference has {ref_shape}; pass the "
                "reference weights of this very model."
            )
    return UpdateMagnitudes(params, ref, rows)


# ---------------------------------------------------------------------------------------------------- the signals
def _add_square(buffer: torch.Tensor, grad: torch.Tensor) -> None:
    buffer.addcmul_(grad, grad)


def _add(buffer: torch.Tensor, grad: torch.Tensor) -> None:
    buffer.add_(grad)


def _same(buffer: torch.Tensor) -> torch.Tensor:
    return buffer


def _magnitude(buffer: torch.Tensor) -> torch.Tensor:
    return buffer.abs()


register_signal(Signal(
    "fisher", "Σg²", "the accumulated squared gradient (diagonal empirical Fisher)", accumulate=_add_square,
    finish=_same))
register_signal(Signal("gradsum", "|Σg|", "the magnitude of the summed gradient", accumulate=_add, finish=_magnitude))
register_signal(Signal(
    "update", "|θ−θ0|", "the paper's weight change after the probe", from_weights=update_magnitudes,
    unreliable_fix=f"lengthen the probe (probe_steps) or use core_signal={DEFAULT_SIGNAL!r}"))

# the built-in names (kept for imports; the registry is the authority, see get_signal / gradient_signals)
SIGNALS = tuple(SIGNAL_REGISTRY)
GRADIENT_SIGNALS = gradient_signals()
