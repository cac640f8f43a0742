"""`sdprep report`: thin command over sdprep.prep.report.run_report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sdprep.clitools import dataset_argument, field_option, options_from, reporter

OPTIONS = "sdprep.prep.report:ReportOptions"


@click.command("report")
@dataset_argument()
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Report file (default DIR/report.html).",
)
@field_option(OPTIONS, "format", "--format", type=click.Choice(["html", "json"]), help="Report format.")
@click.option("--recursive/--no-recursive", default=True, show_default=True, help="Include subfolders.")
@click.option("--tokenizer", help="Model folder or hub id whose CLIP tokenizer counts caption tokens.")
@field_option(OPTIONS, "max_thumbs", "--max-thumbs", type=int, help="Thumbnails for at most N images.")
@click.pass_context
def command(ctx: click.Context, /, directory: Path, **kw: Any) -> None:
    """Write a self-contained HTML (or JSON) report of the dataset in DIRECTORY.

    Contact sheet with captions and labelled mask overlays, tag frequencies, caption lengths,
    resolution and aspect histograms, buckets (with the settings the dataset was bucketed with,
    linked to the bucket preview sheets), monochrome share and captions whose monochrome tags the
    colour check contradicts, duplicates and images with problems. An empty folder is an error.

    \b
    Example:
      sdprep report data/ -o data_report.html
      sdprep report data/ --format json -o report.json
    """
    from sdprep.prep.report import ReportOptions, run_report

    opts = options_from(ReportOptions, kw)
    result = run_report(directory, opts, report=reporter(ctx))
    click.echo("\n".join(result.notes))
    if result.failed:
        raise click.exceptions.Exit(1)  # the report is written; unreadable files are named above
