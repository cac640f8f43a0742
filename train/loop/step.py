"""One training batch's maths: latents, noise, timesteps, SDXL conditioning, U-Net, loss.

Kept apart from the loop so the benchmark and tests can run exactly the computation a training
step does. The pure loss maths lives in `sdprep.train.loop.loss`, text encoding in `sdprep.train.data.text`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

    from sdprep.train.config.schema import TrainConfig
    from sdprep.train.data.pipeline import Batch
    from sdprep.train.models.load import SDXLModel


@dataclass
class StepContext:
    """What computing a batch's loss needs besides the batch."""

    cfg: TrainConfig
    model: SDXLModel  # vae, text encoders, tokenizers
    unet: torch.nn.Module  # the (possibly accelerate-wrapped) U-Net to call
    noise_scheduler: DDPMScheduler
    device: torch.device
    weight_dtype: torch.dtype
    vae_dtype: torch.dtype
    train_text: bool  # text encoders get gradients (LoRA-TE, TI, fine-tune with TE)
    prediction_type: str = "epsilon"
    generator: torch.Generator | None = None  # the run's noise generator (CPU), same state on every process
    rank: int = 0  # this process, of `world` data-parallel processes
    world: int = 1
    fixed_timestep: int | None = None  # validation: every sample at this timestep

    @property
    def timestep_range(self) -> tuple[int, int]:
        if self.fixed_timestep is not None:
            return self.fixed_timestep, self.fixed_timestep + 1
        lo = self.cfg.min_timestep if self.cfg.min_timestep is not None else 0
        hi = (
            self.cfg.max_timestep
            if self.cfg.max_timestep is not None
            else self.noise_scheduler.config["num_train_timesteps"]
        )
        return int(lo), int(hi)


def latents_of(ctx: StepContext, batch: Batch) -> torch.Tensor:
    """Scaled latents of a batch: cached raw latents, or the VAE's encoding of its pixels."""
    import torch

    scale: float = ctx.model.vae.config["scaling_factor"]
    cached = batch.get("latents")
    if cached is not None:
        return cached.to(ctx.device, dtype=torch.float32) * scale
    if batch["pixels"] is None:
        raise ValueError("a batch needs pixels or cached latents")
    with torch.no_grad():
        pixels = batch["pixels"].to(ctx.device, dtype=ctx.vae_dtype)
        latents: torch.Tensor = ctx.model.vae.encode(pixels).latent_dist.sample()
    if not torch.isfinite(latents).all():
        raise_vae_nan(batch)
    return latents.to(torch.float32) * scale


def raise_vae_nan(batch: Batch) -> None:
    from sdprep.errors import TrainingError

    names = ", ".join(str(p) for p in batch.get("paths", [])[:4])
    raise TrainingError(
        f"the VAE produced NaN latents for {names}",
        "set no_half_vae = true (the SDXL VAE overflows in fp16) or use an fp16-fixed VAE",
    )


