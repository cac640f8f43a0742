"""kohya's `fused_backward_pass`: the optimizer steps each parameter as soon as its gradient is ready
during the backward pass and frees that gradient, so a full SDXL fine-tune never holds every
gradient at once (what lets it fit 24 GB with Adafactor).

As kohya's sdxl_train.py: a post-accumulate-grad hook per trained parameter clips that parameter's
gradient alone to `max_grad_norm` (kohya clips per tensor in this mode, not over all of them), steps
it with the optimizer's own update rule and sets its gradient to None. The update is transformers'
Adafactor itself, run on a one-parameter view of the parameter's group, so a fused step gives the
same weights as the unfused step (kohya's own fused Adafactor also rounds bf16 weights
stochastically; sdprep rounds as the unfused step does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdprep.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch.utils.hooks import RemovableHandle


def check_fused(
    optimizer_type: str, accumulation: int, method: str, mixed_precision: str, processes: int
) -> None:
    """Refuse the settings kohya's fused backward pass does not work with (ConfigError)."""
    if optimizer_type.lower() != "adafactor":
        raise ConfigError(
            f"fused_backward_pass works with optimizer_type Adafactor only (as kohya), not {optimizer_type}",
            'set optimizer_type = "Adafactor" or turn fused_backward_pass off',
        )
    if accumulation != 1:
        raise ConfigError(
            "fused_backward_pass needs gradient_accumulation_steps = 1 (as kohya): each gradient is "
            "applied and freed as soon as it is computed",
            "raise train_batch_size instead, or turn fused_backward_pass off",
        )
    if method != "finetune":
        raise ConfigError(
            "fused_backward_pass is for full fine-tunes (kohya's sdxl_train.py): a LoRA or embedding's "
            "gradients are small",
            "turn fused_backward_pass off",
        )
    if mixed_precision == "fp16":
        raise ConfigError(
            "fused_backward_pass cannot be used with mixed_precision fp16 (the loss scaler needs every "
            "gradient before a step)",
            'use mixed_precision = "bf16" (with full_bf16 for the memory saving)',
        )
    if processes > 1:
        raise ConfigError(
            "fused_backward_pass with several processes would step each parameter before its gradient is "
            "averaged across them",
            "train in one process, or turn fused_backward_pass off",
        )


def step_parameter(optimizer: torch.optim.Optimizer, group: dict[str, Any], param: torch.Tensor) -> None:
    """One parameter's optimizer step with the optimizer's own rule: `step()` on its group narrowed
    to this parameter (every other group hidden), then the group restored."""
    groups, params = optimizer.param_groups, group["params"]
    optimizer.param_groups = [group]
    group["params"] = [param]
    try:
        optimizer.step()
    finally:
        group["params"] = params
        optimizer.param_groups = groups


def register_fused_step(optimizer: torch.optim.Optimizer, max_grad_norm: float) -> list[RemovableHandle]:
    """Hook every trained parameter of `optimizer` (accelerate's wrapper or a torch optimizer) so
    it is clipped, stepped and its gradient freed the moment its gradient is accumulated; returns
    the hook handles."""
    import torch

    inner: torch.optim.Optimizer = getattr(optimizer, "optimizer", optimizer)
    handles = []
    for group in inner.param_groups:
        for param in group["params"]:
            if not param.requires_grad:
                continue

            def hook(tensor: torch.Tensor, group: dict[str, Any] = group) -> None:
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_([tensor], max_grad_norm)
                step_parameter(inner, group, tensor)
                tensor.grad = None

            handles.append(param.register_post_accumulate_grad_hook(hook))
    return handles
