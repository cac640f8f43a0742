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


ZYGOTE = Path(__file__).with_name("zygote.py")


class Zygote:
    """A fork server (tests/zygote.py): each CLI run is a fork of one warm interpreter, so a test can
    afford dozens of real processes killed at random places per command."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.proc = subprocess.Popen(
            [sys.executable, str(ZYGOTE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=cli_env(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost"),  # loopback servers
        )
        self._buf = b""
        self._n = 0
        assert self._line(120) == {"ready": True}

    def _line(self, timeout: float) -> dict | None:
        """The next JSON line from the server, or None when none came within `timeout` seconds."""
        import json
        import select

        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    raise RuntimeError("the fork server died")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _start(self, args: list[str], env: dict[str, str]) -> tuple[int, Path]:
        import json

        self._n += 1
        out = self.workdir / f"run-{self._n}.log"
        request = {"args": [str(a) for a in args], "env": env, "out": str(out)}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        reply = self._line(60)
        assert reply and "pid" in reply, reply
        return reply["pid"], out

    def run(self, args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, int]:
        """Run `sdprep -q ARGS` to its end: (exit code, output, pause points passed)."""
        env = dict(env or {})
        env.setdefault("SDPREP_TEST_PAUSE", f"any:{10**9}:{self.workdir / 'never'}")  # count only
        _, out = self._start(args, env)
        reply = self._line(600)
        assert reply is not None, f"sdprep {args} did not finish"
        count = Path(str(out) + ".count")
        return (
            reply["status"],
            out.read_text(errors="replace"),
            int(count.read_text()) if count.exists() else 0,
        )

    def kill_at(self, args: list[str], n: int, kind: str = "any") -> bool:
        """Run `sdprep ARGS` until its N-th pause point KIND, then SIGKILL it.

        Returns False (and lets the run finish) when it ends before reaching point N.
        """
        self._n += 1
        marker = self.workdir / f"paused-{self._n}"
        pid, _ = self._start(args, {"SDPREP_TEST_PAUSE": f"{kind}:{n}:{marker}"})
        while True:
            if marker.exists():
                os.kill(pid, signal.SIGKILL)
                reply = self._line(60)
                assert reply == {"status": -signal.SIGKILL}, reply
                return True
            reply = self._line(0.01)
            if reply is not None:
                return False

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)
        if self.proc.stdout:
            self.proc.stdout.close()
