"""Diffusion training loss as small pure tensor functions (kohya sd-scripts' formulas).

The loop computes `training_loss(pred, target, timesteps=..., noise_scheduler=...)`, which is:
per-element loss (l2 / l1 / huber / smooth_l1) -> times the mask (area-resized to the latent)
-> mean over C,H,W -> times the per-sample weight (prior_loss_weight for regularisation images)
-> times the min-SNR weight -> batch mean. Every step is exposed so tests can check it by hand.

`noise_scheduler` is anything with `alphas_cumprod` (a tensor over the training timesteps) and
`config["num_train_timesteps"]` (`NoiseSchedule`), e.g. diffusers' DDPMScheduler / EulerDiscreteScheduler.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

LossType = Literal["l2", "l1", "huber", "smooth_l1"]
HuberSchedule = Literal["constant", "exponential", "snr"]
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


class NoiseSchedule(Protocol):
    """What the loss maths reads of a diffusers noise scheduler."""

    alphas_cumprod: torch.Tensor

    @property
    def config(self) -> Mapping[str, Any]: ...  # num_train_timesteps


def _per_sample(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] tensor shaped to broadcast over a [B, ...] tensor."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.dim() - 1))) if t.dim() else t


def per_element_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    loss_type: LossType = "l2",
    huber_c: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Unreduced loss, as kohya's `conditional_loss(reduction="none")`.

    huber: 2c(sqrt(d^2 + c^2) - c); smooth_l1: 2(sqrt(d^2 + c^2) - c); `huber_c` is a float or a
    per-sample [B] tensor (see `huber_c_for_timesteps`).
    """
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type} needs huber_c")
        c = _per_sample(huber_c, pred)
        root = torch.sqrt((pred - target) ** 2 + c**2) - c
        return 2 * c * root if loss_type == "huber" else 2 * root
    raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")


def _alphas_cumprod(noise_scheduler: NoiseSchedule, timesteps: torch.Tensor) -> torch.Tensor:
    ac = torch.as_tensor(noise_scheduler.alphas_cumprod, dtype=torch.float64)
    return ac[timesteps.long().cpu()].to(timesteps.device)


def snr(timesteps: torch.Tensor, noise_scheduler: NoiseSchedule) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep (float32, [B])."""
    ac = _alphas_cumprod(noise_scheduler, timesteps)
    return (ac / (1.0 - ac)).float()


def huber_c_for_timesteps(
    timesteps: torch.Tensor,
    schedule: HuberSchedule,
    huber_c: float,
    noise_scheduler: NoiseSchedule | None = None,
    *,
    huber_scale: float = 1.0,
) -> torch.Tensor:
    """Per-sample huber threshold, as kohya's `get_huber_threshold_if_needed`.

    constant: c * scale; exponential: exp(ln(c) * t / T) * scale (1 at t=0, c at t=T);
    snr: (1 - c) / (1 + sigma)^2 + c with sigma = sqrt((1 - alpha_bar) / alpha_bar).
    """
    if schedule == "constant":
        return torch.full(timesteps.shape, huber_c * huber_scale, device=timesteps.device)
    if schedule == "exponential":
        total = noise_scheduler.config["num_train_timesteps"] if noise_scheduler is not None else 1000
        alpha = -math.log(huber_c) / total
        return torch.exp(-alpha * timesteps.float()) * huber_scale
    if schedule == "snr":
        if noise_scheduler is None:
            raise ValueError("huber_schedule snr needs the noise scheduler")
        ac = _alphas_cumprod(noise_scheduler, timesteps)
        sigmas = ((1.0 - ac) / ac) ** 0.5
        return ((1 - huber_c) / (1 + sigmas) ** 2 + huber_c).float()
    raise ValueError(f"unknown huber_schedule {schedule!r}; valid: {', '.join(HUBER_SCHEDULES)}")


def resize_mask_to_latent(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """[B,1,H,W] (or [B,H,W]) mask in [0,1] -> [B,1,h,w] by area averaging, as kohya."""
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    return F.interpolate(mask.float(), size=tuple(latent_hw), mode="area")


def apply_mask(
    loss: torch.Tensor, mask: torch.Tensor, unmasked_weight: float = 0.0, normalize: bool = False
) -> torch.Tensor:
    """Per-sample masked loss [B] from an unreduced [B,C,h,w] loss and a latent-size [B,1,h,w] mask.

    Defaults are kohya's: loss * mask, then a plain mean over C,H,W. OneTrainer-style options:
    `unmasked_weight` clamps the mask to [unmasked_weight, 1] (black pixels still count a
    little), `normalize` divides by the mask's mean so a small mask is not a small loss.
    """
    if mask.shape[-2:] != loss.shape[-2:]:
        mask = resize_mask_to_latent(mask, (loss.shape[-2], loss.shape[-1]))
    mask = mask.to(loss.dtype)
    if unmasked_weight > 0:
        mask = mask.clamp(min=unmasked_weight, max=1.0)
    out = (loss * mask).mean(dim=tuple(range(1, loss.dim())))
    if normalize:
        area = mask.mean(dim=tuple(range(1, mask.dim())))
        out = out / area.clamp_min(1e-8)
    return out


def min_snr_weight(
    timesteps: torch.Tensor, noise_scheduler: NoiseSchedule, gamma: float, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """Min-SNR-gamma weight per sample: min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v-prediction)."""
    s = snr(timesteps, noise_scheduler)
    clipped = torch.minimum(s, torch.full_like(s, gamma))
    return clipped / (s + 1) if prediction_type == "v_prediction" else clipped / s


def debiased_weight(
    timesteps: torch.Tensor, noise_scheduler: NoiseSchedule, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """kohya's debiased estimation weight 1 / sqrt(SNR), 1 / (SNR + 1) for v-prediction (SNR capped
    at 1000)."""
    s = torch.clamp(snr(timesteps, noise_scheduler), max=1000)
    return 1 / (s + 1) if prediction_type == "v_prediction" else 1 / torch.sqrt(s)


def snr_scale(timesteps: torch.Tensor, noise_scheduler: NoiseSchedule) -> torch.Tensor:
    """kohya's get_snr_scale: SNR / (SNR + 1) with SNR capped at 1000, the factor that turns a
    noise-prediction loss into a v-prediction-like one."""
    s = torch.clamp(snr(timesteps, noise_scheduler), max=1000)
    return s / (s + 1)


def noise_offset(
    noise: torch.Tensor,
    strength: float,
    *,
    latents: torch.Tensor | None = None,
    adaptive_scale: float | None = None,
    random_strength: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Add a per-sample, per-channel constant to the noise (kohya's `apply_noise_offset`).

    offset = strength (+ adaptive_scale * |mean of the latents per channel|, clamped at 0), times
    a standard normal per [B, C]. `random_strength` draws strength uniformly in [0, strength].
    """
    b, c = noise.shape[:2]
    if random_strength:
        strength = float(torch.rand(1, generator=generator)) * strength
    offset: torch.Tensor | float = strength
    if adaptive_scale is not None:
        if latents is None:
            raise ValueError("adaptive noise offset needs the latents")
        mean = latents.float().mean(dim=tuple(range(2, latents.dim())), keepdim=True).abs()
        offset = torch.clamp(strength + adaptive_scale * mean, min=0.0)
    shape = (b, c) + (1,) * (noise.dim() - 2)
    draw = torch.randn(shape, generator=generator).to(device=noise.device, dtype=noise.dtype)
    return noise + offset * draw


