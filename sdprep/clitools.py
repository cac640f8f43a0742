"""Small helpers shared by the thin click commands: reporters, results, common options."""

from __future__ import annotations

import click

from sdprep.progress import NullReporter, Reporter, RichReporter
from sdprep.stage import StageResult


def reporter(ctx: click.Context | None = None) -> Reporter:
    """A rich progress reporter on stderr, or a silent one under `sdprep -q`."""
    ctx = ctx or click.get_current_context(silent=True)
    quiet = bool(ctx and ctx.obj is not None and getattr(ctx.obj, "quiet", False))
    return NullReporter() if quiet else RichReporter()


def verbosity(ctx: click.Context | None = None) -> int:
    ctx = ctx or click.get_current_context(silent=True)
    return int(getattr(ctx.obj, "verbose", 0)) if ctx and ctx.obj is not None else 0


def finish(result: StageResult) -> None:
    """Print a stage's summary to stdout and exit 1 when any file failed."""
    click.echo(result.summary())
    if result.failed:
        raise click.exceptions.Exit(1)
