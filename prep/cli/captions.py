"""`sdprep captions ...`: tag-aware batch edits, stats and search over one or many caption folders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from sdprep.clitools import finish, reporter, verbosity
from sdprep.stage import StageResult

F = TypeVar("F", bound=Callable[..., Any])


def _common(edit: bool = True) -> Callable[[F], F]:
    """Options every subcommand shares."""

    def wrap(fn: F) -> F:
        fn = click.option("-r", "--recursive", is_flag=True, help="Include subfolders.")(fn)
        fn = click.option(
            "--orphans/--no-orphans",
            default=True,
            show_default=True,
            help="Also .txt files without an image (README, LICENSE... and multi-line files are never captions).",
        )(fn)
        if edit:
            fn = click.option("--dry-run", is_flag=True, help="Print a unified diff; write nothing.")(fn)
        return fn

    return wrap


def _split_tags_and_dirs(args: tuple[str, ...], tags: tuple[str, ...]) -> tuple[list[str], list[Path]]:
    """TAG... DIR...: the trailing arguments naming existing folders are the folders (unless -t is used)."""
    if tags:
        return list(tags), [Path(a) for a in args]
    n = len(args)
    while n > 0 and Path(args[n - 1]).is_dir():
        n -= 1
    tag_args, dirs = list(args[:n]), [Path(a) for a in args[n:]]
    if not dirs:
        raise click.UsageError("give at least one existing folder after the tags")
    if not tag_args:
        raise click.UsageError("give at least one tag before the folders (or use -t TAG)")
    return tag_args, dirs


def _edit(
    ctx: click.Context,
    action: str,
    dirs: tuple[Path, ...] | list[Path],
    args: tuple[str, ...] | list[str] = (),
    *,
    dry_run: bool,
    recursive: bool,
    orphans: bool,
    **kw: Any,
) -> None:
    from sdprep.prep.captions import CaptionsOptions, make_edit, run_edit

    edit = make_edit(action, tuple(args), **kw)
    opts = CaptionsOptions(recursive=recursive, dry_run=dry_run, orphans=orphans)
    result = run_edit(
        [Path(d) for d in dirs],
        edit,
        opts,
        command=f"captions-{action}",
        report=reporter(ctx),
        on_diff=(lambda d: click.echo(d, nl=False)) if dry_run or verbosity(ctx) > 0 else None,
    )
    finish(result)


@click.group("captions")
def command() -> None:
    """Batch-edit caption files of one or many folders (any origin), tag-aware.

    Tags are split on commas and compared case- and underscore-insensitively; edits change whole
    tags. Every folder keeps its own undo journal (`sdprep undo FOLDER`).

    \b
    Example:
      sdprep captions remove "blue eyes" "pink hair" data/ --dry-run
      sdprep captions replace "1girl" "solo girl" data/a data/b -r
      sdprep captions stats data/ -r --tokenizer path/to/sdxl
    """


_DIRS = click.argument(
    "dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path)
)


@command.command("replace")
@click.argument("old")
@click.argument("new")
@_DIRS
@click.option(
    "--regex", "mode", flag_value="regex", help="OLD is a regular expression over the caption text."
)
@click.option("--substring", "mode", flag_value="substring", help="Replace OLD inside tags, as plain text.")
@_common()
@click.pass_context
def replace_cmd(
    ctx: click.Context,
    old: str,
    new: str,
    dirs: tuple[Path, ...],
    mode: str | None,
    dry_run: bool,
    recursive: bool,
    orphans: bool,
) -> None:
    """Replace the tag OLD by NEW (NEW may be several tags, or "" to remove).

    By default whole tags are replaced (`blue eyes` does not change `light blue eyes`);
    --substring replaces text inside tags; --regex substitutes over the caption text (`\\1` groups).

    \b
    Example:
      sdprep captions replace "1girl" "girl, solo" data/ --dry-run
    """
    _edit(
        ctx,
        "replace",
        dirs,
        (old, new),
        mode=mode or "tag",
        dry_run=dry_run,
        recursive=recursive,
        orphans=orphans,
    )


def _tag_command(action: str, doc: str) -> click.Command:
    @command.command(action, help=doc)
    @click.argument("args", nargs=-1, required=True)
    @click.option("-t", "--tag", "tags", multiple=True, help="A tag (then every argument is a folder).")
    @_common()
    @click.pass_context
    def cmd(
        ctx: click.Context,
        args: tuple[str, ...],
        tags: tuple[str, ...],
        dry_run: bool,
        recursive: bool,
        orphans: bool,
    ) -> None:
        tag_args, dirs = _split_tags_and_dirs(args, tags)  # run_edit checks that they are folders
        _edit(ctx, action, dirs, tag_args, dry_run=dry_run, recursive=recursive, orphans=orphans)

    return cmd


_tag_command(
    "remove",
    """Remove whole tags (exact, glob `*hair*` or `re:REGEX`) from the captions in DIR...

    Arguments are TAG... DIR...: the trailing ones naming existing folders are the folders
    (use -t TAG when a tag has the name of a folder).

    \b
    Example:
      sdprep captions remove "blue eyes" "re:.*_hair$" data/
    """,
)
_tag_command(
    "prepend",
    """Put tags first in every caption of DIR... (moved there if already present).

    \b
    Example:
      sdprep captions prepend mytoken data/
    """,
)
_tag_command(
    "append",
    """Put tags last in every caption of DIR... (moved there if already present).

    \b
    Example:
      sdprep captions append "high quality" data/10_best
    """,
)


@command.command("dedupe")
@_DIRS
@_common()
@click.pass_context
def dedupe_cmd(
    ctx: click.Context, dirs: tuple[Path, ...], dry_run: bool, recursive: bool, orphans: bool
) -> None:
    """Drop repeated tags (compared case- and underscore-insensitively), keeping the first.

    \b
    Example:
      sdprep captions dedupe data/ -r
    """
    _edit(ctx, "dedupe", dirs, dry_run=dry_run, recursive=recursive, orphans=orphans)


@command.command("sort")
@_DIRS
@click.option(
    "--by",
    type=click.Choice(["alphabetical", "score", "category"]),
    default="alphabetical",
    show_default=True,
    help="score / category use the WD14 scores and booru categories in the image's sidecar.",
)
@click.option(
    "--keep-first",
    type=click.IntRange(0),
    default=None,
    help="Leave the first N tags in place. Default: the trigger (and the tags `sdprep clean` placed "
    "first) or the class tokens of a kohya <N>_<tokens> folder stay first, for keep_tokens training.",
)
@_common()
@click.pass_context
def sort_cmd(
    ctx: click.Context,
    dirs: tuple[Path, ...],
    by: str,
    keep_first: int | None,
    dry_run: bool,
    recursive: bool,
    orphans: bool,
) -> None:
    """Sort the tags of every caption, keeping the trigger first.

    \b
    Example:
      sdprep captions sort data/
      sdprep captions sort data/ --by score --keep-first 2
    """
    _edit(
        ctx, "sort", dirs, keep_first=keep_first, by=by, dry_run=dry_run, recursive=recursive, orphans=orphans
    )


@command.command("stats")
@_DIRS
@click.option(
    "--top",
    type=click.IntRange(0),
    default=30,
    show_default=True,
    help="How many of the most frequent tags to list.",
)
@click.option(
    "--tokenizer", metavar="MODEL_DIR_OR_REPO", help="Count CLIP tokens with this model's tokenizer."
)
@_common(edit=False)
@click.pass_context
def stats_cmd(
    ctx: click.Context,
    dirs: tuple[Path, ...],
    top: int,
    tokenizer: str | None,
    recursive: bool,
    orphans: bool,
) -> None:
    """Tag frequencies, images without captions and (with --tokenizer) CLIP token lengths.

    \b
    Example:
      sdprep captions stats data/ -r --top 50
    """
    from sdprep.prep.captions import CaptionsOptions, run_stats

    counter = None
    if tokenizer:
        from sdprep.prep.tokens import load_tokenizer

        counter = load_tokenizer(tokenizer)
    opts = CaptionsOptions(recursive=recursive, orphans=orphans)
    result = run_stats(dirs, opts, top=top, count_tokens=counter, report=reporter(ctx))
    _print(result)


@command.command("find")
@click.argument("tag")
@_DIRS
@_common(edit=False)
def find_cmd(tag: str, dirs: tuple[Path, ...], recursive: bool, orphans: bool) -> None:
    """Print the images whose caption has TAG (exact, glob or `re:REGEX`), one per line.

    \b
    Example:
      sdprep captions find "blue eyes" data/ -r
    """
    from sdprep.prep.captions import CaptionsOptions, run_find

    opts = CaptionsOptions(recursive=recursive, orphans=orphans)
    result = run_find(dirs, [tag], opts, on_match=lambda cf: click.echo(str(cf.shown)))
    _print(result)


def _print(result: StageResult) -> None:
    """stats / find: their notes are the result; failures listed; exit 1 if any file failed."""
    for line in result.notes:
        click.echo(line)
    for f in result.failed:
        click.echo(f"  failed: {f.path}: {f.reason}")
    if result.failed:
        raise click.exceptions.Exit(1)