def multires_noise(
    noise: torch.Tensor, iterations: int, discount: float, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pyramid ("multires") noise, kohya's `pyramid_noise_like`: add upsampled coarser noise levels
    with weights discount**i, then rescale to unit standard deviation."""
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = float(torch.rand(1, generator=generator)) * 2 + 2  # a random factor in [2, 4) per level
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        coarse = torch.randn((b, c, hn, wn), generator=generator).to(noise.device, noise.dtype)
        out = out + F.interpolate(coarse, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def input_perturbation(
    noise: torch.Tensor,
    gamma: float,
    *,
    random_strength: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The noise used to make the noisy latents with ip_noise_gamma (the target stays `noise`)."""
    if random_strength:
        gamma = float(torch.rand(1, generator=generator)) * gamma
    extra = torch.randn(noise.shape, generator=generator).to(noise.device, noise.dtype)
    return noise + gamma * extra


def training_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    timesteps: torch.Tensor,
    noise_scheduler: NoiseSchedule,
    loss_type: LossType = "l2",
    huber_c: float = 0.1,
    huber_schedule: HuberSchedule = "snr",
    huber_scale: float = 1.0,
    mask: torch.Tensor | None = None,
    unmasked_weight: float = 0.0,
    normalize_mask: bool = False,
    loss_weights: torch.Tensor | None = None,
    min_snr_gamma: float | None = None,
    debiased: bool = False,
    prediction_type: str = "epsilon",
    reduction: Literal["mean", "none"] = "mean",
    scale_v_pred_like_noise: bool = False,
    v_pred_like_loss: float | None = None,
) -> torch.Tensor:
    """The step's loss: element loss -> mask -> mean over C,H,W -> sample weights -> min-SNR ->
    scale_v_pred_loss_like_noise_pred (x SNR/(SNR+1)) -> v_pred_like_loss (+ loss / scale x that
    much) -> debiased -> mean, in kohya's order.

    `mask` is [B,1,H,W] in [0,1] at image or latent size (pass ones for unmasked samples);
    `loss_weights` is [B] (1.0, or prior_loss_weight for regularisation images).
    `reduction="none"` returns the weighted per-sample losses [B].
    """
    c = None
    if loss_type in ("huber", "smooth_l1"):
        c = huber_c_for_timesteps(
            timesteps, huber_schedule, huber_c, noise_scheduler, huber_scale=huber_scale
        )
    loss = per_element_loss(pred, target, loss_type, c)
    if mask is not None:
        sample = apply_mask(loss, mask.to(loss.device), unmasked_weight, normalize_mask)
    else:
        sample = loss.mean(dim=tuple(range(1, loss.dim())))
    if loss_weights is not None:
        sample = sample * loss_weights.to(sample.device, sample.dtype)
    if min_snr_gamma:
        sample = sample * min_snr_weight(timesteps, noise_scheduler, min_snr_gamma, prediction_type).to(
            sample.device
        )
    if scale_v_pred_like_noise:
        sample = sample * snr_scale(timesteps, noise_scheduler).to(sample.device)
    if v_pred_like_loss:
        sample = sample + sample / snr_scale(timesteps, noise_scheduler).to(sample.device) * v_pred_like_loss
    if debiased:
        sample = sample * debiased_weight(timesteps, noise_scheduler, prediction_type).to(sample.device)
    return sample if reduction == "none" else sample.mean()
