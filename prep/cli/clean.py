"""`sdprep clean`: parse options (layered over an optional rules TOML), run the stage, print."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sdprep.clitools import dataset_argument, finish, parallel_options, run_stage, verbosity
from sdprep.prep.cli.scores import replace_option, score_options, tag_list

SORTS = ("as-tagged", "score", "alphabetical", "category")


def _patterns(values: tuple[str, ...]) -> tuple[str, ...] | None:
    """--remove / --keep: patterns as given (a regex may contain commas)."""
    out = tuple(v.strip() for v in values if v.strip())
    return out or None


@click.command("clean")
@dataset_argument("Clean images in subfolders too (kohya repeat folders).")
@click.option(
    "--rules", "rules_file", type=click.Path(dir_okay=False, path_type=Path), help="Rules TOML file."
)
@click.option(
    "--trigger", multiple=True, metavar="TOKEN", help="Trigger token(s), always first (repeatable)."
)
@click.option(
    "--trigger-from-folder",
    is_flag=True,
    default=None,
    help="Use a `<N>_<tokens>` folder's tokens as trigger.",
)
@click.option(
    "--remove", multiple=True, metavar="TAG", help="Remove a tag: exact, glob (*hair*) or re:REGEX."
)
@click.option(
    "--remove-file",
    multiple=True,
    type=click.Path(path_type=Path),
    help="File of tags to remove, one per line.",
)
@replace_option()
@click.option("--keep", multiple=True, metavar="TAG", help="Never prune or trim this tag (pattern).")
@click.option("--keep-first", type=int, help="Keep the first N tags (after the trigger) in place.")
@click.option("--sort", type=click.Choice(SORTS), help="Order of the other tags.  [default: as-tagged]")
@click.option(
    "--prefix",
    multiple=True,
    metavar="FOLDER=TAGS",
    help='Tags after the trigger in a folder (glob), e.g. "10_low*=low quality".',
)
@click.option(
    "--suffix", multiple=True, metavar="FOLDER=TAGS", help="Tags at the end of captions in a folder (glob)."
)
@click.option(
    "--prune-core",
    type=float,
    is_flag=False,
    flag_value=60.0,
    metavar="PCT",
    help="Remove tags present in at least PCT% of a concept's images (alone: 60).",
)
@click.option(
    "--prune-scope", type=click.Choice(["trigger", "folder"]), help="A concept is a trigger or a folder."
)
@click.option(
    "--monochrome/--no-monochrome",
    default=None,
    help="Append greyscale / monochrome from the HSV test.  [default: on]",
)
@click.option(
    "--saturation-threshold", type=float, help="Mean saturation below this: greyscale.  [default: 0.001]"
)
@click.option(
    "--hue-threshold", type=float, help="Hue standard deviation below this: monochrome.  [default: 0.03]"
)
@click.option("--max-tokens", type=int, metavar="N", help="Trim the lowest-ranked tags to fit N CLIP tokens.")
@click.option(
    "--audit-tokens", is_flag=True, default=None, help="Report captions over 75 / 150 / 225 CLIP tokens."
)
@click.option(
    "--tokenizer",
    metavar="MODEL_DIR_OR_REPO",
    help="Model (or tokenizer folder) whose CLIP tokenizer counts.",
)
@click.option(
    "--underscores",
    type=click.Choice(["keep", "space", "underscore"]),
    help="Write tags with spaces or underscores.",
)
@click.option(
    "--escape-parentheses/--no-escape-parentheses", default=None, help=r"name (series) -> name \(series\)."
)
@click.option("--dedupe/--no-dedupe", default=None, help="Drop repeated tags.  [default: on]")
@click.option(
    "--source",
    type=click.Choice(["auto", "caption", "wd14", "booru"]),
    help="Where tags come from.  [default: auto]",
)
@score_options(layered=True)
@parallel_options("sdprep.prep.clean:CleanOptions")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print a unified diff of what would change; write nothing (-v: diff a real run).",
)
@click.pass_context
def command(
    ctx: click.Context,
    /,
    directory: Path,
    recursive: bool,
    rules_file: Path | None,
    dry_run: bool,
    workers: int,
    **opts: Any,
) -> None:
    """Rebuild the captions of DIRECTORY from rules: trigger first, tags removed or replaced,
    core tags pruned, sorted, greyscale / monochrome appended, trimmed to a CLIP token budget.

    Tags come from each image's caption file, or from its sidecar (stored WD14 scores, booru tags)
    when it has none. Every change is journalled: `sdprep undo DIRECTORY` restores the captions.

    \b
    Example:
      sdprep clean data/1_nazuna --trigger nazuna --remove "blue eyes" --remove "pink hair" --dry-run
      sdprep clean data/ -r --rules rules.toml --prune-core 60 --max-tokens 75
    """
    from sdprep.prep.clean import CleanOptions, run_clean
    from sdprep.prep.monochrome import MonochromeSettings
    from sdprep.prep.rules import CleanRules, combine, load_rules, parse_pairs

    base = load_rules(rules_file) if rules_file else CleanRules()
    mono = base.monochrome
    mono_over = {
        "enabled": opts["monochrome"],
        "saturation_threshold": opts["saturation_threshold"],
        "hue_threshold": opts["hue_threshold"],
    }
    mono = MonochromeSettings(**{**mono.__dict__, **{k: v for k, v in mono_over.items() if v is not None}})
    overrides = {
        "trigger": tag_list(opts["trigger"]) or None,
        "trigger_from_folder": opts["trigger_from_folder"],
        "remove": _patterns(opts["remove"]),
        "remove_files": tuple(opts["remove_file"]) or None,
        "replace": parse_pairs(opts["replace"], "--replace") or None,
        "keep": _patterns(opts["keep"]),
        "keep_first": opts["keep_first"],
        "sort": opts["sort"].replace("-", "_") if opts["sort"] else None,
        "prefix": parse_pairs(opts["prefix"], "--prefix") or None,
        "suffix": parse_pairs(opts["suffix"], "--suffix") or None,
        "prune_core": opts["prune_core"],
        "prune_scope": opts["prune_scope"],
        "monochrome": mono,
        "max_tokens": opts["max_tokens"],
        "audit_tokens": opts["audit_tokens"],
        "tokenizer": opts["tokenizer"],
        "underscores": opts["underscores"],
        "escape_parentheses": opts["escape_parentheses"],
        "dedupe": opts["dedupe"],
        "source": opts["source"],
        "general_threshold": opts["general_threshold"],
        "character_threshold": opts["character_threshold"],
        "mcut": opts["mcut"],
        "rating": opts["rating"],
        "character_first": opts["character_first"],
    }
    rules = combine(base, overrides)
    options = CleanOptions(rules=rules, recursive=recursive, dry_run=dry_run, workers=workers)
    show = dry_run or verbosity(ctx) > 0
    on_diff = (lambda d: click.echo(d, nl=False)) if show else None
    result = run_stage(ctx, run_clean, directory, options, on_diff=on_diff)
    finish(result)
