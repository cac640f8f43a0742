"""Caption rules: the TOML schema of `sdprep clean` and pure functions over one image's tag list.

A caption is rebuilt in this order (each step is a function below, usable on its own):

    trigger tokens, folder prefix tags, the first N tags kept as they are, the other tags
    (replaced, removed, deduplicated, core tags pruned, sorted), folder suffix tags, and the
    greyscale / monochrome label when the caption does not have it yet (as the seed did)

Tags are compared by `sdprep.tags.tag_key` everywhere (case, `_` vs space, escaped parentheses
and spacing do not matter), and removal is always of whole tags: removing `braid` never touches
`braided hair` (the seed's regex did). Placed tags (trigger, prefix, suffix) are taken out of the
body before being put back in their place, so applying the rules twice changes nothing.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sdprep.config import from_dict, load_toml
from sdprep.dataset import read_text_file, split_tags
from sdprep.errors import ConfigError, SdprepError
from sdprep.prep.monochrome import LABELS, MonochromeSettings
from sdprep.taggers.rules import ScoreRules, score_tags
from sdprep.tags import (
    TagMatcher,
    add_underscore,
    dedupe,
    escape_parentheses,
    remove_matching,
    remove_underscore,
    replace_tags,
    replacement_patterns,
    tag_key,
)

SortMode = Literal["as_tagged", "score", "alphabetical", "category"]
Underscores = Literal["keep", "space", "underscore"]
Source = Literal["auto", "caption", "wd14", "booru"]
PruneScope = Literal["trigger", "folder"]

SORT_MODES = ("as_tagged", "score", "alphabetical", "category")
# Booru / WD14 categories, in the order `sort = "category"` puts them; unknown ones go last.
CATEGORY_ORDER = ("character", "copyright", "artist", "general", "meta")
DEFAULT_PRUNE_PCT = 60.0


@dataclass(frozen=True)
class CleanRules:
    """Everything `sdprep clean` can be told, as options or as a TOML file (`--rules FILE.toml`).

    Tag lists accept TOML arrays or one comma-separated string. `replace`, `prefix` and `suffix`
    are tables: `"old tag" = "new tag"` (an empty value removes), `"10_low quality" = "low quality"`
    (keys of prefix/suffix are folder names or globs such as `"*_high*"`).
    """

    trigger: tuple[str, ...] = ()
    trigger_from_folder: bool = False  # kohya `<N>_<tokens>` folders: their tokens are the trigger
    remove: tuple[str, ...] = ()  # exact tags, globs (`*hair*`) or regexes (`re:.*_eyes$`)
    remove_files: tuple[Path, ...] = ()  # one pattern per line (or comma-separated); `#` comments
    replace: dict[str, tuple[str, ...]] = field(default_factory=dict)
    keep: tuple[str, ...] = ()  # never pruned or trimmed
    keep_first: int = 0  # the first N tags after the trigger/prefix keep their place
    dedupe: bool = True
    sort: SortMode = "as_tagged"
    underscores: Underscores = "keep"
    escape_parentheses: bool = False
    prefix: dict[str, tuple[str, ...]] = field(default_factory=dict)
    suffix: dict[str, tuple[str, ...]] = field(default_factory=dict)
    prune_core: float | None = None  # percent of a concept's images; None = off
    prune_scope: PruneScope = "trigger"
    monochrome: MonochromeSettings = field(default_factory=MonochromeSettings)
    max_tokens: int | None = None
    audit_tokens: bool = False
    tokenizer: str | None = None
    source: Source = "auto"
    # only when tags come from stored WD14 scores: the rule `sdprep tag` uses (taggers/rules.py)
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    mcut: bool = False
    rating: Literal["first", "last", "none"] = "none"
    character_first: bool = False

    def __post_init__(self) -> None:
        self.scores  # noqa: B018 - validates the score rule
        if self.prune_core is not None and not 0 < self.prune_core <= 100:
            raise ConfigError(f"prune_core must be a percentage in (0, 100], got {self.prune_core}")
        if self.keep_first < 0:
            raise ConfigError(f"keep_first must be 0 or more, got {self.keep_first}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be at least 1, got {self.max_tokens}")

    @property
    def scores(self) -> ScoreRules:
        """How stored WD14 scores become tags; underscores follow `underscores` afterwards."""
        return ScoreRules(
            self.general_threshold, self.character_threshold, self.mcut, self.rating, self.character_first
        )

    @property
    def wants_tokenizer(self) -> bool:
        return self.audit_tokens or self.max_tokens is not None


def load_rules(path: Path | str) -> CleanRules:
    """Read a rules TOML file strictly (unknown keys are errors with a suggestion)."""
    try:
        return from_dict(CleanRules, load_toml(path))
    except ConfigError as exc:
        if str(path) in exc.message:
            raise
        raise ConfigError(f"{path}: {exc.message}", exc.hint) from None


def combine(base: CleanRules, overrides: Mapping[str, Any]) -> CleanRules:
    """Layer command-line values over rules from a file: lists extend, tables merge, others replace.

    Keys whose value is None (an option not given) are ignored.
    """
    values: dict[str, Any] = {}
    for name, value in overrides.items():
        if value is None:
            continue
        current = getattr(base, name)
        if isinstance(current, tuple):
            values[name] = current + tuple(value)
        elif isinstance(current, dict):
            values[name] = {**current, **value}
        else:
            values[name] = value
    try:
        return dataclasses.replace(base, **values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc


def parse_pairs(pairs: Iterable[str], option: str) -> dict[str, tuple[str, ...]]:
    """`["a=b, c", "d="]` -> `{"a": ("b", "c"), "d": ()}` for `--replace` / `--prefix` / `--suffix`."""
    out: dict[str, tuple[str, ...]] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f'{option} "{pair}" is not of the form A=B', f'write e.g. {option} "a=b"')
        key, value = pair.split("=", 1)
        if not key.strip():
            raise ConfigError(f'{option} "{pair}" has nothing before "="')
        out[key.strip()] = tuple(split_tags(value))
    return out


def read_tag_file(path: Path | str) -> list[str]:
    """Tag patterns from a text file: one per line or comma-separated; blank lines and `#` comments skipped."""
    path = Path(path)
    if not path.is_file():
        what = "a folder, not a file of tags" if path.is_dir() else "no such file"
        raise ConfigError(f"{path}: {what}", "check the path given to --remove-file / remove_files")
    try:
        text = read_text_file(path)
    except SdprepError as exc:
        raise ConfigError(str(exc.message), exc.hint) from None
    tags: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            tags += split_tags(line)
    return tags


# -- the compiled rule set ---------------------------------------------------------------------


@dataclass
class TagInfo:
    """What is known about one image's tags besides their order: scores and categories by tag key."""

    scores: Mapping[str, float] = field(default_factory=dict)
    categories: Mapping[str, str] = field(default_factory=dict)


