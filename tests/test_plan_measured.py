"""The planner against real runs on the CPU: its figure for the same config must be within 10 % of
the peak of live tensor bytes measured while the run steps (sdprep.train.memory.memtrack counts every
storage alive). On the CPU nothing moves off the device, so the plan is made for device "cpu".
The stored full-size profile is checked against fresh traces: its points exactly, its fit through
two sizes at a third size and at batch 2."""

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


FULL_SIZE_KEY = "lora/half/gc/r8"  # a checkpointed bf16 LoRA of rank 8


def full_size_trace(side: int, batch: int = 1):
    from sdprep.train.memory.trace import trace_unet
    from sdprep.train.models.fullsize import FULL

    return trace_unet(FULL, mode="lora", half=True, gc=True, rank=8, batch=batch, height=side, width=side)


@pytest.mark.slow
@pytest.mark.parametrize("side", [512, 1024])
def test_stored_full_size_points_are_reproduced(side: int) -> None:
    """A fresh trace of the full-size U-Net gives exactly what the stored profile holds at each
    size it was measured at."""
    from sdprep.train.memory.profile import full_size_profile

    stored = {m["width"]: m for m in full_size_profile().unet[FULL_SIZE_KEY]}
    assert sorted(stored) == [512, 1024]
    fresh = full_size_trace(side)
    assert (fresh.peak, fresh.grads_at_peak, fresh.tail) == (
        stored[side]["bytes"],
        stored[side]["grads_at_peak"],
        stored[side]["tail"],
    )


@pytest.mark.slow
@pytest.mark.parametrize(("side", "batch"), [(768, 1), (512, 2)], ids=["768px", "512px-batch2"])
def test_full_size_profile_predicts_sizes_it_does_not_hold(side: int, batch: int) -> None:
    """The stored profile's fit (a + b x batch x area through 512 and 1024 px, batch 1) predicts a
    fresh trace of the full-size U-Net at a size and a batch it does not hold within 5 %."""
    from sdprep.train.memory.planner import Settings
    from sdprep.train.memory.profile import full_size_profile, pixels

    profile = full_size_profile()
    s = Settings(rank=8, batch=batch, width=side, height=side)
    assert pixels(s) not in {pixels(m) for m in profile.unet[FULL_SIZE_KEY]}
    predicted, _, _ = profile.unet_activations(s)
    fresh = full_size_trace(side, batch).peak
    assert abs(predicted / fresh - 1) < 0.05, (predicted, fresh)
