"""kohya's `fp8_base` / `fp8_base_unet`: the frozen base model stored in float8 (e4m3fn), a quarter
of float32's memory, and computed in the autocast dtype.

As kohya's train_network.py: with mixed precision fp16 or bf16, the U-Net's weights (and with
`fp8_base` the text encoders' too, except their embeddings) are cast to `torch.float8_e4m3fn`, and
autocast casts each weight up for its operation. Only frozen weights are cast: the trained LoRA /
LyCORIS weights stay in their own precision. It needs a CUDA GPU: on a CPU, autocast does not cast
float8 normalisation weights (GroupNorm / LayerNorm stop with "mixed dtype (CPU)"), and memory
is not what limits a CPU run, so it is refused there with that reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdprep.errors import ConfigError

if TYPE_CHECKING:
    import torch

FP8_DTYPE = "float8_e4m3fn"


def check_fp8(key: str, device_type: str, mixed_precision: str, method: str) -> None:
    """Refuse fp8_base / fp8_base_unet (`key`) where it cannot work (ConfigError with the reason)."""
    if method != "lora":
        raise ConfigError(
            f"{key} is for LoRA / LyCORIS training (kohya's train_network.py), not {method}",
            f"remove {key}",
        )
    if device_type != "cuda":
        raise ConfigError(
            f"{key} needs a CUDA GPU: on this {device_type.upper()}, autocast cannot compute with float8 "
            'normalisation weights (torch stops with "mixed dtype (CPU)")',
            f'remove {key}; mixed_precision = "bf16" halves the base model instead',
        )
    if mixed_precision not in ("fp16", "bf16"):
        raise ConfigError(
            f'{key} needs mixed_precision = "fp16" or "bf16" (as kohya): the float8 weights are computed '
            "in that type",
            'set mixed_precision = "bf16"',
        )


def cast_frozen_to_fp8(module: torch.nn.Module, keep: tuple[str, ...] = ()) -> int:
    """Store every frozen floating parameter of `module` as float8, except those whose name starts
    with one of `keep`; returns how many were cast."""
    import torch

    fp8 = getattr(torch, FP8_DTYPE)
    cast = 0
    for name, param in module.named_parameters():
        if param.requires_grad or not param.is_floating_point() or name.startswith(keep):
            continue
        param.data = param.data.to(fp8)
        cast += 1
    return cast
