"""`sdprep review`: serve the local review page of a dataset until Ctrl-C."""

from __future__ import annotations

from pathlib import Path

import click

from sdprep.clitools import dataset_argument


@click.command("review")
@dataset_argument("Review images in subfolders too (kohya repeat folders).")
@click.option(
    "--port", default=0, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free port)."
)
@click.option("--no-browser", is_flag=True, help="Print the URL only; do not open a browser.")
@click.option(
    "--host",
    default=None,
    metavar="ADDRESS",
    help="Listen on this address instead of 127.0.0.1 (e.g. 0.0.0.0); the URL's token is still required.",
)
def command(directory: Path, recursive: bool, port: int, no_browser: bool, host: str | None) -> None:
    """Open a local web page to look at, fix and approve the images of DIRECTORY.

    A grid of images with their captions as tags; filters (tag, text, mask, monochrome, problems);
    caption editing; tags added, removed or renamed on a selection or everywhere; images excluded
    (moved to DIRECTORY/excluded/); captions re-made from stored WD14 scores with live thresholds;
    a clean rules file previewed per image, then applied; masks painted. Every change is one
    journalled step: the page's Undo button or `sdprep undo DIRECTORY` restores it exactly.
    The page listens on 127.0.0.1 only, behind a random token printed with its URL.

    \b
    Example:
      sdprep review data/
      sdprep review data/ -r --port 8765 --no-browser
    """
    from sdprep.prep.review.server import serve

    serve(directory, recursive=recursive, host=host, port=port, open_browser=not no_browser, echo=click.echo)
