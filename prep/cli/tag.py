"""`sdprep tag`: WD14 tags (and optional VLM captions) for every image; captions from stored scores."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from sdprep.clitools import dataset_argument, field_option, finish, options_from, parallel_options, run_stage
from sdprep.prep.cli.scores import replace_option, score_options, tag_list

DEVICES = ("auto", "cpu", "cuda", "rocm", "directml", "coreml")  # taggers.wd14.DEVICES, kept import-free
OPTIONS = "sdprep.prep.tag:TagOptions"
RULES = "sdprep.taggers.rules:CaptionRules"


def _replacements(values: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """`--replace "A=B"`, as `sdprep clean` reads it (B may list several tags; empty removes).

    The older `"SRC,DST"` form (kohya's --tag_replacement: `;` between pairs, `\\,` / `\\;` escape)
    is still read, with a deprecation note on stderr.
    """
    from sdprep.prep.rules import parse_pairs

    table: dict[str, tuple[str, ...]] = {}
    old = []
    for value in values:
        key = value.split("=", 1)[0]
        if "=" in value and key.strip() and not re.search(r"(?<!\\),", key):
            table.update(parse_pairs([value], "--replace"))
        else:
            old.append(value)
    for value in old:
        for pair in re.split(r"(?<!\\);", value):
            parts = re.split(r"(?<!\\),", pair)
            if not pair.strip():
                continue
            if len(parts) != 2:
                raise click.BadParameter(f'"{pair}" is not A=B', param_hint="--replace")
            src, dst = (x.replace("\\,", ",").replace("\\;", ";").strip() for x in parts)
            table[src] = (dst,) if dst else ()
    if old:
        click.echo(
            f'note: --replace "{old[0]}" (SRC,DST) is deprecated: write --replace "A=B" as in sdprep clean',
            err=True,
        )
    return table


@click.command("tag")
@dataset_argument("Tag images in subfolders too.")
@field_option(
    OPTIONS,
    "model",
    "--model",
    "--model-dir",
    "model",
    metavar="REPO_OR_DIR",
    help="WD14 model: a SmilingWolf hub id (v2 or v3) or a folder with model.onnx + selected_tags.csv.",
)
@score_options(layered=False)
@click.option(
    "--remove-underscore/--keep-underscore",
    default=True,
    show_default=True,
    help="long_hair -> long hair (tags over 3 characters, so ^_^ stays).",
)
@click.option("--escape-parentheses", is_flag=True, help="Write name \\(series\\) for A1111-style prompts.")
@click.option(
    "--undesired",
    multiple=True,
    metavar="TAGS",
    help="Comma-separated tags never to write, as clean --remove (globs allowed; re:REGEX takes the rest of the value).",
)
@click.option(
    "--always-first",
    multiple=True,
    metavar="TAGS",
    help="Comma-separated tags moved to the front when present.",
)
@replace_option()
@field_option(RULES, "separator", "--separator", help="Between tags.")
@field_option(
    OPTIONS,
    "merge",
    "--merge",
    type=click.Choice(["replace", "append", "keep"]),
    help="With an existing caption: replace it, append new tags (deduped), or keep it.",
)
@field_option(
    OPTIONS,
    "batch_size",
    "--batch-size",
    type=int,
    help="Images per step (on the CPU WD14 runs each image on its own: scores never depend on it; "
    "on a GPU the batch runs in one call).",
)
@parallel_options(OPTIONS)
@field_option(
    OPTIONS, "device", "--device", type=click.Choice(DEVICES), help="onnxruntime provider for WD14."
)
@field_option(
    OPTIONS,
    "floor",
    "--score-floor",
    "floor",
    type=float,
    help="Keep raw scores at or above this in the sidecar.",
)
@click.option(
    "--shard",
    default=None,
    metavar="K/N",
    help="Only the K-th of N disjoint parts (split work across machines).",
)
@click.option("--force", is_flag=True, help="Run the models again even on images already tagged.")
@click.option(
    "--captioner",
    default=None,
    metavar="hf:REPO|openai:URL",
    help="Also write a natural-language caption with a VLM.",
)
@click.option(
    "--prompt",
    default=None,
    metavar="TEMPLATE",
    help="VLM prompt; {tags} (the WD14 tags) and {trigger} are filled in.",
)
@click.option(
    "--caption-template",
    default=None,
    metavar="TEMPLATE",
    help="Caption file from {trigger}, {tags}, {caption}; default {tags}, or '{trigger}, {tags}. {caption}' with --captioner.",
)
@field_option(OPTIONS, "trigger", "--trigger", help="Value of {trigger} in templates.")
@click.option(
    "--boilerplate",
    multiple=True,
    metavar="PHRASE",
    help="Extra phrase to strip from the start of VLM captions (repeatable; re: for a regex).",
)
@click.option("--max-new-tokens", default=None, type=click.IntRange(min=1), help="VLM answer length limit.")
@click.option(
    "--caption-option",
    multiple=True,
    metavar="KEY=VALUE",
    help="Other captioner option, e.g. concurrency=8, load_in_4bit=true.",
)
@click.pass_context
def command(ctx: click.Context, /, directory: Path, **kw: Any) -> None:
    """Tag the images of DIRECTORY with a WD14 model and write `<stem>.txt` captions.

    The raw scores of every tag above --score-floor are kept in each image's sidecar, so running
    again with other thresholds or rules rewrites the captions without running the model, and a
    run with the same options does nothing. With --captioner a VLM also writes a sentence caption,
    combined with the tags by --caption-template. `sdprep undo DIRECTORY` restores the old captions.

    \b
    Example:
      sdprep tag data/
      sdprep tag data/ --general-threshold 0.5 --rating first --undesired "simple background"
      sdprep tag data/ -r --model SmilingWolf/wd-eva02-large-tagger-v3 --batch-size 16 --shard 1/2
      sdprep tag data/ --captioner openai:http://127.0.0.1:11434/v1#llava --trigger mytoken
    """
    from sdprep.config import parse_overrides
    from sdprep.prep.tag import TagOptions, parse_shard, run_tag
    from sdprep.taggers.captions_text import DEFAULT_BOILERPLATE
    from sdprep.taggers.rules import CaptionRules

    rules = options_from(
        CaptionRules,
        kw,
        undesired=tag_list(kw["undesired"]),
        always_first=tag_list(kw["always_first"]),
        replace=_replacements(kw["replace"]),
    )
    captioner_options = parse_overrides(list(kw["caption_option"]))
    if kw["max_new_tokens"] is not None:
        captioner_options["max_new_tokens"] = kw["max_new_tokens"]
    opts = options_from(
        TagOptions,
        kw,
        rules=rules,
        shard=parse_shard(kw["shard"]) if kw["shard"] else None,
        captioner_options=captioner_options,
        boilerplate=(*DEFAULT_BOILERPLATE, *kw["boilerplate"]) if kw["boilerplate"] else None,
    )
    finish(run_stage(ctx, run_tag, directory, opts))
