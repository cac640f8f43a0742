"""What the benchmarks share: reading this process's peak memory correctly, fresh folders and
random captions for the synthetic datasets."""

from __future__ import annotations

import random
import resource
import shutil
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    Linux's VmHWM, not `ru_maxrss`: a benchmark child started with fork+exec keeps the parent's
    `ru_maxrss` (the kernel carries the old peak over exec), so a parent that grew while preparing
    data would be counted in the child's figure.
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def empty_folder(root: Path) -> None:
    """`root` as a new, empty folder (whatever an earlier run left there is removed)."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)


def random_caption(rng: random.Random, vocab: list[str], most: int) -> str:
    """A caption line: "1girl, solo" and 13 to `most` tags drawn from `vocab`."""
    tags = ["1girl", "solo", *rng.sample(vocab, rng.randint(13, most))]
    return ", ".join(tags) + "\n"
