"""The score-rule options `sdprep tag` and `sdprep clean` share (taggers/rules.py ScoreRules)."""

from __future__ import annotations

from collections.abc import Callable

import click

RATINGS = ("first", "last", "none")  # taggers.rules.RATING_PLACES, kept import-free
DEFAULTS = {"general_threshold": 0.35, "character_threshold": 0.85, "rating": "none"}  # ScoreRules()


def score_options(layered: bool) -> Callable:
    """Threshold, MCut, rating and order options. `layered`: defaults are None (not given), so the
    values of a rules file stay unless an option is given (clean); otherwise the defaults (tag)."""

    def default(name: str):
        return None if layered else DEFAULTS[name]

    def flag(name: str, text: str) -> Callable:
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

    def decorate(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate
