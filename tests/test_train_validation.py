"""Validation loss as kohya's train_network.py: the split (kohya's split_train_val, run as an oracle:
tests/assets/kohya_validation_split.json), kohya's four timesteps, when it runs, TensorBoard tags, and
a run whose training is untouched by it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_support import lora_cfg, make_dataset, run_trainer

from sdprep.errors import ConfigError
from sdprep.train.loop.validation import should_validate, split_names, validation_timesteps

torch.set_num_threads(1)
KOHYA = json.loads((Path(__file__).parent / "assets" / "kohya_validation_split.json").read_text())


def test_training_images_are_kohyas_and_validation_images_are_the_rest() -> None:
    overlapping = 0
    for case in KOHYA["split"]:
        names = [f"img_{i:02d}.png" for i in range(case["n"])]
        train, val = split_names(names, case["split"], case["seed"])
        assert train == case["train"], case
        # kohya's validation part can repeat a training image (ceil / round): sdprep's never does
        assert val == [n for n in case["val"] if n not in case["train"]], case
        assert sorted(train + val) == sorted(names)
        overlapping += bool(set(case["train"]) & set(case["val"]))
    assert overlapping  # the oracle has cases where kohya validates on training images


def test_kohyas_validation_timesteps() -> None:
    assert validation_timesteps(0, 1000) == KOHYA["timesteps_0_1000"] == [200, 400, 600, 800]
    assert validation_timesteps(100, 900) == KOHYA["timesteps_100_900"]


def test_when_validation_runs() -> None:
    from sdprep.train.config.schema import TrainConfig

    cfg = TrainConfig(validate_every_n_steps=3, validate_every_n_epochs=None)
    assert [s for s in range(1, 10) if should_validate(cfg, step=s)] == [3, 6, 9]
    assert all(should_validate(cfg, epoch=e) for e in (1, 2, 3))  # every epoch by default (kohya)
    cfg = TrainConfig(validate_every_n_steps=None, validate_every_n_epochs=2)
    assert not any(should_validate(cfg, step=s) for s in range(1, 10))
    assert [e for e in range(1, 6) if should_validate(cfg, epoch=e)] == [2, 4]


def _run(tiny_sdxl: Path, data: Path, root: Path, **over):
    cfg = lora_cfg(tiny_sdxl, data, root / "out", logging_dir=str(root / "logs"), max_train_steps=4, **over)
    return run_trainer(cfg)


@pytest.fixture(scope="module")
def runs(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory):
    """The same LoRA run validating every 2 steps and every epoch, and never (same split)."""
    root = tmp_path_factory.mktemp("validation")
    data = make_dataset(root / "data", repeats=2)
    split = {"validation_split": 0.5, "validation_seed": 3}
    with_val = _run(tiny_sdxl, data, root / "with", validate_every_n_steps=2, **split)
    never = _run(tiny_sdxl, data, root / "never", validate_every_n_epochs=1000, **split)
    return with_val, never


def test_held_out_images_do_not_train(runs) -> None:
    trainer, _ = runs
    train = {r.path.name for r in trainer.dataset.records}
    val = {r.path.name for r in trainer.dataset.validation.records}
    expect_train, expect_val = split_names(sorted(train | val), 0.5, 3)
    assert (sorted(train), sorted(val)) == (sorted(expect_train), sorted(expect_val))
    assert len(val) == 2 and not train & val
    assert {r.num_repeats for r in trainer.dataset.validation.records} == {1}  # repeats 2 in training


def test_validation_loss_is_logged_as_kohya_tags(runs) -> None:
    from sdprep.train.loop.logs import read_scalars

    trainer, _ = runs
    scalars = read_scalars(trainer.result.log_dir)
    steps = [s for s, _ in scalars["loss/validation/step_average"]]
    assert steps == [2, 4]
    assert "loss/validation/step_divergence" in scalars
    epochs = [s for s, _ in scalars["loss/validation/epoch_average"]]
    assert epochs == list(range(1, trainer.result.epochs + 1))  # every epoch when not set (kohya)
    recorded = [(k, at) for k, at, _ in trainer.result.validation]
    assert ("step", 2) in recorded and ("epoch", 1) in recorded
    loss = dict(((k, at), v) for k, at, v in trainer.result.validation)[("step", 4)]
    assert scalars["loss/validation/step_average"][1][1] == pytest.approx(loss)
    meta_count = trainer.saver.metadata(trainer.pos, None)["ss_num_validation_images"]
    assert meta_count == "2"


def test_validation_changes_nothing_in_training(runs) -> None:
    """Validating (its own noise generator, eval mode for the pass only) leaves training exactly as it
    is without it."""
    with_val, never = runs
    assert with_val.result.validation and not never.result.validation
    a, b = load_file(str(with_val.result.output)), load_file(str(never.result.output))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_weights_same_validation_loss(runs, monkeypatch) -> None:
    """Every pass sees the same noise, at kohya's timesteps, batch by batch up to max_validation_steps."""
    import sdprep.train.loop.step as step
    from sdprep.train.loop.validation import validation_loss

    trainer, _ = runs
    seen = []
    real = step.draw_noise

    def spy(ctx, latents):
        out = real(ctx, latents)
        seen.append(int(out[2][0]))
        return out

    monkeypatch.setattr(step, "draw_noise", spy)
    for m in trainer.train_modules:
        m.eval()
    first = validation_loss(trainer.ctx, trainer.dataset.validation.batches(0), max_batches=None, seed=3)
    again = validation_loss(trainer.ctx, trainer.dataset.validation.batches(0), max_batches=None, seed=3)
    assert first == again
    batches = len(trainer.dataset.validation.plan(0))
    assert seen == [200, 400, 600, 800] * batches * 2
    seen.clear()
    validation_loss(trainer.ctx, trainer.dataset.validation.batches(0), max_batches=1, seed=3)
    assert seen == [200, 400, 600, 800]


def test_bad_split_is_refused(tiny_sdxl: Path, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data")
    with pytest.raises(ConfigError, match="validation_split must be at least 0 and below 1, got 1.0"):
        from sdprep.train.data.pipeline import build_dataset

        build_dataset(lora_cfg(tiny_sdxl, data, tmp_path / "out", validation_split=1.0))


def test_dataset_toml_split_and_reg_images(tmp_path: Path) -> None:
    """validation_split in [[datasets]] (kohya's place for it); regularisation images always train."""
    from sdprep.train.config.schema import load_train_config
    from sdprep.train.data.pipeline import build_dataset

    images = make_dataset(tmp_path / "img") / "2_mytoken"
    reg = make_dataset(tmp_path / "reg", token="person") / "2_person"
    toml = tmp_path / "dataset.toml"
    toml.write_text(
        "[[datasets]]\nresolution = 128\nmin_bucket_reso = 64\nvalidation_split = 0.25\nvalidation_seed = 1\n"
        f'[[datasets.subsets]]\nimage_dir = "{images}"\nnum_repeats = 2\ncaption_extension = ".txt"\n'
        f'[[datasets.subsets]]\nimage_dir = "{reg}"\nis_reg = true\nnum_repeats = 1\ncaption_extension = ".txt"\n'
    )
    cfg, _ = load_train_config(
        None, overrides={"dataset_config": str(toml), "network_module": "networks.lora"}
    )
    ds = build_dataset(cfg)
    held = [r for r in ds.validation.records]
    assert len(held) == 1 and not held[0].is_reg
    _, want = split_names([str(p) for p in images.glob("*.png")], 0.25, 1)
    assert [str(r.path) for r in held] == want
    assert sum(r.is_reg for r in ds.records) == 4 and len(ds.records) == 7
