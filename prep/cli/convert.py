"""`sdprep convert`: normalise image formats for training (originals kept in the journal)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sdprep.clitools import dataset_argument, field_option, finish, options_from, parallel_options, run_stage

OPTIONS = "sdprep.prep.convert:ConvertOptions"


@click.command("convert")
@dataset_argument("Convert images in subfolders too.")
@click.option(
    "--format",
    type=click.Choice(["png", "jpg", "webp"]),
    default=None,
    help="Re-encode every image to this format (default: keep PNG/JPEG/WebP, others become PNG).",
)
@field_option(OPTIONS, "quality", "--quality", type=int, help="JPEG/WebP quality (1-100).")
@click.option("--flatten", default=None, metavar="COLOR", help="Flatten transparency onto COLOR.")
@click.option("--keep-alpha", is_flag=True, help="Keep transparency (an error with --format jpg).")
@parallel_options(OPTIONS)
@click.pass_context
def command(ctx: click.Context, /, directory: Path, flatten: str | None, **kw: Any) -> None:
    """Normalise the images of DIRECTORY: format, first frame, EXIF rotation, transparency.

    Only images that need it are re-encoded (animated images keep their first frame, rotations
    stored in EXIF are baked into the pixels). When the extension changes the sidecar follows;
    the originals stay in the journal until `sdprep gc` (`sdprep undo` brings them back).
    Images kept as they are are still decoded to the end: a truncated or corrupt file is listed
    as failed and left untouched (files already checked are remembered in DIR/.sdprep/).

    \b
    Example:
      sdprep convert data/ --format png
      sdprep convert data/ --format jpg --quality 92 --flatten white
    """
    from sdprep.images import parse_color
    from sdprep.prep.convert import ConvertOptions, run_convert

    opts = options_from(ConvertOptions, kw, flatten=parse_color(flatten) if flatten else None)
    finish(run_stage(ctx, run_convert, directory, opts))
