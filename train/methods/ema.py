"""An exponential moving average (EMA) of trained weights, saved instead of the raw weights.

The decay schedule is diffusers' `EMAModel` default: after optimizer step t the average moves with
decay `min(ema_decay, (1 + s) / (10 + s))`, s = t - 1 (so the first step copies the weights and the
decay ramps up), i.e. `shadow += (1 - decay) * (param - shadow)`. The shadow copy has the dtype of
the weights it follows (fp32 master weights, or bf16 under full_bf16), and lives on their device:
it costs one more copy of the trained weights in GPU memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

STEP_KEY = "__step__"


class EMA:
    """EMA of named parameters; `step()` after each optimizer step, `averaged()` to export."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float = 0.9999) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
        self.params = params
        self.decay = decay
        self.optimization_step = 0
        self.shadow = {name: p.detach().clone() for name, p in params.items()}

    def current_decay(self) -> float:
        """The decay used for the update after optimizer step `optimization_step` (diffusers' rule)."""
        step = self.optimization_step - 1
        if step <= 0:
            return 0.0
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def step(self) -> None:
        """Move the average towards the current weights (call once per optimizer step)."""
        self.optimization_step += 1
        weight = 1.0 - self.current_decay()
        names = list(self.params)
        for n in names:  # the trainer moves the model to its device after the EMA is made
            if self.shadow[n].device != self.params[n].device:
                self.shadow[n] = self.shadow[n].to(self.params[n].device)
        shadows = [self.shadow[n] for n in names]
        values = [self.params[n].detach() for n in names]
        torch._foreach_lerp_(shadows, values, weight)

    def averaged(self) -> dict[str, torch.Tensor]:
        """The averaged weights by parameter name (no copy)."""
        return self.shadow

    def state_dict(self, prefix: str = "ema/") -> dict[str, torch.Tensor]:
        """Tensors to save with the training state (the step count included)."""
        out = {prefix + name: t for name, t in self.shadow.items()}
        out[prefix + STEP_KEY] = torch.tensor(self.optimization_step, dtype=torch.int64)
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str = "ema/") -> None:
        mine = {prefix + name for name in self.shadow} | {prefix + STEP_KEY}
        theirs = {k for k in state if k.startswith(prefix)}
        if mine != theirs:
            missing = sorted(mine - theirs)
            raise KeyError(
                f"EMA state does not match ({len(missing)} missing, e.g. {(missing or sorted(theirs))[:1]})"
            )
        for name, t in self.shadow.items():
            t.copy_(state[prefix + name].to(t.dtype))
        self.optimization_step = int(state[prefix + STEP_KEY])

    @torch.no_grad()
    def _swap(self) -> None:
        for name, p in self.params.items():
            s = self.shadow[name]
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Temporarily put the averaged weights into the model (e.g. to save a diffusers folder);
        tensor by tensor, so it needs no second copy of the model."""
        self._swap()
        try:
            yield
        finally:
            self._swap()


def ema_of(modules: dict[str, Any], decay: float) -> EMA:
    """An EMA of every trainable parameter of `modules` ({"unet": unet, ...}), names `<key>/<param>`."""
    params = {
        f"{key}/{name}": p
        for key, module in modules.items()
        for name, p in module.named_parameters()
        if p.requires_grad
    }
    return EMA(params, decay)
