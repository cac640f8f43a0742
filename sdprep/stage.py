"""The shape every prep stage shares: a result that counts changed / skipped / failed, and `map_items`."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from sdprep.errors import SdprepError, from_os_error

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Failure:
    path: Path | str  # a str for things that are not files (URLs)
    reason: str


@dataclass
class StageResult:
    """What a stage did: counts, per-file failures with reasons, and short notes for the summary."""

    stage: str
    changed: int = 0
    skipped: int = 0
    failed: list[Failure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def fail(self, path: Path | str, reason: str) -> None:
        keep = isinstance(path, str) and "://" in path  # a URL is not a path: Path() would mangle it
        self.failed.append(Failure(path if keep else Path(path), reason))

    def fail_error(self, path: Path | str, exc: Exception) -> None:
        """Record `exc` as the failure of the image at `path`; when the error is about another file
        (its caption, sidecar or mask) the reason starts with that file's path from the image's folder."""
        reason = getattr(exc, "reason", None) or getattr(exc, "message", None) or str(exc)
        where = getattr(exc, "path", None)
        if where is not None and Path(where) != Path(path):
            reason = f"{os.path.relpath(where, Path(path).parent)}: {reason}"
        self.fail(path, reason)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        """One line for the terminal: `tag: 12 changed, 3 skipped, 1 failed`."""
        line = f"{self.stage}: {self.changed} changed, {self.skipped} skipped, {len(self.failed)} failed"
        lines = [line, *self.notes]
        lines += [f"  failed: {f.path}: {f.reason}" for f in self.failed]
        return "\n".join(lines)


# File-system errors that are about the disk, not one file: the run stops instead of listing them all.
WHOLE_RUN_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def map_items(
    fn: Callable[[T], R], items: Iterable[T], workers: int = 1
) -> Iterator[tuple[T, R | SdprepError]]:
    """Apply `fn` to each item, in order, serially or in a thread pool; SdprepErrors become values.

    Per-file errors must never stop a run of 10,000 files, so a raised SdprepError, or an OSError
    about one file (name too long, permission denied, I/O error), is yielded in place of the
    result. Other exceptions are bugs and propagate.
    """

    def call(item: T) -> R | SdprepError:
        try:
            return fn(item)
        except SdprepError as exc:
            return exc
        except OSError as exc:
            if exc.errno in WHOLE_RUN_ERRNOS:
                raise  # every next file would fail the same way: stop (the CLI says how to go on)
            return from_os_error(exc, getattr(item, "path", None))

    if workers <= 1:
        for item in items:
            yield item, call(item)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        window: list = []
        for item in items:
            window.append((item, pool.submit(call, item)))
            if len(window) >= workers * 4:
                it, fut = window.pop(0)
                yield it, fut.result()
        for it, fut in window:
            yield it, fut.result()
