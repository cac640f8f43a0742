"""The progress bars: a stage's (RichReporter) and training's (RichCallbacks) are one layout."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import TextColumn

from sdprep.progress import RichReporter, rich_bar


def test_rich_bar_columns_in_order() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    bar = rich_bar(console, "training", TextColumn("loss {task.fields[loss]}"))
    task = bar.add_task("train", total=10, loss="0.5000")
    bar.update(task, completed=3)
    console.print(bar.get_renderable())
    line = out.getvalue().splitlines()[-1]
    parts = ["training", "3/10", "loss 0.5000", "eta"]
    positions = [line.find(p) for p in parts]
    assert -1 not in positions, line
    assert positions == sorted(positions), line


def test_rich_reporter_counts_and_finishes() -> None:
    report = RichReporter()
    report.console = Console(file=io.StringIO(), force_terminal=True, width=120, color_system=None)
    report.start(4, "tag")
    report.advance(3)
    assert report._progress is not None
    assert report._progress.tasks[0].completed == 3
    assert report._progress.tasks[0].description == "tag"
    report.finish()
    assert report._progress is None
    report.advance()  # after finish: nothing to advance, no error
