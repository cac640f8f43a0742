"""Deterministic crash and disk-full points for the crash-safety tests (inactive unless asked for).

`SDPREP_TEST_PAUSE=KIND:N:MARKER` makes the process stop at the N-th time it reaches the pause
point KIND: it writes its pid to the file MARKER and sleeps until it is killed. A test waits for
the marker, then sends SIGKILL, so the kill lands at a known place instead of wherever a timer
happens to fall. Kinds: "change" (before each file change a journalled operation makes), "write"
(inside an atomic write: the temporary file is written, not yet renamed into place), "begin"
(a journal operation folder is being created), "save" (inside a training save, after some of its
files are written) and "swap" (between the two renames of `fileops.atomic_write_dir`'s fallback,
where an old folder is moved aside). KIND "any" counts every point of every kind.

`SDPREP_TEST_FAIL=KIND:N:ERRNO` makes the N-th point of KIND and every later one raise
`OSError(ERRNO)` without a file name, as the OS does when a write hits a full disk (`write:5:ENOSPC`).
"""

from __future__ import annotations

import errno
import os
import time
from collections import Counter
from pathlib import Path

ENV = "SDPREP_TEST_PAUSE"
FAIL_ENV = "SDPREP_TEST_FAIL"
_seen: Counter[str] = Counter()
_failed: Counter[str] = Counter()


def pause_point(kind: str) -> None:
    """Stop here (forever), or fail, when the environment asks for this kind and count."""
    spec = os.environ.get(ENV)
    if spec:
        want, n, marker = spec.split(":", 2)
        if want in (kind, "any"):
            _seen[want] += 1
            if _seen[want] == int(n):
                Path(marker).write_text(str(os.getpid()))
                while True:  # pragma: no cover - ended by the test's SIGKILL
                    time.sleep(1)
    spec = os.environ.get(FAIL_ENV)
    if spec:
        want, n, code = spec.split(":", 2)
        if want in (kind, "any"):
            _failed[want] += 1
            if _failed[want] >= int(n):
                number = getattr(errno, code)
                raise OSError(number, os.strerror(number))
