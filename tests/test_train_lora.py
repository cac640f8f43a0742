"""LoRA method: kohya's targets, SGM names, true alpha, files diffusers loads exactly, checks that bite."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from train_support import (
    PAIR,
    lora_cfg,
    make_dataset,
    run_trainer,
    set_up_method,
    unet_inputs,
)

from sdprep.errors import ConfigError, TrainingError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory):
    """One short LoRA run with U-Net conv layers and text-encoder LoRA; the trainer is kept."""
    root = tmp_path_factory.mktemp("lora")
    data = make_dataset(root / "data", images=PAIR, repeats=1)
    cfg = lora_cfg(
        tiny_sdxl,
        data,
        root / "out",
        network_alpha=2,
        network_args=["conv_dim=2", "conv_alpha=1"],
        network_train_unet_only=False,
        learning_rate=5e-3,
        max_train_steps=3,
        cache_latents=False,
        save_diffusers_copy=True,
    )
    return run_trainer(cfg)


def test_targets_are_kohyas_default_set(tiny_sdxl: Path) -> None:
    from sdprep.train.methods.lora import TE_BLOCKS, UNET_BLOCKS, target_modules
    from sdprep.train.models.load import load_sdxl

    model = load_sdxl(tiny_sdxl)
    targets = target_modules(model.unet, UNET_BLOCKS)
    leaf = {name.split(".", 4)[-1].split("transformer_blocks.")[-1] for name in targets}
    suffixes = {n.split(".", 1)[1] if n[0].isdigit() else n for n in leaf}
    assert suffixes == {
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "attn2.to_q",
        "attn2.to_k",
        "attn2.to_v",
        "attn2.to_out.0",
        "ff.net.0.proj",
        "ff.net.2",
        "proj_in",
        "proj_out",
    }
    # tiny model: 5 transformer models (2+2 down... ) with 1-2 blocks each; 10 linears per block + proj_in/out
    blocks = sum(1 for n in targets if n.endswith("attn1.to_q"))
    models = sum(1 for n in targets if n.endswith("proj_in"))
    assert len(targets) == 10 * blocks + 2 * models
    assert all(kind == "linear" for kind in targets.values())
    te = target_modules(model.text_encoder, TE_BLOCKS)
    assert {n.rsplit(".", 1)[1] for n in te} == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert len(te) == 6 * model.text_encoder.config.num_hidden_layers


def test_saved_file_uses_sgm_names_true_alpha_and_metadata(trained) -> None:
    path = trained.result.output
    tensors = load_file(str(path))
    unet_keys = [k for k in tensors if k.startswith("lora_unet_")]
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_unet_middle_block_1_proj_in.lora_up.weight" in tensors
    assert any(k.startswith("lora_unet_output_blocks_") and "_0_in_layers_2" in k for k in unet_keys)  # conv
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in tensors)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in tensors
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in tensors
    alphas = {k: float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    linear = alphas["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha"]
    assert linear == 2.0  # the configured alpha, not the rank (4)
    conv = [v for k, v in alphas.items() if "in_layers_2" in k]
    assert conv and set(conv) == {1.0}
    assert (
        tensors["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"].shape[0] == 4
    )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0"
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_steps"] == "3"
    assert json.loads(meta["ss_tag_frequency"]) == {
        "1_mytoken": {"mytoken": 2, "1girl": 2, "solo": 2, "square": 1, "sepia": 1}
    }
    assert json.loads(meta["ss_dataset_dirs"]) == {"1_mytoken": {"n_repeats": 1, "img_count": 2}}
    assert len(meta["sshs_model_hash"]) == 64


def test_diffusers_load_lora_weights_reproduces_trained_model(trained, tiny_sdxl: Path) -> None:
    from sdprep.train.models.load import load_sdxl

    model = trained.model
    for module in (model.unet, model.text_encoder, model.text_encoder_2):
        module.eval()
    sample, t, enc, added = unet_inputs()
    ids = model.tokenizer(
        ["mytoken, 1girl"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        want_unet = model.unet(sample, t, enc, added_cond_kwargs=added).sample
        want_te1 = model.text_encoder(ids).last_hidden_state
        want_te2 = model.text_encoder_2(ids).text_embeds
    pipe = load_sdxl(tiny_sdxl).pipeline()
    with torch.no_grad():
        base = pipe.unet(sample, t, enc, added_cond_kwargs=added).sample
    pipe.load_lora_weights(str(trained.result.output))
    with torch.no_grad():
        got_unet = pipe.unet(sample, t, enc, added_cond_kwargs=added).sample
        got_te1 = pipe.text_encoder(ids).last_hidden_state
        got_te2 = pipe.text_encoder_2(ids).text_embeds
    assert (want_unet - base).abs().max() > 1e-4  # the LoRA does something
    assert (want_unet - got_unet).abs().max() < 1e-5
    assert (want_te1 - got_te1).abs().max() < 1e-5
    assert (want_te2 - got_te2).abs().max() < 1e-5


def test_diffusers_format_copy_loads_with_the_true_alpha(trained, tiny_sdxl: Path) -> None:
    from sdprep.train.models.load import load_sdxl

    copy = trained.result.output.with_name("tiny_diffusers") / "pytorch_lora_weights.safetensors"
    assert copy in trained.result.saved
    model = trained.model
    model.unet.eval()
    sample, t, enc, added = unet_inputs(2)
    pipe = load_sdxl(tiny_sdxl).pipeline()
    pipe.load_lora_weights(str(copy.parent))
    with torch.no_grad():
        want = model.unet(sample, t, enc, added_cond_kwargs=added).sample
        got = pipe.unet(sample, t, enc, added_cond_kwargs=added).sample
    assert (want - got).abs().max() < 1e-5


def test_network_weights_continue_from_a_file_with_another_alpha(
    trained, tiny_sdxl: Path, tmp_path: Path
) -> None:
    """Starting from a kohya file whose alpha differs gives exactly the file's function."""
    from sdprep.train.methods.lora import LoraMethod
    from sdprep.train.models.load import load_sdxl

    src = load_file(str(trained.result.output))
    for key in src:
        if key.endswith(".alpha"):
            src[key] = src[key] * 2  # the file was trained with twice our alpha
    other = tmp_path / "other.safetensors"
    save_file(src, str(other))
    cfg = dataclasses.replace(trained.cfg, network_weights=other)
    method = set_up_method(LoraMethod, cfg, tiny_sdxl)
    method.load_initial_weights()
    assert "started from other.safetensors" in method.notes[-1]
    ref = load_sdxl(tiny_sdxl).pipeline()
    ref.load_lora_weights(str(other))
    sample, t, enc, added = unet_inputs(1)
    method.model.unet.eval()
    with torch.no_grad():
        got = method.model.unet(sample, t, enc, added_cond_kwargs=added).sample
        want = ref.unet(sample, t, enc, added_cond_kwargs=added).sample
    assert (got - want).abs().max() < 1e-5


