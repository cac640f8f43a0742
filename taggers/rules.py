"""Captions as a pure function of stored WD14 scores and rules; and merging with existing captions.

`score_tags(record, ScoreRules)` is the one rule that turns a score record (taggers/wd14.py's
sidecar record: `scores` in vocabulary order, `categories`, `rating`, `mcut`) into tags; `sdprep
tag`, `sdprep clean` (tags from stored scores), the report and the review page all call it, so the
same scores give the same tags whichever writes the caption. It reproduces kohya's
tag_images_by_wd14_tagger.py (thresholds compared with `>=` in float32, vocabulary order, general
then character tags, rating by argmax, `--remove_underscore`'s >3-character rule) without its
defects (a passing character tag crashes its current script; its replacement option does
nothing), plus imgutils' MCut thresholds.

`caption_tags(record, CaptionRules)` then applies tag's caption rules with the functions `clean`
uses for the same rules (sdprep/tags.py): replacements, then undesired tags, then always-first.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdprep.dataset import split_tags
from sdprep.errors import ConfigError, unknown_choice
from sdprep.tags import (
    TagMatcher,
    TagPattern,
    dedupe,
    escape_parentheses,
    remove_matching,
    remove_underscore,
    replace_tags,
    replacement_patterns,
    tag_key,
)

RATING_PLACES = ("first", "last", "none")
MERGE_POLICIES = ("replace", "append", "keep")
MCUT_CHARACTER_MIN = 0.15  # imgutils' lower bound for an automatic character threshold


@dataclass(frozen=True)
class ScoreRules:
    """Which stored scores become tags, in which order. A threshold above 1 disables its category."""

    general_threshold: float = 0.35
    character_threshold: float = 0.85
    mcut: bool = False  # automatic thresholds per image (MCut), as imgutils / SmilingWolf's demo
    rating: str = "none"  # first | last | none
    character_first: bool = False
    remove_underscore: bool = True

    def __post_init__(self) -> None:
        if self.rating not in RATING_PLACES:
            raise unknown_choice("rating place", self.rating, RATING_PLACES)
        for name in ("general_threshold", "character_threshold"):
            value = getattr(self, name)
            if not value >= 0:  # also catches NaN
                raise ConfigError(f"{name.replace('_', '-')} must be a number >= 0, got {value}")


Replacements = dict[str, tuple[str, ...]]


def replacement_table(value: Mapping[str, Any] | Any) -> Replacements:
    """`{"a": "b, c"}` / `{"a": ("b",)}` or the older list of (source, target) pairs -> one table."""
    pairs = value.items() if isinstance(value, Mapping) else value
    table: Replacements = {}
    for src, dst in pairs:
        table[str(src).strip()] = tuple(split_tags(dst)) if isinstance(dst, str) else tuple(dst)
    return table


@dataclass(frozen=True)
class CaptionRules:
    """How `sdprep tag` turns scores into a caption: the score rule plus caption rules.

    `replace` and `undesired` mean what `replace` and `remove` mean in `sdprep clean`
    (exact tags, globs, `re:` regexes; a replacement may list several tags, none removes).
    """

    general_threshold: float = 0.35
    character_threshold: float = 0.85
    mcut: bool = False
    rating: str = "none"
    character_first: bool = False
    remove_underscore: bool = True
    escape_parentheses: bool = False  # `name \(series\)` for A1111 prompts
    undesired: tuple[str, ...] = ()
    always_first: tuple[str, ...] = ()
    # "tag" = "new tag" (the older list of [tag, new] pairs is read too)
    replace: dict[str, tuple[str, ...]] | tuple[tuple[str, str], ...] = ()
    separator: str = ", "

    def __post_init__(self) -> None:
        object.__setattr__(self, "replace", replacement_table(self.replace))
        self.scores  # noqa: B018 - validates the thresholds and the rating place
        if not self.separator.strip():
            raise ConfigError("the tag separator cannot be blank", 'use ", " (kohya) or another mark')

    @property
    def scores(self) -> ScoreRules:
        return ScoreRules(
            self.general_threshold,
            self.character_threshold,
            self.mcut,
            self.rating,
            self.character_first,
            self.remove_underscore,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form recorded with the caption, to know later whether the rules changed."""
        from sdprep.config import to_dict

        d: dict[str, Any] = to_dict(self)  # a dataclass gives a dict
        # pairs, as before the table form (so settings recorded by earlier runs still match)
        d["replace"] = [[src, ", ".join(dst)] for src, dst in self.replacements.items()]
        return d

    @property
    def replacements(self) -> Replacements:
        """`replace` as the table `__post_init__` made of it (whichever form it was given in)."""
        return self.replace if isinstance(self.replace, dict) else replacement_table(self.replace)


