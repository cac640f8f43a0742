"""Full fine-tune: a single-file SGM checkpoint that diffusers' from_single_file reproduces exactly,
per-encoder learning rates, full_bf16 + Adafactor on the CPU, EMA, a diffusers folder, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from train_support import (
    assert_untrained_save_refused,
    lora_settings,
    make_dataset,
    run_trainer,
    set_up_method,
    unet_inputs,
)

torch.set_num_threads(1)
ADAFACTOR_FIXED = ["scale_parameter=False", "relative_step=False", "warmup_init=False"]


def ft_cfg(model: Path, data: Path, out: Path, **over):
    from sdprep.train.config.schema import load_train_config

    settings = lora_settings(model, data, out, resolution="64", enable_bucket=False)
    for key in ("network_module", "network_dim", "network_alpha"):
        del settings[key]
    settings.update(learning_rate=1e-3, max_train_steps=2)
    settings.update(over)
    cfg, _ = load_train_config(None, overrides=settings)
    return cfg


def aligned(module: torch.nn.Module) -> torch.nn.Module:
    """Copy every weight into freshly allocated memory: CPU kernels pick code paths by alignment,
    and safetensors-loaded tensors are unaligned, which changes results in the last bits."""
    for p in module.parameters():
        p.data = p.data.clone()
    return module.eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ft-data")
    return make_dataset(root, images=["c_square.webp", "e_sepia.jpg"], repeats=1, side=64)


@pytest.fixture(scope="module")
def trained(tiny_sdxl: Path, data: Path, tmp_path_factory: pytest.TempPathFactory):
    """U-Net + text encoder 2 (te1 frozen by learning rate 0), Adafactor with fixed lr, checkpointing."""
    cfg = ft_cfg(
        tiny_sdxl,
        data,
        tmp_path_factory.mktemp("ft") / "out",
        train_text_encoder=True,
        learning_rate_te1=0,
        learning_rate_te2=2e-3,
        optimizer_type="Adafactor",
        optimizer_args=ADAFACTOR_FIXED,
        gradient_checkpointing=True,
        save_model_as="diffusers",
    )
    return run_trainer(cfg)


def test_single_file_reproduces_the_trained_model_exactly(trained, tiny_sdxl: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    path = trained.result.output
    keys = set(load_file(path))
    for prefix in (
        "model.diffusion_model.input_blocks.",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.",
        "conditioner.embedders.1.model.transformer.resblocks.",
        "first_stage_model.decoder.",
    ):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base"

    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tiny_sdxl), local_files_only=True)
    model = trained.model
    x = unet_inputs(seed=3)
    with torch.no_grad():
        expected = aligned(model.unet)(*x[:3], added_cond_kwargs=x[3]).sample
        got = aligned(pipe.unet)(*x[:3], added_cond_kwargs=x[3]).sample
        assert torch.equal(expected, got)
        ids = model.tokenizer(
            ["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        for mine, theirs in (
            (model.text_encoder, pipe.text_encoder),
            (model.text_encoder_2, pipe.text_encoder_2),
        ):
            a = aligned(mine)(ids, output_hidden_states=True)
            b = aligned(theirs)(ids, output_hidden_states=True)
            assert torch.equal(a.hidden_states[-2], b.hidden_states[-2])
        assert torch.equal(
            model.text_encoder_2(ids).text_embeds, pipe.text_encoder_2(ids).text_embeds
        )  # transposed text_projection


def test_learning_rates_choose_what_trains(trained, tiny_sdxl: Path) -> None:
    from sdprep.train.models.load import load_sdxl

    fresh = load_sdxl(tiny_sdxl)
    groups = {g["name"]: g["lr"] for g in trained.method.param_groups()}
    assert groups == {"unet": 1e-3, "te2": 2e-3}
    assert trained.optimizer.optimizer.__class__.__name__ == "Adafactor"
    assert [g["lr"] for g in trained.optimizer.param_groups] == [1e-3, 2e-3]  # fixed lr, not relative

    def same(a, b) -> bool:
        return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())

    assert same(trained.model.text_encoder, fresh.text_encoder)  # learning_rate_te1 = 0: frozen
    assert same(trained.model.vae, fresh.vae)
    assert not same(trained.model.text_encoder_2, fresh.text_encoder_2)
    assert not same(trained.model.unet, fresh.unet)
    assert any("te1 stays frozen" in n for n in trained.method.notes)


def test_diffusers_folder_holds_the_same_weights(trained) -> None:
    from diffusers import StableDiffusionXLPipeline

    folder = trained.result.output.with_suffix("")
    assert folder in trained.result.saved
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    for name in ("unet", "text_encoder_2"):
        ours = getattr(trained.model, name).state_dict()
        assert all(torch.equal(v, ours[k]) for k, v in getattr(pipe, name).state_dict().items())
    assert len(pipe.tokenizer) == len(trained.model.tokenizer)


def test_full_bf16_with_adafactor_runs_on_cpu(tiny_sdxl: Path, data: Path, tmp_path: Path) -> None:
    cfg = ft_cfg(
        tiny_sdxl,
        data,
        tmp_path / "out",
        mixed_precision="bf16",
        full_bf16=True,
        optimizer_type="Adafactor",
        optimizer_args=ADAFACTOR_FIXED,
        save_precision="bf16",
        max_train_steps=1,
    )
    trainer = run_trainer(cfg)
    assert trainer.model.unet.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in trainer.method.trainable_parameters())
    sd = load_file(trainer.result.output)
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    assert trainer.result.last_loss is not None and math.isfinite(trainer.result.last_loss)


def test_ema_matches_diffusers_ema_model() -> None:
    from diffusers.training_utils import EMAModel

    from sdprep.train.methods.ema import EMA

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    ours = EMA(dict(net.named_parameters()), decay=0.9)
    theirs = EMAModel(net.parameters(), decay=0.9)
    for _ in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ours.step()
        theirs.step(net.parameters())
    for a, b in zip(ours.averaged().values(), theirs.shadow_params):
        assert torch.allclose(a, b, atol=1e-6)
    raw = {k: v.clone() for k, v in net.state_dict().items()}
    average = {k: v.clone() for k, v in ours.averaged().items()}
    with ours.swapped():
        assert all(torch.equal(p, average[n]) for n, p in net.named_parameters())
    assert all(torch.equal(v, raw[k]) for k, v in net.state_dict().items())
    assert all(torch.equal(v, average[k]) for k, v in ours.averaged().items())
    state = ours.state_dict()
    again = EMA(dict(net.named_parameters()), decay=0.9)
    again.load_state_dict(state)
    assert again.optimization_step == 5 and torch.equal(again.averaged()["weight"], ours.averaged()["weight"])


def test_ema_is_saved_and_resume_continues_exactly(tiny_sdxl: Path, data: Path, tmp_path: Path) -> None:
    from sdprep.train.save.sgm import UNET_PREFIX, unet_key_to_sgm

    over = dict(ema=True, ema_decay=0.5, max_train_steps=3, save_every_n_steps=2, save_state=True)
    full = run_trainer(ft_cfg(tiny_sdxl, data, tmp_path / "a", **over))
    saved = load_file(full.result.output)
    ema = full.method.ema.averaged()
    name = "down_blocks.1.attentions.0.proj_in.weight"
    sgm = UNET_PREFIX + unet_key_to_sgm(name)
    assert torch.equal(saved[sgm], ema[f"unet/{name}"])
    assert not torch.equal(saved[sgm], full.model.unet.state_dict()[name])  # not the raw weights

    state = tmp_path / "a" / "tiny-step00000002-state"
    resumed = run_trainer(ft_cfg(tiny_sdxl, data, tmp_path / "b", **over), resume=state)
    assert resumed.result.first_step == 2
    again = load_file(resumed.result.output)
    assert all(torch.equal(again[k], v) for k, v in saved.items())


def test_untrained_checkpoint_is_refused(tiny_sdxl: Path, data: Path, tmp_path: Path) -> None:
    from sdprep.train.methods.finetune import FinetuneMethod

    method = set_up_method(FinetuneMethod, ft_cfg(tiny_sdxl, data, tmp_path / "out"), tiny_sdxl)
    assert_untrained_save_refused(
        method, tmp_path / "out" / "model.safetensors", "every trained weight equals its starting value"
    )
    tensors = method.export_tensors(torch.float32)
    assert method.verify_tensors(tensors, trained=False) == []
    tensors["model.diffusion_model.input_blocks.0.0.bias"] = (
        tensors["model.diffusion_model.input_blocks.0.0.bias"] + 1
    )
    assert method.verify_tensors(tensors, trained=False) == [
        "1 tensors in the file differ from the trained weights (e.g. model.diffusion_model.input_blocks.0.0.bias)"
    ]
    del tensors["model.diffusion_model.out.2.bias"]
    tensors["first_stage_model.decoder.conv_in.bias"] = torch.full_like(
        tensors["first_stage_model.decoder.conv_in.bias"], float("inf")
    )
    assert method.verify_tensors(tensors, trained=False) == [
        "1 expected tensors missing (e.g. model.diffusion_model.out.2.bias)",
        "1 tensors have NaN or infinite values (e.g. first_stage_model.decoder.conv_in.bias)",
    ]
