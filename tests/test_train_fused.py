"""fused_backward_pass (kohya's sdxl_train.py): each weight is stepped and its gradient freed during the
backward pass, giving the same weights as the unfused step; the settings kohya refuses are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_finetune import ADAFACTOR_FIXED, ft_cfg
from train_support import make_dataset, run_trainer

from sdprep.errors import ConfigError
from sdprep.train.loop.fused import register_fused_step, step_parameter

torch.set_num_threads(1)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))


def _adafactor(model: torch.nn.Module, relative: bool):
    from sdprep.train.loop.optim import build_optimizer

    args = {} if relative else {"scale_parameter": False, "relative_step": False, "warmup_init": False}
    groups = [
        {"params": list(model[0].parameters()), "lr": 1e-2},
        {"params": list(model[2].parameters()), "lr": 3e-2},
    ]
    return build_optimizer("Adafactor", groups, 1e-2, args)[0]


@pytest.mark.parametrize("relative", [True, False])
def test_fused_steps_give_the_unfused_weights(relative: bool) -> None:
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    plain, fused = _model(), _model()
    opt_plain, opt_fused = _adafactor(plain, relative), _adafactor(fused, relative)
    register_fused_step(opt_fused, 0.0)
    for _ in range(3):
        plain(x).pow(2).mean().backward()
        opt_plain.step()
        opt_plain.zero_grad(set_to_none=True)
        fused(x).pow(2).mean().backward()
        assert all(p.grad is None for p in fused.parameters())  # each gradient freed once applied
    for a, b in zip(plain.parameters(), fused.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(next(plain.parameters()), next(_model().parameters()))  # it trained


def test_fused_clipping_is_per_weight_as_kohya() -> None:
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1)) * 50
    manual, fused = _model(), _model()
    opt_manual, opt_fused = _adafactor(manual, False), _adafactor(fused, False)
    register_fused_step(opt_fused, 0.01)
    manual(x).pow(2).mean().backward()
    for group in opt_manual.param_groups:
        for p in group["params"]:
            assert p.grad.norm() > 0.01  # every gradient is clipped
            torch.nn.utils.clip_grad_norm_([p], 0.01)
            step_parameter(opt_manual, group, p)
    fused(x).pow(2).mean().backward()
    for a, b in zip(manual.parameters(), fused.parameters()):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(
        tmp_path_factory.mktemp("fused-data"), images=["c_square.webp", "e_sepia.jpg"], repeats=1, side=64
    )


@pytest.mark.parametrize(
    "settings",
    [
        {"optimizer_args": ADAFACTOR_FIXED, "train_text_encoder": True, "gradient_checkpointing": True},
        {"mixed_precision": "bf16", "full_bf16": True},  # kohya's 24 GB recipe; relative-step Adafactor
    ],
    ids=["fp32-te-checkpointing", "full_bf16"],
)
def test_a_fused_fine_tune_saves_the_unfused_weights(
    tiny_sdxl: Path, data: Path, tmp_path: Path, settings
) -> None:
    common = dict(optimizer_type="Adafactor", max_grad_norm=0.0, max_train_steps=2, **settings)
    plain = run_trainer(ft_cfg(tiny_sdxl, data, tmp_path / "plain", **common))
    fused = run_trainer(ft_cfg(tiny_sdxl, data, tmp_path / "fused", fused_backward_pass=True, **common))
    a, b = load_file(str(plain.result.output)), load_file(str(fused.result.output))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert differ == []
    assert plain.result.last_loss == fused.result.last_loss


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"optimizer_type": "AdamW"}, "fused_backward_pass works with optimizer_type Adafactor only"),
        ({"gradient_accumulation_steps": 2}, "fused_backward_pass needs gradient_accumulation_steps = 1"),
        ({"network_module": "networks.lora"}, "fused_backward_pass is for full fine-tunes"),
        ({"mixed_precision": "fp16"}, "cannot be used with mixed_precision fp16"),
    ],
)
def test_what_kohya_refuses_is_refused(tiny_sdxl: Path, data: Path, tmp_path: Path, over, message) -> None:
    settings = {"optimizer_type": "Adafactor", "fused_backward_pass": True, **over}
    with pytest.raises(ConfigError, match=message):
        ft_cfg(tiny_sdxl, data, tmp_path / "out", **settings)