class RuleSet:
    """CleanRules with the matchers built and the remove files read, ready to apply to many images."""

    def __init__(self, rules: CleanRules):
        self.rules = rules
        patterns = list(rules.remove)
        for path in rules.remove_files:
            patterns += read_tag_file(path)
        self.remove = TagMatcher(patterns)
        self.keep = TagMatcher(rules.keep)
        self.replacements = replacement_patterns(rules.replace)
        self._placed_anywhere = {tag_key(t) for tags in rules.prefix.values() for t in tags}
        self._placed_anywhere |= {tag_key(t) for tags in rules.suffix.values() for t in tags}
        self._placed_anywhere |= {tag_key(t) for t in rules.trigger} | set(LABELS)

    def trigger_for(self, folder: str) -> tuple[str, ...]:
        """The trigger tokens of images in a folder (`trigger_from_folder` reads `<N>_<tokens>`)."""
        if self.rules.trigger_from_folder:
            from sdprep.dataset import parse_repeat_folder

            parsed = parse_repeat_folder(folder)
            if parsed is not None:
                return tuple(dedupe([*self.rules.trigger, parsed.tokens]))
        return tuple(self.rules.trigger)

    def protected(self, tag: str, trigger: Iterable[str] = ()) -> bool:
        """Tags core pruning and token trimming never remove: trigger, prefix/suffix, labels, --keep."""
        key = tag_key(tag)
        return key in self._placed_anywhere or key in {tag_key(t) for t in trigger} or self.keep.matches(tag)


def folder_tags(mapping: Mapping[str, tuple[str, ...]], folder: str) -> list[str]:
    """Tags of every key of a prefix/suffix table naming `folder` (exact name or glob), in table order."""
    out: list[str] = []
    for pattern, tags in mapping.items():
        if pattern == folder or fnmatch.fnmatchcase(folder, pattern):
            out += tags
    return dedupe(out)


