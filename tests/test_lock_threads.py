"""The dataset lock is re-entrant per process: several threads of one process share it safely.

`_held` (the lock's descriptor and depth per dataset) is process-global; without a guard two threads
both see the dataset unlocked, open the lock file twice and the second is refused as "another sdprep
command" (itself), or a depth update is lost and the lock is released early or never.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

from sdprep import lock, state

THREADS = 6


def lock_is_free(root: Path) -> bool:
    fd = os.open(root / ".sdprep" / "lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_threads_entering_the_lock_together_share_it_and_release_it_once(tmp_path, monkeypatch):
    root = tmp_path / "data"
    root.mkdir()
    real_file = state.file

    def slow_file(*args, **kwargs):  # widens the window between "not held" and "held" to many switches
        time.sleep(0.05)
        return real_file(*args, **kwargs)

    monkeypatch.setattr(state, "file", slow_file)
    all_inside = threading.Barrier(THREADS, timeout=60)
    errors: list[BaseException] = []
    held_inside: list[bool] = []

    def work() -> None:
        try:
            with lock.dataset_lock(root, "demo"):
                for _ in range(50):  # nested re-entries race on the depth count
                    with lock.dataset_lock(root, "demo"):
                        pass
                all_inside.wait()  # every thread holds it at once
                held_inside.append(not lock_is_free(root))
                all_inside.wait()
        except BaseException as exc:
            errors.append(exc)
            all_inside.abort()

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert held_inside == [True] * THREADS
    assert lock._held == {}  # every entry counted out: nothing left held
    assert lock_is_free(root)  # and the OS lock released


def test_the_lock_is_held_until_the_last_thread_leaves(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    first_in, second_out = threading.Event(), threading.Event()

    def second() -> None:
        first_in.wait(60)
        with lock.dataset_lock(root, "demo"):
            pass
        second_out.set()

    t = threading.Thread(target=second)
    t.start()
    with lock.dataset_lock(root, "demo"):
        first_in.set()
        assert second_out.wait(60)
        assert not lock_is_free(root)  # the other thread's exit did not release it
    t.join(60)
    assert lock_is_free(root)
