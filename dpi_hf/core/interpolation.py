"""Weight interpolation (WiSE-FT) of two checkpoints of one architecture, tensor by tensor.

``θ = (1 − α) θ_A + α θ_B``, with another ``α_core`` on the elements of a core mask: a core-aware interpolation
that, for instance, keeps A's core (``α_core = 0``) while taking B's other weights (``α = 1``). Each tensor is
interpolated in float32 with :func:`torch.lerp` (exact at both ends: α = 0 gives θ_A and α = 1 gives θ_B bit for bit)
and cast back to A's dtype. Also: the weight delta of a LoRA adapter, to interpolate towards A plus an adapter.

Torch only; :mod:`dpi_hf.merging` applies it to models and to checkpoint directories.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import DPIConfigError


def validate_alpha(value, name: str = "alpha") -> float:
    """``value`` as a float if it is a number in [0, 1], else a :class:`DPIConfigError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise DPIConfigError(
            f"{name}={value!r} must be a number in [0, 1]: the weight of B (0 keeps A's weights, 1 takes B's); "
            "extrapolating beyond the two checkpoints is not supported."
        )
    return float(value)


def check_same_architecture(shapes_a: Mapping[str, tuple], shapes_b: Mapping[str, tuple], what=("A", "B")) -> None:
    """Raise :class:`DPIConfigError` naming the first tensor whose name or shape differs between two checkpoints."""
    only_a = [n for n in shapes_a if n not in shapes_b]
    only_b = [n for n in shapes_b if n not in shapes_a]
    if only_a or only_b:
        raise DPIConfigError(
            f"checkpoints {what[0]} and {what[1]} have different architectures: tensors only in {what[0]}: "
            f"{only_a[:3]}{'…' if len(only_a) > 3 else ''}; only in {what[1]}: {only_b[:3]}"
            f"{'…' if len(only_b) > 3 else ''}. Interpolate two checkpoints of one model (a base and its fine-tune)."
        )
    for n, shape in shapes_a.items():
        if tuple(shape) != tuple(shapes_b[n]):
            raise DPIConfigError(
                f"checkpoints {what[0]} and {what[1]} have different architectures: {n!r} is {tuple(shape)} in "
                f"{what[0]} but {tuple(shapes_b[n])} in {what[1]}. Interpolate two checkpoints of one model."
            )


def interpolate(a: torch.Tensor, b: torch.Tensor, alpha: float, core_indices: torch.Tensor | None = None,
                alpha_core: float | None = None) -> torch.Tensor:
    """``(1 − α) a + α b`` in float32, cast to ``a``'s dtype; ``alpha_core`` at the flat ``core_indices``.

    Non-floating tensors (integer buffers) are returned as a copy of ``a``.
    """
    if not a.is_floating_point():
        return a.clone()
    a32 = a.detach().to(torch.float32)
    b32 = b.detach().to(device=a.device, dtype=torch.float32)
    if core_indices is None or alpha_core is None or core_indices.numel() == 0:
        out = torch.lerp(a32, b32, alpha)
    else:
        weight = torch.full_like(a32, alpha)
        weight.view(-1)[core_indices.to(device=a.device, dtype=torch.int64)] = alpha_core
        out = torch.lerp(a32, b32, weight)
    return out.to(a.dtype)


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """The weight change ``scale · B @ A`` of one LoRA-adapted linear layer, float32 (transposed with
    ``fan_in_fan_out``, for layers that store their weight as (in, out))."""
    delta = (lora_b.to(torch.float32) @ lora_a.to(torch.float32)) * scale
    return delta.T if fan_in_fan_out else delta
