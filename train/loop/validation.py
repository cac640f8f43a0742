"""Validation loss as kohya's train_network.py computes it: a share of the training images held out
(`validation_split`), and their loss at fixed timesteps, logged to TensorBoard.

- The split (kohya's `split_train_val`, per non-regularisation subset): the subset's image paths
  sorted, shuffled by `random.Random(validation_seed)` (sdprep: the training seed when unset; kohya
  then shuffles with an unseeded state, differently for its two datasets), the first
  `ceil(n * (1 - split))` train. The rest validate, each once (kohya's rounding can also put one
  image in both sets; sdprep's validation images are exactly the ones training does not see).
- The loss: for each validation batch (at most `max_validation_steps`) and each timestep of
  `linspace(min_timestep, max_timestep, 6)[1:-1]` (200, 400, 600, 800 by default), the training
  loss with that timestep and noise from a generator seeded with validation_seed (or the seed), so
  every pass sees the same noise; no gradients, dropout off.
- When: every `validate_every_n_steps` optimizer steps and at the end of every
  `validate_every_n_epochs`-th epoch (every epoch when unset), as kohya. Logged as
  `loss/validation/step_average` / `step_divergence` (minus the training loss average) at the step,
  `loss/validation/epoch_average` / `epoch_divergence` at the epoch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from typing import TYPE_CHECKING

from sdprep.errors import ConfigError

if TYPE_CHECKING:
    from sdprep.train.config.datasets import DatasetSpec
    from sdprep.train.config.schema import TrainConfig
    from sdprep.train.data.pipeline import Batch
    from sdprep.train.data.scan import ImageRecord
    from sdprep.train.loop.step import StepContext

NUM_TIMESTEPS = 4  # kohya's NUM_VALIDATION_TIMESTEPS


def validation_timesteps(lo: int, hi: int, count: int = NUM_TIMESTEPS) -> list[int]:
    """kohya's `np.linspace(lo, hi, count + 2, dtype=int)[1:-1]`: evenly spaced inner timesteps."""
    import numpy as np

    return [int(t) for t in np.linspace(lo, hi, count + 2, dtype=int)[1:-1]]


def split_names(names: list[str], split: float, seed: int) -> tuple[list[str], list[str]]:
    """(training, validation) names of one subset: sorted, shuffled by `seed`, the first
    ceil(n * (1 - split)) train and the rest validate."""
    items = sorted(names)
    random.Random(seed).shuffle(items)
    cut = math.ceil(len(items) * (1 - split))
    return items[:cut], items[cut:]


def check_split(split: float, where: str) -> None:
    if not 0.0 <= split < 1.0:
        raise ConfigError(
            f"{where}: validation_split must be at least 0 and below 1, got {split}",
            "e.g. 0.1 holds out a tenth of each subset's images",
        )


def split_records(
    records: list[ImageRecord], datasets: list[DatasetSpec], seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Training records and validation records (each once, repeats 1) for datasets with a
    validation_split; regularisation images always train."""
    import dataclasses

    groups: dict[tuple[int, int], list[ImageRecord]] = {}
    for rec in records:
        spec = datasets[rec.dataset]
        if spec.validation_split > 0 and not rec.is_reg:
            groups.setdefault((rec.dataset, rec.subset), []).append(rec)
    held: set[int] = set()
    for (d, _), recs in groups.items():
        spec = datasets[d]
        by_name = {str(r.path): r for r in recs}
        own_seed = spec.validation_seed if spec.validation_seed is not None else seed
        _, val = split_names(list(by_name), spec.validation_split, own_seed)
        held |= {id(by_name[name]) for name in val}
    train = [r for r in records if id(r) not in held]
    validation = [dataclasses.replace(r, num_repeats=1) for r in records if id(r) in held]
    return train, validation


def should_validate(cfg: TrainConfig, *, step: int | None = None, epoch: int | None = None) -> bool:
    """kohya's rule: after step N when N % validate_every_n_steps == 0; after epoch E (1-based) when
    E % validate_every_n_epochs == 0, or every epoch when that is unset."""
    if step is not None:
        n = cfg.validate_every_n_steps
        return n is not None and n != 0 and step % n == 0
    n = cfg.validate_every_n_epochs
    return epoch is not None and (not n or epoch % n == 0)


def validation_loss(
    ctx: StepContext, batches: Iterable[Batch], *, max_batches: int | None, seed: int
) -> float:
    """The mean loss over the validation batches and kohya's timesteps (no gradients)."""
    import dataclasses

    import torch

    from sdprep.train.loop.step import batch_loss

    lo, hi = ctx.timestep_range
    generator = torch.Generator().manual_seed(seed)
    losses = []
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            for t in validation_timesteps(lo, hi):
                fixed = dataclasses.replace(ctx, generator=generator, fixed_timestep=t, rank=0, world=1)
                losses.append(float(batch_loss(fixed, batch)))
    return sum(losses) / len(losses) if losses else float("nan")
