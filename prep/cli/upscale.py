"""`sdprep upscale`: bring small images up to the training size (Lanczos or an AI model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sdprep.clitools import dataset_argument, field_option, finish, options_from, parallel_options, run_stage

OPTIONS = "sdprep.prep.upscale:UpscaleOptions"


@click.command("upscale")
@dataset_argument("Upscale images in subfolders too.")
@click.option(
    "--min-area", default=None, metavar="PIXELS", help="Target area, e.g. 1048576 or 1024x1024 (default)."
)
@field_option(OPTIONS, "min_side", "--min-side", type=int, metavar="PX", help="Target shortest side instead.")
@click.option(
    "--model",
    default=None,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Local upscaler weights (.safetensors/.pth): ESRGAN, Real-ESRGAN; more with spandrel.",
)
@field_option(OPTIONS, "tile", "--tile", type=int, help="Model tile size (0 = whole image).")
@field_option(OPTIONS, "overlap", "--tile-overlap", "overlap", type=int, help="Tile overlap in pixels.")
@field_option(OPTIONS, "device", "--device", help="auto, cpu, cuda, cuda:1, mps.")
@field_option(OPTIONS, "quality", "--quality", type=int, help="JPEG/WebP quality (1-100).")
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Load a .pth/.ckpt that holds pickled objects (this can run code from the file; trusted files only).",
)
@parallel_options(OPTIONS)
@click.pass_context
def command(ctx: click.Context, /, directory: Path, min_area: str | None, **kw: Any) -> None:
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

    if min_area is not None and kw["min_side"] is not None:
        raise click.UsageError("use --min-area or --min-side, not both")
    opts = options_from(UpscaleOptions, kw, min_area=parse_pixels(min_area) if min_area else DEFAULT_MIN_AREA)
    finish(run_stage(ctx, run_upscale, directory, opts))
