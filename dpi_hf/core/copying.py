"""A deep copy of a model that computes with its own weights."""

from __future__ import annotations

import copy

import torch


def independent_copy(model: torch.nn.Module) -> torch.nn.Module:
    """``copy.deepcopy(model)`` without the instance-level ``forward`` overrides of any of its modules.

    Trainers patch ``module.forward`` on the instance with a closure over the original bound method (TRL's
    ``SFTTrainer`` does this to every model it trains; accelerate's mixed-precision wrapper too). ``copy.deepcopy``
    does not copy closures, so a copy of such a model keeps calling the ORIGINAL model's forward: it computes with the
    original's weights, whatever is written into the copy's. Dropping the override restores the class's forward on
    the copy; the original model is unchanged.

    Args:
        model: the model to copy.

    Returns:
        The copy (same parameters, buffers and training mode; the class's own ``forward`` on every module).
    """
    clone = copy.deepcopy(model)
    for module in clone.modules():
        module.__dict__.pop("forward", None)
    return clone
