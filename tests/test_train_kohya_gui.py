"""The kohya_ss GUI's SDXL presets, as the GUI writes them, through `sdprep train --preflight`.

tests/assets/kohya_gui_presets/ holds the TOML the GUI's train button writes for each SDXL preset
of its presets/ folder (made by running the GUI's own code; see the README there). Each must pass
preflight on the tiny model; the exceptions are listed below with the reason, and a preset whose
optimizer package is not installed must fail with exactly the one-line missing-package error.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from train_support import make_dataset

from sdprep.cli import cli
from sdprep.train.loop.optim import optimizer_module

torch.set_num_threads(1)

PRESETS = Path(__file__).parent / "assets" / "kohya_gui_presets"
NAMES = sorted(p.name for p in PRESETS.glob("*.toml"))

# Presets that cannot pass, with the error that says why (kohya refuses them too, or sdprep does
# not implement what they use yet).
REFUSED = {
    # the GUI writes bucket_reso_steps = 1 from this preset; kohya's SDXL scripts assert a multiple of 32
    "lora - locon-dadaptation-sdxl.toml": "bucket_reso_steps = 1: SDXL needs a multiple of 32",
}


# Presets that repeat another one's method, optimizer and schedule with other numbers (often large
# ranks: slow on the tiny model): their full preflight runs with `make test-slow`; the config check
# below runs for every preset. The default run still covers each method, network and optimizer.
VARIANTS = {
    "lora - SDXL - LoRA AI_characters standard v1.0.toml",  # AdamW8bit: LoHA's
    "lora - SDXL - LoRA AI_characters standard v1.1.toml",  # AdamW: AI_Now ADamW's
    "lora - SDXL - LoRA aitrepreneur clothing v1.0.toml",  # Adafactor: adafactor v1.0's
    "lora - SDXL - LoRA face dogu_cat v1.0.toml",  # AdamW8bit
    "lora - SDXL - LoRA by malcolmrey training v1.0.toml",  # AdamW8bit
    "lora - SDXL - LoRA kudou-reira dadaptadam v1.0.toml",  # DAdaptAdam: v1.1's
    "lora - SDXL - LoRA kudou-reira prodigy v4.0.toml",  # Prodigy: AI_Now prodigy's
    "lora - SDXL - LoKR v1.0.toml",  # LyCORIS LoKr + Prodigy: 1 image LoRA's
    "lora - SDXL - edgLoRAXL AI_Now.toml",  # Prodigy
    "lora - SDXL - edgLoRAXL.toml",  # Prodigy
}


def test_the_converted_presets_are_all_here() -> None:
    assert len(NAMES) == 21  # 19 LoRA + 2 fine-tune SDXL presets of kohya_ss 45088f04
    assert set(REFUSED) <= set(NAMES)


def _write_lora(path: Path) -> None:
    from safetensors.torch import save_file

    save_file(
        {
            "lora_unet_a_proj.lora_down.weight": torch.zeros(8, 32),
            "lora_unet_a_proj.lora_up.weight": torch.zeros(32, 8),
            "lora_unet_a_proj.alpha": torch.tensor(8.0),
            "lora_te1_b_proj.lora_down.weight": torch.zeros(8, 32),
            "lora_te1_b_proj.alpha": torch.tensor(8.0),
        },
        str(path),
    )


def _fill(name: str, root: Path, model: Path) -> Path:
    """The preset's TOML with the placeholders the conversion left pointed at real files."""
    data = make_dataset(root / "images", images=["c_square.webp"], repeats=2, token="token")
    folder = data / "2_token"
    for stem in ("c_square",):  # the extensions some presets write
        for ext in (".txt2", ".txt-no"):
            (folder / f"{stem}{ext}").write_text(f"token, {stem}")
    meta = root / "meta"
    meta.mkdir()
    captions = {str(p): {"caption": "token, a picture", "tags": "1girl"} for p in folder.glob("*.png")}
    for file in ("meta_cap.json", "meta_lat.json"):
        (meta / file).write_text(json.dumps(captions))
    out = root / "out"
    (out / "sample").mkdir(parents=True)
    (out / "sample" / "prompt.txt").write_text("")  # the GUI writes its (empty) prompt box here
    _write_lora(root / "phase1.safetensors")
    text = (
        (PRESETS / name)
        .read_text()
        .format(
            model=model,
            train_data_dir=data,
            image_folder=folder,
            meta_dir=meta,
            output_dir=out,
            network_weights=root / "phase1.safetensors",
        )
    )
    config = root / "config.toml"
    config.write_text(text)
    return config


def _missing_package(config: Path) -> str | None:
    """The first package the preset needs that is not installed (optimizer, then LyCORIS)."""
    from sdprep.config import load_toml

    settings = load_toml(config)
    need = optimizer_module(settings.get("optimizer_type"))
    if need is not None and importlib.util.find_spec(need[0]) is None:
        return need[1]
    if settings.get("network_module") == "lycoris.kohya" and importlib.util.find_spec("lycoris") is None:
        return "lycoris-lora"
    return None


@pytest.mark.parametrize("name", NAMES)
def test_gui_preset_config_is_read_as_kohya_reads_it(
    name: str, cli_runner, tiny_sdxl: Path, tmp_path: Path
) -> None:
    """Every preset: the config loads (the resolved config is written), its dataset resolves."""
    config = _fill(name, tmp_path, tiny_sdxl)
    result = cli_runner.invoke(
        cli, ["train", "--config", str(config), "--output-config", str(tmp_path / "r.toml")]
    )
    if name in REFUSED:
        assert result.exit_code == 1 and REFUSED[name] in result.output, result.output
        return
    assert result.exit_code == 0, result.output
    from sdprep.train.config.schema import load_train_config
    from sdprep.train.data.pipeline import build_dataset

    cfg, _ = load_train_config(tmp_path / "r.toml")
    assert len(build_dataset(cfg)) == 1


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in VARIANTS else n for n in NAMES]
)
def test_gui_preset_passes_preflight(name: str, cli_runner, tiny_sdxl: Path, tmp_path: Path) -> None:
    config = _fill(name, tmp_path, tiny_sdxl)
    result = cli_runner.invoke(cli, ["train", "--config", str(config), "--preflight"])
    if name in REFUSED:
        assert result.exit_code == 1 and REFUSED[name] in result.output, result.output
        return
    package = _missing_package(config)
    if package is not None:
        fails = [line for line in result.output.splitlines() if line.startswith("FAIL")]
        assert result.exit_code == 1 and len(fails) == 1, result.output
        assert (
            fails[0].startswith("FAIL setup: optimizer_type") and f"needs the `{package}` package" in fails[0]
        )
        return
    assert result.exit_code == 0, result.output
    assert "preflight passed" in result.output
