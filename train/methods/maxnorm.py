"""Max-norm regularisation of LoRA weights (kohya's `scale_weight_norms`).

After every optimizer step the weight change each LoRA module adds, `up @ down * alpha / rank`, is
measured (Frobenius norm); when it is above `max_norm`, `up` and `down` are both multiplied by
sqrt(max_norm / norm), so the change is exactly `max_norm`. This is kohya's
`LoRANetwork.apply_max_norm_regularization`, including its floor: norms are clamped to at least
max_norm / 2 before the ratio is taken, which leaves small modules untouched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class NormStats:
    keys_scaled: int  # modules scaled down this step
    average_norm: float  # mean norm after scaling (as kohya logs `average_key_norm`)
    max_norm: float  # largest norm after scaling (`max_key_norm`)


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """The weight change a LoRA module adds: linear, 1x1 conv or 3x3 conv, times alpha / rank."""
    import torch

    if up.dim() == 4 and up.shape[2:] == (1, 1) and down.shape[2:] == (1, 1):
        delta = (up.flatten(1) @ down.flatten(1)).unsqueeze(2).unsqueeze(3)
    elif up.dim() == 4:  # a 3x3 conv down projection: compose the two convolutions
        delta = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    else:
        delta = up @ down
    return delta * scale


def apply_max_norm(modules: Iterable[tuple[Any, Any, float]], max_norm: float) -> NormStats:
    """Scale (down, up, scale) weight pairs in place so no module's change exceeds `max_norm`."""
    import torch

    scaled, norms = 0, []
    with torch.no_grad():
        for down, up, scale in modules:
            delta = lora_delta(down.float(), up.float(), scale)
            norm = delta.norm().clamp(min=max_norm / 2)
            ratio = float(norm.clamp(max=max_norm) / norm)
            if ratio != 1.0:
                scaled += 1
                down.mul_(ratio**0.5)
                up.mul_(ratio**0.5)
            norms.append(float(delta.norm()) * ratio)
    if not norms:
        return NormStats(0, 0.0, 0.0)
    return NormStats(scaled, sum(norms) / len(norms), max(norms))
