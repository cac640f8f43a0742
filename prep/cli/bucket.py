"""`sdprep bucket`: thin command over sdprep.prep.bucket.run_bucket."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sdprep.buckets import BucketSettings
from sdprep.clitools import dataset_argument, field_option, finish, options_from, reporter
from sdprep.errors import ConfigError

OPTIONS = "sdprep.prep.bucket:BucketOptions"
SETTINGS = "sdprep.buckets:BucketSettings"


def _parse_tiers(values: tuple[str, ...]) -> dict[str, int]:
    tiers = {}
    for value in values:
        name, sep, n = value.rpartition("=")
        if not sep or not name.strip() or not n.strip().isdigit():  # BucketOptions checks n >= 1
            raise ConfigError(
                f'--tier "{value}" is not of the form FOLDER=REPEATS', "e.g. --tier 'high quality=40'"
            )
        tiers[name.strip()] = int(n)
    return tiers


def _parse_resolution(value: str) -> tuple[int, int]:
    parts = [p for p in value.replace("x", ",").split(",") if p.strip()]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(
            f'--resolution "{value}" is not W,H or a single size', "e.g. --resolution 1024"
        ) from None
    if len(nums) == 1:
        nums *= 2
    if len(nums) != 2:  # BucketOptions checks the sizes
        raise ConfigError(
            f'--resolution "{value}" is not W,H or a single size', "e.g. --resolution 1024,1024"
        )
    return nums[0], nums[1]


@click.command("bucket")
@dataset_argument()
@click.option(
    "-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder."
)
@field_option(
    OPTIONS,
    "token",
    "--token",
    help="Class token / trigger for the concept folder name (40_TOKEN). Default: the trigger "
    "`sdprep clean --trigger` recorded.",
)
@field_option(OPTIONS, "repeats", "--repeats", type=int, help="Fixed repeats for every concept.")
@field_option(
    OPTIONS, "target_steps", "--target-steps", type=int, help="Choose repeats so an epoch is about N steps."
)
@field_option(
    OPTIONS,
    "batch_size",
    "--batch-size",
    type=int,
    help="Batch size for --target-steps (default 1); written to the TOML only when given, where it "
    "overrides kohya's --train_batch_size.",
)
@click.option(
    "--tier",
    "tiers",
    multiple=True,
    metavar="FOLDER=N",
    help="Repeats for a quality-tier subfolder (repeatable).",
)
@click.option("--balance", is_flag=True, help="Give concepts of different sizes equal weight per epoch.")
@click.option(
    "--reg",
    "reg",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Regularisation image folder (repeatable).",
)
@field_option(
    OPTIONS,
    "reg_token",
    "--reg-token",
    help="Class tokens of the regularisation images (default: folder name).",
)
@click.option("--resolution", default="1024,1024", show_default=True, help="Max bucket area as W,H.")
@field_option(SETTINGS, "step", "--step", type=int, help="Bucket step (multiple of 32 for SDXL).")
@field_option(SETTINGS, "min_side", "--min-side", type=int, help="Smallest bucket side.")
@field_option(SETTINGS, "max_side", "--max-side", type=int, help="Largest bucket side.")
@click.option("--no-upscale", is_flag=True, help="Small images keep their size (kohya's bucket_no_upscale).")
@click.option("--copy", is_flag=True, help="Copy files instead of hard-linking them.")
@field_option(
    OPTIONS,
    "mask_form",
    "--mask-form",
    type=click.Choice(["alpha", "conditioning"]),
    help="How masks reach kohya: baked into PNG copies' alpha channel (alpha_mask; keeps class tokens "
    "and reg images), or mask files (conditioning_data_dir; needs --masked_loss, no --reg).",
)
@click.option(
    "--root",
    metavar="PATH",
    help="Where OUT will be on the training machine: write absolute paths under PATH "
    "(default: paths relative to OUT; run kohya from OUT).",
)
@click.pass_context
def command(
    ctx: click.Context, /, directory: Path, resolution: str, tiers: tuple[str, ...], **kw: Any
) -> None:
    """Build a training-ready folder (kohya layout, dataset TOML, metadata JSON) from DIRECTORY.

    Images are hard-linked (never moved), captions and masks go with them. buckets.json says where
    every image lands, how much is cropped, and which images are upscaled or dropped; OUT/preview/
    holds one PNG contact sheet per bucket with the part each crop cuts away shaded red.
    Masked and EXIF-rotated images become PNG copies (the mask as alpha, the pixels as displayed),
    so kohya trains what sdprep shows. Paths are relative to OUT: `cd OUT` before running kohya,
    or pass --root. Re-running replaces what the previous run wrote (undo restores it).

    \b
    Example:
      sdprep bucket data/ -o train_set/ --token mytoken --repeats 40
      sdprep bucket data/ -o train_set/ --token mytoken --tier "high quality=40" --tier "low quality=10"
      sdprep bucket data/ -o train_set/ --token mytoken --reg reg/woman --root /workspace/train_set
    """
    from sdprep.prep.bucket import BucketOptions, run_bucket

    settings = options_from(BucketSettings, kw, resolution=_parse_resolution(resolution))
    opts = options_from(BucketOptions, kw, settings=settings, tiers=_parse_tiers(tiers), reg=tuple(kw["reg"]))
    finish(run_bucket(directory, opts, report=reporter(ctx)))
