"""`sdprep upscale`: bring small images up to the training size (Lanczos or an AI model)."""

from __future__ import annotations

from pathlib import Path

import click

from sdprep.clitools import finish, reporter


@click.command("upscale")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--min-area", default=None, metavar="PIXELS", help="Target area, e.g. 1048576 or 1024x1024 (default)."
)
@click.option(
    "--min-side", default=None, type=click.IntRange(min=1), metavar="PX", help="Target shortest side instead."
)
@click.option(
    "--model",
    default=None,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Local upscaler weights (.safetensors/.pth): ESRGAN, Real-ESRGAN; more with spandrel.",
)
@click.option(
    "--tile",
    default=256,
    show_default=True,
    type=click.IntRange(min=0),
    help="Model tile size (0 = whole image).",
)
@click.option(
    "--tile-overlap",
    default=16,
    show_default=True,
    type=click.IntRange(min=0),
    help="Tile overlap in pixels.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, mps.")
@click.option(
    "--quality", default=95, show_default=True, type=click.IntRange(1, 100), help="JPEG/WebP quality."
)
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Load a .pth/.ckpt that holds pickled objects (this can run code from the file; trusted files only).",
)
@click.option("-r", "--recursive", is_flag=True, help="Upscale images in subfolders too.")
@click.option(
    "--workers", default=1, show_default=True, type=click.IntRange(1, 64), help="Threads (Lanczos only)."
)
@click.pass_context
def command(
    ctx: click.Context,
    directory: Path,
    min_area: str | None,
    min_side: int | None,
    model: Path | None,
    tile: int,
    tile_overlap: int,
    device: str,
    quality: int,
    trust_pickle: bool,
    recursive: bool,
    workers: int,
) -> None:
    """Upscale the images of DIRECTORY whose area is below the target; never downscales.

    Lanczos by default; --model runs an AI upscaler from a local file, in tiles, on the GPU when
    present. Masks are resized with their image and the new size is recorded in the sidecar.
    `sdprep undo DIRECTORY` restores the originals.

    \b
    Example:
      sdprep upscale data/
      sdprep upscale data/ --min-side 768 --model 4x-UltraSharp.safetensors
    """
    from sdprep.prep.upscale import DEFAULT_MIN_AREA, UpscaleOptions, parse_pixels, run_upscale

    if min_area is not None and min_side is not None:
        raise click.UsageError("use --min-area or --min-side, not both")
    opts = UpscaleOptions(
        min_area=parse_pixels(min_area) if min_area else DEFAULT_MIN_AREA,
        min_side=min_side,
        model=model,
        tile=tile,
        overlap=tile_overlap,
        device=device,
        quality=quality,
        recursive=recursive,
        workers=workers,
        trust_pickle=trust_pickle,
    )
    finish(run_upscale(directory, opts, report=reporter(ctx)))
