"""`sdprep mask`: masks for masked-loss training (generate, import, check)."""

from __future__ import annotations

from pathlib import Path

import click

from sdprep.clitools import finish, reporter

METHODS = ("alpha", "face", "clipseg", "color", "import", "full")


@click.command("mask")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-m", "--method", type=click.Choice(METHODS), help="How to make the masks.")
@click.option("--check", is_flag=True, help="Check the masks of DIRECTORY instead and draw a preview sheet.")
@click.option(
    "--out", default="masks", show_default=True, help='Mask folder beside the images ("masks_<name>" too).'
)
@click.option(
    "-p", "--prompt", "prompts", multiple=True, help="clipseg: what to learn, e.g. head (repeatable)."
)
@click.option(
    "--model", default="CIDAS/clipseg-rd64-refined", show_default=True, help="clipseg: hub id or folder."
)
@click.option("--cascade", default=None, help="face: cascade XML (default: OpenCV's frontal face).")
@click.option(
    "--pad", default=0.25, show_default=True, type=float, help="face: box padding, fraction of the box."
)
@click.option(
    "--color", "color", default=None, help='color: background colour ("#ffffff", "white"; default: border).'
)
@click.option(
    "--tolerance", default=30.0, show_default=True, type=float, help="color: RGB distance still background."
)
@click.option("--border-only", is_flag=True, help="color: only background regions touching the border.")
@click.option(
    "--from",
    "source",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="import: folder of painted masks (same stem as the images, red channel read).",
)
@click.option("--threshold", type=click.FloatRange(0, 1), default=None, help="Binarise: >= T becomes white.")
@click.option("--grow", default=0, type=click.IntRange(min=0), help="Widen white areas by N px.")
@click.option("--shrink", default=0, type=click.IntRange(min=0), help="Narrow white areas by N px.")
@click.option("--feather", default=0.0, type=click.FloatRange(min=0), help="Soften edges over about R px.")
@click.option("--invert", is_flag=True, help="Swap learned and ignored areas.")
@click.option(
    "--floor",
    default=0.0,
    type=click.FloatRange(0, 1),
    help="Smallest weight (OneTrainer's unmasked weight).",
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
@click.option("-r", "--recursive", is_flag=True, help="Include subfolders (each gets its own mask folder).")
@click.option("-j", "--workers", default=1, show_default=True, type=click.IntRange(min=1), help="Threads.")
@click.option(
    "--preview", type=click.Path(dir_okay=False, path_type=Path), help="--check: preview sheet PNG path."
)
@click.pass_context
def command(ctx: click.Context, directory: Path, method: str | None, check: bool, **kw) -> None:
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

    settings = MethodSettings(
        prompts=tuple(kw["prompts"]),
        model=kw["model"],
        cascade=kw["cascade"],
        pad=kw["pad"],
        color=kw["color"],
        tolerance=kw["tolerance"],
        border_only=kw["border_only"],
        source=kw["source"],
    )
    post = PostOptions(
        threshold=kw["threshold"],
        invert=kw["invert"],
        grow=kw["grow"],
        shrink=kw["shrink"],
        feather=kw["feather"],
        combine=kw["combine"],
        floor=kw["floor"],
    )
    opts = MaskOptions(
        method=method,
        settings=settings,
        post=post,
        out=kw["out"],
        fallback=kw["fallback"],
        force=kw["force"],
        recursive=kw["recursive"],
        workers=kw["workers"],
    )
    finish(run_mask(directory, opts, report=reporter(ctx)))


def _check(ctx: click.Context, directory: Path, out: str, recursive: bool, preview: Path | None) -> None:
    from sdprep.prep.mask import check_out_dir
    from sdprep.prep.mask_check import check_masks

    report = check_masks(
        directory, check_out_dir(out), recursive=recursive, preview=preview or True, report=reporter(ctx)
    )
    click.echo(report.summary())
    if report.problems:
        raise click.exceptions.Exit(1)
