"""Progress reporting through an injected reporter, so a CLI shows a bar and a test can listen."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # rich is imported when a bar is made (`sdprep --help` stays light)
    from rich.console import Console
    from rich.progress import Progress, ProgressColumn, TaskID


class Reporter(Protocol):
    """What long-running library code calls; the CLI passes a rich bar, tests a recorder."""

    def start(self, total: int | None, description: str) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def note(self, message: str) -> None: ...
    def finish(self) -> None: ...


class NullReporter:
    """Reports nothing (library default)."""

    def start(self, total: int | None, description: str) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def finish(self) -> None:
        pass


class RecordingReporter(NullReporter):
    """Keeps what was reported; for tests and for callers that print notes later."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.done = 0
        self.notes: list[str] = []

    def start(self, total: int | None, description: str) -> None:
        self.total, self.done = total, 0

    def advance(self, n: int = 1) -> None:
        self.done += n

    def note(self, message: str) -> None:
        self.notes.append(message)


def rich_bar(console: Console, title: str, *middle: ProgressColumn, **kwargs: Any) -> Progress:
    """sdprep's progress bar: `title`, the bar, done/total, the `middle` columns (e.g. the loss),
    elapsed time and ETA; `kwargs` go to rich's Progress. Not started yet."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(title),
        BarColumn(),
        MofNCompleteColumn(),
        *middle,
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        **kwargs,
    )


class RichReporter:
    """A rich progress bar on stderr with counts, rate and ETA; notes are printed above it."""

    def __init__(self, quiet: bool = False) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.quiet = quiet
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def start(self, total: int | None, description: str) -> None:
        self.finish()
        if self.quiet:
            return
        self._progress = rich_bar(
            self.console,
            "{task.description}",
            transient=False,
            disable=not self.console.is_terminal,  # no bar in logs or pipes
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def note(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False)

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
