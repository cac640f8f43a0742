"""Checkpoints in and out: SGM single files (incl. Pony/Illustrious-style extras and gaps), separate
VAE files, diffusers folders, and clear errors for missing tokenizers, configs and weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdprep.errors import ModelError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base(tiny_sdxl: Path):
    from sdprep.train.models.load import load_sdxl

    return load_sdxl(tiny_sdxl)


@pytest.fixture(scope="module")
def tensors(base) -> dict:
    from sdprep.train.save.checkpoint import model_tensors

    return model_tensors(base)


def write(path: Path, tensors: dict) -> Path:
    save_file(tensors, str(path))
    return path


def same_weights(a, b) -> bool:
    ref = b.state_dict()
    return all(torch.equal(v, ref[k]) for k, v in a.state_dict().items())


def test_checkpoint_names_and_precision(base, tensors: dict) -> None:
    from sdprep.train.save.checkpoint import component_to_sgm, model_tensors

    prefixes = {k.split(".")[0] for k in tensors}
    assert prefixes == {"model", "conditioner", "first_stage_model"}
    assert "model.diffusion_model.label_emb.0.0.weight" in tensors  # SDXL's size/pooled embedding
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in tensors
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in tensors
    proj = tensors["conditioner.embedders.1.model.text_projection"]
    assert torch.equal(proj, base.text_encoder_2.text_projection.weight.T)
    half = model_tensors(base, torch.float16)
    assert {t.dtype for t in half.values()} == {torch.float16} and half.keys() == tensors.keys()
    with pytest.raises(ValueError, match="unknown SDXL component 'clip'"):
        component_to_sgm("clip", {})


def test_single_file_loads_offline_with_a_local_config(
    base, tensors: dict, tiny_sdxl: Path, tmp_path: Path
) -> None:
    from sdprep.train.models.load import load_sdxl

    path = write(tmp_path / "model.safetensors", tensors)
    loaded = load_sdxl(path, model_config=tiny_sdxl)
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        assert same_weights(getattr(loaded, name), getattr(base, name)), name
    assert loaded.scheduler_config["prediction_type"] == "epsilon"
    with pytest.raises(ModelError, match="--model_config DIR"):
        load_sdxl(path)  # offline and no config: say what to pass


def test_finetune_style_extras_are_handled(base, tensors: dict, tiny_sdxl: Path, tmp_path: Path) -> None:
    """Pony/Illustrious-style files: same architecture, extra keys (sigmas, v-pred markers, float
    position ids, logit scale) and fp16 weights."""
    from sdprep.train.models.load import load_sdxl

    extra = {k: v.half() for k, v in tensors.items()}
    extra["denoiser.sigmas"] = torch.linspace(0.03, 14.6, 1000)
    extra["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6052)
    extra["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = (
        torch.arange(77.0)[None] - 1e-4
    )
    loaded = load_sdxl(write(tmp_path / "pony.safetensors", extra), model_config=tiny_sdxl)
    assert torch.equal(loaded.unet.conv_in.weight, base.unet.conv_in.weight.half().float())
    assert loaded.scheduler_config["prediction_type"] == "epsilon"

    extra["v_pred"] = torch.tensor([])
    extra["ztsnr"] = torch.tensor([])
    vpred = load_sdxl(write(tmp_path / "vpred.safetensors", extra), model_config=tiny_sdxl)
    assert vpred.scheduler_config["prediction_type"] == "v_prediction"
    assert vpred.scheduler_config["rescale_betas_zero_snr"] is True
    assert any("v-prediction" in note for note in vpred.notes)


def test_missing_weights_are_a_clear_error(tensors: dict, tiny_sdxl: Path, tmp_path: Path) -> None:
    from sdprep.train.models.load import load_sdxl

    no_proj = {k: v for k, v in tensors.items() if not k.endswith("text_projection")}
    with pytest.raises(
        ModelError, match=r"text_encoder_2 is missing 1 weights \(e\.g\. text_projection\.weight\)"
    ):
        load_sdxl(write(tmp_path / "noproj.safetensors", no_proj), model_config=tiny_sdxl)
    no_vae = {k: v for k, v in tensors.items() if not k.startswith("first_stage_model.")}
    path = write(tmp_path / "novae.safetensors", no_vae)
    with pytest.raises(ModelError, match="has no VAE weights") as err:
        load_sdxl(path, model_config=tiny_sdxl)
    assert "set vae = " in str(err.value)
    vae_file = write(
        tmp_path / "vae.safetensors",
        {
            k.removeprefix("first_stage_model."): v
            for k, v in tensors.items()
            if k.startswith("first_stage_model.")
        },
    )
    loaded = load_sdxl(path, model_config=tiny_sdxl, vae=vae_file)  # a VAE-less checkpoint + separate VAE
    assert torch.equal(
        loaded.vae.decoder.conv_out.weight, tensors["first_stage_model.decoder.conv_out.weight"]
    )


def test_separate_vae_file_in_both_layouts(base, tensors: dict, tiny_sdxl: Path, tmp_path: Path) -> None:
    from sdprep.train.models.load import load_sdxl

    ldm = {
        k.removeprefix("first_stage_model."): v * 1.5
        for k, v in tensors.items()
        if k.startswith("first_stage_model.")
    }
    diffusers = {k: v * 2 for k, v in base.vae.state_dict().items()}
    for name, sd, factor in (("ldm", ldm, 1.5), ("diffusers", diffusers, 2)):
        loaded = load_sdxl(tiny_sdxl, vae=write(tmp_path / f"vae_{name}.safetensors", sd))
        assert torch.equal(loaded.vae.encoder.conv_in.weight, base.vae.encoder.conv_in.weight * factor), name
        assert same_weights(loaded.unet, base.unet)
    with pytest.raises(ModelError, match="no such file or folder"):
        load_sdxl(tiny_sdxl, vae=tmp_path / "missing.safetensors")


def test_tokenizer_without_vocabulary_is_caught(tiny_sdxl: Path, tmp_path: Path) -> None:
    """transformers 5 returns a 2-3 token tokenizer for a folder without vocabulary files."""
    from sdprep.train.models.load import load_sdxl

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sdxl, broken)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (broken / "tokenizer_2" / name).unlink(missing_ok=True)
    with pytest.raises(
        ModelError, match="tokenizer_2 has only [0-9] tokens: its vocabulary files are missing"
    ):
        load_sdxl(broken)


def test_missing_config_and_wrong_files(tensors: dict, tiny_sdxl: Path, tmp_path: Path) -> None:
    from sdprep.train.models.load import load_sdxl

    no_config = tmp_path / "noconfig"
    shutil.copytree(tiny_sdxl, no_config)
    (no_config / "unet" / "config.json").unlink()
    with pytest.raises(ModelError, match="cannot load the model"):
        load_sdxl(no_config)
    with pytest.raises(ModelError, match="is not a diffusers model folder"):
        load_sdxl(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelError, match="not a model file"):
        load_sdxl(tmp_path / "notes.txt")
    unet_only = {k: v for k, v in tensors.items() if k.startswith("model.")}
    with pytest.raises(ModelError):
        load_sdxl(write(tmp_path / "unet_only.safetensors", unet_only), model_config=tiny_sdxl)


def test_diffusers_folder_in_save_precision(base, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    from sdprep.train.save.checkpoint import write_diffusers

    folder = write_diffusers(tmp_path / "out", base, torch.bfloat16)
    weights = load_file(next((folder / "unet").glob("*.safetensors")))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    pipe = StableDiffusionXLPipeline.from_pretrained(
        folder, local_files_only=True, torch_dtype=torch.bfloat16
    )
    assert torch.equal(pipe.unet.conv_in.weight, base.unet.conv_in.weight.to(torch.bfloat16))
    assert not list(tmp_path.glob(".out*"))  # written under a temporary name, nothing left behind


def test_v_prediction_markers_round_trip(base, tensors: dict, tiny_sdxl: Path, tmp_path: Path) -> None:
    from sdprep.train.models.load import load_sdxl
    from sdprep.train.save.checkpoint import prediction_markers

    assert prediction_markers({"prediction_type": "epsilon"}) == {}
    assert set(prediction_markers({"prediction_type": "epsilon"}, v_parameterization=True)) == {"v_pred"}
    markers = prediction_markers({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True})
    assert set(markers) == {"v_pred", "ztsnr"}
    loaded = load_sdxl(write(tmp_path / "v.safetensors", {**tensors, **markers}), model_config=tiny_sdxl)
    assert loaded.scheduler_config["prediction_type"] == "v_prediction"
