"""Deterministic crash points for the crash-safety tests (inactive unless SDPREP_TEST_PAUSE is set).

`SDPREP_TEST_PAUSE=KIND:N:MARKER` makes the process stop at the N-th time it reaches the pause
point KIND: it writes its pid to the file MARKER and sleeps until it is killed. A test waits for
the marker, then sends SIGKILL, so the kill lands at a known place instead of wherever a timer
happens to fall. Kinds: "change" (before each file change a journalled operation makes) and
"save" (inside a training save, after some of its files are written) and "swap" (between
the two renames of `fileops.atomic_write_dir`'s fallback, where an old folder is moved aside).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

ENV = "SDPREP_TEST_PAUSE"
_seen: Counter[str] = Counter()


def pause_point(kind: str) -> None:
    """Stop here (forever) when SDPREP_TEST_PAUSE asks for this kind and count; else return at once."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    want, n, marker = spec.split(":", 2)
    if want != kind:
        return
    _seen[kind] += 1
    if _seen[kind] != int(n):
        return
    Path(marker).write_text(str(os.getpid()))
    while True:  # pragma: no cover - ended by the test's SIGKILL
        time.sleep(1)
