"""On a CUDA GPU (`make test-gpu`; skipped elsewhere): the memory planner against
torch.cuda.max_memory_allocated for the same configs, and the bf16 / fp16 / 8-bit training paths.

The planner predicts the peak of live tensors (what max_memory_allocated counts) without its
margin; the runs use the topology-true SDXL (3 GB, so cuBLAS's few MB of workspace do not matter)
at 128 px. Each case trains two steps and reports the peak up to its last step.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from train_support import lora_settings, make_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ADAFACTOR = ["scale_parameter=False", "relative_step=False", "warmup_init=False"]
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
CASES = {
    "lora-bf16-checkpointing-cached": {
        "mixed_precision": "bf16",
        "gradient_checkpointing": True,
        "cache_text_encoder_outputs": True,
    },
    "lora-fp16-text-encoders-live": {"mixed_precision": "fp16"},
    "lora-fp32-text-encoders-trained": {"network_train_unet_only": False},
    "finetune-full-bf16-adafactor": {
        "network_module": None,
        "mixed_precision": "bf16",
        "full_bf16": True,
        "optimizer_type": "Adafactor",
        "optimizer_args": ADAFACTOR,
        "gradient_checkpointing": True,
        "cache_text_encoder_outputs": True,
        "save_precision": "bf16",
    },
    "finetune-adamw-fp32-weights": {
        "network_module": None,
        "mixed_precision": "bf16",
        "save_precision": "bf16",
    },
}


def gpu_run(model: Path, tmp_path: Path, **over):
    """(max_memory_allocated up to the last step, the plan for the same config on this model)."""
    from sdprep.train.config.schema import detect_method, load_train_config
    from sdprep.train.loop.trainer import RecordingCallbacks, Trainer
    from sdprep.train.memory.planner import predict, settings_from_config
    from sdprep.train.memory.profile import measure_profile
    from sdprep.train.models.fullsize import SdxlSpec

    data = make_dataset(tmp_path / "data", images=["c_square.webp", "e_sepia.jpg"], repeats=1, side=128)
    settings = lora_settings(
        model,
        data,
        tmp_path / "out",
        resolution="128",
        enable_bucket=False,
        train_batch_size=2,
        max_train_steps=2,
    )
    settings.update(over)
    cfg, _ = load_train_config(None, overrides=settings)
    peaks: list[int] = []

    class Peaks(RecordingCallbacks):
        def step(self, step: int, epoch: int, loss: float, lr: float) -> None:
            super().step(step, epoch, loss, lr)
            peaks.append(torch.cuda.max_memory_allocated())

    trainer = Trainer(cfg, callbacks=Peaks())
    trainer.setup()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    result = trainer.run()
    assert result.steps == 2
    spec = SdxlSpec.from_model(trainer.model, "model")
    s = settings_from_config(cfg, detect_method(cfg), device="cuda")
    return max(peaks), predict(s, measure_profile(spec, [s])), trainer


@pytest.mark.parametrize("case", list(CASES))
def test_plan_matches_max_memory_allocated(topology_sdxl: Path, tmp_path: Path, case: str) -> None:
    measured, plan, _ = gpu_run(topology_sdxl, tmp_path, **CASES[case])
    parts = ", ".join(f"{p} {b / 2**20:.0f}" for p, b, _ in plan.parts)
    assert abs(plan.tensors / measured - 1) <= 0.10, (
        f"planned {plan.tensors}, measured {measured} (MiB: {parts})"
    )


def test_cached_text_encoders_and_vae_leave_the_gpu(tiny_sdxl: Path, tmp_path: Path) -> None:
    *_, trainer = gpu_run(tiny_sdxl, tmp_path, cache_text_encoder_outputs=True, sample_prompts=None)
    assert all(p.device.type == "cpu" for te in trainer.model.text_encoders for p in te.parameters())
    assert all(p.device.type == "cpu" for p in trainer.model.vae.parameters())
    assert next(trainer.model.unet.parameters()).device.type == "cuda"


@pytest.mark.parametrize(
    "over",
    [
        {"mixed_precision": "bf16", "full_bf16": True, "network_module": None, "optimizer_type": "Adafactor"},
        {"mixed_precision": "fp16"},
        pytest.param(
            {"optimizer_type": "AdamW8bit"},
            marks=pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (sdprep[optim])"),
        ),
        pytest.param(
            {"network_module": None, "optimizer_type": "AdamW8bit", "mixed_precision": "bf16"},
            marks=pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (sdprep[optim])"),
        ),
    ],
    ids=["finetune-full-bf16", "lora-fp16", "lora-adamw8bit", "finetune-adamw8bit"],
)
def test_precision_and_8bit_paths_train(tiny_sdxl: Path, tmp_path: Path, over: dict) -> None:
    from sdprep.train.config.schema import load_train_config
    from sdprep.train.loop.trainer import RecordingCallbacks, train

    data = make_dataset(tmp_path / "data", images=["c_square.webp"], repeats=2, side=128)
    cfg, _ = load_train_config(
        None, overrides=lora_settings(tiny_sdxl, data, tmp_path / "out", max_train_steps=3, **over)
    )
    callbacks = RecordingCallbacks()
    result = train(cfg, callbacks=callbacks)
    assert result.steps == 3
    assert result.output is not None and result.output.exists()
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in callbacks.losses)
