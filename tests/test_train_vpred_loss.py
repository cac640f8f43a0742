"""v_pred_like_loss and scale_v_pred_loss_like_noise_pred as kohya's custom_train_functions compute
them (values below from running them: sd-scripts 48d368f, SDXL's scaled-linear schedule), in kohya's
order with min-SNR and debiased estimation (whose v-prediction weight is 1 / (SNR + 1), as kohya)."""

from __future__ import annotations

import pytest
import torch

from sdprep.train.config.schema import load_train_config
from sdprep.train.loop.loss import training_loss

TIMESTEPS = [0, 1, 10, 250, 500, 999]
LOSS = [0.5, 0.25, 0.125, 1.0, 2.0, 0.75]
KOHYA = {
    "v_pred_like_0.2": [0.6000999808, 0.3000853360, 0.1502415240, 1.2968273163, 3.4475317002, 32.9381904602],
    "scale_v_pred": [0.4995005131, 0.2495740056, 0.1238039136, 0.6737923026, 0.5526649952, 0.0034950706],
    "minsnr5_scale_vlike0.1_debiased": [
        7.39158276701346e-05,
        9.681357914814726e-05,
        0.0006471733213402331,
        0.5384042263031006,
        1.218022346496582,
        1.147177815437317,
    ],
    "debiased_vpred": [0.0004995005, 0.0004259944, 0.0011960864, 0.3262076676, 1.4473351240, 0.7465049029],
}


def _loss(**kw) -> list[float]:
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False
    )
    # a per-sample mean of exactly LOSS: each prediction misses its target by sqrt(loss) everywhere
    target = torch.zeros(6, 1, 2, 2)
    pred = torch.tensor(LOSS).sqrt().view(6, 1, 1, 1).expand(6, 1, 2, 2)
    out = training_loss(
        pred, target, timesteps=torch.tensor(TIMESTEPS), noise_scheduler=sched, reduction="none", **kw
    )
    return out.tolist()


def test_v_pred_like_loss_is_kohyas() -> None:
    assert _loss(v_pred_like_loss=0.2) == pytest.approx(KOHYA["v_pred_like_0.2"], rel=1e-5)


def test_scale_v_pred_loss_like_noise_pred_is_kohyas() -> None:
    assert _loss(scale_v_pred_like_noise=True) == pytest.approx(KOHYA["scale_v_pred"], rel=1e-5)


def test_kohyas_order_with_min_snr_and_debiased() -> None:
    got = _loss(min_snr_gamma=5, scale_v_pred_like_noise=True, v_pred_like_loss=0.1, debiased=True)
    assert got == pytest.approx(KOHYA["minsnr5_scale_vlike0.1_debiased"], rel=1e-4)


def test_debiased_weight_for_v_prediction_is_kohyas() -> None:
    got = _loss(debiased=True, prediction_type="v_prediction")
    assert got == pytest.approx(KOHYA["debiased_vpred"], rel=1e-5)


def test_the_options_reach_the_loss(monkeypatch) -> None:
    """A training step passes both settings to the loss (a spy in place of training_loss)."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    import sdprep.train.loop.loss as loss_module
    from sdprep.train.loop.step import StepContext, batch_loss

    cfg, notes = load_train_config(
        None, overrides={"v_pred_like_loss": 0.2, "scale_v_pred_loss_like_noise_pred": True}
    )
    assert not any("v_pred" in n for n in notes)
    seen = {}
    monkeypatch.setattr(loss_module, "training_loss", lambda *a, **kw: seen.update(kw) or torch.tensor(0.0))
    model = SimpleNamespace(vae=SimpleNamespace(config={"scaling_factor": 0.13}))
    unet = lambda x, *a, **kw: SimpleNamespace(sample=x)  # noqa: E731
    ctx = StepContext(
        cfg,
        model,
        unet,
        DDPMScheduler(),
        "cpu",
        torch.float32,
        torch.float32,
        False,
        generator=torch.Generator().manual_seed(0),
    )
    batch = {
        "latents": torch.zeros(1, 4, 2, 2),
        "prompt_embeds": torch.zeros(1, 77, 8),
        "pooled_prompt_embeds": torch.zeros(1, 4),
        "time_ids": torch.zeros(1, 6),
        "loss_weight": torch.ones(1),
    }
    batch_loss(ctx, batch)
    assert seen["v_pred_like_loss"] == 0.2 and seen["scale_v_pred_like_noise"] is True
