"""Core commands that act on a dataset's journal: undo and gc."""

from __future__ import annotations

from pathlib import Path

import click

from sdprep import fileops


@click.command("undo")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--list", "list_only", is_flag=True, help="List the undoable operations, newest last.")
def undo_command(directory: Path, list_only: bool) -> None:
    """Undo the last sdprep operation on DIRECTORY, restoring every file it changed.

    \b
    Example:
      sdprep rename data/ && sdprep undo data/
    """
    journal = fileops.Journal(directory)
    if list_only:
        ops = journal.operations()
        for folder in ops:
            click.echo(f"{folder.name}: {journal.describe(folder)}")
        if not ops:
            click.echo("nothing to undo")
        return
    description, count = fileops.undo(directory)
    click.echo(f"undone: {description} ({count} changes reversed)")


@click.command("gc")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--keep", default=0, show_default=True, help="Keep the newest N operations undoable.")
def gc_command(directory: Path, keep: int) -> None:
    """Delete the undo journal of DIRECTORY and the original files it keeps (frees disk space).

    \b
    Example:
      sdprep gc data/ --keep 1
    """
    removed = fileops.gc(directory, keep=keep)
    click.echo(f"removed {removed} journalled operations")
