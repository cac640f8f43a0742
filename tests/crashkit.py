"""Run the sdprep CLI in real processes, stop them at a chosen pause point and SIGKILL them.

Imported by the crash and journal-safety tests. `SDPREP_TEST_PAUSE` (sdprep/faults.py) makes the
process stop at the N-th pause point of a kind; the test then kills it from outside, so the kill
lands at a known place instead of wherever a timer happens to fall.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest


def cli_env(**extra: str) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)


def sdprep(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`sdprep -q ARGS` in a new process (its output captured)."""
    cmd = [sys.executable, "-m", "sdprep.cli", "-q", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(**(env_extra or {})), timeout=300)


@contextmanager
def paused(args: list[str], kind: str, n: int, tmp: Path, env_extra: dict[str, str] | None = None):
    """`sdprep ARGS` stopped at its N-th pause point KIND; yields the process, SIGKILLs it after."""
    marker = tmp / f"paused-{kind}-{n}-{time.monotonic_ns()}"
    env = cli_env(SDPREP_TEST_PAUSE=f"{kind}:{n}:{marker}", **(env_extra or {}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdprep.cli", "-q", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                pytest.fail(
                    f"sdprep {' '.join(args)} ended (exit {proc.returncode}) before pause {n}:\n{out}"
                )
            assert time.monotonic() < deadline, "the pause point was never reached"
            time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


def kill_at(args: list[str], kind: str, n: int, tmp: Path) -> None:
    """Run `sdprep ARGS` until it reaches pause point KIND for the N-th time, then SIGKILL it."""
    with paused(args, kind, n, tmp) as proc:
        pass
    assert proc.returncode == -signal.SIGKILL