def sort_tags(tags: list[str], mode: str, info: TagInfo) -> list[str]:
    """Order tags: as tagged, by score (highest first, unscored last), alphabetically, or by category."""
    if mode == "as_tagged":
        return list(tags)
    if mode == "alphabetical":
        return sorted(tags, key=tag_key)
    if mode == "score":
        return sorted(tags, key=lambda t: -info.scores.get(tag_key(t), -1.0))
    if mode == "category":
        rank = {c: i for i, c in enumerate(CATEGORY_ORDER)}
        return sorted(tags, key=lambda t: rank.get(info.categories.get(tag_key(t), ""), len(rank)))
    raise ConfigError(f'unknown sort "{mode}"', "valid: " + ", ".join(SORT_MODES))


def format_tag(tag: str, underscores: str, escape: bool) -> str:
    """Apply the underscore convention (kohya's >3-character rule for spaces) and paren escaping."""
    if underscores == "space":
        tag = remove_underscore(tag)
    elif underscores == "underscore":
        tag = add_underscore(tag)
    return escape_parentheses(tag) if escape else tag


def core_tags(
    counts: Counter[str], images: int, percent: float, protected: Callable[[str], bool]
) -> list[tuple[str, float]]:
    """Tags (by key) present in at least `percent`% of a concept's images, most frequent first."""
    if images <= 0:
        return []
    found = [(key, n / images) for key, n in counts.items() if n / images * 100 >= percent - 1e-9]
    found = [(key, f) for key, f in found if not protected(key)]
    return sorted(found, key=lambda kf: (-kf[1], kf[0]))


# -- one caption ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """The tags this image gets in fixed places."""

    trigger: tuple[str, ...] = ()
    prefix: tuple[str, ...] = ()
    suffix: tuple[str, ...] = ()
    label: str | None = None

    def keys(self) -> set[str]:
        """Keys of the tags that move to their place (the label is only added when missing)."""
        return {tag_key(t) for t in (*self.trigger, *self.prefix, *self.suffix)}


def placement_for(rs: RuleSet, folder: str, label: str | None) -> Placement:
    trigger = rs.trigger_for(folder)
    return Placement(
        trigger,
        tuple(folder_tags(rs.rules.prefix, folder)),
        tuple(folder_tags(rs.rules.suffix, folder)),
        label,
    )


def body_tags(tags: Iterable[str], rs: RuleSet, place: Placement) -> list[str]:
    """The image's own tags after replace / remove / dedupe, without the placed tags."""
    placed = place.keys()
    body = [t for t in tags if tag_key(t) not in placed]
    if rs.replacements:
        body = [t for t in replace_tags(body, rs.replacements) if tag_key(t) not in placed]
    body = remove_matching(body, rs.remove)
    return dedupe(body) if rs.rules.dedupe else body


@dataclass
class Cleaned:
    """A rebuilt caption: the final tags and what was trimmed to fit the token budget."""

    tags: list[str]
    trimmed: list[str] = field(default_factory=list)
    tokens: int | None = None
    head: int = 0  # leading tags in fixed places (trigger, prefix, kept first): never reordered


def clean_tags(
    tags: Iterable[str],
    rs: RuleSet,
    place: Placement,
    info: TagInfo | None = None,
    *,
    pruned: frozenset[str] | set[str] = frozenset(),
    count_tokens: Callable[[str], int] | None = None,
) -> Cleaned:
    """Apply every rule to one image's tags (pure: no I/O). `pruned` holds core-tag keys to drop."""
    info = info or TagInfo()
    rules = rs.rules
    tags = list(tags)
    if place.label and tags and tag_key(tags[-1]) == tag_key(place.label):
        tags.pop()  # the label this function appended last time: it goes back after the suffix
    body = body_tags(tags, rs, place)
    fixed, rest = body[: rules.keep_first], body[rules.keep_first :]
    if pruned:
        rest = [t for t in rest if tag_key(t) not in pruned or rs.protected(t, place.trigger)]
    rest = sort_tags(rest, rules.sort, info)
    fixed = [format_tag(t, rules.underscores, rules.escape_parentheses) for t in fixed]
    rest = [format_tag(t, rules.underscores, rules.escape_parentheses) for t in rest]
    head = [*place.trigger, *place.prefix, *fixed]
    tail = list(place.suffix)
    if place.label and tag_key(place.label) not in {tag_key(t) for t in (*head, *rest, *tail)}:
        tail.append(place.label)
    result = Cleaned(_join(head, rest, tail, rules.dedupe), head=len(_join(head, [], [], rules.dedupe)))
    if count_tokens is None:
        return result
    result.tokens = count_tokens(", ".join(result.tags))
    if rules.max_tokens is None or result.tokens <= rules.max_tokens:
        return result
    trimmed = _trim(head, rest, tail, rs, place, info, count_tokens, rules.max_tokens)
    trimmed.head = result.head
    return trimmed


