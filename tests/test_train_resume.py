"""save_state / --resume: a resumed run continues the step count and ends with the same weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_support import lora_cfg, make_dataset

from sdprep.errors import TrainingError
from sdprep.train.loop.trainer import RecordingCallbacks, train

torch.set_num_threads(1)

# Everything random in play: flips, caption shuffling, LoRA dropout, noise offset, accumulation, warmup.
RANDOM = dict(
    train_batch_size=2,
    gradient_accumulation_steps=2,
    flip_aug=True,
    shuffle_caption=True,
    network_dropout=0.1,
    noise_offset=0.05,
    lr_scheduler="cosine",
    lr_warmup_steps=1,
    cache_latents=False,
    max_train_steps=5,
)


class Interrupt(RecordingCallbacks):
    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        super().step(step, epoch, loss, lr)
        if step == self.at:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def runs(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted 5-step run, and the same run interrupted after step 4 (mid-epoch) and resumed."""
    root = tmp_path_factory.mktemp("resume")
    # 2 images x 4 repeats = 8 samples: 4 batches of 2, accumulation 2 -> 2 steps per epoch,
    # so the state saved at step 3 is in the middle of epoch 2
    data = make_dataset(root / "data", images=["a_landscape.jpg", "h_wide.jpg"], repeats=4)
    full = RecordingCallbacks()
    train(lora_cfg(tiny_sdxl, data, root / "full", **RANDOM), callbacks=full)
    cfg = lora_cfg(tiny_sdxl, data, root / "cut", save_every_n_steps=3, save_state=True, **RANDOM)
    first = Interrupt(at=4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=first)
    resumed = RecordingCallbacks()
    result = train(cfg, callbacks=resumed, resume="latest")
    return root, full, first, resumed, result


