"""Batch rewriting of caption folders of any origin (`sdprep captions ...`), and the caption writer.

Which files are captions: every `<stem>.txt` beside an image, and `.txt` files without an image
("orphans", e.g. captions whose images were moved) unless their name is one of the usual
non-caption texts (README, LICENSE, notes, requirements, prompts...) or they hold more than one
non-empty line (a caption is one line; kohya reads only the first). Skipped texts are counted in
the summary. `--no-orphans` restricts to captions of images.

Edits are tag-aware: the caption is split on commas, spacing normalised, and tags compared by
`tag_key`; `remove "blue eyes"` removes that tag, not the words inside `light blue eyes`. A file is
rewritten only when its tag list changes (a file that only lacks the space after commas is left
as it is); rewritten files are `tag, tag, tag` plus a newline.

Undo: every folder given on the command line is its own dataset root with its own journal, so a
run over `a/ b/` is undone with `sdprep undo a/` and `sdprep undo b/` (the summary prints both).
A folder given twice, or inside another one given with --recursive, is an error.
"""

from __future__ import annotations

import bisect
import contextlib
import difflib
import itertools
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from sdprep import fileops
from sdprep.dataset import (
    CAPTION_EXT,
    IGNORED_DIRS,
    SDPREP_KEY,
    Item,
    check_folder,
    dump_sidecar,
    format_caption,
    is_image,
    join_tags,
    name_suffix,
    parse_repeat_folder,
    read_sidecar,
    read_text_file,
    split_tags,
)
from sdprep.errors import ConfigError, DatasetError, SdprepError
from sdprep.prep.lineage import kept_head
from sdprep.progress import NullReporter, Reporter
from sdprep.stage import StageResult, each_item, progress
from sdprep.tags import TagMatcher, dedupe, tag_key

NOT_CAPTIONS = {
    "readme",
    "license",
    "licence",
    "copying",
    "changelog",
    "notes",
    "todo",
    "requirements",
    "prompt",
    "prompts",
    "sample_prompts",
    "robots",
}

DiffSink = Callable[[str], None]


# -- diffs and journalled writes -----------------------------------------------------------------


def caption_diff(name: str, old: str | None, new: str | None) -> str:
    """A unified diff of one text file (`old`/`new` None = absent), as `diff -uN` prints it."""

    def lines(text: str | None) -> list[str]:
        if not text:
            return []
        out = text.splitlines(keepends=True)
        if not out[-1].endswith("\n"):
            out[-1] += "\n\\ No newline at end of file\n"
        return out

    a = "/dev/null" if old is None else name
    b = "/dev/null" if new is None else name
    return "".join(difflib.unified_diff(lines(old), lines(new), a, b))


class CaptionWriter:
    """Writes captions and sidecars of one dataset root through its journal, or only diffs them.

    The journal operation starts at the first real change, so a run that changes nothing leaves
    no trace. Writes are batched (`Operation.write_many`: one journal sync per batch, each file
    replaced atomically). Use as a context manager.
    """

    BATCH = 512

    def __init__(self, root: Path, command: str, *, dry_run: bool = False, on_diff: DiffSink | None = None):
        self.root = Path(root)
        self.command = command
        self.dry_run = dry_run
        self.on_diff = on_diff
        self.captions = 0
        self.sidecars = 0
        self._stack = contextlib.ExitStack()
        self._op: fileops.Operation | None = None
        self._pending: list[tuple[Path | str, bytes]] = []  # as Operation.write_many takes them

    def __enter__(self) -> CaptionWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.flush()
        finally:
            self._stack.__exit__(exc_type, exc, tb)

    def write(self, path: Path, text: str) -> None:
        """Queue a file write (journalled and written with its batch; nothing in a dry run)."""
        if self.dry_run:
            return
        self._pending.append((path, text.encode("utf-8")))
        if len(self._pending) >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        """Write the pending files (through the journal)."""
        if self._pending:
            pending, self._pending = self._pending, []
            self._operation().write_many(pending)

    def _operation(self) -> fileops.Operation:
        if self._op is None:
            self._op = self._stack.enter_context(fileops.Journal(self.root).begin(self.command))
        return self._op

    def write_caption(self, path: Path, old: str | None, tags: list[str]) -> bool:
        """Write `tags` as the caption at `path` unless the file already says exactly that."""
        new = format_caption(join_tags(tags)) if tags else ""
        if old == new:
            return False
        self.captions += 1
        if self.on_diff is not None:
            self.on_diff(caption_diff(path.as_posix(), old, new))
        self.write(path, new)
        return True

    def write_sidecar(self, path: Path, data: dict[str, Any], old_text: str | None) -> bool:
        new = dump_sidecar(data)
        if old_text == new:
            return False
        self.sidecars += 1
        self.write(path, new)
        return True


