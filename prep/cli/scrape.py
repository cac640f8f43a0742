"""`sdprep scrape`: download images with gallery-dl into a dataset folder, tagged from booru metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sdprep.clitools import field_option, finish, options_from, reporter

OPTIONS = "sdprep.prep.scrape:ScrapeOptions"


def _split(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(v.strip() for value in values for v in value.split(",") if v.strip())


@click.command("scrape")
@click.argument("urls", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Dataset folder.",
)
@field_option(OPTIONS, "limit", "--limit", type=int, help="At most N files per URL.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A gallery-dl config file (logins, site options).",
)
@click.option(
    "--cookies",
    "cookies_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A cookies.txt file for sites that need a login.",
)
@field_option(
    OPTIONS,
    "min_side",
    "--min-side",
    type=int,
    metavar="PX",
    help="Reject images whose shorter side is below PX.",
)
@click.option(
    "--rating",
    "ratings",
    multiple=True,
    metavar="R[,R]",
    help="Allowed booru ratings: g, s, q, e (repeatable).",
)
@click.option(
    "--exclude-tags",
    multiple=True,
    metavar="TAG[,TAG]",
    help="Reject images with these tags (globs and re: allowed).",
)
@field_option(
    OPTIONS,
    "sleep_request",
    "--sleep-request",
    type=float,
    metavar="SECONDS",
    help="Pause between requests (default: gallery-dl's for the site).",
)
@click.pass_context
def command(
    ctx: click.Context, /, out: Path, ratings: tuple[str, ...], exclude_tags: tuple[str, ...], **kw: Any
) -> None:
    """Download the images at URLS into a dataset folder with gallery-dl.

    Any site gallery-dl supports. Each image keeps gallery-dl's metadata in its sidecar
    (`<name>.<ext>.json`); booru tags are stored by category with the rating, so a Danbooru or
    Gelbooru scrape is tagged before any model runs. Re-running downloads nothing new (an
    interrupted scrape resumes); rejected images go to OUT/rejected/; `sdprep undo OUT` removes
    what a scrape added. Config and cookie files are read by gallery-dl, never printed.

    \b
    Example:
      sdprep scrape "https://danbooru.donmai.us/posts?tags=nazuna_(yofukashi_no_uta)" -o data/ --limit 200
      sdprep scrape URL -o data/ --rating g,s --exclude-tags comic,monochrome --min-side 768
    """
    from sdprep.prep.scrape import ScrapeOptions, run_scrape

    opts = options_from(ScrapeOptions, kw, ratings=_split(ratings), exclude_tags=_split(exclude_tags))
    finish(run_scrape(out, opts, report=reporter(ctx)))
