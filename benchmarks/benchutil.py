"""What the benchmarks share: reading this process's peak memory correctly."""

from __future__ import annotations

import resource


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
