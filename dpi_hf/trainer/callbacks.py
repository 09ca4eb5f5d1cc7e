"""The two halves of DPI as ordinary `transformers.TrainerCallback`s, usable in any HF `Trainer`.

* :class:`CoreProbeCallback` — turn a training run into a probe: read its importance signal (Σg² by default, or
  |θ − θ0| from a θ0 copy taken when training begins), and when it ends select the core region (the top p).
* :class:`FreezeMaskCallback` — keep a set of parameter elements bit-identical through training (grad-zero hooks +
  post-step restore, see :class:`dpi_hf.core.ParameterFreezer`).

Example with a plain `Trainer`::

    probe = CoreProbeCallback(core_fraction=0.01, task_name="gsm8k", signal="fisher",
                              save_path="out/dpi/gsm8k.safetensors")
    Trainer(model=model, args=args, train_dataset=gsm8k, callbacks=[probe]).train()
    core = probe.core                      # a CoreMask

    model.load_state_dict(theta0)          # back to the base weights, then train another task with that core frozen
    Trainer(model=model, args=args, train_dataset=code, callbacks=[FreezeMaskCallback(core)]).train()
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

from ..core import CoreMask, ParameterFreezer, model_fingerprint, save_cores, select_core
from ..core.errors import DPIConfigError
from ..core.selection import validate_core_fraction, validate_scope
from ..core.sharding import snapshot_parameters  # noqa: F401  (re-exported: θ0 copies, local shards only)
from ..core.signals import (
    DEFAULT_SIGNAL,
    ImportanceAccumulator,
    cpu_copy,
    get_signal,
    gradient_signals,
    threshold_ties,
    tie_warning,
    validate_signal,
)

logger = logging.getLogger(__name__)


class CoreProbeCallback(TrainerCallback):
    """Select a task's core region from the training run it is attached to (a probe).

    Args:
        core_fraction: p, the fraction of considered elements in the core (default 0.01).
        scope: ``"global"`` (default) or ``"per_tensor"``.
        include: parameter-name patterns to consider (default None: every trainable parameter).
        exclude: parameter-name patterns to leave out (default None).
        reference: θ0 for a weight signal such as ``signal="update"`` — a mapping of parameter name → tensor on the
            CPU, or a path to a safetensors file/checkpoint directory. Default None: a CPU copy of the trainable
            parameters is taken when training begins. Gradient signals need no reference.
        task_name: the task's name, used as the key when saving (default ``"task"``).
        save_path: if given, the core is saved there with :func:`dpi_hf.save_cores` as soon as it is selected (by the
            main process only).
        signal: the importance that ranks elements, a name in :data:`dpi_hf.core.signals.SIGNAL_REGISTRY` (default
            ``"fisher"``, as DPIConfig's ``core_signal``): ``"update"`` = |θ − θ0| at the end of training (the
            paper); ``"fisher"`` = Σ g² and ``"gradsum"`` = |Σ g| over the optimizer steps, read from the gradients at
            ``on_pre_optimizer_step`` (after accumulation and the DDP all-reduce; after clipping when
            ``max_grad_norm`` > 0) into one float32 buffer per considered parameter.
        keep_importance: keep a float32 CPU copy of the importance in :attr:`importance` after training (default
            False), e.g. to pool the importance of several probes.
        update_weights: let the optimizer step (default True). False (gradient signals only): the gradients are
            accumulated and then dropped before every optimizer step, so the run reads the importance at the current
            weights and never moves them (the optimizer skips parameters without a gradient, weight decay included).
        split_half: (gradient signals) add the gradients of even optimizer steps into one accumulator and of odd steps
            into another (default False): one pass yields two half-importances, whose cores land in
            :attr:`half_cores`, and :attr:`core` is selected from both pooled. The halves are independent when the
            steps' rows are (``DPITrainer`` alternates the two halves of a task's rows step by step).
        keep_gradient_sum: (gradient signals) also accumulate the signed gradient sum Σ g and keep it, on the
            parameters' devices, in :attr:`gradient_sum` after training, with :attr:`gradient_steps` (default False;
            one float32 buffer per considered element, for :mod:`dpi_hf.core.affinity`).

    After training, :attr:`core` holds the :class:`CoreMask`, :attr:`batches` the number of optimizer steps the
    importance was accumulated over (the divisor of its mean, as stored in ``dpi/importance.safetensors``), and
    :attr:`ties` the threshold tie report (see
    :func:`dpi_hf.core.signals.threshold_ties`); a warning is logged when the threshold falls among exact zeros or
    inside a large block of tied values.
    """

    def __init__(
        self,
        core_fraction: float = 0.01,
        scope: str = "global",
        include=None,
        exclude=None,
        reference=None,
        task_name: str = "task",
        save_path=None,
        signal: str = DEFAULT_SIGNAL,
        keep_importance: bool = False,
        update_weights: bool = True,
        split_half: bool = False,
        keep_gradient_sum: bool = False,
    ):
        self.core_fraction = validate_core_fraction(core_fraction)
        self.scope = validate_scope(scope)
        self.signal = validate_signal(signal)
        self.include = include
        self.exclude = exclude
        self.reference = reference
        self._owns_reference = reference is None
        self.task_name = task_name
        self.save_path = save_path
        self.keep_importance = keep_importance
        spec = get_signal(self.signal)
        if not update_weights and spec.needs_steps:
            raise DPIConfigError(
                f"update_weights=False takes no optimizer step, so signal={self.signal!r} ({spec.formula}) would be "
                f"zero everywhere; use a gradient signal ({' or '.join(map(repr, gradient_signals()))}), or "
                "update_weights=True."
            )
        self.update_weights = update_weights
        if (split_half or keep_gradient_sum) and not spec.reads_gradients:
            raise DPIConfigError(
                f"split_half and keep_gradient_sum read the probe's gradients, and signal={self.signal!r} "
                f"({spec.formula}) reads none; use a gradient signal ({' or '.join(map(repr, gradient_signals()))})."
            )
        self.split_half = split_half
        self.keep_gradient_sum = keep_gradient_sum
        self.half_cores: tuple[CoreMask, CoreMask] | None = None
        self.gradient_sum: dict[str, torch.Tensor] | None = None
        self.gradient_steps = 0
        self.core: CoreMask | None = None
        self.importance: dict[str, torch.Tensor] | None = None
        self.ties: dict | None = None
        self.batches: int | None = None
        self._accumulator: ImportanceAccumulator | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if get_signal(self.signal).reads_gradients:
            if getattr(args, "fp16", False):
                raise DPIConfigError(
                    f"signal={self.signal!r} reads the gradients at on_pre_optimizer_step, where fp16 loss scaling "
                    "leaves them scaled (and inf on overflow steps); train the probe in bf16 or float32, or use "
                    "signal='update'."
                )
            if _zero3_enabled():
                raise DPIConfigError(
                    f"signal={self.signal!r} cannot read gradients under DeepSpeed ZeRO-3 (they live in the engine's "
                    "partitions and the engine steps inside backward); use signal='update' or DDP/FSDP2."
                )
            self._accumulator = ImportanceAccumulator(model, self.signal, self.include, self.exclude,
                                                      parts=2 if self.split_half else 1,
                                                      keep_signed_sum=self.keep_gradient_sum)
        elif self._owns_reference:
            self.reference = snapshot_parameters(model)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self._accumulator is not None:
            # split-half: optimizer steps alternate between the halves (the trainer's sampler alternates their rows)
            self._accumulator.accumulate(state.global_step % 2 if self.split_half else 0)
        if not self.update_weights:
            # no gradient, no step: torch optimizers skip parameters whose .grad is None (their weight decay too)
            for p in model.parameters():
                p.grad = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.batches = self._accumulator.steps if self._accumulator is not None else state.global_step
        self.core = self.select(model)
        if self.save_path is not None:
            fingerprint = model_fingerprint(model)  # on every rank: sharded tensors are read with collectives
        if self.save_path is not None and state.is_world_process_zero:
            save_cores(
                {self.task_name: self.core},
                self.save_path,
                fingerprint=fingerprint,
                core_fraction=self.core_fraction,
                scope=self.scope,
                core_signal=self.signal,
            )
        if self._owns_reference:
            self.reference = None  # free θ0
        if self._accumulator is not None:
            if self.keep_gradient_sum:  # on the parameters' devices; the caller drops it when done
                self.gradient_sum = self._accumulator.signed_sum()
                self.gradient_steps = self._accumulator.steps
            self._accumulator.release()
            self._accumulator = None

    def importance_of(self, model: torch.nn.Module):
        """The importance mapping (name → non-negative tensor) of ``model`` for this callback's signal."""
        spec = get_signal(self.signal)
        if spec.reads_gradients:
            if self._accumulator is None:
                raise DPIConfigError(f"CoreProbeCallback({self.signal!r}) has accumulated nothing: training never began.")
            return self._accumulator.importance()
        if self.reference is None:
            raise DPIConfigError("CoreProbeCallback has no reference θ0: training never began.")
        return spec.from_weights(model, self.reference, include=self.include, exclude=self.exclude)

    def select(self, model: torch.nn.Module) -> CoreMask:
        """The core of ``model``'s probe: the top p of the importance."""
        importance = self.importance_of(model)
        if self.keep_importance:
            importance = cpu_copy(importance)
            self.importance = importance
        core = select_core(importance, self.core_fraction, scope=self.scope)
        self.ties = threshold_ties(importance, core)
        message = tie_warning(self.ties, f"core of {self.task_name!r} ({self.signal})")
        if message:
            logger.warning(message)
        if self.split_half:
            self.half_cores = tuple(select_core(self._accumulator.importance(h), self.core_fraction, scope=self.scope)
                                    for h in (0, 1))
        return core


