"""Loss maths against hand-computed tensors: element losses, huber schedules, masks, min-SNR, noise."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sdprep.train.loop.loss import (
    apply_mask,
    debiased_weight,
    huber_c_for_timesteps,
    input_perturbation,
    min_snr_weight,
    multires_noise,
    noise_offset,
    per_element_loss,
    resize_mask_to_latent,
    training_loss,
)

torch.set_num_threads(1)


def fake_scheduler(alphas_cumprod, total=1000):
    return SimpleNamespace(
        alphas_cumprod=torch.tensor(alphas_cumprod, dtype=torch.float32),
        config={"num_train_timesteps": total},
    )


def t(values):
    return torch.tensor(values, dtype=torch.float32)


# -- element losses --------------------------------------------------------------------------


def test_element_losses_match_hand_values():
    pred = t([1.0, -3.0]).reshape(1, 1, 1, 2)
    target = torch.zeros_like(pred)
    assert per_element_loss(pred, target, "l2").flatten().tolist() == [1.0, 9.0]
    assert per_element_loss(pred, target, "l1").flatten().tolist() == [1.0, 3.0]
    # huber: 2c(sqrt(d^2+c^2)-c), c=0.5: d=1 -> sqrt(1.25)-0.5 = 0.618034; d=3 -> sqrt(9.25)-0.5 = 2.541381
    huber = per_element_loss(pred, target, "huber", 0.5).flatten()
    assert huber.tolist() == pytest.approx([0.618034, 2.541381], abs=1e-6)
    smooth = per_element_loss(pred, target, "smooth_l1", 0.5).flatten()
    assert smooth.tolist() == pytest.approx([1.236068, 5.082763], abs=1e-6)


def test_huber_threshold_per_sample():
    pred = torch.ones(2, 1, 1, 1)
    loss = per_element_loss(pred, torch.zeros_like(pred), "huber", t([1.0, 0.5])).flatten()
    assert loss.tolist() == pytest.approx([2 * (math.sqrt(2) - 1), 0.618034], abs=1e-6)


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown loss_type 'l3'"):
        per_element_loss(torch.zeros(1), torch.zeros(1), "l3")


def test_huber_schedules():
    sched = fake_scheduler([0.5, 0.8], total=1000)
    steps = torch.tensor([0, 1])
    assert huber_c_for_timesteps(steps, "constant", 0.1, sched, huber_scale=2.0).tolist() == pytest.approx(
        [0.2, 0.2]
    )
    # snr: sigma = sqrt((1-a)/a): a=0.5 -> 1, a=0.8 -> 0.5; (1-c)/(1+sigma)^2 + c
    assert huber_c_for_timesteps(steps, "snr", 0.1, sched).tolist() == pytest.approx([0.325, 0.5])
    exp = huber_c_for_timesteps(torch.tensor([0, 500, 1000]), "exponential", 0.1, sched)
    assert exp.tolist() == pytest.approx([1.0, math.sqrt(0.1), 0.1], rel=1e-6)


# -- masks -----------------------------------------------------------------------------------


def test_mask_is_area_resized():
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1.0
    mask[..., 2:, 2:] = t([[1.0, 0.0], [0.0, 1.0]])
    assert resize_mask_to_latent(mask, (2, 2))[0, 0].tolist() == [[1.0, 0.0], [0.0, 0.5]]
    assert resize_mask_to_latent(mask[:, 0], (2, 2)).shape == (1, 1, 2, 2)


# Loss per latent pixel 1,2,3,4 in both channels; mask 1, 0, 0.5, 0.
LOSS = t([[1.0, 2.0], [3.0, 4.0]]).expand(1, 2, 2, 2)
MASK = t([[1.0, 0.0], [0.5, 0.0]]).reshape(1, 1, 2, 2)


def test_kohya_masked_loss_is_a_plain_mean():
    # (1*1 + 2*0 + 3*0.5 + 4*0) / 4 = 0.625 per channel
    assert apply_mask(LOSS, MASK).tolist() == pytest.approx([0.625])


def test_normalised_masked_loss_divides_by_the_mask_area():
    # mask mean 0.375 -> 0.625 / 0.375
    assert apply_mask(LOSS, MASK, normalize=True).tolist() == pytest.approx([0.625 / 0.375])


def test_unmasked_weight_clamps_black():
    # mask becomes 1, 0.25, 0.5, 0.25 -> (1 + 0.5 + 1.5 + 1) / 4 = 1.0; its mean is 0.5
    assert apply_mask(LOSS, MASK, unmasked_weight=0.25).tolist() == pytest.approx([1.0])
    assert apply_mask(LOSS, MASK, unmasked_weight=0.25, normalize=True).tolist() == pytest.approx([2.0])


def test_all_black_normalised_mask_is_zero_not_nan():
    assert apply_mask(LOSS, torch.zeros(1, 1, 2, 2), normalize=True).tolist() == [0.0]


def _grad_for(mask: torch.Tensor, **kw) -> torch.Tensor:
    torch.manual_seed(0)
    pred = torch.randn(1, 4, 2, 2, requires_grad=True)
    target = torch.zeros(1, 4, 2, 2)
    loss = training_loss(pred, target, timesteps=torch.tensor([10]), noise_scheduler=None, mask=mask, **kw)
    loss.backward()
    return pred.grad


def test_black_mask_gives_zero_gradient_and_grey_half():
    # A 16x16 image mask: top-left 8x8 block black, top-right grey, bottom white -> latent 2x2.
    mask = torch.ones(1, 1, 16, 16)
    mask[..., :8, :8] = 0.0
    mask[..., :8, 8:] = 0.5
    grad = _grad_for(mask)
    white = _grad_for(torch.ones(1, 1, 16, 16))
    assert torch.all(grad[..., 0, 0] == 0)
    assert torch.allclose(grad[..., 0, 1], 0.5 * white[..., 0, 1])
    assert torch.allclose(grad[..., 1, :], white[..., 1, :])
    assert torch.all(white[..., 0, 0] != 0)


def test_unmasked_weight_lets_black_pixels_learn_a_little():
    mask = torch.ones(1, 1, 16, 16)
    mask[..., :8, :8] = 0.0
    grad = _grad_for(mask, unmasked_weight=0.1)
    white = _grad_for(torch.ones(1, 1, 16, 16))
    assert torch.allclose(grad[..., 0, 0], 0.1 * white[..., 0, 0])


# -- SNR weights -----------------------------------------------------------------------------


def test_min_snr_weight_formula():
    sched = fake_scheduler([0.5, 0.9, 0.99])  # SNR = 1, 9, 99
    steps = torch.tensor([0, 1, 2])
    assert min_snr_weight(steps, sched, 5.0).tolist() == pytest.approx([1.0, 5 / 9, 5 / 99], rel=1e-5)
    assert min_snr_weight(steps, sched, 5.0, "v_prediction").tolist() == pytest.approx(
        [0.5, 0.5, 0.05], rel=1e-5
    )
    assert debiased_weight(steps, sched).tolist() == pytest.approx([1.0, 1 / 3, 1 / math.sqrt(99)], rel=1e-5)


def test_min_snr_weight_matches_diffusers_compute_snr():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    steps = torch.tensor([0, 10, 250, 500, 999])
    s = compute_snr(sched, steps)
    expected = torch.stack([s, 5 * torch.ones_like(s)], dim=1).min(dim=1)[0] / s
    assert torch.allclose(min_snr_weight(steps, sched, 5.0), expected, rtol=1e-5)


# -- noise -----------------------------------------------------------------------------------


def test_noise_offset_is_constant_per_channel():
    noise = torch.zeros(2, 4, 8, 8)
    out = noise_offset(noise, 0.1, generator=torch.Generator().manual_seed(3))
    draw = torch.randn((2, 4, 1, 1), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(out, (0.1 * draw).expand_as(out))


def test_adaptive_noise_offset_adds_latent_mean():
    latents = torch.full((1, 2, 4, 4), -2.0)
    out = noise_offset(
        torch.zeros(1, 2, 4, 4),
        0.1,
        latents=latents,
        adaptive_scale=0.05,
        generator=torch.Generator().manual_seed(1),
    )
    draw = torch.randn((1, 2, 1, 1), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out, ((0.1 + 0.05 * 2.0) * draw).expand_as(out))


def test_multires_noise_single_level_is_exact():
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(5)
    out = multires_noise(noise, 1, 0.3, generator=gen)
    gen = torch.Generator().manual_seed(5)
    torch.rand(1, generator=gen)  # the level's random factor
    level0 = torch.randn((1, 4, 8, 8), generator=gen)
    expected = noise + level0
    assert torch.allclose(out, expected / expected.std(), atol=1e-6)


def test_multires_noise_unit_std_and_deterministic():
    noise = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    a = multires_noise(noise, 6, 0.3, generator=torch.Generator().manual_seed(1))
    b = multires_noise(noise, 6, 0.3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == noise.shape
    assert a.std().item() == pytest.approx(1.0, abs=1e-5)
    assert not torch.equal(a, noise / noise.std())


def test_input_perturbation():
    noise = torch.zeros(1, 1, 2, 2)
    out = input_perturbation(noise, 0.1, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(out, 0.1 * torch.randn((1, 1, 2, 2), generator=torch.Generator().manual_seed(2)))


# -- the combined loss -----------------------------------------------------------------------


def test_training_loss_combines_weights_in_kohya_order():
    sched = fake_scheduler([0.5, 0.9])  # SNR 1 and 9
    pred = torch.stack([torch.full((1, 2, 2), 2.0), torch.full((1, 2, 2), 1.0)])  # l2 vs 0: 4 and 1
    target = torch.zeros_like(pred)
    steps = torch.tensor([1, 0])
    mask = torch.ones(2, 1, 2, 2)
    mask[0, 0, 0, 0] = 0.0  # sample 0: mean(4 * [0,1,1,1]) = 3
    weights = t([1.0, 0.5])  # sample 1 is a regularisation image with prior_loss_weight 0.5
    inputs = dict(timesteps=steps, noise_scheduler=sched, mask=mask, loss_weights=weights, min_snr_gamma=5.0)
    per_sample = training_loss(pred, target, **inputs, reduction="none")
    # sample 0: 3 * 1 * min(9,5)/9 ; sample 1: 1 * 0.5 * min(1,5)/1
    assert per_sample.tolist() == pytest.approx([3 * 5 / 9, 0.5], rel=1e-5)
    total = training_loss(pred, target, **inputs)  # the mean over the batch
    assert total.item() == pytest.approx((3 * 5 / 9 + 0.5) / 2, rel=1e-5)


def test_training_loss_without_mask_is_mse():
    pred = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    target = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    loss = training_loss(pred, target, timesteps=torch.tensor([1, 2, 3]), noise_scheduler=None)
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(pred, target).item(), rel=1e-6)


def test_training_loss_huber_uses_schedule():
    sched = fake_scheduler([0.5, 0.8])
    pred = torch.ones(2, 1, 1, 1)
    loss = training_loss(
        pred,
        torch.zeros_like(pred),
        timesteps=torch.tensor([0, 1]),
        noise_scheduler=sched,
        loss_type="huber",
        huber_c=0.1,
        reduction="none",
    )
    c = t([0.325, 0.5])
    assert loss.tolist() == pytest.approx((2 * c * (torch.sqrt(1 + c**2) - c)).tolist(), rel=1e-5)
