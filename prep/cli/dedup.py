"""`sdprep dedup`: move perceptual duplicates aside, keeping the best copy (undoable)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sdprep.clitools import dataset_argument, field_option, finish, options_from, parallel_options, run_stage

OPTIONS = "sdprep.prep.dedup:DedupOptions"


@click.command("dedup")
@dataset_argument("Include subfolders (duplicates across folders too).")
@field_option(
    OPTIONS,
    "threshold",
    "--threshold",
    type=int,
    help="Largest pHash Hamming distance (0-32 of 64 bits) counted as a duplicate; 0 = near-identical only.",
)
@click.option("--dry-run", is_flag=True, help="List the groups and change nothing.")
@parallel_options(OPTIONS)
@click.pass_context
def command(ctx: click.Context, /, directory: Path, **kw: Any) -> None:
    """Find duplicate and near-duplicate images in DIRECTORY by perceptual hash.

    In each group the largest image is kept (then the sharpest); the others move to
    DIRECTORY/duplicates/ with their captions, sidecars and masks. `sdprep undo` puts them back.

    \b
    Example:
      sdprep dedup data/ --dry-run
      sdprep dedup data/ --threshold 4
    """
    from sdprep.prep.dedup import DedupOptions, run_dedup

    opts = options_from(DedupOptions, kw)
    result = run_stage(ctx, run_dedup, directory, opts)
    for keep, dups in result.details["groups"]:
        click.echo(f"keep {keep.relative_to(directory)}")
        for path, dist in dups:
            click.echo(
                f"  {'duplicate' if opts.dry_run else 'moved'} {path.relative_to(directory)} (distance {dist})"
            )
    finish(result)
