"""LoRA, textual inversion and a fine-tune trained on the topology-true SDXL (slow: `make test-slow`).

The model has SDXL's real blocks, depths, context and conditioning sizes, CLIP-L's and bigG's real
layer counts and hidden sizes, and CLIP's real tokenizer (sdprep.train.models.fullsize). The outputs are
checked against facts measured on kohya sd-scripts and ComfyUI (tests/fullsize_facts.py): kohya's
module names, ComfyUI's SDXL detection, the real single file's key set, TI tensor shapes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fullsize_facts import (
    comfyui_detects_sdxl,
    kohya_te_names,
    kohya_unet_names,
    lora_modules,
    single_file_keys,
)
from safetensors import safe_open
from safetensors.torch import load_file
from train_support import lora_settings, make_dataset

pytestmark = pytest.mark.slow
torch.set_num_threads(1)
TOKEN = "zork"
TI = dict(token_string=TOKEN, init_word="woman", num_vectors_per_token=2, learning_rate=1e-2)
FINETUNE = dict(
    learning_rate=1e-4,
    optimizer_type="Adafactor",
    optimizer_args=["scale_parameter=False", "relative_step=False", "warmup_init=False"],
    save_precision="fp16",  # a 1.5 GB file instead of 3 GB
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fullsize-data")
    return make_dataset(root, images=["c_square.webp", "e_sepia.jpg"], repeats=1, side=64, token=TOKEN)


def run(model: Path, data: Path, out: Path, *, lora: bool = True, **over):
    """Train 2 steps at 64 px on the topology-true model; returns the finished Trainer."""
    from sdprep.train.config.schema import load_train_config
    from sdprep.train.loop.trainer import RecordingCallbacks, Trainer

    settings = lora_settings(model, data, out, resolution="64", enable_bucket=False, max_train_steps=2)
    if not lora:
        for key in ("network_module", "network_dim", "network_alpha"):
            del settings[key]
    settings.update(over)
    cfg, _ = load_train_config(None, overrides=settings)
    trainer = Trainer(cfg, callbacks=RecordingCallbacks())
    trainer.setup()
    trainer.run()
    return trainer


def test_lora_unet_and_text_encoders_has_kohyas_986_modules(topology_sdxl: Path, data: Path, tmp_path: Path):
    trainer = run(topology_sdxl, data, tmp_path / "out", network_train_unet_only=False, text_encoder_lr=1e-3)
    tensors = load_file(trainer.result.output)
    modules = lora_modules(tensors)
    assert len(modules) == 986
    assert modules == kohya_unet_names() | kohya_te_names()
    ups = {m: tensors[f"{m}.lora_up.weight"] for m in modules}
    # SDXL conditions on TE1's penultimate layer: its last layer gets no gradient (kohya: the same)
    last = {m for m in modules if m.startswith("lora_te1_text_model_encoder_layers_11_")}
    assert len(last) == 6 and all(not ups[m].any() for m in last)
    assert all(ups[m].any() for m in modules - last)
    assert tensors["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape == (
        4,
        2048,
    )

    # diffusers loads it onto the same model, every module adapted
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer

    pipe = StableDiffusionXLPipeline.from_pretrained(topology_sdxl, local_files_only=True)
    pipe.load_lora_weights(str(trainer.result.output))
    counts = [
        sum(isinstance(m, LoraLayer) for m in module.modules())
        for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    ]
    assert counts == [722, 72, 192]


def test_lora_with_conv_dim_has_kohyas_788_unet_modules(topology_sdxl: Path, data: Path, tmp_path: Path):
    trainer = run(topology_sdxl, data, tmp_path / "out", network_args=["conv_dim=2", "conv_alpha=1"])
    tensors = load_file(trainer.result.output)
    modules = lora_modules(tensors)
    assert len(modules) == 788
    assert modules == kohya_unet_names(conv=True)
    assert tensors["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"].shape == (2, 320, 3, 3)
    assert tensors["lora_unet_output_blocks_2_2_conv.lora_up.weight"].shape == (320, 2, 1, 1)


def test_textual_inversion_vectors_have_real_shapes(topology_sdxl: Path, data: Path, tmp_path: Path):
    trainer = run(topology_sdxl, data, tmp_path / "out", lora=False, **TI)
    tensors = load_file(trainer.result.output)
    assert set(tensors) == {"clip_l", "clip_g"}
    assert tensors["clip_l"].shape == (2, 768)
    assert tensors["clip_g"].shape == (2, 1280)
    assert len(trainer.model.tokenizer) == 49408 + 2  # the real vocabulary plus the two new tokens


def test_finetune_single_file_is_a_real_sdxl_checkpoint(topology_sdxl: Path, data: Path, tmp_path: Path):
    trainer = run(topology_sdxl, data, tmp_path / "out", lora=False, **FINETUNE)
    path = trainer.result.output
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
    assert keys == single_file_keys()
    assert comfyui_detects_sdxl(shapes.get, keys) == []
    assert shapes["conditioner.embedders.1.model.token_embedding.weight"] == (49408, 1280)
    assert shapes["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] == (
        49408,
        768,
    )
    path.unlink()  # 1.5 GB
