"""`sdprep mask`: masks for masked-loss training (generate, import, check)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sdprep.clitools import (
    dataset_argument,
    field_option,
    finish,
    options_from,
    parallel_options,
    reporter,
    run_stage,
)

OPTIONS = "sdprep.prep.mask:MaskOptions"
SETTINGS = "sdprep.prep.masks.base:MethodSettings"
POST = "sdprep.prep.masks.postprocess:PostOptions"

METHODS = ("alpha", "face", "clipseg", "color", "import", "full")


@click.command("mask")
@dataset_argument("Include subfolders (each gets its own mask folder).")
@click.option("-m", "--method", type=click.Choice(METHODS), help="How to make the masks.")
@click.option("--check", is_flag=True, help="Check the masks of DIRECTORY instead and draw a preview sheet.")
@field_option(OPTIONS, "out", "--out", help='Mask folder beside the images ("masks_<name>" too).')
@click.option(
    "-p", "--prompt", "prompts", multiple=True, help="clipseg: what to learn, e.g. head (repeatable)."
)
@field_option(SETTINGS, "model", "--model", help="clipseg: hub id or folder.")
@field_option(SETTINGS, "cascade", "--cascade", help="face: cascade XML (default: OpenCV's frontal face).")
@field_option(SETTINGS, "pad", "--pad", type=float, help="face: box padding, fraction of the box.")
@click.option(
    "--color", "color", default=None, help='color: background colour ("#ffffff", "white"; default: border).'
)
@field_option(SETTINGS, "tolerance", "--tolerance", type=float, help="color: RGB distance still background.")
@click.option("--border-only", is_flag=True, help="color: only background regions touching the border.")
@click.option(
    "--from",
    "source",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="import: folder of painted masks (same stem as the images, red channel read).",
)
@field_option(POST, "threshold", "--threshold", type=float, help="Binarise: >= T (0-1) becomes white.")
@field_option(POST, "grow", "--grow", type=int, help="Widen white areas by N px.")
@field_option(POST, "shrink", "--shrink", type=int, help="Narrow white areas by N px.")
@field_option(POST, "feather", "--feather", type=float, help="Soften edges over about R px.")
@click.option("--invert", is_flag=True, help="Swap learned and ignored areas.")
@field_option(
    POST, "floor", "--floor", type=float, help="Smallest weight, 0-1 (OneTrainer's unmasked weight)."
)
@click.option(
    "--combine", type=click.Choice(["union", "intersection"]), help="Merge with the mask already there."
)
@click.option(
    "--fallback",
    type=click.Choice(["full"]),
    help="Where the method finds nothing: an all-white mask (alpha: opaque images need none, they are "
    "skipped and trained whole).",
)
@click.option("--force", is_flag=True, help="Redo masks that are up to date.")
@parallel_options(OPTIONS)
@click.option(
    "--preview", type=click.Path(dir_okay=False, path_type=Path), help="--check: preview sheet PNG path."
)
@click.pass_context
def command(ctx: click.Context, /, directory: Path, method: str | None, check: bool, **kw: Any) -> None:
    """Write one mask per image of DIRECTORY for masked-loss training, or check them with --check.

    Masks are greyscale PNGs in DIRECTORY/masks/<stem>.png, the image's pixel size: white = full
    loss, black = none, grey = partial (kohya's conditioning_data_dir; only the red channel is read).
    Post-processing runs in this order: threshold, invert, grow, shrink, feather, combine, floor.
    Each mask is recorded in the image's sidecar; a rerun skips what is up to date, and
    `sdprep undo DIRECTORY` removes what a run wrote.

    \b
    Example:
      sdprep mask data/ --method face --pad 0.3 --feather 12 --fallback full
      sdprep mask data/ --method clipseg --prompt head --threshold 0.4 --grow 8
      sdprep mask data/ --method import --from painted/
      sdprep mask --check data/
    """
    if check:
        _check(ctx, directory, kw["out"], kw["recursive"], kw["preview"])
        return
    if method is None:
        raise click.UsageError("give --method (alpha, face, clipseg, color, import, full) or --check")
    from sdprep.prep.mask import MaskOptions, run_mask
    from sdprep.prep.masks.base import MethodSettings
    from sdprep.prep.masks.postprocess import PostOptions

    settings = options_from(MethodSettings, kw, prompts=tuple(kw["prompts"]))
    post = options_from(PostOptions, kw)
    opts = options_from(MaskOptions, kw, method=method, settings=settings, post=post)
    finish(run_stage(ctx, run_mask, directory, opts))


def _check(ctx: click.Context, directory: Path, out: str, recursive: bool, preview: Path | None) -> None:
    from sdprep.prep.mask import check_out_dir
    from sdprep.prep.mask_check import check_masks

    report = check_masks(
        directory, check_out_dir(out), recursive=recursive, preview=preview or True, report=reporter(ctx)
    )
    click.echo(report.summary())
    if report.problems:
        raise click.exceptions.Exit(1)
