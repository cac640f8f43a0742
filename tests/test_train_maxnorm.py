"""scale_weight_norms: kohya's max-norm regularisation of LoRA modules, checked against kohya's own
algorithm (sd-scripts networks/lora.py `apply_max_norm_regularization`, restated below) and in a run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from train_support import lora_cfg, make_dataset

from sdprep.errors import ConfigError
from sdprep.train.loop.trainer import RecordingCallbacks, train
from sdprep.train.methods.maxnorm import apply_max_norm, lora_delta

torch.set_num_threads(1)


def kohya_max_norm(pairs: list[tuple[torch.Tensor, torch.Tensor, float]], max_norm_value: float):
    """kohya's loop over (down, up, alpha/dim), on copies; returns new pairs and its three statistics."""
    out, norms, keys_scaled = [], [], 0
    for down, up, scale in pairs:
        down, up = down.clone(), up.clone()
        if up.shape[2:] == (1, 1) and down.shape[2:] == (1, 1):
            updown = (up.squeeze(2).squeeze(2) @ down.squeeze(2).squeeze(2)).unsqueeze(2).unsqueeze(3)
        elif up.shape[2:] == (3, 3) or down.shape[2:] == (3, 3):
            updown = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        else:
            updown = up @ down
        updown *= scale
        norm = updown.norm().clamp(min=max_norm_value / 2)
        desired = torch.clamp(norm, max=max_norm_value)
        ratio = desired.cpu() / norm.cpu()
        sqrt_ratio = ratio**0.5
        if ratio != 1:
            keys_scaled += 1
            up *= sqrt_ratio
            down *= sqrt_ratio
        norms.append((updown.norm() * ratio).item())
        out.append((down, up))
    return out, keys_scaled, sum(norms) / len(norms), max(norms)


def test_matches_kohyas_algorithm_on_linear_1x1_and_3x3_modules() -> None:
    g = torch.Generator().manual_seed(0)
    pairs = []
    for big in (0.01, 1.0, 3.0):  # below the floor, around the limit, far above it
        pairs.append((torch.randn(4, 32, generator=g) * big, torch.randn(16, 4, generator=g) * big, 2 / 4))
        pairs.append(
            (torch.randn(4, 8, 1, 1, generator=g) * big, torch.randn(8, 4, 1, 1, generator=g) * big, 1.0)
        )
        pairs.append(
            (torch.randn(4, 8, 3, 3, generator=g) * big, torch.randn(8, 4, 1, 1, generator=g) * big, 0.25)
        )
    expected, keys, average, largest = kohya_max_norm(pairs, 1.0)
    mine = [(d.clone(), u.clone(), s) for d, u, s in pairs]
    stats = apply_max_norm(mine, 1.0)
    assert (stats.keys_scaled, stats.average_norm, stats.max_norm) == pytest.approx((keys, average, largest))
    assert 0 < keys < len(pairs)
    for (d, u, s), (ed, eu) in zip(mine, expected):
        assert torch.allclose(d, ed, rtol=1e-6, atol=1e-7) and torch.allclose(u, eu, rtol=1e-6, atol=1e-7)
        assert float(lora_delta(d, u, s).norm()) <= 1.0 + 1e-5


def test_a_run_keeps_every_module_under_the_limit(tiny_sdxl: Path, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", images=["a_landscape.jpg", "c_square.webp"])
    limit = 2e-3
    notes = RecordingCallbacks()
    result = train(
        lora_cfg(tiny_sdxl, data, tmp_path / "out", learning_rate=1e-2, scale_weight_norms=limit),
        callbacks=notes,
    )
    tensors = load_file(str(result.output))
    downs = [k for k in tensors if k.endswith("lora_down.weight")]
    norms = []
    for key in downs:
        base = key[: -len("lora_down.weight")]
        scale = float(tensors[base + "alpha"]) / tensors[key].shape[0]
        norms.append(float(lora_delta(tensors[key], tensors[base + "lora_up.weight"], scale).norm()))
    assert max(norms) <= limit * (1 + 1e-3)
    assert max(norms) > limit / 2  # the limit was reached: the regularisation acted
    with safe_open(str(result.output), "pt") as f:
        assert f.metadata()["ss_scale_weight_norms"] == str(limit)


def test_scale_weight_norms_is_refused_outside_lora(tiny_sdxl: Path, tmp_path: Path) -> None:
    from sdprep.train.config.schema import load_train_config

    cfg, _ = load_train_config(
        None,
        overrides={
            "pretrained_model_name_or_path": str(tiny_sdxl),
            "train_data_dir": str(make_dataset(tmp_path / "data", images=["a_landscape.jpg"])),
            "output_dir": str(tmp_path / "out"),
            "token_string": "mytoken",
            "init_word": "woman",
            "scale_weight_norms": 1.0,
        },
    )
    with pytest.raises(ConfigError, match="scale_weight_norms applies to LoRA training only"):
        train(cfg)
