"""kohya networks.lora's `network_args` beyond conv_dim: block dims / alphas / learning rates on
SDXL's blocks, LoRA+ parameter groups, and neuron / rank / module dropout.

SDXL's blocks as kohya counts them (`networks/lora.py` get_block_index with is_sdxl): 0 = time and
label embeddings, 1-9 = input_blocks 0-8, 10-12 = middle_block 0-2, 13-21 = output_blocks 0-8,
22 = out. `block_dims`, `block_alphas`, `conv_block_dims`, `conv_block_alphas` take 23 values;
`down_lr_weight` / `up_lr_weight` take 9 (or a preset: cosine, sine, linear, reverse_linear, zeros,
with an optional `+base`), `mid_lr_weight` 3; a block whose lr weight is 0 gets no LoRA at all.
LoRA+ gives the up (B) weights `lr * ratio` in their own parameter group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sdprep.errors import ConfigError

if TYPE_CHECKING:
    import torch

N = TypeVar("N", int, float)

SDXL_BLOCKS = 23  # 1 (embeddings) + 9 (input) + 3 (middle) + 9 (output) + 1 (out)
SDXL_IN_OUT = 9
SDXL_MID = 3
LR_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


def block_index(kohya_name: str) -> int:
    """kohya's SDXL block index of a LoRA module name (`lora_unet_input_blocks_4_1_...` -> 5), -1 for
    text-encoder modules."""
    if not kohya_name.startswith("lora_unet_"):
        return -1
    name = kohya_name[len("lora_unet_") :]
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    for prefix, base in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if name.startswith(prefix):
            return base + int(name[len(prefix) :].split("_")[0])
    return 22 if name.startswith("out_") else -1


def _numbers(key: str, value: str, kind: Callable[[str], N], count: int) -> list[N]:
    try:
        values = [kind(s) for s in str(value).split(",")]
    except ValueError:
        raise ConfigError(
            f"network_args {key}: expected {count} comma-separated numbers, got {value!r}"
        ) from None
    if len(values) != count:
        raise ConfigError(
            f"network_args {key} has {len(values)} values, SDXL needs {count}",
            "one per block: embeddings, input_blocks 0-8, middle_block 0-2, output_blocks 0-8, out",
        )
    return values


def lr_weight_preset(spec: str, n: int = SDXL_IN_OUT) -> list[float]:
    """kohya's named lr weight curves over `n` blocks: `cosine`, `sine`, `linear`, `reverse_linear`,
    `zeros`, each with an optional `+base` added."""
    name, _, base_text = spec.partition("+")
    base = float(base_text) if base_text else 0.0
    steps = [i / (n - 1) for i in range(n)]
    curves = {
        "cosine": [math.sin(math.pi * s / 2) for s in reversed(steps)],
        "sine": [math.sin(math.pi * s / 2) for s in steps],
        "linear": steps,
        "reverse_linear": list(reversed(steps)),
        "zeros": [0.0] * n,
    }
    if name not in curves:
        raise ConfigError(f'unknown lr weight preset "{name}"', "valid: " + ", ".join(LR_PRESETS))
    return [v + base for v in curves[name]]


def _lr_list(key: str, value: str | None, n: int, named: bool) -> list[float] | None:
    if value is None:
        return None
    value = str(value)
    if named and "," not in value:
        return lr_weight_preset(value, n)
    try:
        weights = [float(s) if s else 0.0 for s in value.split(",")]
    except ValueError:
        raise ConfigError(f"network_args {key}: expected numbers, got {value!r}") from None
    return (weights + [1.0] * n)[:n]  # kohya: cut to n, fill with 1


def block_lr_weights(args: Mapping[str, str]) -> list[float] | None:
    """The 23 per-block learning-rate multipliers, or None when no lr weight is given."""
    down = _lr_list("down_lr_weight", args.get("down_lr_weight"), SDXL_IN_OUT, True)
    mid = _lr_list("mid_lr_weight", args.get("mid_lr_weight"), SDXL_MID, False)
    up = _lr_list("up_lr_weight", args.get("up_lr_weight"), SDXL_IN_OUT, True)
    if down is None and mid is None and up is None:
        return None
    threshold = float(args.get("block_lr_zero_threshold") or 0.0)

    def cut(ws: list[float] | None, n: int) -> list[float]:
        return [1.0] * n if ws is None else [w if w > threshold else 0.0 for w in ws]

    return [1.0, *cut(down, SDXL_IN_OUT), *cut(mid, SDXL_MID), *cut(up, SDXL_IN_OUT), 1.0]


@dataclass(frozen=True)
class Blocks:
    """Per-block ranks and alphas (23 each; conv ones None when 3x3 convs get no LoRA) and lr weights."""

    dims: list[int]
    alphas: list[float]
    conv_dims: list[int] | None
    conv_alphas: list[float] | None
    lr_weight: list[float] | None

    def rank_alpha(self, kohya_name: str, kind: str) -> tuple[int, float] | None:
        """(rank, alpha) of a U-Net module, None when its block gets no LoRA."""
        i = block_index(kohya_name)
        if kind == "conv":
            if self.conv_dims is None or self.conv_alphas is None or not self.conv_dims[i]:
                return None
            return self.conv_dims[i], self.conv_alphas[i]
        return (self.dims[i], self.alphas[i]) if self.dims[i] else None


def parse_blocks(
    args: Mapping[str, str], dim: int, alpha: float, conv_dim: int | None, conv_alpha: float | None
) -> Blocks | None:
    """kohya's get_block_dims_and_alphas + remove_block_dims_and_alphas for SDXL; None when neither
    block_dims nor a block lr weight is given (every module then has network_dim / conv_dim)."""
    lr_weight = block_lr_weights(args)
    if args.get("block_dims") is None and lr_weight is None:
        for key in ("block_alphas", "conv_block_dims", "conv_block_alphas"):
            if args.get(key) is not None:
                raise ConfigError(f"network_args {key} needs block_dims", "give block_dims (23 values) too")
        return None
    n = SDXL_BLOCKS
    dims = _numbers("block_dims", args["block_dims"], int, n) if args.get("block_dims") else [dim] * n
    alphas = (
        _numbers("block_alphas", args["block_alphas"], float, n) if args.get("block_alphas") else [alpha] * n
    )
    conv_dims = conv_alphas = None
    if args.get("conv_block_dims"):
        conv_dims = _numbers("conv_block_dims", args["conv_block_dims"], int, n)
        default = conv_alpha if conv_alpha is not None else 1.0
        given = args.get("conv_block_alphas")
        conv_alphas = _numbers("conv_block_alphas", given, float, n) if given else [default] * n
    elif conv_dim:
        conv_dims, conv_alphas = [conv_dim] * n, [conv_alpha if conv_alpha is not None else 1.0] * n
    if lr_weight is not None:
        dims = [0 if w == 0 else d for d, w in zip(dims, lr_weight)]
        if conv_dims is not None:
            conv_dims = [0 if w == 0 else d for d, w in zip(conv_dims, lr_weight)]
    return Blocks(dims, alphas, conv_dims, conv_alphas, lr_weight)


def plus_groups(
    name: str, params: list[tuple[str, Any]], lr: float, ratio: float | None
) -> list[dict[str, Any]]:
    """One component's parameter groups as kohya's assemble_params: with a LoRA+ `ratio` the up (B)
    weights go to `<name> plus` at `lr * ratio`; empty groups are left out."""
    base = [p for n, p in params if not (ratio and ("lora_B" in n or "lora_up" in n))]
    plus = [p for n, p in params if ratio and ("lora_B" in n or "lora_up" in n)]
    groups = []
    if base:
        groups.append({"params": base, "lr": lr, "name": name})
    if plus and ratio:
        groups.append({"params": plus, "lr": lr * ratio, "name": f"{name} plus"})
    return groups


# -- dropout ---------------------------------------------------------------------------------


def add_dropout(layer: Any, dropout: float, rank_dropout: float, module_dropout: float) -> None:
    """kohya LoRAModule's three dropouts on a peft LoRA layer, active in train mode only:
    module dropout skips the whole LoRA for a step (probability `module_dropout`); dropout (kohya's
    network_dropout) and rank dropout act on the down projection's output, rank dropout zeroing
    whole ranks per sample and scaling the rest by 1 / (1 - p)."""
    import torch

    down = layer.lora_A["default"]
    if dropout or rank_dropout:

        def on_down(
            module: Any,  # the down Linear / Conv2d (out_features or out_channels read below)
            inputs: tuple[torch.Tensor, ...],
            lx: torch.Tensor,
        ) -> torch.Tensor:
            if not module.training:
                return lx
            if dropout:
                lx = torch.nn.functional.dropout(lx, p=dropout)
            if rank_dropout:
                rank = module.out_features if hasattr(module, "out_features") else module.out_channels
                mask = torch.rand((lx.size(0), rank), device=lx.device) > rank_dropout
                if lx.dim() == 3:
                    mask = mask.unsqueeze(1)
                elif lx.dim() == 4:
                    mask = mask.unsqueeze(-1).unsqueeze(-1)
                lx = lx * mask * (1.0 / (1.0 - rank_dropout))
            return lx

        down.register_forward_hook(on_down)
    if module_dropout:

        def on_layer(module: Any, inputs: tuple[torch.Tensor, ...]) -> None:  # peft's LoraLayer
            # peft's own switch: a disabled layer computes only its base layer (no LoRA, no gradient)
            module._disable_adapters = bool(module.training and torch.rand(1) < module_dropout)

        layer.register_forward_pre_hook(on_layer)
