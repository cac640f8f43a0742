"""Every option of kohya's three SDXL trainers, as a TOML key and as a flag: used, accepted with a
note, or refused with the reason; never unknown, never a crash.

tests/assets/kohya_sdxl_options.json is the list of kohya sd-scripts' (commit 48d368fa) SDXL
options, made by running the argparse setup of sdxl_train.py, sdxl_train_network.py and
sdxl_train_textual_inversion.py (see tests/assets/README.md): 209 options with their flags, kind,
type, default and choices.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from sdprep.errors import ConfigError, SdprepError
from sdprep.train.config.kohya import ACCEPTED_IGNORED, ALIASES, UNSUPPORTED
from sdprep.train.config.schema import FIELDS, load_train_config

OPTIONS: dict[str, dict[str, Any]] = json.loads(
    (Path(__file__).parent / "assets" / "kohya_sdxl_options.json").read_text()
)
SPECIAL = {"config_file", "use_8bit_adam"}  # the config file itself; read as optimizer_type

# A value (and the settings it needs) for options whose generic sample would be invalid.
SAMPLES: dict[str, tuple[Any, dict[str, Any]]] = {
    "adaptive_noise_scale": (0.003, {"noise_offset": 0.03}),
    "bucket_reso_steps": (32, {}),
    "full_bf16": (True, {"mixed_precision": "bf16"}),
    "full_fp16": (True, {"mixed_precision": "fp16"}),
    "lr_scheduler": ("cosine", {}),
    "lr_scheduler_type": ("CosineAnnealingLR", {}),
    "min_bucket_reso": (128, {}),
    "max_bucket_reso": (1536, {}),
    "network_args": (["conv_dim=4"], {"network_module": "networks.lora"}),
    "network_module": ("networks.lora", {}),
    "optimizer_type": ("Adafactor", {}),
    "resolution": ("768,1024", {}),
    "fused_backward_pass": (True, {"optimizer_type": "Adafactor"}),
    "dim_from_weights": (True, {"network_module": "networks.lora", "network_weights": "{lora}"}),
}


def _sample(name: str, entry: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    if name in SAMPLES:
        return SAMPLES[name]
    if entry["kind"] == "flag":
        return True, {}
    if entry["choices"]:
        return next(c for c in entry["choices"] if c is not None and c != entry["default"]), {}
    if entry["nargs"] == "*":
        return (["x=1"] if entry["type"] in ("str", None) else [0.5]), {}
    return {"int": 2, "float": 0.5, "int_or_float": 2}.get(entry["type"], "x"), {}


def _flags(values: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in values.items():
        if value is True:
            out.append(f"--{key}")
        elif isinstance(value, list):
            out += [f"--{key}", *map(str, value)]
        else:
            out.append(f"--{key}={value}")
    return out


def _try(load) -> tuple[str, Any]:
    try:
        return "loaded", load()
    except ConfigError as exc:
        return "refused", exc
    except SdprepError as exc:  # pragma: no cover - a typed error is still not a crash
        return "refused", exc


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("lora") / "lora.safetensors"
    save_file(
        {"lora_unet_a.lora_down.weight": torch.zeros(4, 8), "lora_unet_a.alpha": torch.tensor(4.0)}, str(path)
    )
    return path


def test_the_option_list_is_kohyas_209() -> None:
    assert len(OPTIONS) == 209
    assert OPTIONS["text_encoder_lr"]["nargs"] == "*" and OPTIONS["text_encoder_lr"]["scripts"] == [
        "sdxl_train_network"
    ]


def test_every_kohya_sdxl_option_is_known() -> None:
    known = set(FIELDS) | set(ALIASES) | set(ACCEPTED_IGNORED) | set(UNSUPPORTED) | SPECIAL
    assert sorted(set(OPTIONS) - known) == []


@pytest.mark.parametrize("form", ["toml", "flag"])
def test_every_kohya_sdxl_option_is_used_noted_or_refused_with_a_reason(
    form: str, tmp_path: Path, lora_file: Path
) -> None:
    outcomes: dict[str, str] = {}
    for name, entry in OPTIONS.items():
        if name in SPECIAL:
            continue
        value, needs = _sample(name, entry)
        values = {k: str(lora_file) if v == "{lora}" else v for k, v in {**needs, name: value}.items()}
        if form == "toml":
            path = tmp_path / f"{name}.toml"
            path.write_text(tomli_w.dumps(values))
            kind, result = _try(lambda path=path: load_train_config(path))
        else:
            kind, result = _try(lambda values=values: load_train_config(None, flags=_flags(values)))
        if name in UNSUPPORTED:
            assert kind == "refused", (name, result)
            assert result.hint and "not supported" in result.message, (name, result)
            outcomes[name] = "refused"
            continue
        assert kind == "loaded", (name, value, result)
        cfg, notes = result
        if name in ACCEPTED_IGNORED:
            assert any(n.startswith(f'"{name}" accepted but not used: ') for n in notes), (name, notes)
            outcomes[name] = "ignored"
        else:
            assert ALIASES.get(name, name) in FIELDS, name
            outcomes[name] = "used"
    counts = {k: list(outcomes.values()).count(k) for k in ("used", "ignored", "refused")}
    assert sum(counts.values()) == len(OPTIONS) - len(SPECIAL)
    assert counts["refused"] == len(set(UNSUPPORTED) & set(OPTIONS))


def test_config_file_and_use_8bit_adam(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("learning_rate = 3e-5\n")
    cfg, _ = load_train_config(None, flags=["--config_file", str(tmp_path / "c")])  # kohya adds .toml
    assert cfg.learning_rate == 3e-5
    cfg, notes = load_train_config(None, flags=["--use_8bit_adam"])
    assert (
        cfg.optimizer_type == "AdamW8bit" and 'use_8bit_adam: read as optimizer_type = "AdamW8bit"' in notes
    )
