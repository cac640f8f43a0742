"""`sdprep rename`: sequential names, lower-case extensions, companions follow, undoable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sdprep.clitools import dataset_argument, field_option, finish, options_from, reporter

OPTIONS = "sdprep.prep.rename:RenameOptions"


@click.command("rename")
@dataset_argument("Rename in subfolders too (numbered per folder).")
@click.option(
    "--pattern",
    default=None,
    help="Name pattern over {n} (index), {token}, {stem} (old name), {folder}; default 001, 002...",
)
@click.option("--token", default=None, help="Value of {token} (default: the kohya folder's class tokens).")
@field_option(OPTIONS, "start", "--start", type=int, help="First number.")
@click.option("--dry-run", is_flag=True, help="Print the plan and change nothing.")
@click.pass_context
def command(ctx: click.Context, /, directory: Path, **kw: Any) -> None:
    """Give the images of DIRECTORY sequential names; captions, sidecars and masks follow.

    Extensions become lower case and .jpeg becomes .jpg. The rename is two-phase (no collision can
    overwrite a file) and `sdprep undo DIRECTORY` restores the old names.

    \b
    Example:
      sdprep rename data/ --dry-run
      sdprep rename data/ --pattern "{token}_{n:04d}" --token nazuna
    """
    from sdprep.prep.rename import RenameOptions, run_rename

    opts = options_from(RenameOptions, kw)
    result = run_rename(directory, opts, report=reporter(ctx))
    if opts.dry_run:
        for src, dst in result.details["plan"]:
            click.echo(f"{src.relative_to(directory)} -> {dst.relative_to(directory)}")
    finish(result)
