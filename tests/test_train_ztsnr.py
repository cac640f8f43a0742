"""zero_terminal_snr: the noise schedule is rescaled exactly as kohya's
`fix_noise_scheduler_betas_for_zero_terminal_snr` does (restated below), only for v-prediction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from train_support import lora_cfg, make_dataset

from sdprep.errors import ConfigError
from sdprep.train.loop.trainer import Trainer, train

torch.set_num_threads(1)


def kohya_enforce_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    alphas = 1 - betas
    alphas_bar = alphas.cumprod(0)
    alphas_bar_sqrt = alphas_bar.sqrt()
    alphas_bar_sqrt_0 = alphas_bar_sqrt[0].clone()
    alphas_bar_sqrt_t = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= alphas_bar_sqrt_t
    alphas_bar_sqrt *= alphas_bar_sqrt_0 / (alphas_bar_sqrt_0 - alphas_bar_sqrt_t)
    alphas_bar = alphas_bar_sqrt**2
    alphas = alphas_bar[1:] / alphas_bar[:-1]
    alphas = torch.cat([alphas_bar[0:1], alphas])
    return 1 - alphas


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(
        tmp_path_factory.mktemp("ztsnr") / "data", images=["a_landscape.jpg", "c_square.webp"]
    )


def test_schedule_equals_kohyas_and_training_stays_finite(
    tiny_sdxl: Path, data: Path, tmp_path: Path
) -> None:
    cfg = lora_cfg(
        tiny_sdxl, data, tmp_path / "out", zero_terminal_snr=True, v_parameterization=True, min_snr_gamma=5
    )
    trainer = Trainer(cfg)
    trainer.setup()
    sched = trainer.noise_scheduler
    base = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2  # SDXL scaled_linear
    expected = torch.cumprod(1 - kohya_enforce_zero_terminal_snr(base), 0)
    assert torch.allclose(sched.alphas_cumprod, expected, atol=1e-6)
    assert float(sched.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-12)
    result = trainer.run()
    assert result.last_loss == result.last_loss and result.last_loss < 100  # finite
    with safe_open(str(result.output), "pt") as f:
        meta = f.metadata()
    assert meta["ss_zero_terminal_snr"] == "True" and meta["modelspec.prediction_type"] == "v"


def test_epsilon_models_are_refused(tiny_sdxl: Path, data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="zero_terminal_snr needs a v-prediction model"):
        train(lora_cfg(tiny_sdxl, data, tmp_path / "out", zero_terminal_snr=True))
