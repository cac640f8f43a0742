"""The caption-rule options `sdprep tag` and `sdprep clean` share: score rules (taggers/rules.py
ScoreRules), `--replace A=B`, and comma-separated tag lists."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

RATINGS = ("first", "last", "none")  # taggers.rules.RATING_PLACES, kept import-free
DEFAULTS: dict[str, float | str] = {
    "general_threshold": 0.35,
    "character_threshold": 0.85,
    "rating": "none",
}  # ScoreRules()


def score_options(layered: bool) -> Callable[[F], F]:
    """Threshold, MCut, rating and order options. `layered`: defaults are None (not given), so the
    values of a rules file stay unless an option is given (clean); otherwise the defaults (tag)."""

    def default(name: str) -> float | str | None:
        return None if layered else DEFAULTS[name]

    def flag(name: str, text: str) -> Callable[[F], F]:
        return click.option(name, is_flag=True, default=None if layered else False, help=text)

    def shown(name: str) -> str:
        return f"  [default: {DEFAULTS[name]}]" if layered else ""

    options = [
        click.option(
            "--general-threshold",
            type=float,
            default=default("general_threshold"),
            show_default=not layered,
            help="General tags at or above this stored score (>1 disables them)."
            + shown("general_threshold"),
        ),
        click.option(
            "--character-threshold",
            type=float,
            default=default("character_threshold"),
            show_default=not layered,
            help="Character tags at or above this score (>1 disables them)." + shown("character_threshold"),
        ),
        flag("--mcut", "Automatic per-image thresholds (MCut, as imgutils) instead of fixed ones."),
        click.option(
            "--rating",
            type=click.Choice(RATINGS),
            default=default("rating"),
            show_default=not layered,
            help="Add the most likely rating tag." + shown("rating"),
        ),
        flag("--character-first", "Character tags before general tags."),
    ]

    def decorate(fn: F) -> F:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def replace_option() -> Callable[[F], F]:
    """`--replace A=B` (repeatable), one syntax in tag and clean (prep/rules.py `parse_pairs`)."""
    return click.option(
        "--replace",
        multiple=True,
        metavar="A=B",
        help="Replace tag A by B (B may list several; empty removes), e.g. 'hatsune miku=mytoken'.",
    )


def tag_list(values: tuple[str, ...]) -> tuple[str, ...]:
    """Repeatable options that also take comma-separated lists -> one tuple of tags. A `re:`
    pattern takes the rest of its value whole (a regex may hold commas: `re:x{1,2}`)."""
    tags: list[str] = []
    for value in values:
        pieces = value.split(",")
        for i, piece in enumerate(pieces):
            if piece.strip().startswith("re:"):
                tags.append(",".join(pieces[i:]).strip())
                break
            if piece.strip():
                tags.append(piece.strip())
    return tuple(tags)
