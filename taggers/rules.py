"""Captions as a pure function of stored WD14 scores and rules; and merging with existing captions.

`caption_tags(record, rules)` reads a score record (taggers/wd14.py's sidecar record: `scores` in
vocabulary order, `categories`, `rating`, `mcut`) and returns the caption's tags. It reproduces
kohya's tag_images_by_wd14_tagger.py (thresholds compared with `>=` in float32, vocabulary order,
rating by argmax, `--remove_underscore`'s >3-character rule, then tag replacements, then undesired
tags) without its defects (a passing character tag crashes its current script; its replacement
option does nothing), plus imgutils' MCut thresholds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sdprep.dataset import split_tags
from sdprep.errors import ConfigError, unknown_choice
from sdprep.tags import TagMatcher, dedupe, escape_parentheses, remove_underscore, tag_key

RATING_PLACES = ("first", "last", "none")
MERGE_POLICIES = ("replace", "append", "keep")
MCUT_CHARACTER_MIN = 0.15  # imgutils' lower bound for an automatic character threshold


@dataclass(frozen=True)
class CaptionRules:
    """How scores become a caption. A threshold above 1 disables its category."""

    general_threshold: float = 0.35
    character_threshold: float = 0.85
    mcut: bool = False  # automatic thresholds per image (MCut), as imgutils / SmilingWolf's demo
    rating: str = "none"  # first | last | none
    character_first: bool = False
    remove_underscore: bool = True
    escape_parentheses: bool = False  # `name \(series\)` for A1111 prompts
    undesired: tuple[str, ...] = ()
    always_first: tuple[str, ...] = ()
    replace: tuple[tuple[str, str], ...] = ()  # (tag, replacement), matched by tag key
    separator: str = ", "

    def __post_init__(self) -> None:
        if self.rating not in RATING_PLACES:
            raise unknown_choice("rating place", self.rating, RATING_PLACES)
        for name in ("general_threshold", "character_threshold"):
            value = getattr(self, name)
            if not value >= 0:  # also catches NaN
                raise ConfigError(f"{name.replace('_', '-')} must be a number >= 0, got {value}")
        if not self.separator.strip():
            raise ConfigError("the tag separator cannot be blank", 'use ", " (kohya) or another mark')

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form recorded with the caption, to know later whether the rules changed."""
        d = asdict(self)
        d["undesired"] = list(self.undesired)
        d["always_first"] = list(self.always_first)
        d["replace"] = [list(pair) for pair in self.replace]
        return d


def _f32(x: float) -> np.float32:
    return np.float32(x)


def _passing(record: dict, category: str, threshold: float, mcut: bool) -> list[str]:
    """Tags of `category` whose score passes, in vocabulary (record) order."""
    if threshold > 1:
        return []
    categories = record["categories"]
    names = [t for t, c in categories.items() if c == category]
    if not names:
        return []
    scores = record["scores"]
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


def rating_tag(record: dict) -> str | None:
    """The rating with the highest score (kohya: argmax of the 4 rating outputs)."""
    rating = record.get("rating") or {}
    if not rating:
        return None
    return max(rating, key=lambda name: rating[name])  # max keeps the first of equal scores, like argmax


def caption_tags(record: dict, rules: CaptionRules) -> list[str]:
    """The caption's tags, in order, for one image's score record."""
    general = _passing(record, "general", rules.general_threshold, rules.mcut)
    character = _passing(record, "character", rules.character_threshold, rules.mcut)
    ordered = character + general if rules.character_first else general + character
    rating = rating_tag(record) if rules.rating != "none" else None
    if rating is not None:
        ordered = [rating, *ordered] if rules.rating == "first" else [*ordered, rating]
    if rules.remove_underscore:
        ordered = [remove_underscore(t) for t in ordered]
    if rules.replace:
        table = {tag_key(src): dst.strip() for src, dst in rules.replace}
        ordered = [table.get(tag_key(t), t) for t in ordered]
        ordered = [t for t in ordered if t]
    undesired = TagMatcher(rules.undesired)
    if undesired:
        ordered = [t for t in ordered if not undesired.matches(t)]
    if rules.always_first:
        keys = [tag_key(t) for t in rules.always_first]
        first = sorted((t for t in ordered if tag_key(t) in keys), key=lambda t: keys.index(tag_key(t)))
        ordered = first + [t for t in ordered if tag_key(t) not in keys]
    ordered = dedupe(ordered)
    if rules.escape_parentheses:
        ordered = [escape_parentheses(t) for t in ordered]
    return ordered


def caption_from_scores(record: dict, rules: CaptionRules) -> str:
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
