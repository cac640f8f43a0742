"""Progress reporting for training runs: callbacks the loop calls, and what a run returns.

The loop never prints: it calls a `TrainCallbacks` object. The CLI passes one that draws a rich
progress bar (steps, loss, lr, ETA); tests pass `RecordingCallbacks` and read what happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sdprep.progress import NullReporter, Reporter

if TYPE_CHECKING:
    from sdprep.train.methods.base import Verification


class TrainCallbacks:
    """What the loop reports. Subclass and override; every method is optional."""

    def note(self, message: str) -> None:
        """A line of information (start banner, notes about the config, save reports)."""

    def reporter(self) -> Reporter:
        """Where the data scan and the caches report their progress (default: nowhere)."""
        return NullReporter()

    def start(self, total_steps: int, first_step: int, steps_per_epoch: int) -> None:
        """Training begins (after model, data and caches are ready)."""

    def step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        """An optimizer step finished (`step` counts from 1)."""

    def saved(self, verification: Verification) -> None:
        """A weights file was written AND verified."""

    def sampled(self, paths: list[Path]) -> None:
        """Sample images were written."""

    def end(self, result: TrainResult) -> None:
        """Training finished (after the final save)."""


class RecordingCallbacks(TrainCallbacks):
    """Keeps everything reported (for tests and for callers that print later)."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.losses: list[tuple[int, float]] = []
        self.lrs: list[float] = []
        self.saves: list[Verification] = []
        self.samples: list[Path] = []
        self.started: tuple[int, int, int] | None = None
        self.result: TrainResult | None = None

    def note(self, message: str) -> None:
        self.notes.append(message)

    def start(self, total_steps: int, first_step: int, steps_per_epoch: int) -> None:
        self.started = (total_steps, first_step, steps_per_epoch)

    def step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        self.losses.append((step, loss))
        self.lrs.append(lr)

    def saved(self, verification: Verification) -> None:
        self.saves.append(verification)

    def sampled(self, paths: list[Path]) -> None:
        self.samples += paths

    def end(self, result: TrainResult) -> None:
        self.result = result


@dataclass
class TrainResult:
    method: str
    output: Path | None
    saved: list[Path] = field(default_factory=list)
    states: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    steps: int = 0
    epochs: int = 0
    first_step: int = 0
    last_loss: float | None = None
    log_dir: Path | None = None
    seconds: float = 0.0
    validation: list[tuple[str, int, float]] = field(default_factory=list)  # (step|epoch, at, loss)

    def summary(self) -> str:
        lines = [
            f"trained {self.method}: steps {self.first_step} -> {self.steps} ({self.epochs} full epochs), "
            f"last loss {self.last_loss:.4f} ({self.seconds:.0f} s)"
            if self.last_loss is not None
            else f"trained {self.method}: {self.steps} steps"
        ]
        if self.output:
            lines.append(f"output: {self.output}")
        if self.states:
            lines.append(f"state: {self.states[-1]}")
        if self.log_dir:
            lines.append(f"TensorBoard: tensorboard --logdir {self.log_dir.parent}")
        return "\n".join(lines)
