"""TensorBoard logging (loss, learning rates, sample images) under `logging_dir`, as kohya does.

A run writes to `<logging_dir>/<log_prefix><YYYYmmddHHMMSS>/`; `tensorboard --logdir logging_dir`
shows every run. Without `logging_dir`, nothing is logged.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image


class NullLog:
    """Logs nothing."""

    folder: Path | None = None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        pass

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLog(NullLog):
    """A SummaryWriter with the few calls the trainer makes."""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(folder), flush_secs=30)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        import numpy as np

        self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def open_log(
    logging_dir: Path | str | None, log_with: str | None, prefix: str | None = None
) -> tuple[NullLog, list[str]]:
    """The run's log (TensorBoard or none) and notes about what was chosen."""
    notes = []
    if not logging_dir:
        if log_with in ("tensorboard", "all"):
            notes.append(f"log_with = {log_with} but no logging_dir: nothing is logged")
        return NullLog(), notes
    if log_with not in (None, "", "tensorboard", "all"):
        notes.append(f'log_with = "{log_with}" is not supported: logging to TensorBoard instead')
    folder = Path(logging_dir).expanduser() / f"{prefix or ''}{time.strftime('%Y%m%d%H%M%S')}"
    n = 1
    while folder.exists():
        folder = folder.with_name(f"{folder.name.split('.')[0]}.{n}")
        n += 1
    return TensorBoardLog(folder), notes


def read_scalars(folder: Path | str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a TensorBoard run folder: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_image_tags(folder: Path | str) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0})
    acc.Reload()
    return list(acc.Tags()["images"])