def read_existing(path: Path, root: str | None = None) -> str | None:
    """A text file's content (None when missing); non-UTF-8 is a CaptionError and the file stays.
    `root`: the dataset folder, for the symlink rule."""
    try:
        return read_text_file(path, root=root)
    except SdprepError:
        if not path.exists():
            return None
        raise


def read_sidecar_text(item: Item) -> tuple[dict[str, Any], str | None]:
    """(sidecar dict, its current text) so a writer can skip unchanged sidecars."""
    data = read_sidecar(item)
    exists = os.path.exists(item.sidecar_path)
    return data, (read_text_file(item.sidecar_path, root=item.root) if exists else None)


# -- which files are captions --------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionFile:
    """A caption file (which may not exist yet) and its image (None for an orphan caption)."""

    path: Path
    image: Path | None
    root: str | None = None  # the real path of the dataset folder (the symlink rule)

    @property
    def shown(self) -> Path:
        return self.image or self.path


def _stem(name: str) -> str:
    """`Path(name).stem` for a name with a suffix (images and .txt files)."""
    return name[: len(name) - len(name_suffix(name))]


def _is_text(name: str) -> bool:
    return name_suffix(name).lower() == CAPTION_EXT


def _caption_name(name: str) -> str:
    """The caption file name of an image name (an orphan caption is its own)."""
    return name if _is_text(name) else _stem(name) + CAPTION_EXT


def _has_image(images: list[str], stem: str) -> bool:
    """Whether the sorted image names hold one with this stem (they share the prefix `stem.`)."""
    prefix = stem + "."
    i = bisect.bisect_left(images, prefix)
    while i < len(images) and images[i].startswith(prefix):
        if _stem(images[i]) == stem:
            return True
        i += 1
    return False


def _scan(folder: Path) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """The folder's visible entries (name, entry); listing errors are DatasetErrors."""
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.startswith("."):
                    yield entry.name, entry
    except OSError as exc:
        raise DatasetError(f"{folder}: cannot list folder ({exc.strerror})") from exc


def _folder_captions(folder: Path, orphans: bool) -> tuple[list[str], list[str], int]:
    """(names, sub-folder names, texts skipped by name) of one folder.

    `names` are image names and orphan caption names, in the order of their caption file names; an
    image stands for its `<stem>.txt`, and of images sharing a stem only the first by name is kept.
    Only plain names are held (about 70 bytes per image), and captions are found in a second
    listing, so a folder of 20,000 images and 20,000 captions never holds 40,000 entries.
    """
    names: list[str] = []
    subdirs: list[str] = []
    for name, entry in _scan(folder):
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                if name not in IGNORED_DIRS:
                    subdirs.append(name)
            elif is_image(name) and entry.is_file():
                names.append(name)
    names.sort()
    skipped = 0
    if orphans:
        found = []
        for name, entry in _scan(folder):
            with contextlib.suppress(OSError):
                if _is_text(name) and entry.is_file() and not _has_image(names, _stem(name)):
                    if _stem(name).casefold() in NOT_CAPTIONS:
                        skipped += 1
                    else:
                        found.append(name)
        names += found
    ordered, unique = _caption_order(names)
    if not ordered:  # usually they are: sorting by key would hold a key string per file
        names.sort(key=_caption_name)  # stable: images sharing a stem stay in name order, side by side
        unique = _caption_order(names)[1]
    if not unique:
        names = [n for i, n in enumerate(names) if not i or _caption_name(n) != _caption_name(names[i - 1])]
    subdirs.sort()
    return names, subdirs, skipped


