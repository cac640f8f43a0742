"""The topology-true SDXL and the real CLIP tokenizer, checked on meta tensors (fast): the model's
single-file key set is real SDXL's, ComfyUI's detection rule accepts it (and refuses the tiny
model), kohya's LoRA module sets have their real sizes and names on it, and the tokenizer is CLIP's.
Training on the built model is in test_fullsize_slow.py."""

from __future__ import annotations

import hashlib

import pytest
import torch
from fullsize_facts import comfyui_detects_sdxl, kohya_te_names, kohya_unet_names, single_file_keys

from sdprep.train.models.fullsize import FULL, TOPOLOGY, build_components
from sdprep.train.save.sgm import pipeline_to_sgm

torch.set_num_threads(1)


def meta_single_file(spec) -> dict:
    with torch.device("meta"):
        unet, vae, te1, te2 = build_components(spec)
    return pipeline_to_sgm(unet, te1, te2, vae)


@pytest.fixture(scope="module")
def topology_meta():
    with torch.device("meta"):
        return build_components(TOPOLOGY)


def test_topology_model_has_the_real_single_file_key_set_and_is_detected_as_sdxl() -> None:
    sd = meta_single_file(TOPOLOGY)
    assert set(sd) == single_file_keys()
    assert len(sd) == 2513
    assert comfyui_detects_sdxl(lambda k: tuple(sd[k].shape) if k in sd else None, sd) == []
    full = meta_single_file(FULL)
    assert set(full) == set(sd)
    assert comfyui_detects_sdxl(lambda k: tuple(full[k].shape), full) == []
    # the text encoders keep their real widths: TI vectors and the context have real shapes
    for key in (
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        "conditioner.embedders.1.model.token_embedding.weight",
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
    ):
        assert sd[key].shape == full[key].shape, key


def test_tiny_model_is_not_detected_as_sdxl() -> None:
    """The reason the topology-true model exists: ComfyUI refuses the tiny model."""
    from sdprep.train.models.tiny import build_tiny_sdxl_components

    unet, vae, te1, te2, *_ = build_tiny_sdxl_components()
    sd = pipeline_to_sgm(unet, te1, te2, vae)
    problems = comfyui_detects_sdxl(lambda k: tuple(sd[k].shape) if k in sd else None, sd)
    assert any("model_channels" in p for p in problems)
    assert any("transformer_depth" in p for p in problems)
    assert any("context_dim" in p for p in problems)


def test_detection_rule_fails_on_each_fact() -> None:
    sd = {k: tuple(v.shape) for k, v in meta_single_file(TOPOLOGY).items()}
    p = "model.diffusion_model."
    wrong = dict(sd)
    wrong[p + "label_emb.0.0.weight"] = (1280, 2560)
    assert comfyui_detects_sdxl(wrong.get, wrong) == ["adm_in_channels 2560 != 2816"]
    shallow = {k: v for k, v in sd.items() if ".input_blocks.8.1.transformer_blocks.9." not in k}
    assert comfyui_detects_sdxl(shallow.get, shallow) == [
        "transformer_depth [0, 0, 2, 2, 10, 9] != [0, 0, 2, 2, 10, 10]"
    ]


@pytest.mark.parametrize("conv", [False, True])
def test_kohya_unet_lora_modules_on_the_topology_model(topology_meta, conv: bool) -> None:
    from sdprep.train.methods.lora import UNET_BLOCKS, UNET_CONV_BLOCKS, kohya_name, target_modules

    unet = topology_meta[0]
    targets = target_modules(unet, UNET_BLOCKS, UNET_CONV_BLOCKS if conv else ())
    names = {kohya_name("unet", n) for n in targets}
    assert len(names) == (788 if conv else 722)
    assert names == kohya_unet_names(conv)


def test_kohya_text_encoder_lora_modules_on_the_topology_model(topology_meta) -> None:
    from sdprep.train.methods.lora import TE_BLOCKS, kohya_name, target_modules

    _, _, te1, te2 = topology_meta
    names = {kohya_name("te1", n) for n in target_modules(te1, TE_BLOCKS)}
    names |= {kohya_name("te2", n) for n in target_modules(te2, TE_BLOCKS)}
    assert len(names) == 72 + 192
    assert names == kohya_te_names()


def test_real_clip_tokenizer_from_the_bpe_file(tmp_path) -> None:
    from transformers import CLIPTokenizer

    from sdprep.train.models.clip_vocab import BPE_FILE, BPE_SHA256, write_real_clip_tokenizer

    assert hashlib.sha256(BPE_FILE.read_bytes()).hexdigest() == BPE_SHA256  # open_clip_torch 3.3.0's
    assert write_real_clip_tokenizer(tmp_path / "tok") == 49408
    write_real_clip_tokenizer(tmp_path / "tok2", pad_token="!")
    tok = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    tok2 = CLIPTokenizer.from_pretrained(tmp_path / "tok2")
    assert tok2("a cat", padding="max_length", max_length=6).input_ids == [49406, 320, 2368, 49407, 0, 0]
