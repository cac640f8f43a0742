"""SDXL's shipped base config: the real architecture, CLIP's real tokenizer, used for single files offline."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch

from sdprep.errors import ModelError
from sdprep.train.config.schema import TrainConfig
from sdprep.train.models import sdxl_config
from sdprep.train.models.clip_vocab import VOCAB_SIZE
from sdprep.train.models.load import load_sdxl
from sdprep.train.save.sgm import pipeline_to_sgm

torch.set_num_threads(1)

ASSETS = Path(__file__).parent / "assets" / "kohya"


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sdxl_config.write_base_config(tmp_path_factory.mktemp("sdxl") / "config")


def test_tokenizers_are_clips(config_dir: Path) -> None:
    """CLIP's ids for a known sentence (sdxl-fullsize.md), 49,408 tokens, SDXL's two pad tokens."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(config_dir / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(config_dir / "tokenizer_2")
    assert len(tok) == len(tok2) == VOCAB_SIZE
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok2("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token_id == 49407 and tok2.pad_token_id == 0  # SDXL's second tokenizer pads with "!"
    assert tok.model_max_length == tok2.model_max_length == 77


def test_configs_build_the_checkpoint_layout_kohya_writes(config_dir: Path) -> None:
    """Built from the shipped configs (on the meta device), the four components have exactly the
    tensors, by SGM name and shape, of the full-size SDXL checkpoint kohya's own SDXL classes save
    (recorded in assets/kohya/sdxl_checkpoint_shapes.json.gz); only text encoder 2's logit_scale,
    which diffusers does not use, is absent."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config_dir / "text_encoder_2"))
    ours = {k: list(v.shape) for k, v in pipeline_to_sgm(unet, te1, te2, vae).items()}
    kohya = json.loads(gzip.decompress((ASSETS / "sdxl_checkpoint_shapes.json.gz").read_bytes()))
    assert len(kohya) == 2514
    assert set(kohya) - set(ours) == {"conditioner.embedders.1.model.logit_scale"}
    assert set(ours) <= set(kohya)
    assert {k: v for k, v in kohya.items() if k in ours} == ours
    # ComfyUI's SDXL detection facts (sdxl-fullsize.md)
    assert unet.config.block_out_channels[0] == 320 and unet.config.cross_attention_dim == 2048
    assert unet.config.projection_class_embeddings_input_dim == 2816
    assert te1.config.vocab_size == te2.config.vocab_size == 49408


def test_a_single_file_of_another_architecture_says_to_pass_model_config(
    tiny_sdxl: Path, tmp_path: Path
) -> None:
    """No model_config: sdprep uses its SDXL config (no hub, offline) and a non-SDXL-sized file fails
    with a message naming the file and the fix."""
    path = _tiny_single_file(tiny_sdxl, tmp_path)
    with pytest.raises(ModelError) as err:
        load_sdxl(path)
    text = str(err.value)
    assert f"cannot load the single-file checkpoint {path} with the standard SDXL configuration" in text
    assert "--model_config DIR" in text


def test_single_file_loads_without_model_config_through_the_shipped_config(
    tiny_sdxl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shipped-config path end to end, on the tiny architecture: a base folder whose component
    configs are the tiny model's (tokenizers and the rest as shipped) stands in for SDXL's. The file
    loads with no model_config, its v-prediction markers are still read, and the tokenizers are
    CLIP's real ones."""
    base = tmp_path / "base"
    shutil.copytree(sdxl_config.BASE_DIR, base)
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        shutil.copy(tiny_sdxl / sub / "config.json", base / sub / "config.json")
    monkeypatch.setattr(sdxl_config, "BASE_DIR", base)
    path = _tiny_single_file(tiny_sdxl, tmp_path, markers=("v_pred", "ztsnr"))
    model = load_sdxl(path)
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    assert model.scheduler_config["rescale_betas_zero_snr"] is True
    assert any("v_pred" in n for n in model.notes)
    assert len(model.tokenizer) == len(model.tokenizer_2) == VOCAB_SIZE
    from safetensors.torch import load_file

    want = load_file(path)["model.diffusion_model.input_blocks.0.0.weight"]
    assert torch.equal(model.unet.conv_in.weight, want)  # the file's weights, not a fresh init


def _tiny_single_file(tiny_sdxl: Path, tmp_path: Path, markers: tuple[str, ...] = ()) -> Path:
    from safetensors.torch import save_file

    model = load_sdxl(tiny_sdxl)
    sd = pipeline_to_sgm(model.unet, model.text_encoder, model.text_encoder_2, model.vae)
    sd = {k: v.contiguous() for k, v in sd.items()}
    sd.update({m: torch.tensor([]) for m in markers})  # ComfyUI's marker keys: empty tensors
    path = tmp_path / "single.safetensors"
    save_file(sd, str(path))
    return path


def test_standard_architecture_is_recognised_by_its_marker_shapes(tiny_sdxl: Path, tmp_path: Path) -> None:
    """What preflight says before any load: a standard SDXL file needs no model_config, another
    architecture does (the shapes are the full-size checkpoint's, from kohya's recorded list)."""

    from safetensors import safe_open
    from safetensors.torch import save_file

    from sdprep.train.config.preflight import _model_check

    kohya = json.loads(gzip.decompress((ASSETS / "sdxl_checkpoint_shapes.json.gz").read_bytes()))
    assert sdxl_config.nonstandard_reason({k: tuple(v) for k, v in kohya.items()}) is None
    markers = tmp_path / "markers.safetensors"  # SDXL's marker tensors only (a few MB)
    markers_sd = {
        k: torch.zeros(shape, dtype=torch.float16) for k, shape in sdxl_config.STANDARD_SHAPES.items()
    }
    save_file({**markers_sd, "conditioner.embedders.1.model.text_projection": torch.zeros(1)}, markers)
    ok, detail = _model_check(TrainConfig(pretrained_model_name_or_path=str(markers), model_config=None))
    assert ok and "standard SDXL architecture" in detail

    tiny = _tiny_single_file(tiny_sdxl, tmp_path)
    with safe_open(str(tiny), framework="pt") as f:
        keys = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    assert sdxl_config.nonstandard_reason(shapes) == (
        "model.diffusion_model.input_blocks.0.0.weight is [32, 4, 3, 3], SDXL's is [320, 4, 3, 3]"
    )
    ok, detail = _model_check(TrainConfig(pretrained_model_name_or_path=str(tiny), model_config=None))
    assert not ok and "not SDXL 1.0's standard architecture" in detail and "model_config" in detail
    ok, _ = _model_check(TrainConfig(pretrained_model_name_or_path=str(tiny), model_config=tiny_sdxl))
    assert ok
