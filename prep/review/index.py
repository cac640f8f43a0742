"""What the review page shows of each image, read from the dataset's files, and its filters.

The index holds one small `Entry` per image (caption, size from the header, mask, monochrome label,
whether WD14 scores are stored, the report's problems), not the pixels or the scores, so 5,000
images take a few MB. Masks are checked for emptiness (a decode) by a background pass, so the page
is up before every mask is read.
"""

from __future__ import annotations

import functools
import os
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdprep.buckets import BucketSettings
from sdprep.dataset import (
    Item,
    iter_items,
    read_caption,
    read_sidecar,
    sdprep_meta,
    split_tags,
    unsafe_reason,
)
from sdprep.errors import SdprepError
from sdprep.images import image_header, load_image
from sdprep.prep.monochrome import LABELS
from sdprep.prep.report import MASK_EMPTY, NO_CAPTION, mask_size_problem, size_checks
from sdprep.stage import map_items
from sdprep.tags import tag_key

MAX_TAGS_LISTED = 400


@dataclass
class Entry:
    """One image as the page shows it."""

    rel: str  # path relative to the dataset root, with /
    path: Path
    caption: str | None = None
    size: tuple[int, int] | None = None
    bucket: tuple[int, int] | None = None
    mask: bool = False
    mono: str | None = None
    scores: bool = False
    problems: list[str] = field(default_factory=list)
    version: int = 0  # the image's mtime (thumbnail cache key)
    mask_version: int = 0
    tags: list[str] = field(default_factory=list)  # the caption's tags
    keys: dict[str, str] = field(default_factory=dict)  # tag key -> the tag as written, once each
    root: str | None = None  # the real path of the dataset folder (the symlink rule)

    @property
    def item(self) -> Item:
        return Item(self.path, self.root)

    def set_caption(self, caption: str | None) -> None:
        self.caption = caption
        self.tags = split_tags(caption) if caption else []
        self.keys = {}
        for tag in self.tags:
            self.keys.setdefault(tag_key(tag), tag)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.rel,
            "name": self.path.name,
            "caption": self.caption or "",
            "tags": self.tags,
            "size": list(self.size) if self.size else None,
            "mask": self.mask,
            "mono": self.mono,
            "scores": self.scores,
            "problems": self.problems,
            "v": self.version,
            "mv": self.mask_version,
        }


def _mtime(path: Path) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


def read_entry(root: Path, item: Item, *, settings: BucketSettings) -> Entry:
    """An image's entry, from its caption, sidecar and header (no pixel is decoded)."""
    entry = Entry(
        item.path.relative_to(root).as_posix(), item.path, version=_mtime(item.path), root=item.root
    )
    try:
        entry.set_caption(read_caption(item))
        if entry.caption is None:
            entry.problems.append(NO_CAPTION)
    except SdprepError as exc:
        entry.problems.append(exc.reason)
    try:
        meta = sdprep_meta(read_sidecar(item))
        mono = meta.get("monochrome")
        entry.mono = mono.get("label") if isinstance(mono, dict) else None
        wd14 = meta.get("wd14")
        entry.scores = isinstance(wd14, dict) and bool(wd14.get("scores"))
    except SdprepError as exc:
        entry.problems.append(exc.reason)
    try:
        entry.size = image_header(item.path, root=item.root).size
    except SdprepError as exc:
        entry.problems.append(exc.reason)
        return entry
    entry.bucket, problems = _size_checks(entry.size, settings)
    entry.problems += problems
    mask = item.mask_path()
    unsafe = os.path.isfile(mask) and unsafe_reason(mask, item.root)
    if unsafe:  # e.g. masks/ linked out of the dataset: never shown
        entry.problems.append(f"mask: {unsafe}")
    elif os.path.isfile(mask):
        entry.mask, entry.mask_version = True, _mtime(mask)
        try:
            problem = mask_size_problem(image_header(mask, root=item.root).size, entry.size)
        except SdprepError as exc:
            problem = "mask: " + exc.reason
        if problem:
            entry.problems.append(problem)
    return entry


_size_checks = functools.lru_cache(maxsize=4096)(size_checks)  # datasets repeat a few sizes


