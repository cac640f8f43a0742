"""A run stopped by Ctrl-C or by a file that goes bad mid-run keeps its progress: the state of the
last finished step is saved (even without save_state) and `--resume latest` ends exactly where an
uninterrupted run ends."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_resume import RANDOM
from train_support import lora_cfg, make_dataset

from sdprep.errors import TrainingError
from sdprep.train.loop.trainer import RecordingCallbacks, train

torch.set_num_threads(1)


class At(RecordingCallbacks):
    """Runs `action` once, right after step `at` finished."""

    def __init__(self, at: int, action) -> None:
        super().__init__()
        self.at, self.action = at, action

    def step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        super().step(step, epoch, loss, lr)
        if step == self.at:
            self.action()


@pytest.fixture(scope="module")
def reference(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("rescue")
    data = make_dataset(root / "data", images=["a_landscape.jpg", "h_wide.jpg"], repeats=4)
    train(lora_cfg(tiny_sdxl, data, root / "full", **RANDOM))
    return root, data, load_file(str(root / "full" / "tiny.safetensors"))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


def test_ctrl_c_saves_the_state_and_resume_finishes_the_same_run(reference, tiny_sdxl: Path) -> None:
    root, data, full = reference
    out = root / "ctrl-c"
    cfg = lora_cfg(tiny_sdxl, data, out, **RANDOM)  # save_state is off: the rescue saves it anyway
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingError) as err:
        train(cfg, callbacks=At(3, lambda: os.kill(os.getpid(), signal.SIGINT)))
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    assert "interrupted (Ctrl-C); stopped after step 3 of 5, progress saved (tiny-step00000003-state)" in str(
        err.value
    )
    assert "--resume latest" in err.value.hint
    assert (out / "tiny-step00000003.safetensors").is_file()
    resumed = RecordingCallbacks()
    result = train(cfg, callbacks=resumed, resume="latest")
    assert result.first_step == 3 and result.steps == 5
    assert_same(full, load_file(str(out / "tiny.safetensors")))


def test_a_file_that_goes_bad_mid_run_stops_with_the_progress_saved(reference, tiny_sdxl: Path) -> None:
    root, data, full = reference
    out = root / "bad-file"
    image = next((data / "4_mytoken").glob("h_wide.png"))
    good = image.read_bytes()
    cfg = lora_cfg(tiny_sdxl, data, out, **RANDOM)
    try:
        with pytest.raises(TrainingError) as err:
            train(cfg, callbacks=At(2, lambda: image.write_bytes(good[:200])))
    finally:
        image.write_bytes(good)  # the user re-downloads it
    message = str(err.value)
    assert f"{image}: truncated or corrupt image data" in message
    assert "stopped after step 2 of 5, progress saved (tiny-step00000002-state)" in message
    assert err.value.hint == "re-download or delete the file, then run the same command with --resume latest"
    train(cfg, resume="latest")
    assert_same(full, load_file(str(out / "tiny.safetensors")))


def test_with_cached_latents_an_unloadable_image_is_left_out_and_listed(
    tiny_sdxl: Path, tmp_path: Path
) -> None:
    data = make_dataset(tmp_path / "data", images=["a_landscape.jpg", "h_wide.jpg", "c_square.webp"])
    bad = data / "2_mytoken" / "h_wide.png"
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])  # the header is intact: the scan keeps it
    notes = RecordingCallbacks()
    result = train(lora_cfg(tiny_sdxl, data, tmp_path / "out"), callbacks=notes)
    text = "\n".join(notes.notes)
    assert f"  {bad}: cannot be loaded: truncated or corrupt image data" in text
    assert "note: 1 image cannot be loaded: left out (listed under dropped)" in text
    assert "data: 2 images, 4 samples per epoch" in text
    from safetensors import safe_open

    with safe_open(str(result.output), "pt") as f:
        assert f.metadata()["ss_num_train_images"] == "4"  # 2 images x 2 repeats