class FreezeMaskCallback(TrainerCallback):
    """Keep the elements of ``frozen`` bit-identical through training.

    Attaches a :class:`~dpi_hf.core.ParameterFreezer` when training begins (after the Trainer created its optimizer,
    so the post-step restore hooks the inner torch optimizer even when accelerate wraps it) and detaches it when
    training ends. Under DeepSpeed ZeRO-3 through the Trainer it refuses to start: the engine steps inside backward,
    before any callback event, so no callback can zero the frozen gradients in time (the engine-level
    :class:`~dpi_hf.core.sharding.ZeroFreezer` serves a DeepSpeed loop of your own).

    Args:
        frozen: a :class:`CoreMask` over the model's parameter names (e.g. a core, or the union of several).
    """

    def __init__(self, frozen: CoreMask):
        if not isinstance(frozen, CoreMask):
            raise DPIConfigError(f"frozen must be a CoreMask, got {type(frozen).__name__}.")
        self.frozen = frozen
        self.freezer: ParameterFreezer | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if _zero3_enabled():
            # accelerate's DeepSpeed wrapper runs engine.step() inside backward, before any callback event, so a
            # callback cannot zero the frozen gradients before the step: refuse rather than freeze inexactly
            raise DPIConfigError(
                "FreezeMaskCallback cannot freeze exactly under DeepSpeed ZeRO-3 through the Trainer (the engine "
                "steps inside backward, before any callback runs); use DDP or FSDP2, or dpi_hf.core.sharding."
                "ZeroFreezer in your own DeepSpeed loop (zero_frozen_grads() after backward, restore() after step)."
            )
        self.freezer = ParameterFreezer(model, self.frozen).attach(optimizer)
        logger.info("FreezeMaskCallback: %s elements frozen", f"{self.freezer.frozen_count:,}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.freezer is not None:
            self.freezer.detach()
            self.freezer = None


def _zero3_enabled() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())
