"""Repeats for `sdprep bucket` (pure functions): per concept, and for regularisation images as
kohya sd-scripts' DreamBoothDataset balances them (kohya-formats.md)."""

from __future__ import annotations

import math


def compute_repeats(
    sizes: list[int],
    *,
    repeats: int | None,
    target_steps: int | None,
    batch_size: int,
    balance: bool,
    fixed: list[int | None] | None = None,
) -> list[int]:
    """Repeats per concept: fixed, from a target number of steps per epoch, and/or balanced by size.

    - `repeats` sets every concept (except those with a fixed value, e.g. a tier);
    - `target_steps` chooses repeats so one epoch is about that many steps at `batch_size`;
    - `balance` makes every concept contribute about the same number of samples per epoch
      (the largest concept keeps the base repeats, smaller ones get proportionally more).
    """
    fixed = fixed or [None] * len(sizes)
    base = repeats or 1
    out = []
    largest = max(sizes) if sizes else 1
    for n, fix in zip(sizes, fixed):
        if fix is not None:
            out.append(fix)
        elif balance:
            out.append(max(1, round(base * largest / max(n, 1))))
        else:
            out.append(base)
    if target_steps:
        free = [i for i, f in enumerate(fixed) if f is None]
        fixed_samples = sum(sizes[i] * out[i] for i in range(len(sizes)) if fixed[i] is not None)
        free_samples = sum(sizes[i] * out[i] for i in free)
        wanted = target_steps * batch_size - fixed_samples
        if free and free_samples > 0:
            scale = max(wanted, 1) / free_samples
            for i in free:
                out[i] = max(1, round(out[i] * scale))
    return out


def balance_reg_repeats(train_samples: int, reg_sizes: list[int]) -> list[int]:
    """Regularisation repeats so that kohya registers every reg image and tops the repeats up to
    exactly the training samples: the largest repeats with reg samples <= training samples (kohya
    stops registering reg images once they reach the training samples, see `kohya_reg_use`)."""
    total = sum(reg_sizes)
    if total == 0:
        return [1] * len(reg_sizes)
    return [max(1, train_samples // total)] * len(reg_sizes)


def kohya_reg_use(train_samples: int, reg: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """What kohya's DreamBoothDataset registers of reg subsets (images, repeats), in TOML order, in a
    dataset with `train_samples` training samples: per subset (images used, samples per epoch).

    Its rule: register reg images one by one, each with its subset's repeats, until the reg samples
    reach the training samples; if all are registered and still short, add one repeat to one image
    at a time, in order, until they match. No training samples: no reg image is used.
    """
    used = [0] * len(reg)
    samples = [0] * len(reg)
    n = 0
    for i, (count, repeats) in enumerate(reg):
        take = min(count, max(0, math.ceil((train_samples - n) / repeats))) if repeats > 0 else 0
        used[i], samples[i] = take, take * repeats
        n += take * repeats
    images = sum(used)
    if n < train_samples and images:  # the second loop: +1 per image in order, cycling
        short = train_samples - n
        rounds, rest = divmod(short, images)
        for i in range(len(reg)):
            samples[i] += rounds * used[i] + min(rest, used[i])
            rest -= min(rest, used[i])
    return list(zip(used, samples))
