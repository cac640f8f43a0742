"""Every change the review page makes to a dataset.

Each call is one journalled operation (`sdprep undo DIR` or the page's Undo button reverses it,
byte for byte) and holds the dataset lock only while it writes, so another sdprep command can run
between two edits, and an edit is refused (a JournalError naming the command) while one runs.
The edits are the ones the commands make: tags through `sdprep captions`' edit functions, captions
from stored scores through `score_tags` (taggers/rules.py), rules through `sdprep clean` itself,
excluded images moved aside as `sdprep dedup` moves duplicates.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdprep.config import from_dict, parse_toml
from sdprep.dataset import (
    EXCLUDED_DIR,
    MASK_DIR,
    format_caption,
    join_tags,
    read_sidecar,
    sdprep_meta,
    split_tags,
)
from sdprep.errors import ConfigError, DatasetError, SdprepError
from sdprep.fileops import Journal, Operation
from sdprep.prep.captions import CaptionFile, make_edit, read_existing
from sdprep.prep.review.index import Entry, Index
from sdprep.taggers.rules import CaptionRules, caption_from_scores, merge_caption
from sdprep.tags import tag_key

if TYPE_CHECKING:
    from sdprep.prep.rules import CleanRules

TAG_ACTIONS = {"add": "append", "remove": "remove", "rename": "replace"}
MAX_CHANGES_SHOWN = 500


@dataclass(frozen=True)
class Change:
    """One caption a preview would change."""

    rel: str
    old: str | None
    new: str

    def to_json(self) -> dict[str, Any]:
        old = split_tags(self.old or "")
        new = split_tags(self.new)
        old_keys, new_keys = {tag_key(t) for t in old}, {tag_key(t) for t in new}
        return {
            "path": self.rel,
            "old": self.old,
            "new": self.new,
            "added": [t for t in new if tag_key(t) not in old_keys],
            "removed": [t for t in old if tag_key(t) not in new_keys],
        }


MERGES = ("tag", "replace", "append")


@dataclass(frozen=True)
class Recaption:
    """The page's re-captioning controls; the other caption settings are the ones `sdprep tag`
    recorded for each image (its rules, template, trigger).

    merge "tag": what `sdprep tag` with these thresholds would write (its recorded merge policy,
    onto the caption it built on while the caption is still its output); "replace": the tags
    alone; "append": new tags added to the current caption.
    """

    general_threshold: float = 0.35
    character_threshold: float = 0.85
    mcut: bool = False
    merge: str = "tag"

    def __post_init__(self) -> None:
        if self.merge not in MERGES:
            raise ConfigError(f'unknown merge "{self.merge}"', "use " + ", ".join(MERGES))


def _tag_settings(meta: dict[str, Any]) -> dict[str, Any]:
    tag = meta.get("tag")
    settings = tag.get("settings") if isinstance(tag, dict) else None
    return settings if isinstance(settings, dict) else {}


def recorded_rules(meta: dict[str, Any]) -> CaptionRules:
    """The caption rules `sdprep tag` last used on this image (its defaults when none are recorded)."""
    rules = _tag_settings(meta).get("rules")
    if isinstance(rules, dict):
        with contextlib.suppress(SdprepError, TypeError):
            return from_dict(CaptionRules, rules)
    return CaptionRules()


def recaption_text(meta: dict[str, Any], caption: str | None, opts: Recaption) -> str | None:
    """The caption the stored WD14 scores give with these thresholds (None: no scores stored)."""
    from sdprep.prep import lineage
    from sdprep.prep.tag import TAGS_ONLY_TEMPLATE, derived_caption
    from sdprep.taggers.captions_text import DEFAULT_BOILERPLATE

    record = meta.get("wd14")
    if not isinstance(record, dict) or not record.get("scores"):
        return None
    rules = replace(
        recorded_rules(meta),
        general_threshold=opts.general_threshold,
        character_threshold=opts.character_threshold,
        mcut=opts.mcut,
    )
    if opts.merge == "replace":
        return caption_from_scores(record, rules)
    if opts.merge == "append":
        return merge_caption(caption, caption_from_scores(record, rules), "append", rules.separator)
    settings = _tag_settings(meta)
    template = str(settings.get("template", TAGS_ONLY_TEMPLATE))
    boilerplate = settings.get("boilerplate", DEFAULT_BOILERPLATE)
    text = derived_caption(meta, rules, template, str(settings.get("trigger", "")), boilerplate)
    base = caption
    if lineage.derived_from(meta, "tag", caption):
        base = meta["tag"].get("base")
    return merge_caption(base, text, str(settings.get("merge", "replace")), rules.separator)


def clean_rules_from_text(text: str) -> CleanRules:
    """A `sdprep clean` rules file, or a project file (its [stages.clean.rules] and [rules]).

    Rules that name a file on the server (`remove_files`, `tokenizer`) are refused: the page must
    not let whoever types the rules probe files outside the dataset.
    """
    rules = _clean_rules(text)
    named = [k for k, v in (("remove_files", rules.remove_files), ("tokenizer", rules.tokenizer)) if v]
    if named:
        raise ConfigError(
            f"the review page's rules cannot name files on the server ({', '.join(named)})",
            "list the tags in remove = [...] here, or run `sdprep clean DIR --rules FILE.toml` in a terminal",
        )
    return rules


def _clean_rules(text: str) -> CleanRules:
    from sdprep.prep.rules import CleanRules
    from sdprep.project import SharedRules

    doc = parse_toml(text)
    if "stages" in doc or "project" in doc:
        table = doc.get("stages", {}).get("clean", {}).get("rules", {})
        rules = from_dict(CleanRules, table, where="stages.clean.rules")
        return from_dict(SharedRules, doc.get("rules", {}), where="rules").before_clean(rules)
    return from_dict(CleanRules, doc)


class Editor:
    """The write side of the page: one method per kind of change, each one journalled operation."""

    def __init__(self, index: Index):
        self.index = index
        self.root = index.root
        self._writing = threading.Lock()  # the page's own writes, one at a time

    @contextlib.contextmanager
    def _operation(self, *what: str) -> Iterator[Operation]:
        with self._writing, Journal(self.root).begin("review", argv=["review", *what]) as op:
            yield op

    def entry(self, rel: str) -> Entry:
        e = self.index.get(rel)
        if e is None:
            raise DatasetError(f"{rel}: not an image of {self.root}", "reload the page")
        return e

    def entries(self, rels: list[str] | None) -> list[Entry]:
        if rels is None:
            return self.index.query_all()
        return [self.entry(r) for r in rels]

    # -- captions ----------------------------------------------------------------------------
    def set_caption(self, rel: str, text: str) -> Entry:
        """Write a caption as typed (one line; a line break separates tags, as `clean` reads it)."""
        e = self.entry(rel)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        text = ", ".join(line.rstrip(",").rstrip() for line in lines) if len(lines) > 1 else text
        with self._operation("caption", rel) as op:
            op.write_text(e.item.caption_path, format_caption(text))
        self.index.refresh([rel])
        return self.entry(rel)

    def edit_tags(self, action: str, tag: str, new: str = "", rels: list[str] | None = None) -> int:
        """Add, remove or rename a tag on `rels`, or (None) on every image that has it (add: every
        image), with `sdprep captions`' functions. Returns the number of captions changed."""
        if action not in TAG_ACTIONS:
            raise ConfigError(f'unknown tag action "{action}"', "add, remove or rename")
        if not tag.strip() or (action == "rename" and not new.strip()):
            raise ConfigError(f"{action}: name the tag" + (" and its new name" if action == "rename" else ""))
        args = (tag, new) if action == "rename" else (tag,)
        edit = make_edit(TAG_ACTIONS[action], args)
        targets = self.entries(rels)
        if rels is None and action != "add":
            targets = [e for e in targets if tag_key(tag) in e.keys]
        writes: list[tuple[Path | str, bytes]] = []  # as Operation.write_many takes them
        changed: list[str] = []
        for e in targets:
            path = e.item.caption_path
            text = read_existing(path, e.item.root)
            tags = split_tags(text) if text else []
            result = edit(tags, text or "", CaptionFile(path, e.path, e.item.root))
            if result != tags:
                writes.append((path, (format_caption(join_tags(result)) if result else "").encode()))
                changed.append(e.rel)
        if writes:
            scope = "selection" if rels is not None else "everywhere"
            with self._operation(f"{action}-tag", *args, scope) as op:
                op.write_many(writes)
            self.index.refresh(changed)
        return len(changed)

    # -- images and masks ----------------------------------------------------------------------
    def exclude(self, rels: list[str]) -> int:
        """Move images (and their caption, sidecar, masks) to DIR/excluded/, as dedup moves duplicates."""
        from sdprep.prep.dedup import free_destination
        from sdprep.prep.rename import companion_pairs, mask_dirs

        targets = self.entries(rels)
        with self._operation("exclude", *rels) as op:
            for e in targets:
                dest = free_destination(self.root, e.path, EXCLUDED_DIR)
                pairs: list[tuple[Path | str, Path | str]] = [
                    *companion_pairs(e.path, dest, mask_dirs(e.path.parent))
                ]
                op.move_many(pairs)
        self.index.refresh(rels)
        return len(targets)

    def save_mask(self, rel: str, png: bytes) -> Path:
        """Write a painted mask as `masks/<stem>.png` (greyscale, the image's displayed size)."""
        from PIL import Image, UnidentifiedImageError

        e = self.entry(rel)
        try:
            with Image.open(io.BytesIO(png)) as im:
                if e.size is None or im.size != e.size:
                    raise DatasetError(
                        f"{rel}: the painted mask is {im.size[0]}x{im.size[1]}, the image "
                        + (f"{e.size[0]}x{e.size[1]}" if e.size else "unreadable"),
                        "reload the page",
                    )
                mask = im.convert("L")
        except (UnidentifiedImageError, OSError) as exc:
            raise DatasetError(f"{rel}: the mask sent is not a PNG ({exc})") from None
        buf = io.BytesIO()
        mask.save(buf, "PNG")
        path = e.item.mask_path(MASK_DIR)
        with self._operation("mask", rel) as op:
            op.write_bytes(path, buf.getvalue())
        self.index.refresh([rel])
        return path

    # -- captions from stored scores, and rules ------------------------------------------------
    def recaption(
        self, opts: Recaption, rels: list[str] | None = None, apply: bool = False
    ) -> dict[str, Any]:
        """What the stored WD14 scores give with these thresholds: per-image changes; `apply` writes them."""
        changes: list[Change] = []
        without = 0
        for e in self.entries(rels):
            try:
                meta = sdprep_meta(read_sidecar(e.item))
            except SdprepError:
                without += 1
                continue
            new = recaption_text(meta, e.caption, opts)
            if new is None:
                without += 1
            elif new.strip() != (e.caption or "").strip():
                changes.append(Change(e.rel, e.caption, new))
        if apply and changes:
            with self._operation("recaption", f"general={opts.general_threshold:g}", *self._opts(opts)) as op:
                op.write_many(
                    [(self.entry(c.rel).item.caption_path, format_caption(c.new).encode()) for c in changes]
                )
            self.index.refresh([c.rel for c in changes])
        return _listing(changes, {"without_scores": without, "applied": apply})

    @staticmethod
    def _opts(opts: Recaption) -> list[str]:
        return [
            f"character={opts.character_threshold:g}",
            *(["mcut"] if opts.mcut else []),
            f"merge={opts.merge}",
        ]

    def rules(self, text: str, apply: bool = False) -> dict[str, Any]:
        """Run `sdprep clean` with these rules over the dataset: a dry run's per-image diff, or the run."""
        from sdprep.prep.clean import CleanOptions, run_clean

        rules = clean_rules_from_text(text)
        diffs: list[str] = []
        opts = CleanOptions(rules, recursive=self.index.recursive, dry_run=not apply)
        with self._writing if apply else contextlib.nullcontext():
            result = run_clean(self.root, opts, on_diff=diffs.append)
        images = {e.item.caption_path: e.rel for e in self.index.query_all()}
        changes = []
        for parsed in filter(None, map(_parse_diff, diffs)):
            path, old, new = parsed
            changes.append(Change(images.get(path, path.relative_to(self.root).as_posix()), old, new))
        if apply:
            self.index.scan()
        extra = {
            "applied": apply,
            "notes": result.notes,
            "failed": [f"{f.path}: {f.reason}" for f in result.failed],
        }
        return _listing(changes, extra)

    def undo(self) -> str:
        """Reverse the newest operation on the dataset (as `sdprep undo DIR`)."""
        from sdprep.undo import undo_last

        with self._writing:
            description, count = undo_last(self.root)
        self.index.scan()
        return f"undone: {description} ({count} changes reversed)"

    def last_operation(self) -> str | None:
        """What the Undo button would reverse."""
        journal = Journal(self.root)
        try:
            ops = journal.operations()
        except SdprepError:
            return None
        return journal.describe(ops[-1]) if ops else None


def _listing(changes: list[Change], extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "count": len(changes),
        "changes": [c.to_json() for c in changes[:MAX_CHANGES_SHOWN]],
        **extra,
    }


def _parse_diff(diff: str) -> tuple[Path, str | None, str] | None:
    """(caption path, old text, new text) from one caption's unified diff (captions.caption_diff)."""
    name, old, new = None, [], []
    for line in diff.splitlines():
        if line.startswith(("--- ", "+++ ")):
            if line[4:] != "/dev/null":
                name = line[4:]
        elif line.startswith("-"):
            old.append(line[1:])
        elif line.startswith("+"):
            new.append(line[1:])
    if name is None:
        return None
    return Path(name), ("\n".join(old) if old else None), "\n".join(new)