def mask_is_empty(entry: Entry) -> bool:
    """Whether the entry's mask is all black (decodes the mask)."""
    try:
        return load_image(entry.item.mask_path(), "L", root=entry.item.root).getextrema()[1] == 0
    except SdprepError:
        return False  # unreadable: already named by the header check


@dataclass(frozen=True)
class Filter:
    """The page's filters; an image shows when it passes all of them."""

    tag: str = ""
    text: str = ""
    mask: bool = False
    mono: bool = False
    problems: bool = False

    def matches(self, e: Entry) -> bool:
        if self.mask and not e.mask:
            return False
        if self.problems and not e.problems:
            return False
        if self.mono and not (e.mono in LABELS or any(label in e.keys for label in LABELS)):
            return False
        if self.tag and tag_key(self.tag) not in e.keys:
            return False
        if self.text:
            needle = self.text.casefold()
            if needle not in e.rel.casefold() and needle not in (e.caption or "").casefold():
                return False
        return True


class Index:
    """Every image of the dataset under review, in the order the stages list them."""

    def __init__(self, root: Path, recursive: bool, settings: BucketSettings | None = None):
        self.root = Path(root).absolute()
        self.recursive = recursive
        self.settings = settings or BucketSettings()
        self.entries: dict[str, Entry] = {}
        self.lock = threading.RLock()
        self._generation = 0

    def scan(self) -> None:
        """Read every image's entry afresh (new and vanished files included)."""
        fresh = {}
        read = functools.partial(read_entry, self.root, settings=self.settings)
        for item, e in map_items(read, iter_items(self.root, self.recursive)):
            if not isinstance(e, Entry):  # an error about the file itself: listed, with the reason
                e = Entry(
                    item.path.relative_to(self.root).as_posix(), item.path, problems=[str(e)], root=item.root
                )
            fresh[e.rel] = e
        with self.lock:
            self.entries = fresh
            self._generation += 1
        self.start_mask_checks()

    def refresh(self, rels: Iterable[str]) -> None:
        """Re-read the entries of these images (a vanished one leaves the index)."""
        with self.lock:
            for rel in rels:
                old = self.entries.get(rel)
                if old is None:
                    continue
                if not os.path.lexists(old.path):
                    del self.entries[rel]
                    continue
                e = read_entry(self.root, old.item, settings=self.settings)
                if e.mask and mask_is_empty(e):
                    e.problems.append(MASK_EMPTY)
                self.entries[rel] = e

    def start_mask_checks(self) -> None:
        """Look for empty masks in a background thread (a decode per mask)."""
        threading.Thread(target=self._check_masks, args=(self._generation,), daemon=True).start()

    def _check_masks(self, generation: int) -> None:
        for e in list(self.entries.values()):
            if generation != self._generation:
                return  # a newer scan replaced these entries (and checks them itself)
            if e.mask and mask_is_empty(e):
                with self.lock:
                    if self.entries.get(e.rel) is e and MASK_EMPTY not in e.problems:
                        e.problems.append(MASK_EMPTY)

    def get(self, rel: str) -> Entry | None:
        with self.lock:
            return self.entries.get(rel)

    def query_all(self) -> list[Entry]:
        with self.lock:
            return list(self.entries.values())

    def query(self, flt: Filter) -> list[Entry]:
        with self.lock:
            return [e for e in self.entries.values() if flt.matches(e)]

    def tag_counts(self, entries: list[Entry], keep: str = "") -> list[tuple[str, int]]:
        """(tag, images) of these entries, most frequent first; `keep` stays listed (the active filter)."""
        counts: Counter[str] = Counter()
        shown: dict[str, str] = {}
        for e in entries:
            counts.update(e.keys.keys())
            for key, tag in e.keys.items():
                shown.setdefault(key, tag)
        top = counts.most_common(MAX_TAGS_LISTED)
        if keep and tag_key(keep) in counts and all(k != tag_key(keep) for k, _ in top):
            top.append((tag_key(keep), counts[tag_key(keep)]))
        return [(shown[k], n) for k, n in top]
