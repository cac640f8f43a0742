"""Model loading: the dtypes load_sdxl promises, from every kind of source."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from sdprep.train.models.load import load_sdxl

torch.set_num_threads(1)

MODULES = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def half_sources(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model stored in float16: a diffusers folder, a single file and a separate VAE file."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from sdprep.train.save.sgm import pipeline_to_sgm

    root = tmp_path_factory.mktemp("half")
    pipe = StableDiffusionXLPipeline.from_pretrained(
        tiny_sdxl, local_files_only=True, torch_dtype=torch.float16
    )
    pipe.save_pretrained(root / "folder")
    shutil.copy(next(tiny_sdxl.glob("SDPREP_*")), root / "folder")
    sd = pipeline_to_sgm(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.vae)
    save_file({k: v.contiguous() for k, v in sd.items()}, root / "single.safetensors")
    pipe.vae.save_pretrained(root / "vae")
    stored = {t.dtype for t in sd.values()}
    assert stored == {torch.float16}, stored  # the files really hold half precision
    return {"folder": root / "folder", "single": root / "single.safetensors", "vae": root / "vae"}


def _dtypes(model) -> dict[str, set]:
    return {
        name: {t.dtype for t in getattr(model, name).state_dict().values() if t.is_floating_point()}
        for name in MODULES
    }


def test_float16_folder_loads_in_float32(half_sources) -> None:
    model = load_sdxl(half_sources["folder"], vae=half_sources["vae"])
    assert _dtypes(model) == {name: {torch.float32} for name in MODULES}


def test_float16_single_file_loads_in_float32(half_sources, tiny_sdxl: Path) -> None:
    model = load_sdxl(half_sources["single"], model_config=tiny_sdxl)
    assert _dtypes(model) == {name: {torch.float32} for name in MODULES}
    # float16 -> float32 is exact: the weights are the file's
    from safetensors.torch import load_file

    sd = load_file(half_sources["single"])
    want = sd["model.diffusion_model.input_blocks.0.0.weight"].float()
    assert torch.equal(model.unet.conv_in.weight, want)


def test_to_float32_casts_only_what_needs_it() -> None:
    from sdprep.train.models.load import to_float32

    half = torch.nn.Linear(2, 2).half()
    full = torch.nn.Linear(2, 2)
    weight = full.weight
    to_float32(half, full)
    assert half.weight.dtype == torch.float32
    assert full.weight is weight  # already float32: untouched