def _caption_order(names: list[str]) -> tuple[bool, bool]:
    """(sorted by caption name, no caption name twice) of `names`."""
    ordered = unique = True
    for a, b in itertools.pairwise(names):
        ka, kb = _caption_name(a), _caption_name(b)
        ordered = ordered and ka <= kb
        unique = unique and ka != kb
    return ordered, unique


def iter_caption_files(
    root: Path, recursive: bool, orphans: bool, skipped: Counter[str], dataset: str | None = None
) -> Iterator[CaptionFile]:
    """Stream the caption files under `root`, folder by folder (memory grows with one folder);
    `dataset`: the real path of the dataset folder (default: `root`'s)."""
    dataset = dataset or os.path.realpath(root)
    names, subdirs, n = _folder_captions(root, orphans)
    skipped["not a caption (by name)"] += n
    for name in names:
        if _is_text(name):
            yield CaptionFile(Path(os.path.join(root, name)), None, dataset)
        else:
            image = Path(os.path.join(root, name))
            yield CaptionFile(image.with_suffix(CAPTION_EXT), image, dataset)
    del names
    if recursive:
        for sub in subdirs:
            yield from iter_caption_files(Path(os.path.join(root, sub)), True, orphans, skipped, dataset)


def all_caption_files(
    roots: Iterable[Path], opts: CaptionsOptions, skipped: Counter[str]
) -> Iterator[CaptionFile]:
    """The caption files under each of `roots` (checked first: `check_roots`), one root after another."""
    for root in check_roots(roots, opts.recursive):
        yield from iter_caption_files(root, opts.recursive, opts.orphans, skipped)


def check_roots(roots: Iterable[Path], recursive: bool) -> list[Path]:
    """The dataset folders of a multi-folder run: existing, distinct and (recursive) not nested."""
    out: list[Path] = []
    for root in roots:
        root = check_folder(root)
        resolved = root.resolve()
        for other in out:
            o = other.resolve()
            if o == resolved:
                raise ConfigError(f"{root} is given twice")
            if recursive and (o in resolved.parents or resolved in o.parents):
                inner, outer = (root, other) if o in resolved.parents else (other, root)
                raise ConfigError(f"{inner} is inside {outer} and --recursive is on", f"pass only {outer}")
        out.append(root)
    return out


@dataclass(frozen=True)
class CaptionsOptions:
    recursive: bool = False
    dry_run: bool = False
    orphans: bool = True


def _read_tags(cf: CaptionFile) -> tuple[str | None, list[str] | None]:
    """(raw text, tags) of a caption; (None, None) when missing; CaptionError when undecodable.

    A multi-line orphan text is not a caption: (text, None).
    """
    text = read_existing(cf.path, cf.root)
    if text is None:
        return None, None
    if cf.image is None and sum(1 for line in text.splitlines() if line.strip()) > 1:
        return text, None
    return text, split_tags(text)


# -- edits ---------------------------------------------------------------------------------------

Edit = Callable[[list[str], str, CaptionFile], list[str]]


def make_edit(
    action: str,
    args: tuple[str, ...] = (),
    *,
    mode: str = "tag",
    keep_first: int | None = None,
    by: str = "alphabetical",
) -> Edit:
    """The function an edit applies to one caption: (tags, raw text, file) -> new tags."""
    if action == "replace":
        old, new = args
        if not old.strip():
            raise ConfigError("captions replace: nothing to replace (the first argument is empty)")
        if mode == "regex":
            try:
                pattern = re.compile(old)
            except re.error as exc:
                raise ConfigError(f'invalid regular expression "{old}": {exc}') from None
            return lambda tags, text, cf: split_tags(pattern.sub(new, ", ".join(tags)))
        if mode == "substring":
            return lambda tags, text, cf: split_tags(", ".join(tags).replace(old, new))
        key, new_tags = tag_key(old), split_tags(new)
        return lambda tags, text, cf: dedupe(
            [n for t in tags for n in (new_tags if tag_key(t) == key else [t])]
        )
    if action == "remove":
        matcher = TagMatcher(args)
        return lambda tags, text, cf: [t for t in tags if not matcher.matches(t)]
    if action in ("prepend", "append"):
        added = dedupe(t for a in args for t in split_tags(a))
        keys = {tag_key(t) for t in added}

        def place(tags: list[str], text: str, cf: CaptionFile) -> list[str]:
            rest = [t for t in tags if tag_key(t) not in keys]
            return [*added, *rest] if action == "prepend" else [*rest, *added]

        return place
    if action == "dedupe":
        return lambda tags, text, cf: dedupe(tags)
    if action == "sort":
        return _sort_edit(keep_first, by)
    raise ConfigError(f'unknown caption action "{action}"')


def _sort_edit(keep_first: int | None, by: str) -> Edit:
    """Sort after the first `keep_first` tags; None keeps each caption's head in place (`leading`)."""
    from sdprep.prep.rules import TagInfo, sidecar_info, sort_tags

    def sort(tags: list[str], text: str, cf: CaptionFile) -> list[str]:
        sidecar = {}
        if cf.image is not None and (by in ("score", "category") or keep_first is None):
            try:
                sidecar = read_sidecar(Item(cf.image, cf.root))
            except SdprepError:
                if by in ("score", "category"):
                    raise
        info = sidecar_info(sidecar) if by in ("score", "category") and sidecar else TagInfo()
        n = leading(tags, cf, sidecar) if keep_first is None else keep_first
        return tags[:n] + sort_tags(tags[n:], by, info)

    return sort


def leading(tags: list[str], cf: CaptionFile, sidecar: dict[str, Any]) -> int:
    """How many first tags are a head that must stay first (kohya's keep_tokens counts them): the
    trigger and the tags `clean` placed before the others, as it recorded them, or the class tokens
    of the kohya `<N>_<tokens>` folder the caption is in."""
    meta = sidecar.get(SDPREP_KEY)
    n = kept_head(meta, tags) if isinstance(meta, dict) else 0
    folder = parse_repeat_folder(cf.path.parent.name)
    if folder is not None:
        keys = [tag_key(t) for t in split_tags(folder.tokens)]
        if keys and [tag_key(t) for t in tags[: len(keys)]] == keys:
            n = max(n, len(keys))
    return n


def run_edit(
    roots: Iterable[Path],
    edit: Edit,
    opts: CaptionsOptions,
    *,
    command: str = "captions",
    report: Reporter = NullReporter(),
    on_diff: DiffSink | None = None,
) -> StageResult:
    """Apply `edit` to every caption file under each root; each root journalled on its own."""
    result = StageResult("captions" + (" (dry run)" if opts.dry_run else ""))
    skipped: Counter[str] = Counter()
    changed_roots: list[Path] = []

    def edited(cf: CaptionFile) -> tuple[str | None, list[str] | None, list[str] | None]:
        text, tags = _read_tags(cf)
        if text is None or tags is None:  # no caption, or not one (tags are None then)
            return text, None, None
        return text, tags, edit(tags, text, cf)

    with progress(report, None, command):
        for root in check_roots(roots, opts.recursive):
            with CaptionWriter(root, command, dry_run=opts.dry_run, on_diff=on_diff) as writer:
                files = iter_caption_files(root, opts.recursive, opts.orphans, skipped)
                for cf, (text, tags, new) in each_item(edited, files, result, report, None):
                    if tags is None or new is None:  # both None, or neither
                        skipped["no caption file" if text is None else "not a caption (several lines)"] += 1
                    elif new == tags or not writer.write_caption(cf.path, text, new):
                        result.skipped += 1
                    else:
                        result.changed += 1
            if writer.captions and not opts.dry_run:
                changed_roots.append(root)
    _skip_notes(result, skipped)
    if changed_roots:
        result.notes.append("undo: " + " && ".join(f"sdprep undo {r}" for r in changed_roots))
    return result


def _skip_notes(result: StageResult, skipped: Counter[str]) -> None:
    for reason, n in sorted(skipped.items()):
        if n:
            result.notes.append(f"  skipped {n}: {reason}")


# -- stats and find ------------------------------------------------------------------------------


@dataclass
class CaptionStats:
    """Counts over a caption folder: files, tags, images without captions, tag frequencies."""

    captions: int = 0
    images: int = 0
    uncaptioned: int = 0
    orphans: int = 0
    empty: int = 0
    tags: Counter[str] = field(default_factory=Counter)
    spelling: dict[str, str] = field(default_factory=dict)  # key -> first spelling seen
    tag_total: int = 0

    def lines(self, top: int) -> list[str]:
        mean = self.tag_total / self.captions if self.captions else 0.0
        lines = [
            f"captions: {self.captions} ({self.orphans} without an image, {self.empty} empty), "
            f"{mean:.1f} tags each, {len(self.tags)} distinct tags",
            f"images: {self.images}, {self.uncaptioned} without a caption",
        ]
        if self.tags and top:
            lines.append(f"top {min(top, len(self.tags))} tags:")
            for key, n in self.tags.most_common(top):
                pct = 100 * n / self.captions
                lines.append(f"  {n:7d}  {pct:5.1f}%  {self.spelling[key]}")
        return lines


def run_stats(
    roots: Iterable[Path],
    opts: CaptionsOptions,
    *,
    top: int = 30,
    count_tokens: Callable[[str], int] | None = None,
    report: Reporter = NullReporter(),
) -> StageResult:
    """Tag frequencies, images without captions, and (with a tokenizer) CLIP token lengths."""
    from sdprep.prep.tokens import TokenAudit

    result = StageResult("captions stats")
    stats, audit, skipped = CaptionStats(), TokenAudit(), Counter[str]()

    def files() -> Iterator[CaptionFile]:
        for cf in all_caption_files(roots, opts, skipped):
            stats.images += cf.image is not None
            yield cf

    for cf, (text, tags) in each_item(_read_tags, files(), result, report, "stats"):
        if text is None:
            stats.uncaptioned += 1
            continue
        if tags is None:
            skipped["not a caption (several lines)"] += 1
            continue
        stats.captions += 1
        stats.orphans += cf.image is None
        stats.empty += not tags
        stats.tag_total += len(tags)
        for tag in dedupe(tags):
            key = tag_key(tag)
            stats.tags[key] += 1
            stats.spelling.setdefault(key, tag)
        if count_tokens is not None:
            audit.add(cf.path, count_tokens(", ".join(tags)))
    result.skipped = stats.uncaptioned
    result.notes += stats.lines(top)
    if count_tokens is not None:
        result.notes += audit.lines()
        result.details["tokens"] = audit.as_dict()
    _skip_notes(result, skipped)
    result.details["stats"] = stats
    return result


def run_find(
    roots: Iterable[Path],
    patterns: Iterable[str],
    opts: CaptionsOptions,
    *,
    on_match: Callable[[CaptionFile], None] | None = None,
) -> StageResult:
    """The images (or orphan captions) having a tag named by any pattern (exact, glob or `re:`)."""
    matcher = TagMatcher(patterns)
    if not matcher:
        raise ConfigError("find needs a tag", 'e.g. sdprep captions find "blue eyes" data/')
    result = StageResult("captions find")
    searched, skipped = 0, Counter[str]()
    files = all_caption_files(roots, opts, skipped)
    for cf, (_, tags) in each_item(_read_tags, files, result, NullReporter(), None):
        if tags is None:
            continue
        searched += 1
        if any(matcher.matches(t) for t in tags):
            result.changed += 1
            if on_match is not None:
                on_match(cf)
    result.skipped = searched - result.changed
    result.notes.append(f"found in {result.changed} of {searched} captions")
    return result
