"""Ctrl-C during training: finish the current step, save the state, stop (a second Ctrl-C stops at once)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class StopRequest:
    """A flag the training loop checks between steps; set by the first SIGINT while caught."""

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def catch_interrupt(self, enabled: bool = True) -> Iterator[None]:
        """Turn the first Ctrl-C into `requested = True`; the next one raises KeyboardInterrupt as usual.

        Only in the main thread (signal handlers live there) and when `enabled`; otherwise a no-op.
        """
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def first(signum: int, frame: FrameType | None) -> None:
            self.requested = True
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the second one is not polite

        signal.signal(signal.SIGINT, first)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
