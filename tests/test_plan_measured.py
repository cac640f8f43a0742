"""The planner against real runs on the CPU: its figure for the same config must be within 10 % of
the peak of live tensor bytes measured while the run steps (sdprep.train.memory.memtrack counts every
storage alive). On the CPU nothing moves off the device, so the plan is made for device "cpu"."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_support import lora_settings, make_dataset

torch.set_num_threads(1)
TOKEN = "zork"
ADAFACTOR = ["scale_parameter=False", "relative_step=False", "warmup_init=False"]
NOT_LORA = {"network_module": None}
CASES = {
    "lora-bf16-checkpointing": {"gradient_checkpointing": True, "mixed_precision": "bf16"},
    "lora-fp32-text-encoders-live": {"cache_latents": False, "network_args": ["conv_dim=4"]},
    "lora-text-encoders-trained": {
        "network_train_unet_only": False,
        "resolution": "192",
        "optimizer_type": "Adafactor",
    },
    "ti-checkpointing": {
        **NOT_LORA,
        "token_string": TOKEN,
        "init_word": "woman",
        "num_vectors_per_token": 2,
        "gradient_checkpointing": True,
    },
    "finetune-full-bf16-adafactor": {
        **NOT_LORA,
        "optimizer_type": "Adafactor",
        "optimizer_args": ADAFACTOR,
        "mixed_precision": "bf16",
        "full_bf16": True,
    },
    "finetune-text-encoders-ema-uncached": {
        **NOT_LORA,
        "train_text_encoder": True,
        "cache_latents": False,
        "ema": True,
    },
}
QUICK = ["lora-fp32-text-encoders-live"]


def measured_and_planned(model: Path, tmp_path: Path, side: int, **over) -> tuple[int, object]:
    from sdprep.train.config.schema import detect_method, load_train_config
    from sdprep.train.loop.trainer import RecordingCallbacks, Trainer
    from sdprep.train.memory.memtrack import peak_during_steps
    from sdprep.train.memory.planner import predict, settings_from_config
    from sdprep.train.memory.profile import measure_profile
    from sdprep.train.models.fullsize import SdxlSpec

    data = make_dataset(
        tmp_path / "data", images=["c_square.webp", "e_sepia.jpg"], repeats=1, side=side, token=TOKEN
    )
    settings = lora_settings(
        model,
        data,
        tmp_path / "out",
        resolution=str(side),
        enable_bucket=False,
        train_batch_size=2,
        max_train_steps=2,
    )
    settings.update(over)
    cfg, _ = load_train_config(None, overrides=settings)
    trainer = Trainer(cfg, callbacks=RecordingCallbacks())
    trainer.setup()
    spec = SdxlSpec.from_model(trainer.model, "model")
    measured = peak_during_steps(trainer)
    s = settings_from_config(cfg, detect_method(cfg), device="cpu")
    return measured, predict(s, measure_profile(spec, [s]))


def check(measured: int, plan) -> None:
    detail = ", ".join(f"{p} {b / 2**20:.2f}" for p, b, _ in plan.parts)
    assert abs(plan.tensors / measured - 1) <= 0.10, (
        f"planned {plan.tensors}, measured {measured} (MiB: {detail})"
    )


@pytest.mark.parametrize("case", QUICK)
def test_plan_matches_a_tiny_run(tiny_sdxl: Path, tmp_path: Path, case: str) -> None:
    check(*measured_and_planned(tiny_sdxl, tmp_path, 128, **CASES[case]))


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c not in QUICK])
def test_plan_matches_tiny_runs(tiny_sdxl: Path, tmp_path: Path, case: str) -> None:
    check(*measured_and_planned(tiny_sdxl, tmp_path, 128, **CASES[case]))


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        {"train_batch_size": 1},
        {
            "network_module": None,
            "optimizer_type": "Adafactor",
            "optimizer_args": ADAFACTOR,
            "gradient_checkpointing": True,
            "save_precision": "fp16",
        },
    ],
    ids=["lora", "finetune-adafactor-checkpointing"],
)
def test_plan_matches_topology_true_runs(topology_sdxl: Path, tmp_path: Path, case: dict) -> None:
    check(*measured_and_planned(topology_sdxl, tmp_path, 64, **case))


@pytest.mark.slow
def test_stored_full_size_profile_is_reproduced_and_scales_with_area() -> None:
    """A fresh trace of the full-size U-Net at 512 px matches the stored 1024 px measurement
    scaled by area (the planner's assumption) within 5 %."""
    from sdprep.train.memory.planner import Settings
    from sdprep.train.memory.profile import full_size_profile
    from sdprep.train.memory.trace import trace_unet
    from sdprep.train.models.fullsize import FULL

    s = Settings(rank=8, width=512, height=512)
    stored, _, _ = full_size_profile().unet_activations(s)
    fresh = trace_unet(FULL, mode="lora", half=True, gc=True, rank=8, height=512, width=512).peak
    assert abs(fresh / stored - 1) < 0.05, (fresh, stored)