def _f32(x: float) -> np.float32:
    return np.float32(x)


def _passing(record: Mapping[str, Any], category: str, threshold: float, mcut: bool) -> list[str]:
    """Tags of `category` whose score passes, in vocabulary (record) order."""
    if threshold > 1:
        return []
    categories = record.get("categories") or {}
    scores = record["scores"]
    names = [t for t in scores if categories.get(t, "general") == category]  # uncategorised: general
    if not names:
        return []
    values = np.fromiter((scores[t] for t in names), dtype=np.float32, count=len(names))
    if mcut:
        stored = (record.get("mcut") or {}).get(category)
        cut = _f32(stored) if stored is not None else _f32(mcut_threshold(values))
        if category == "character":
            cut = max(cut, _f32(MCUT_CHARACTER_MIN))
        keep = values > cut
    else:
        keep = values >= _f32(threshold)
    return [t for t, k in zip(names, keep) if k]


def mcut_threshold(probs: np.ndarray) -> float:
    """MCut (Largeron et al. 2012), as imgutils: sort descending, cut in the middle of the largest gap."""
    probs = np.asarray(probs, dtype=np.float32)
    if probs.size < 2:
        return 0.0
    ordered = np.sort(probs)[::-1]
    t = int((ordered[:-1] - ordered[1:]).argmax())
    return float((ordered[t] + ordered[t + 1]) / np.float32(2))


def rating_tag(record: Mapping[str, Any]) -> str | None:
    """The rating with the highest score (kohya: argmax of the 4 rating outputs)."""
    rating = record.get("rating") or {}
    if not rating:
        return None
    best: str = max(rating, key=lambda name: rating[name])  # max keeps the first of equal scores, like argmax
    return best


def score_tags(record: Mapping[str, Any], rules: ScoreRules) -> list[str]:
    """The tags one image's stored scores give, in caption order: the one score-to-tags rule."""
    general = _passing(record, "general", rules.general_threshold, rules.mcut)
    character = _passing(record, "character", rules.character_threshold, rules.mcut)
    ordered = character + general if rules.character_first else general + character
    rating = rating_tag(record) if rules.rating != "none" else None
    if rating is not None:
        ordered = [rating, *ordered] if rules.rating == "first" else [*ordered, rating]
    if rules.remove_underscore:
        ordered = [remove_underscore(t) for t in ordered]
    return ordered


@functools.lru_cache(maxsize=64)
def _patterns(
    replace: tuple[tuple[str, tuple[str, ...]], ...], undesired: tuple[str, ...]
) -> tuple[list[tuple[TagPattern, tuple[str, ...]]], TagMatcher]:
    return replacement_patterns(dict(replace)), TagMatcher(undesired)


def caption_tags(record: Mapping[str, Any], rules: CaptionRules) -> list[str]:
    """The caption's tags, in order, for one image's score record."""
    ordered = score_tags(record, rules.scores)
    replacements, undesired = _patterns(tuple(rules.replacements.items()), rules.undesired)
    if replacements:
        ordered = replace_tags(ordered, replacements)
    ordered = remove_matching(ordered, undesired)
    if rules.always_first:
        keys = [tag_key(t) for t in rules.always_first]
        first = sorted((t for t in ordered if tag_key(t) in keys), key=lambda t: keys.index(tag_key(t)))
        ordered = first + [t for t in ordered if tag_key(t) not in keys]
    ordered = dedupe(ordered)
    if rules.escape_parentheses:
        ordered = [escape_parentheses(t) for t in ordered]
    return ordered


def caption_from_scores(record: Mapping[str, Any], rules: CaptionRules) -> str:
    """The caption text (no trailing newline) for one image's score record."""
    return rules.separator.join(caption_tags(record, rules))


def merge_caption(existing: str | None, new: str, policy: str, separator: str = ", ") -> str:
    """Combine an existing caption with a new one: replace, append (deduped by tag key) or keep."""
    if policy not in MERGE_POLICIES:
        raise unknown_choice("merge policy", policy, MERGE_POLICIES)
    existing = (existing or "").strip()
    if policy == "replace" or not existing:
        return new
    if policy == "keep":
        return existing
    mark = separator.strip() or ","
    return separator.join(dedupe(split_tags(existing, mark) + split_tags(new, mark)))