def _join(head: list[str], rest: list[str], tail: list[str], unique: bool) -> list[str]:
    tags = [*head, *rest, *tail]
    return dedupe(tags) if unique else tags


def _trim(
    head: list[str],
    rest: list[str],
    tail: list[str],
    rs: RuleSet,
    place: Placement,
    info: TagInfo,
    count_tokens: Callable[[str], int],
    budget: int,
) -> Cleaned:
    """Drop the lowest-ranked removable tags until the caption fits `budget` (`max_tokens`).

    Rank: WD14 score when known (an unscored tag counts as certain, e.g. one a person added);
    among equals, the later tag goes first. Trigger, prefix/suffix, label, kept and fixed tags stay.
    """
    order = sorted(
        (i for i, t in enumerate(rest) if not rs.protected(t, place.trigger)),
        key=lambda i: (info.scores.get(tag_key(rest[i]), 1.0), -i),
    )
    dropped: set[int] = set()
    tags = _join(head, rest, tail, rs.rules.dedupe)
    tokens = count_tokens(", ".join(tags))
    for i in order:
        if tokens <= budget:
            break
        dropped.add(i)
        tags = _join(head, [t for j, t in enumerate(rest) if j not in dropped], tail, rs.rules.dedupe)
        tokens = count_tokens(", ".join(tags))
    return Cleaned(tags, [rest[i] for i in sorted(dropped)], tokens)


# -- tags and scores stored in sidecars ----------------------------------------------------------

_BOORU_CATEGORIES = ("character", "copyright", "artist", "general", "meta")
# Categories a caption built from a sidecar includes, in this order (WD14 has the same two).
CAPTION_CATEGORIES = ("character", "general")


def _sdprep_part(sidecar: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    meta = sidecar.get("sdprep")
    part = meta.get(key) if isinstance(meta, Mapping) else None
    return part if isinstance(part, Mapping) else {}


def _booru_lists(sidecar: Mapping[str, Any]) -> dict[str, list[str]]:
    """Booru tags by category: sdprep's scrape record, else gallery-dl's raw Danbooru keys."""
    stored = _sdprep_part(sidecar, "booru").get("tags")
    if isinstance(stored, Mapping):
        return {str(c): [str(t) for t in tags] for c, tags in stored.items() if isinstance(tags, list)}
    out: dict[str, list[str]] = {}
    for cat in _BOORU_CATEGORIES:
        tags = sidecar.get(f"tags_{cat}")
        if isinstance(tags, list):
            out[cat] = [str(t) for t in tags if str(t).strip()]
        elif isinstance(sidecar.get(f"tag_string_{cat}"), str):
            out[cat] = sidecar[f"tag_string_{cat}"].split()
    return {c: t for c, t in out.items() if t}


def sidecar_info(sidecar: Mapping[str, Any]) -> TagInfo:
    """Scores (WD14) and categories (WD14, booru) of an image's tags, keyed by tag key."""
    categories: dict[str, str] = {}
    for cat, tags in _booru_lists(sidecar).items():
        for tag in tags:
            categories.setdefault(tag_key(tag), cat)
    wd14 = _sdprep_part(sidecar, "wd14")
    scores = {
        tag_key(t): float(s) for t, s in (wd14.get("scores") or {}).items() if isinstance(s, (int, float))
    }
    for tag, cat in (wd14.get("categories") or {}).items():
        categories.setdefault(tag_key(tag), str(cat))
    return TagInfo(scores, categories)


def sidecar_tags(
    sidecar: Mapping[str, Any], rules: CleanRules, source: str = "auto"
) -> tuple[list[str], str] | None:
    """An image's tags from its sidecar when it has no caption: (tags, "wd14" | "booru") or None.

    WD14 scores give the tags `sdprep tag` writes from them with the same thresholds (`score_tags`:
    vocabulary order, general then character unless `character_first`, rating only when asked);
    booru tags are character then general, as listed. Names get kohya's underscore rule
    (`long_hair` -> `long hair`, `^_^` kept), as `sdprep tag` writes them.
    """
    wd14 = _sdprep_part(sidecar, "wd14")
    scores = wd14.get("scores")
    if source in ("auto", "wd14") and isinstance(scores, Mapping) and scores:
        return score_tags(wd14, rules.scores), "wd14"
    if source == "wd14":
        return None
    lists = _booru_lists(sidecar)
    if source in ("auto", "booru") and any(lists.get(c) for c in CAPTION_CATEGORIES):
        tags = [remove_underscore(t) for c in CAPTION_CATEGORIES for t in lists.get(c, [])]
        return tags, "booru"
    return None
