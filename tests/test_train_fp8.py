"""fp8_base / fp8_base_unet as kohya: frozen base weights stored in float8 on a CUDA GPU, refused on a
CPU (where autocast cannot compute float8 norm weights: checked here) before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_support import errors_without, lora_cfg, make_dataset, unet_inputs

from sdprep.errors import ConfigError
from sdprep.train.models.fp8 import cast_frozen_to_fp8, check_fp8

torch.set_num_threads(1)
FP8 = torch.float8_e4m3fn


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
def test_refused_on_cpu_before_the_model_loads(cli_runner, tmp_path: Path, monkeypatch) -> None:
    settings = 'network_module = "networks.lora"\nfp8_base = true\nmixed_precision = "bf16"\n'
    errors = errors_without(cli_runner, tmp_path, monkeypatch, None, settings)
    assert errors == [
        "Error: fp8_base needs a CUDA GPU: on this CPU, autocast cannot compute with float8 normalisation "
        'weights (torch stops with "mixed dtype (CPU)")'
    ]


def test_what_kohya_requires_is_checked() -> None:
    with pytest.raises(ConfigError, match="fp8_base is for LoRA / LyCORIS training"):
        check_fp8("fp8_base", "cuda", "bf16", "finetune")
    with pytest.raises(ConfigError, match='fp8_base_unet needs mixed_precision = "fp16" or "bf16"'):
        check_fp8("fp8_base_unet", "cuda", "no", "lora")
    check_fp8("fp8_base", "cuda", "fp16", "lora")


def test_frozen_weights_go_to_float8_and_trained_ones_stay(tiny_sdxl: Path, tmp_path: Path) -> None:
    from sdprep.train.methods import make_method
    from sdprep.train.models.load import load_sdxl

    model = load_sdxl(tiny_sdxl)
    cfg = lora_cfg(tiny_sdxl, make_dataset(tmp_path / "d"), tmp_path / "out", network_train_unet_only=False)
    method = make_method("lora", cfg)
    method.setup(model, torch.float32)
    cast_frozen_to_fp8(model.unet)
    for te in model.text_encoders:
        cast_frozen_to_fp8(te, keep=("embeddings.", "text_model.embeddings."))
    for module in (model.unet, *model.text_encoders):
        for name, p in module.named_parameters():
            if p.requires_grad:
                assert p.dtype == torch.float32, name  # LoRA weights train in full precision
            elif "embeddings." in name:
                assert p.dtype == torch.float32, name  # kohya keeps the embeddings (nn.Embedding has no fp8)
            else:
                assert p.dtype == FP8, name
    # why the CPU refuses it: autocast does not cast float8 GroupNorm weights there
    sample, t, enc, added = unet_inputs()
    with pytest.raises(RuntimeError, match="mixed dtype"), torch.autocast("cpu", dtype=torch.bfloat16):
        model.unet(sample, t, enc, added_cond_kwargs=added)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp8_base needs a CUDA GPU")
def test_fp8_base_trains_on_cuda(tiny_sdxl: Path, tmp_path: Path) -> None:
    from sdprep.train.loop.trainer import RecordingCallbacks, Trainer

    data = make_dataset(tmp_path / "data", images=["c_square.webp"], repeats=1)
    cfg = lora_cfg(
        tiny_sdxl, data, tmp_path / "out", fp8_base=True, mixed_precision="bf16", max_train_steps=2
    )
    trainer = Trainer(cfg, callbacks=RecordingCallbacks())
    trainer.setup()
    trainer.run()
    frozen = [p.dtype for p in trainer.model.unet.parameters() if not p.requires_grad]
    assert frozen and set(frozen) == {FP8}
    assert trainer.result.last_loss is not None and torch.isfinite(torch.tensor(trainer.result.last_loss))