def text_conditioning(ctx: StepContext, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [B,77k,2048], pooled [B,1280]) from the cache or the text encoders."""
    from sdprep.train.data.text import encode_prompts

    cached, pooled_cached = batch.get("prompt_embeds"), batch.get("pooled_prompt_embeds")
    if cached is not None and pooled_cached is not None:
        return (
            cached.to(ctx.device, dtype=ctx.weight_dtype),
            pooled_cached.to(ctx.device, dtype=ctx.weight_dtype),
        )
    import torch

    grad = contextlib.nullcontext() if ctx.train_text else torch.no_grad()
    with grad:
        embeds, pooled = encode_prompts(
            batch["captions"],
            ctx.model.tokenizers,
            ctx.model.text_encoders,
            ctx.cfg.max_token_length,
            ctx.cfg.clip_skip,
            weighted=ctx.cfg.weighted_captions,
        )
    return embeds.to(ctx.weight_dtype), pooled.to(ctx.weight_dtype)


def draw_noise(ctx: StepContext, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise, input noise, timesteps) for this process's part of the step's GLOBAL batch.

    Everything is drawn from the run's noise generator for the whole global batch (all processes
    draw the same numbers) and sliced, so N processes with batch b train exactly like one process
    with batch N*b, and a resumed run continues the same sequence. Noise offset (+adaptive),
    multires noise and input perturbation (ip_noise_gamma) are kohya's, applied globally too.
    """
    import torch

    from sdprep.train.loop import loss as L

    cfg, g = ctx.cfg, ctx.generator
    b = latents.shape[0]
    n = max(b, cfg.train_batch_size) * ctx.world  # a fixed draw size keeps processes in step
    part = slice(ctx.rank * b, ctx.rank * b + b)
    lo, hi = ctx.timestep_range
    noise = torch.randn((n, *latents.shape[1:]), generator=g).to(latents.device)
    timesteps = torch.randint(lo, hi, (n,), generator=g)[part].to(latents.device)
    kind = cfg.noise_offset_type
    if cfg.noise_offset and kind in (None, "original"):
        placed = None
        if cfg.adaptive_noise_scale is not None:
            placed = latents.new_zeros((n, *latents.shape[1:]))
            placed[part] = latents  # only this process's slice is used
        noise = L.noise_offset(
            noise,
            cfg.noise_offset,
            latents=placed,
            adaptive_scale=cfg.adaptive_noise_scale,
            random_strength=cfg.noise_offset_random_strength,
            generator=g,
        )
    if cfg.multires_noise_iterations and kind in (None, "multires"):
        noise = L.multires_noise(
            noise, cfg.multires_noise_iterations, cfg.multires_noise_discount, generator=g
        )
    input_noise = noise
    if cfg.ip_noise_gamma:
        input_noise = L.input_perturbation(
            noise, cfg.ip_noise_gamma, random_strength=cfg.ip_noise_gamma_random_strength, generator=g
        )
    return noise[part], input_noise[part], timesteps.long()


def batch_loss(ctx: StepContext, batch: Batch) -> torch.Tensor:
    """The training loss of one batch (a scalar tensor with grad)."""
    import torch

    from sdprep.train.loop.loss import training_loss

    cfg = ctx.cfg
    latents = latents_of(ctx, batch)
    embeds, pooled = text_conditioning(ctx, batch)
    noise, input_noise, timesteps = draw_noise(ctx, latents)
    # diffusers annotates timesteps as the legacy torch.IntTensor, which no tensor op returns
    noisy = ctx.noise_scheduler.add_noise(latents, input_noise, timesteps)  # type: ignore[arg-type]
    time_ids = batch["time_ids"].to(ctx.device, dtype=torch.float32)  # sizes like 1023 are not exact in bf16
    pred: torch.Tensor = ctx.unet(
        noisy.to(ctx.weight_dtype),
        timesteps,
        embeds,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
    ).sample
    if ctx.prediction_type == "v_prediction":
        target = ctx.noise_scheduler.get_velocity(latents, noise, timesteps)  # type: ignore[arg-type]
    else:
        target = noise
    # kohya: masked_loss weights by mask images or alpha; alpha masks apply even without it (with
    # masked_loss off, the scan attaches no mask files, so a batch's mask can only be alpha)
    mask = batch.get("mask")
    return training_loss(
        pred.float(),
        target.float(),
        timesteps=timesteps,
        noise_scheduler=ctx.noise_scheduler,
        loss_type=cfg.loss_type,
        huber_c=cfg.huber_c,
        huber_schedule=cfg.huber_schedule,
        huber_scale=cfg.huber_scale,
        mask=None if mask is None else mask.to(ctx.device),
        unmasked_weight=cfg.unmasked_weight,
        normalize_mask=cfg.masked_loss_normalize,
        loss_weights=batch["loss_weight"].to(ctx.device),
        min_snr_gamma=cfg.min_snr_gamma,
        debiased=cfg.debiased_estimation_loss,
        prediction_type=ctx.prediction_type,
        scale_v_pred_like_noise=cfg.scale_v_pred_loss_like_noise_pred,
        v_pred_like_loss=cfg.v_pred_like_loss,
    )