def test_network_weights_with_modules_this_config_does_not_train(trained, tiny_sdxl: Path) -> None:
    from sdprep.train.methods.lora import LoraMethod

    cfg = dataclasses.replace(
        trained.cfg, network_weights=trained.result.output, network_train_unet_only=True
    )
    method = set_up_method(LoraMethod, cfg, tiny_sdxl)
    with pytest.raises(ConfigError, match="not trained by this config"):
        method.load_initial_weights()


def test_verification_catches_bad_files(trained, tmp_path: Path) -> None:
    from sdprep.train.save.weights import save_weights

    method = trained.method
    good = method.export_tensors(torch.float32)
    assert method.verify_tensors(good, trained=True) == []
    bad = dict(good)
    key = next(k for k in bad if k.endswith("lora_down.weight"))
    bad[key] = bad[key].clone()
    bad[key][0, 0] = float("nan")
    assert any("NaN" in p for p in method.verify_tensors(bad, trained=True))
    zero = {k: (torch.zeros_like(v) if k.endswith("lora_up.weight") else v) for k, v in good.items()}
    assert "every lora_up weight is zero" in " ".join(method.verify_tensors(zero, trained=True))
    assert method.verify_tensors(zero, trained=False) == []
    missing = {k: v for k, v in good.items() if not k.startswith("lora_te2")}
    assert "expected tensors missing" in " ".join(method.verify_tensors(missing, trained=True))
    wrong_alpha = {**good, key.replace("lora_down.weight", "alpha"): torch.tensor(4.0)}
    assert "expected alpha" in " ".join(method.verify_tensors(wrong_alpha, trained=True))

    # a save whose check fails raises and leaves the previous good file untouched
    target = tmp_path / "keep.safetensors"
    save_weights(method, target, {"k": "v"}, torch.float32, trained=True)
    before = target.read_bytes()
    param = next(p for n, p in method.model.unet.named_parameters() if "lora_A" in n)
    saved = param.detach().clone()
    with torch.no_grad():
        param[0, 0] = float("inf")
    try:
        with pytest.raises(TrainingError, match="failed its check.*NaN or infinite"):
            save_weights(method, target, {"k": "v"}, torch.float32, trained=True)
    finally:
        with torch.no_grad():
            param.copy_(saved)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]


def test_network_args_parsing() -> None:
    from sdprep.train.methods.lora import parse_network_args

    args, notes = parse_network_args(["conv_dim=4", "conv_alpha=2", "rank_dropout=0.1", "preset=x"])
    assert args == {"conv_dim": "4", "conv_alpha": "2", "rank_dropout": "0.1"}  # strings, as kohya
    assert notes == ["network_args: preset=x is accepted but not used by sdprep"]
    with pytest.raises(ConfigError, match="LyCORIS"):
        parse_network_args(["algo=lokr"])
