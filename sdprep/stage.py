"""The one way a prep stage runs: its dataset's images (`dataset_items`), one pass over them with a
progress bar and per-file failures (`each_item` over `map_items`), and a result that counts
changed / skipped / failed with the reason per file (`StageResult`)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable, Iterator, Sized
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sdprep.dataset import Item, OnClash, discover, require_images
from sdprep.errors import SdprepError, from_os_error
from sdprep.progress import Reporter

if TYPE_CHECKING:
    from sdprep.executors import Executor

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
    details: dict[str, Any] = field(default_factory=dict)  # a stage's own data for its command (JSON-like)

    def fail(self, path: Path | str, reason: str) -> None:
        keep = isinstance(path, str) and "://" in path  # a URL is not a path: Path() would mangle it
        self.failed.append(Failure(path if keep else Path(path), reason))

    def fail_error(self, path: Path | str, exc: Exception) -> None:
        """Record `exc` as the failure of the file at `path` (see `failure_reason`)."""
        self.fail(path, failure_reason(path, exc))

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        """One line for the terminal: `tag: 12 changed, 3 skipped, 1 failed`."""
        line = f"{self.stage}: {self.changed} changed, {self.skipped} skipped, {len(self.failed)} failed"
        lines = [line, *self.notes]
        lines += [f"  failed: {f.path}: {f.reason}" for f in self.failed]
        return "\n".join(lines)


def failure_reason(path: Path | str, exc: Exception) -> str:
    """Why the file at `path` failed, from the error it raised: an SdprepError's reason, or the file
    system's for an OSError. When the error is about another file (the image's caption, sidecar or
    mask), the reason starts with that file's path from the folder of `path`."""
    if isinstance(exc, OSError):
        exc = from_os_error(exc, path)
    reason = exc.reason if isinstance(exc, SdprepError) else str(exc)
    where = exc.path if isinstance(exc, SdprepError) else None
    if where is not None and Path(where) != Path(path):
        reason = f"{os.path.relpath(where, Path(path).parent)}: {reason}"
    return reason


# -- --workers: one meaning in every command ---------------------------------------------------

MAX_WORKERS = 64
WORKERS_HELP = (
    "Images worked on at once, in threads (reading, decoding, hashing, encoding); 0 = auto "
    "(up to 4, as the machine has cores). A model that runs one image at a time uses one."
)


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last may be shorter), read from `items` as they are needed."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def worker_count(workers: int, auto: int | None = None) -> int:
    """The threads of a stage's pass for `--workers N`: N, or for 0 the stage's own choice `auto`
    (default: up to 4, as many as the machine has cores)."""
    if workers > 0:
        return workers
    return auto if auto is not None else min(4, os.cpu_count() or 1)


# File-system errors that are about the disk, not one file: the run stops instead of listing them all.
WHOLE_RUN_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def call_item(fn: Callable[[T], R], item: T) -> R | SdprepError:
    """`fn(item)`, or the per-file error it raised as a value (see `map_items`)."""
    try:
        return fn(item)
    except SdprepError as exc:
        return exc
    except OSError as exc:
        if exc.errno in WHOLE_RUN_ERRNOS:
            raise  # every next file would fail the same way: stop (the CLI says how to go on)
        return from_os_error(exc, getattr(item, "path", None))


def map_items(
    fn: Callable[[T], R], items: Iterable[T], workers: int = 1
) -> Iterator[tuple[T, R | SdprepError]]:
    """Apply `fn` to each item, in order, serially or in a thread pool; SdprepErrors become values.

    Per-file errors must never stop a run of 10,000 files, so a raised SdprepError, or an OSError
    about one file (name too long, permission denied, I/O error), is yielded in place of the
    result. Other exceptions are bugs and propagate.
    """

    def call(item: T) -> R | SdprepError:
        return call_item(fn, item)

    if workers <= 1:
        for item in items:
            yield item, call(item)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        window: list[tuple[T, Future[R | SdprepError]]] = []
        for item in items:
            window.append((item, pool.submit(call, item)))
            if len(window) >= workers * 4:
                it, fut = window.pop(0)
                yield it, fut.result()
        for it, fut in window:
            yield it, fut.result()


def dataset_items(
    root: Path | str, recursive: bool = False, on_clash: OnClash | None = None
) -> tuple[Path, list[Item]]:
    """The dataset folder, checked (it exists and holds images: `require_images`), and its images.

    With `on_clash` (usually the result's `fail`), images that share a stem with another (a.png and
    a.jpg would share one caption file and one mask) are left out and reported to it.
    """
    root = require_images(root, recursive)
    return root, discover(root, recursive, on_clash)


@contextmanager
def progress(report: Reporter, total: int | None, description: str) -> Iterator[Reporter]:
    """A progress bar for one pass of a stage: started, and finished however the pass ends."""
    report.start(total, description)
    try:
        yield report
    finally:
        report.finish()


def _path_of(item: Any) -> Path:
    path: Path = item.path  # an Item, or anything else with a path
    return path


def each_item(
    fn: Callable[[T], R],
    items: Iterable[T],
    result: StageResult,
    report: Reporter,
    description: str | None,
    *,
    workers: int = 1,
    total: int | None = None,
    path_of: Callable[[T], Path] = _path_of,
    stop: tuple[type[SdprepError], ...] = (),
    on_error: Callable[[T, SdprepError], bool] | None = None,
    executor: Executor | None = None,
    gpu: bool = False,
) -> Iterator[tuple[T, R]]:
    """One pass of a stage: `fn` over `items` (`map_items`), the bar advanced per item, an error
    recorded in `result` as the failure of the file `path_of(item)`; yields (item, what fn returned)
    for the items that worked.

    `description`: the bar's title (None: the caller runs the bar, e.g. over several folders);
    `total` defaults to `len(items)`. `on_error(item, error)` sees each error first and returns True
    when it dealt with it (then it is no failure). An error of a type in `stop` ends the run: a
    model that cannot load is no one file's fault.

    `executor` (sdprep/executors.py) decides where `fn` runs: None or local = `map_items` with
    `workers` threads; ray = batches on a Ray cluster (`gpu`: `fn` runs a model that wants a GPU),
    with the throughput added to the result's notes.
    """
    mapped = _mapped(fn, items, workers, executor, gpu)
    if description is None:
        yield from _each(mapped, result, report, path_of, stop, on_error)
    else:
        if total is None and isinstance(items, Sized):
            total = len(items)
        with progress(report, total, description):
            yield from _each(mapped, result, report, path_of, stop, on_error)
    line = executor.summary() if executor is not None else None
    if line:
        result.notes.append(line)


def _mapped(
    fn: Callable[[T], R], items: Iterable[T], workers: int, executor: Executor | None, gpu: bool
) -> Iterator[tuple[T, R | SdprepError]]:
    if executor is None or executor.local:
        return map_items(fn, items, workers)
    return executor.map(fn, items, workers=workers, gpu=gpu)


def _each(
    mapped: Iterator[tuple[T, R | SdprepError]],
    result: StageResult,
    report: Reporter,
    path_of: Callable[[T], Path],
    stop: tuple[type[SdprepError], ...],
    on_error: Callable[[T, SdprepError], bool] | None,
) -> Iterator[tuple[T, R]]:
    for item, out in mapped:
        report.advance()
        if not isinstance(out, SdprepError):
            yield item, out
        elif isinstance(out, stop):
            raise out
        elif on_error is None or not on_error(item, out):
            result.fail_error(path_of(item), out)