def test_resumed_run_equals_uninterrupted_run(runs) -> None:
    root, full, first, resumed, result = runs
    a = load_file(str(root / "full" / "tiny.safetensors"))
    b = load_file(str(root / "cut" / "tiny.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    assert [loss for _, loss in full.losses] == [loss for _, loss in first.losses[:3] + resumed.losses]


def test_resume_continues_the_step_count(runs) -> None:
    root, full, first, resumed, result = runs
    assert resumed.started == (5, 3, 2)
    assert [s for s, _ in resumed.losses] == [4, 5]
    assert result.first_step == 3 and result.steps == 5
    assert any("resumed from" in n and "tiny-step00000003-state at step 3" in n for n in resumed.notes)
    info = json.loads((root / "cut" / "tiny-state" / "state.json").read_text())
    assert info["step"] == 5 and info["method"] == "lora"


def test_latest_skips_incomplete_states_and_explains_missing_ones(runs, tmp_path: Path) -> None:
    from sdprep.train.save.weights import read_state_info, resolve_resume

    root = runs[0]
    out = tmp_path / "out"
    shutil.copytree(root / "cut", out)
    # a crashed save: a temp folder, and a folder without state.json, both newer
    (out / ".tiny-step00000009-state.tmp-1").mkdir()
    (out / "tiny-step00000008-state").mkdir()
    assert resolve_resume("latest", out, "tiny").name == "tiny-state"
    with pytest.raises(TrainingError, match="not a complete sdprep training state"):
        read_state_info(out / "tiny-step00000008-state")
    kohya = tmp_path / "kohya-state"
    kohya.mkdir()
    (kohya / "train_state.json").write_text("{}")
    with pytest.raises(TrainingError) as err:
        resolve_resume(kohya, out, "tiny")
    assert "kohya/accelerate state folder" in str(err.value)
    with pytest.raises(TrainingError, match="no saved training state"):
        resolve_resume("latest", tmp_path / "empty", "tiny")
    with pytest.raises(TrainingError, match="states found for: tiny"):
        resolve_resume("latest", out, "another_lora")  # never another run's state


def test_resume_past_the_end_is_an_error(runs, tiny_sdxl: Path) -> None:
    root = runs[0]
    cfg = lora_cfg(tiny_sdxl, root / "data", root / "cut", save_state=True, **RANDOM)
    with pytest.raises(
        TrainingError, match="is at step 5, and this run ends at step 5: nothing left to train"
    ):
        train(cfg, resume="latest")


def test_a_state_with_a_code_running_pickle_is_refused_not_run(runs, tiny_sdxl: Path, tmp_path: Path) -> None:
    import pickle

    root = runs[0]
    state = tmp_path / "tiny-state"
    shutil.copytree(root / "cut" / "tiny-step00000003-state", state)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # would create the marker file if unpickled

    (state / "optimizer.pt").write_bytes(pickle.dumps(Payload(), protocol=2))  # torch.save's protocol
    cfg = lora_cfg(tiny_sdxl, root / "data", tmp_path / "out", save_state=True, **RANDOM)
    with pytest.raises(TrainingError, match="holds pickled objects that are not plain data: refused"):
        train(cfg, resume=state)
    assert not marker.exists()


def test_a_state_json_nesting_bomb_is_a_damaged_state(tmp_path: Path) -> None:
    from sdprep.train.save.weights import read_state_info

    folder = tmp_path / "tiny-state"
    folder.mkdir()
    (folder / "state.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TrainingError, match="state.json is damaged \\(nested too deeply"):
        read_state_info(folder)


def _state_copy(runs, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(runs[0] / "cut", out)
    return out / "tiny-step00000003-state"


def test_resume_latest_with_a_truncated_trainable_file_names_it_and_the_fix(
    runs, tiny_sdxl: Path, tmp_path: Path
) -> None:
    state = _state_copy(runs, tmp_path)
    latest = state.parent / "tiny-state"
    path = latest / "trainable.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    cfg = lora_cfg(
        tiny_sdxl, runs[0] / "data", state.parent, save_state=True, **{**RANDOM, "max_train_steps": 7}
    )
    with pytest.raises(TrainingError) as err:
        train(cfg, resume="latest")
    assert err.value.message.startswith(f"{path}: not a complete safetensors file (truncated or corrupt")
    assert f"delete {latest} and resume from an earlier state" in err.value.hint


@pytest.mark.parametrize(
    ("name", "damage", "problem"),
    [
        (
            "optimizer.pt",
            lambda b: bytes(range(256)) * 64,
            "not a complete torch.save file (truncated or corrupt",
        ),
        ("optimizer.pt", lambda b: b[: len(b) // 2], "not a complete torch.save file (truncated or corrupt"),
        ("scheduler.pt", lambda b: b"", "not a complete torch.save file (truncated or corrupt"),
        (
            "rng.pt",
            lambda b: b"PK\x03\x04" + b"\x00" * 100,
            "not a complete torch.save file (truncated or corrupt",
        ),
        ("trainable.safetensors", lambda b: b"\xff" * 64, "not a complete safetensors file"),
    ],
    ids=["random-optimizer", "cut-optimizer", "empty-scheduler", "broken-zip-rng", "random-trainable"],
)
def test_a_damaged_state_file_is_named_as_damaged_not_as_a_threat(
    runs, tmp_path: Path, name, damage, problem
) -> None:
    from sdprep.train.save.weights import load_state

    state = _state_copy(runs, tmp_path)
    path = state / name
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(TrainingError) as err:
        load_state(state, None, None, None)  # refused before the model is touched
    assert err.value.message.startswith(f"{path}: {problem}"), err.value.message
    assert "could run code" not in err.value.message
    assert "is damaged: delete" in err.value.hint


@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.pt"])
def test_a_state_with_nan_weights_is_refused_at_resume_naming_it(
    runs, tiny_sdxl: Path, tmp_path: Path, name
) -> None:
    from safetensors.torch import save_file

    state = _state_copy(runs, tmp_path)
    path = state / name
    if name.endswith(".safetensors"):
        tensors = load_file(str(path))
        key = sorted(tensors)[0]
        tensors[key][..., 0] = float("nan")
        save_file(tensors, str(path))
    else:
        opt = torch.load(path, weights_only=True)
        first = next(iter(opt["state"].values()))
        key = next(k for k, v in first.items() if isinstance(v, torch.Tensor) and v.numel() > 1)
        first[key].view(-1)[0] = float("inf")
        torch.save(opt, path)
    cfg = lora_cfg(tiny_sdxl, runs[0] / "data", tmp_path / "out2", save_state=True, **RANDOM)
    with pytest.raises(TrainingError) as err:
        train(cfg, resume=state)
    assert err.value.message.startswith(f"{path}: 1 tensors hold NaN or infinite values (e.g. ")
    assert state.name in err.value.hint


def test_restore_tensors_checks_names_and_shapes_and_copies_in_place() -> None:
    """A method's trainable state goes back into its own tensors (cast to their dtype); other names
    or shapes are refused with the method's hint, prefixes in `skip` are checked but not copied."""
    from sdprep.train.methods.base import restore_tensors

    mine = {"unet/a": torch.zeros(2, dtype=torch.bfloat16), "ema/unet/a": torch.zeros(2)}
    state = {"unet/a": torch.tensor([1.0, 2.0]), "ema/unet/a": torch.tensor([3.0, 4.0])}
    restore_tensors(state, mine, what="fine-tune", hint="same settings", skip=("ema/",))
    assert mine["unet/a"].dtype == torch.bfloat16 and mine["unet/a"].tolist() == [1.0, 2.0]
    assert mine["ema/unet/a"].tolist() == [0.0, 0.0]  # skipped: the EMA restores its own copy

    with pytest.raises(
        TrainingError, match=r"does not match this fine-tune \(1 missing, 0 unexpected"
    ) as err:
        restore_tensors({"unet/a": state["unet/a"]}, mine, what="fine-tune", hint="same settings")
    assert err.value.hint == "same settings"
    with pytest.raises(TrainingError, match=r"training state unet/a: shape \(3,\) != \(2,\)") as err:
        restore_tensors(
            {"unet/a": torch.zeros(3)}, {"unet/a": torch.zeros(2)}, what="x", hint="h", shape_hint="dims"
        )
    assert err.value.hint == "dims"
