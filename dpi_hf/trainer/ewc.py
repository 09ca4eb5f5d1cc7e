"""EWC / L2-SP protection in a Trainer: ``protect_method="ewc" | "freeze_ewc" | "l2sp"`` of ``protect_cores_from``.

:func:`build_anchor` turns a config and its protection source into a :class:`~dpi_hf.core.anchoring.AnchorPenalty`
(θ_A = the model's weights now; F = the protected tasks' stored importance, each normalised to mean 1 and summed,
or 1 for L2-SP); :class:`AnchorCallback` applies it once per optimizer step.

Where the penalty's gradient goes (``protect_ewc_form="loss"``): at ``on_pre_optimizer_step``, i.e. after the
gradients are accumulated over the micro-batches, all-reduced across DDP ranks and clipped, and before the step. That
is exactly once per optimizer step on every rank without any communication (θ and θ_A are identical on all ranks), and
whatever the accumulation, the precision or the DDP bucket order. It is also after clipping, on purpose: the penalty
is a regulariser, like weight decay, not a noisy data gradient; counted in the clipping norm, a large λ would make the
clip shrink the task's own gradient, and the pull would be capped at ``max_grad_norm``. (A gradient hook on the last
micro-batch could add it before clipping, but under DDP the order of such a hook and the bucket all-reduce is not
specified.) The logged ``grad_norm`` is therefore that of the task's gradient only. Elements frozen by
``"freeze_ewc"`` have F = 0, and the freezer's restore keeps them bit-exact in any case.

The decoupled form pulls in a step post-hook of the (innermost) torch optimizer, with each parameter group's learning
rate of that step: right after the step, like AdamW's weight decay, and before a :class:`FreezeMaskCallback` listed
after this callback restores its frozen elements. That order matters in a multi-task run, where a stage freezes the
cores of earlier stages at their values after those stages, not at θ_A: a pull after the restore would move them.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from ..core.anchoring import AnchorPenalty, normalise_importance, sum_importances
from ..core.errors import DPIConfigError
from ..core.freezing import innermost_optimizer
from ..core.masks import CoreMask
from .config import IMPORTANCE_METHODS, DPIConfig

logger = logging.getLogger(__name__)

PENALTY_LOG_KEY = "protect_penalty"


def anchor_weights(args: DPIConfig, model, tasks: list[str]):
    """F for ``args.protect_method``: the normalised importance of ``tasks`` summed (EWC), or None (L2-SP: F = 1).

    The importance is read from ``args.protect_cores_from`` and checked against ``model`` (names and shapes, and the
    weights unless ``allow_mask_mismatch``)."""
    if args.protect_method not in IMPORTANCE_METHODS:
        return None
    from ..artifacts import load_importance

    stored = load_importance(args.protect_cores_from, tasks=tasks, model=model,
                             check_content=not args.allow_mask_mismatch)
    return sum_importances([normalise_importance(stored.pop(t)) for t in tasks])


def build_anchor(args: DPIConfig, model, protected: CoreMask, tasks: list[str]) -> AnchorPenalty:
    """The penalty of ``args`` on ``model`` (θ_A = its weights now).

    Args:
        args: the config (``protect_method``, ``protect_lambda``, ``protect_ewc_scope``).
        model: the model about to be trained.
        protected: the union of the protected cores (frozen with ``"freeze_ewc"``, the scope of ``"core"``).
        tasks: the protected tasks (whose importance is summed).
    """
    weights = anchor_weights(args, model, tasks)
    only = protected if args.protect_ewc_scope == "core" else None
    exclude = protected if args.protect_method == "freeze_ewc" else None
    anchor = AnchorPenalty(model, args.protect_lambda, weights, only=only, exclude=exclude)
    logger.info("DPI: %s penalty (λ = %g, form %s, scope %s) on %s elements; θ_A and F hold %.1f MB",
                args.protect_method, args.protect_lambda, args.protect_ewc_form, args.protect_ewc_scope,
                f"{anchor.elements:,}", anchor.nbytes / 2**20)
    return anchor


class AnchorCallback(TrainerCallback):
    """Apply an :class:`~dpi_hf.core.anchoring.AnchorPenalty` once per optimizer step of a Trainer run.

    Args:
        anchor: the penalty (θ_A, F, λ), built before training.
        form: ``"loss"`` (its gradient added at ``on_pre_optimizer_step``) or ``"decoupled"`` (a pull in the
            optimizer's step post-hook); see the module docstring for why there. List this callback before any
            :class:`FreezeMaskCallback` of the same run, so that the freezer's restore follows the pull.

    The penalty's value λ/2 Σ F (θ − θ_A)² is measured at every optimizer step (at the weights the step starts from)
    and :meth:`pop_mean` returns the mean since the last call (DPITrainer logs it as ``protect_penalty``).
    """

    def __init__(self, anchor: AnchorPenalty, form: str = "loss"):
        if form not in ("loss", "decoupled"):
            raise DPIConfigError(f"form={form!r} is not 'loss' or 'decoupled'.")
        self.anchor, self.form = anchor, form
        self._values: list[float] = []
        self._hook = None  # the decoupled pull's optimizer step post-hook while training

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.anchor.check_parameters(model)
        self.anchor.follow_parameters()  # the Trainer may have moved the model since θ_A was taken
        self._values = []
        self._remove_hook()
        if self.form == "decoupled":
            # registered before a FreezeMaskCallback listed after this one attaches its restore: pull, then restore
            self._hook = innermost_optimizer(optimizer).register_step_post_hook(self._pull)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hook()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.form == "loss":
            self._values.append(self.anchor.add_gradient())

    def _pull(self, optimizer, _args, _kwargs) -> None:
        lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        self._values.append(self.anchor.pull(lambda p: lr_of.get(id(p), 0.0)))

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def pop_mean(self) -> float | None:
        """The mean penalty over the optimizer steps since the last call (None if there were none)."""
        if not self._values:
            return None
        mean = sum(self._values) / len(self._values)
        self._values = []
        return mean
