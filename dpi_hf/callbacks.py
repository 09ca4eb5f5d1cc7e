"""The two halves of DPI as ordinary `transformers.TrainerCallback`s, usable in any HF `Trainer`.

* :class:`CoreProbeCallback` — turn a training run into a probe: remember θ0 when training begins, and when it ends
  select the core region (the top p of |θ − θ0|).
* :class:`FreezeMaskCallback` — keep a set of parameter elements bit-identical through training (grad-zero hooks +
  post-step restore, see :class:`dpi_hf.core.ParameterFreezer`).

Example with a plain `Trainer`::

    probe = CoreProbeCallback(core_fraction=0.01, task_name="gsm8k", save_path="out/dpi/gsm8k.safetensors")
    Trainer(model=model, args=args, train_dataset=gsm8k, callbacks=[probe]).train()
    core = probe.core                      # a CoreMask

    model.load_state_dict(theta0)          # back to the base weights, then train another task with that core frozen
    Trainer(model=model, args=args, train_dataset=code, callbacks=[FreezeMaskCallback(core)]).train()
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

from .core import CoreMask, ParameterFreezer, save_cores, select_core, update_magnitudes
from .core.errors import DPIConfigError
from .core.selection import validate_core_fraction, validate_scope
from .core.sharding import snapshot_parameters  # noqa: F401  (re-exported: θ0 copies, local shards only)

logger = logging.getLogger(__name__)


class CoreProbeCallback(TrainerCallback):
    """Select a task's core region from the parameter update of the training run it is attached to.

    Args:
        core_fraction: p, the fraction of considered elements in the core (default 0.01).
        scope: ``"global"`` (default) or ``"per_tensor"``.
        include: parameter-name patterns to consider (default None: every trainable parameter).
        exclude: parameter-name patterns to leave out (default None).
        reference: θ0 — a mapping of parameter name → tensor on the CPU, or a path to a safetensors file/checkpoint
            directory. Default None: a CPU copy of the trainable parameters is taken when training begins.
        task_name: the task's name, used as the key when saving (default ``"task"``).
        save_path: if given, the core is saved there with :func:`dpi_hf.save_cores` as soon as it is selected (by the
            main process only).

    After training, :attr:`core` holds the :class:`CoreMask`.
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
    ):
        self.core_fraction = validate_core_fraction(core_fraction)
        self.scope = validate_scope(scope)
        self.include = include
        self.exclude = exclude
        self.reference = reference
        self._owns_reference = reference is None
        self.task_name = task_name
        self.save_path = save_path
        self.core: CoreMask | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._owns_reference:
            self.reference = snapshot_parameters(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.core = self.select(model)
        if self.save_path is not None and state.is_world_process_zero:
            save_cores(
                {self.task_name: self.core},
                self.save_path,
                model=model,
                core_fraction=self.core_fraction,
                scope=self.scope,
            )
        if self._owns_reference:
            self.reference = None  # free θ0

    def select(self, model: torch.nn.Module) -> CoreMask:
        """The core of ``model``'s update from the reference."""
        if self.reference is None:
            raise DPIConfigError("CoreProbeCallback has no reference θ0: training never began.")
        deltas = update_magnitudes(model, self.reference, include=self.include, exclude=self.exclude)
        return select_core(deltas, self.core_fraction, scope=self.scope)


class FreezeMaskCallback(TrainerCallback):
    """Keep the elements of ``frozen`` bit-identical through training.

    Attaches a :class:`~dpi_hf.core.ParameterFreezer` when training begins (after the Trainer created its optimizer,
    so the post-step restore hooks the inner torch optimizer even when accelerate wraps it) and detaches it when
    training ends.

    Args:
        frozen: a :class:`CoreMask` over the model's parameter names (e.g. a core, or the union of several).
    """

    def __init__(self, frozen: CoreMask):
        if not isinstance(frozen, CoreMask):
            raise DPIConfigError(f"frozen must be a CoreMask, got {type(frozen).__name__}.")
        self.frozen = frozen
        self.freezer: ParameterFreezer | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.freezer = ParameterFreezer(model, self.frozen).attach(optimizer)
        logger.info("FreezeMaskCallback: %s elements frozen", f"{self.freezer.frozen_count:,}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.freezer is not None:
            self.freezer.detach()
            self.freezer = None
