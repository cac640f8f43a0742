"""Training metadata: kohya's `ss_*` keys in kohya's value forms, hashes as kohya computes them, times."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from train_support import lora_cfg, make_dataset

torch.set_num_threads(1)


# kohya's run A (tests/assets/kohya/README.md) beyond what lora_cfg already sets the same way
KOHYA_RUN_A = dict(
    max_train_epochs=2,
    save_every_n_epochs=1,
    optimizer_type="AdamW",
    optimizer_args=["weight_decay=0.01"],
    network_alpha=2,
    gradient_checkpointing=True,
    cache_text_encoder_outputs=True,
    mixed_precision="bf16",
    full_bf16=True,
    save_precision="float",
)


class TimedCallbacks:
    """Records the wall time when training starts and when each step ends."""

    def __init__(self) -> None:
        from sdprep.train.callbacks import RecordingCallbacks

        self.inner = RecordingCallbacks()
        self.start_time: float | None = None
        self.step_times: list[float] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def start(self, total_steps: int, first_step: int, steps_per_epoch: int) -> None:
        self.start_time = time.time()
        self.inner.start(total_steps, first_step, steps_per_epoch)

    def step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        self.step_times.append(time.time())
        self.inner.step(step, epoch, loss, lr)


@pytest.fixture(scope="module")
def base_file(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a single .safetensors file (kohya hashes single files)."""
    from safetensors.torch import save_file

    from sdprep.train.models import load_sdxl
    from sdprep.train.sgm import pipeline_to_sgm

    model = load_sdxl(tiny_sdxl)
    sd = pipeline_to_sgm(model.unet, model.text_encoder, model.text_encoder_2, model.vae)
    path = tmp_path_factory.mktemp("base") / "tiny_base.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def run(base_file: Path, tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two epochs of two steps from the single file, saving every epoch; (trainer, callbacks)."""
    from sdprep.train.loop import Trainer

    root = tmp_path_factory.mktemp("meta")
    data = make_dataset(root / "data", images=["c_square.webp", "e_sepia.jpg"], repeats=1)
    cfg = lora_cfg(base_file, data, root / "out", model_config=str(tiny_sdxl), **KOHYA_RUN_A)
    cb = TimedCallbacks()
    trainer = Trainer(cfg, callbacks=cb)
    trainer.setup()
    trainer.run()
    return trainer, cb


def _meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_training_started_at_is_the_first_step_not_the_first_save(run) -> None:
    trainer, cb = run
    first = _meta(trainer.result.saved[0])
    started = float(first["ss_training_started_at"])
    assert cb.start_time <= started <= cb.step_times[0]  # set as step 1 began, before step 1 ended
    assert all(
        _meta(p)["ss_training_started_at"] == first["ss_training_started_at"] for p in trainer.result.saved
    )


def test_kohya_modelspec_options_reach_the_metadata(tmp_path: Path) -> None:
    """kohya's --metadata_* options (sai_model_spec): each is written as its modelspec key; a
    thumbnail file becomes a data URL as kohya's file_to_data_url makes it."""
    import base64
    import types

    from sdprep.errors import ConfigError
    from sdprep.train.config import load_train_config
    from sdprep.train.metadata import modelspec

    thumb = tmp_path / "thumb.png"
    thumb.write_bytes(b"\x89PNG fake")
    values = {
        "trigger_phrase": "nzn",
        "usage_hint": "Use keyword nzn",
        "preprocessor": "none",
        "merged_from": "a, b",
        "is_negative_embedding": "False",
    }
    cfg, _ = load_train_config(
        None, overrides={**{f"metadata_{k}": v for k, v in values.items()}, "metadata_thumbnail": str(thumb)}
    )
    spec = modelspec(
        cfg, types.SimpleNamespace(architecture="stable-diffusion-xl-v1-base/lora"), {"name": "x"}
    )
    for key, value in values.items():
        assert spec[f"modelspec.{key}"] == value
    assert (
        spec["modelspec.thumbnail"] == "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()
    )
    missing, _ = load_train_config(None, overrides={"metadata_thumbnail": str(tmp_path / "none.png")})
    with pytest.raises(ConfigError, match="metadata_thumbnail .*none.png: cannot read"):
        modelspec(missing, types.SimpleNamespace(architecture="a"), {"name": "x"})
