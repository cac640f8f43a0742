"""kohya's save_last_n_epochs_state / save_last_n_steps_state (states pruned on their own count) and
initial_step / initial_epoch / skip_until_initial_step (the step count, and optionally the data,
start later)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_support import lora_cfg, make_dataset

from sdprep.errors import ConfigError
from sdprep.train.config.schema import TrainConfig
from sdprep.train.save.weights import stale_saves

torch.set_num_threads(1)


def test_states_are_pruned_by_their_own_counts() -> None:
    """kohya's train_util: weights go at `step - save_last_n_steps - 1` (rounded down to a save step)
    and `epoch - every * save_last_n_epochs`; states use the *_state counts in the same formulas,
    falling back to the weights' counts."""
    cfg = TrainConfig(
        save_every_n_steps=10,
        save_last_n_steps=25,
        save_last_n_steps_state=15,
        save_every_n_epochs=1,
        save_last_n_epochs=3,
        save_last_n_epochs_state=1,
    )
    assert stale_saves(cfg, step=40, epoch=None) == [{"step": 10}]  # 40 - 25 - 1 = 14 -> 10
    assert stale_saves(cfg, step=40, epoch=None, states=True) == [{"step": 20}]  # 24 -> 20
    assert stale_saves(cfg, step=None, epoch=5) == [{"epoch": 2}]
    assert stale_saves(cfg, step=None, epoch=5, states=True) == [{"epoch": 4}]
    only_weights = TrainConfig(save_every_n_steps=10, save_last_n_steps=25)
    assert stale_saves(only_weights, step=40, epoch=None, states=True) == [{"step": 10}]
    only_states = TrainConfig(save_every_n_steps=10, save_last_n_steps_state=15)
    assert stale_saves(only_states, step=40, epoch=None) == []  # weights are all kept


class Spy:
    """A Trainer that records the (image, repeat) slots of every optimizer step's batches."""

    @staticmethod
    def run(cfg):
        from sdprep.train.loop.trainer import RecordingCallbacks, Trainer

        class Recording(Trainer):
            def _step(self, group):
                self.seen.append([tuple(s) for b in group for s in b["slots"]])
                return super()._step(group)

        trainer = Recording(cfg, callbacks=RecordingCallbacks())
        trainer.seen = []
        trainer.setup()
        trainer.run()
        return trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("initial") / "data", repeats=1)  # 4 steps per epoch


def test_state_pruning_in_a_run(tiny_sdxl: Path, data: Path, tmp_path: Path) -> None:
    cfg = lora_cfg(
        tiny_sdxl,
        data,
        tmp_path / "out",
        max_train_steps=5,
        save_every_n_steps=1,
        save_state=True,
        save_last_n_steps=2,
        save_last_n_steps_state=1,
    )
    Spy.run(cfg)
    names = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("tiny"))
    assert names == sorted(
        [
            "tiny-state",
            "tiny-step00000002.safetensors",
            "tiny-step00000003.safetensors",
            "tiny-step00000003-state",
            "tiny-step00000004.safetensors",
            "tiny-step00000004-state",
            "tiny.safetensors",
        ]
    )


def test_initial_step_with_and_without_skipping(tiny_sdxl: Path, data: Path, tmp_path: Path) -> None:
    plain = Spy.run(lora_cfg(tiny_sdxl, data, tmp_path / "plain", max_train_steps=4))
    skip = Spy.run(
        lora_cfg(
            tiny_sdxl,
            data,
            tmp_path / "skip",
            max_train_steps=4,
            initial_step=2,
            skip_until_initial_step=True,
        )
    )
    start = Spy.run(lora_cfg(tiny_sdxl, data, tmp_path / "start", max_train_steps=4, initial_step=2))
    assert len(plain.seen) == 4
    assert skip.seen == plain.seen[2:]  # the batches an uninterrupted run trains at steps 3 and 4
    assert start.seen == plain.seen[:2]  # kohya without skipping: the epoch from its start
    for trainer in (skip, start):
        assert trainer.result.first_step == 2 and trainer.result.steps == 4
        assert [s for s, _ in trainer.cb.losses] == [3, 4]
    assert "starting at step 2 (skipping the batches before it)" in skip.notes


def test_initial_epoch_and_limits(tiny_sdxl: Path, data: Path, tmp_path: Path) -> None:
    later = Spy.run(lora_cfg(tiny_sdxl, data, tmp_path / "epoch", max_train_steps=6, initial_epoch=2))
    assert later.result.first_step == 4 and [s for s, _ in later.cb.losses] == [5, 6]
    from sdprep.train.loop.trainer import RecordingCallbacks, Trainer

    trainer = Trainer(
        lora_cfg(tiny_sdxl, data, tmp_path / "x", max_train_steps=4, initial_step=4),
        callbacks=RecordingCallbacks(),
    )
    with pytest.raises(ConfigError, match="initial_step 4 is not below the run's 4 steps"):
        trainer.setup()
