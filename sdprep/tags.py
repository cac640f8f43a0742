"""Pure functions over tag strings, shared by the tagger, `clean` and `captions`.

Tags are compared by a normalised key (case-folded, underscores as spaces, parentheses unescaped,
spaces collapsed), so `Blue_Eyes`, `blue eyes` and `blue  eyes` are the same tag everywhere. Text
is read through `normalise_text` first: fullwidth `ｓｍｉｌｅ` is `smile`, and invisible characters
(NUL, zero-width spaces, bidi marks, a BOM inside a line) are dropped, so `--remove smile` finds
every spelling that looks like it and no caption keeps characters that only confuse a tokenizer.
"""

from __future__ import annotations

import fnmatch
import functools
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sdprep.errors import ConfigError

_SPACES = re.compile(r"\s+")
_ASCII_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_KEPT = frozenset("\t\n\r\u2028\u2029")  # whitespace and line breaks: they separate words and tags


def normalise_text(text: str) -> str:
    """Caption text as sdprep reads tags from it: Unicode NFKC (fullwidth letters and commas become
    plain ones), without control and format characters (NUL, zero-width space / joiners, bidi
    marks and isolates, BOM, tag characters); tabs and line breaks stay."""
    if text.isascii():
        return text if text.isprintable() else _ASCII_CONTROLS.sub("", text)
    text = unicodedata.normalize("NFKC", text)
    return "".join(
        c for c in text if c.isprintable() or c in _KEPT or unicodedata.category(c) not in ("Cc", "Cf")
    )


@functools.lru_cache(maxsize=1 << 16)  # datasets repeat a small vocabulary millions of times
def tag_key(tag: str) -> str:
    """The comparison key of a tag."""
    return _SPACES.sub(" ", unescape_parentheses(normalise_text(tag)).replace("_", " ")).strip().casefold()


def remove_underscore(tag: str) -> str:
    """kohya's `--remove_underscore`: `_` -> space only for tags longer than 3 characters (`^_^` stays)."""
    return tag.replace("_", " ") if len(tag) > 3 else tag


def add_underscore(tag: str) -> str:
    """Booru style: spaces -> `_`."""
    return tag.strip().replace(" ", "_")


_UNESCAPED_PAREN = re.compile(r"(?<!\\)([()])")


def escape_parentheses(tag: str) -> str:
    """`name (series)` -> `name \\(series\\)` for A1111-style prompts; already escaped ones stay."""
    return _UNESCAPED_PAREN.sub(r"\\\1", tag)


def unescape_parentheses(tag: str) -> str:
    return tag.replace("\\(", "(").replace("\\)", ")")


def dedupe(tags: Iterable[str]) -> list[str]:
    """Drop repeated tags (by key), keeping the first occurrence and the order."""
    seen: set[str] = set()
    out = []
    for tag in tags:
        key = tag_key(tag)
        if key not in seen:
            seen.add(key)
            out.append(tag)
    return out


@dataclass(frozen=True)
class TagPattern:
    """One way of naming tags: an exact tag, a glob (`*hair*`), or a regex (`re:^.*_eyes$`)."""

    text: str

    def __post_init__(self) -> None:
        if self.kind == "regex":
            try:
                re.compile(self.text[3:])
            except re.error as exc:
                raise ConfigError(
                    f'invalid regular expression "{self.text}": {exc}',
                    "regex patterns start with re: and use Python syntax, e.g. re:^.*_eyes$",
                ) from None

    @property
    def kind(self) -> str:
        if self.text.startswith("re:"):
            return "regex"
        if any(c in self.text for c in "*?[") and not self.text.startswith("\\"):
            return "glob"
        return "exact"

    def matches(self, tag: str) -> bool:
        key = tag_key(tag)
        if self.kind == "regex":
            return re.search(self.text[3:], key) is not None or re.search(self.text[3:], tag) is not None
        if self.kind == "glob":
            return fnmatch.fnmatchcase(key, tag_key(self.text))
        return key == tag_key(self.text)


class TagMatcher:
    """A set of patterns; `matches(tag)` is True when any pattern names the tag (whole-tag matching)."""

    def __init__(self, patterns: Iterable[str]):
        self.patterns = [TagPattern(p) for p in patterns if p.strip()]
        self._exact = {tag_key(p.text) for p in self.patterns if p.kind == "exact"}
        self._other = [p for p in self.patterns if p.kind != "exact"]

    def matches(self, tag: str) -> bool:
        return tag_key(tag) in self._exact or any(p.matches(tag) for p in self._other)

    def __bool__(self) -> bool:
        return bool(self.patterns)


def replacement_patterns(table: Mapping[str, tuple[str, ...]]) -> list[tuple[TagPattern, tuple[str, ...]]]:
    """A replacement table (`{"old tag": ("new", "tags")}`, keys are patterns) ready for `replace_tags`;
    blank keys name nothing and are left out."""
    return [(TagPattern(k), v) for k, v in table.items() if k.strip()]


def replace_tags(tags: Iterable[str], replacements: list[tuple[TagPattern, tuple[str, ...]]]) -> list[str]:
    """Aliases: each tag named by a pattern becomes the pattern's tags (none = removed).

    Regex patterns may use groups: `re:^(.*) eyes$` -> `\\1 pupils`.
    """
    out: list[str] = []
    for tag in tags:
        for pattern, new in replacements:
            if not pattern.matches(tag):
                continue
            if pattern.kind == "regex":
                m = re.search(pattern.text[3:], tag_key(tag)) or re.search(pattern.text[3:], tag)
                new = tuple(m.expand(t) for t in new) if m else new
            out += new
            break
        else:
            out.append(tag)
    return out


def remove_matching(tags: Iterable[str], matcher: TagMatcher) -> list[str]:
    """Drop whole tags named by `matcher` (never words inside other tags)."""
    return [t for t in tags if not matcher.matches(t)] if matcher else list(tags)
