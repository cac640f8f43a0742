"""`sdprep clean`: rebuild captions from rules (trigger, remove, replace, prune, sort, monochrome, tokens).

Where an image's tags come from (`source = "auto"`):
1. its caption file, when there is one: the caption is the source of truth for WHICH tags the image
   has (it may be hand-edited or come from another tool). A caption clean wrote itself is not: a
   re-run starts again from what that caption was built from (recorded in the sidecar as
   "clean": base / source / written, see prep/lineage.py), so other rules give what a fresh run gives;
2. otherwise its sidecar: stored WD14 scores (`sdprep tag`) above the general / character
   thresholds, else booru tags (sdprep's scrape record or gallery-dl's Danbooru keys);
3. otherwise nothing: the caption is the trigger (and label) alone, as the seed's tag.py wrote.
Stored WD14 scores and booru categories are used whatever the source: for `sort = "score"` /
`"category"` and to choose which tags `--max-tokens` trims first.

The greyscale / monochrome label is measured once per image and kept in the sidecar
(`sdprep.monochrome`), so a second run decodes no image. Every caption and sidecar change goes
through the dataset's journal (`sdprep undo DIR` restores the previous captions byte for byte);
`dry_run` prints a unified diff instead. A second run with the same rules changes nothing.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdprep.config import bounded, check_bounds
from sdprep.dataset import SDPREP_KEY, Item, iter_items, join_tags, require_images, sdprep_meta, split_tags
from sdprep.errors import ConfigError, DatasetError, SdprepError
from sdprep.executors import Executor
from sdprep.prep import lineage, monochrome
from sdprep.prep.captions import CaptionWriter, DiffSink, read_existing, read_sidecar_text
from sdprep.prep.rules import (
    CleanRules,
    Placement,
    RuleSet,
    TagInfo,
    body_tags,
    clean_tags,
    core_tags,
    placement_for,
    sidecar_info,
    sidecar_tags,
)
from sdprep.progress import NullReporter, Reporter
from sdprep.stage import MAX_WORKERS, StageResult, each_item, progress, worker_count
from sdprep.tags import tag_key

if TYPE_CHECKING:
    from sdprep.prep.tokens import TokenAudit


@dataclass(frozen=True)
class CleanOptions:
    """The rules plus how to run them."""

    rules: CleanRules = field(default_factory=CleanRules)
    recursive: bool = False
    dry_run: bool = False
    workers: int = bounded(0, 0, MAX_WORKERS)  # 0 = auto: up to 4 when images are decoded, else 1

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass
class Plan:
    """What cleaning one image would write (computed in a worker, written by the main thread)."""

    item: Item
    old_caption: str | None
    tags: list[str]
    source: str
    label: str | None = None
    measured: str | None = None  # "reduced" / "full" when the image was decoded this run
    sidecar: dict[str, Any] | None = None
    sidecar_text: str | None = None
    trimmed: list[str] = field(default_factory=list)
    tokens: int | None = None
    keep: bool = False  # the caption is a later stage's output built on this same result: left alone


def _folder(root: Path, item: Item) -> str:
    return item.path.parent.name if item.path.parent != root else root.resolve().name


@dataclass(frozen=True)
class Input:
    """What clean starts from for one image: a caption text (None: none) or, without one, the kind
    of sidecar tags a previous clean used ("booru", "wd14", "none"; None: decide by the rules)."""

    base: str | None
    kind: str | None = None
    derived: bool = False  # the caption file is clean's own output (or built on it by `later` stages)


def clean_input(sidecar: dict[str, Any], caption: str | None, later: Collection[str] = ()) -> Input:
    """Clean's input: the caption file, unless it is clean's own earlier output (see prep/lineage.py)."""
    meta = sidecar.get(SDPREP_KEY)
    meta = meta if isinstance(meta, dict) else {}
    if lineage.derived_from(meta, "clean", caption, later):
        own = lineage.record(meta, "clean") or {}
        base, kind = own.get("base"), own.get("source")
        return Input(base if isinstance(base, str) else None, kind if isinstance(kind, str) else None, True)
    return Input(caption)


def _image_tags(
    item: Item, start: Input, sidecar: dict[str, Any], rules: CleanRules
) -> tuple[list[str], str]:
    """(tags, where they came from) following the documented precedence."""
    if start.base is not None and rules.source in ("auto", "caption"):
        return split_tags(",".join(start.base.splitlines())), "caption"  # a line break separates tags
    if rules.source == "caption" or (rules.source == "auto" and start.kind == "none"):
        return [], "none"
    # a re-run takes the kind of sidecar tags the first run took (tag may have added scores since)
    wanted = start.kind if rules.source == "auto" and start.kind in ("wd14", "booru") else rules.source
    found = sidecar_tags(sidecar, rules, wanted)
    if found is not None:
        return found
    if rules.source in ("wd14", "booru"):
        what = "WD14 scores" if rules.source == "wd14" else "booru tags"
        raise DatasetError(f"no {what} in the sidecar", "run `sdprep tag` first, or use --source auto")
    return [], "none"


def _concept(rs: RuleSet, root: Path, item: Item, place: Placement) -> str:
    if rs.rules.prune_scope == "folder":
        rel = item.path.parent.relative_to(root).as_posix()
        return rel if rel != "." else root.resolve().name
    return ", ".join(place.trigger)


def count_core(
    root: Path, rs: RuleSet, recursive: bool, percent: float, later: Collection[str] = ()
) -> tuple[dict[str, list[tuple[str, float]]], dict[str, int]]:
    """First pass of core-tag pruning: per concept, the tags in at least `percent`% (the rules'
    `prune_core`) of images."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    images: Counter[str] = Counter()
    for item in iter_items(root, recursive):
        try:
            caption = read_existing(item.caption_path, item.root)
            sidecar = read_sidecar_text(item)[0]
            tags, _ = _image_tags(item, clean_input(sidecar, caption, later), sidecar, rs.rules)
        except SdprepError:
            continue  # reported by the second pass
        place = placement_for(rs, _folder(root, item), None)
        concept = _concept(rs, root, item, place)
        images[concept] += 1
        counts[concept].update({tag_key(t) for t in body_tags(tags, rs, place)})
    pruned = {concept: core_tags(counts[concept], n, percent, rs.protected) for concept, n in images.items()}
    return pruned, dict(images)


def plan_item(
    item: Item,
    root: Path,
    rs: RuleSet,
    pruned: dict[str, frozenset[str]],
    count_tokens: Callable[[str], int] | None,
    later: Collection[str] = (),
) -> Plan:
    """Everything clean would do to one image (reads files, decodes the image if needed; writes nothing)."""
    rules = rs.rules
    caption = read_existing(item.caption_path, item.root)
    sidecar, sidecar_text = read_sidecar_text(item)
    start = clean_input(sidecar, caption, later)
    tags, source = _image_tags(item, start, sidecar, rules)
    plan = Plan(item, caption, [], source)
    if rules.monochrome.enabled:
        meta = sdprep_meta(sidecar)
        previous = meta.get("monochrome")
        plan.label, record, measured = monochrome.detect(item.path, previous, rules.monochrome, item.root)
        plan.measured = record["measured"] if measured else None
        if record != previous:
            meta["monochrome"] = record
            plan.sidecar, plan.sidecar_text = sidecar, sidecar_text
    place = placement_for(rs, _folder(root, item), plan.label)
    info = sidecar_info(sidecar) if sidecar else TagInfo()
    drop = pruned.get(_concept(rs, root, item, place), frozenset())
    cleaned = clean_tags(tags, rs, place, info, pruned=drop, count_tokens=count_tokens)
    plan.tags, plan.trimmed, plan.tokens = cleaned.tags, cleaned.trimmed, cleaned.tokens
    _record(plan, start, sidecar, sidecar_text, place, cleaned.head)
    return plan


def _record(
    plan: Plan, start: Input, sidecar: dict[str, Any], text: str | None, place: Placement, head: int
) -> None:
    """Note in the sidecar what clean writes and from what (prep/lineage.py); or leave the caption
    as it is when a later stage built it on this very result."""
    written = join_tags(plan.tags)
    own = lineage.record(sdprep_meta(sidecar), "clean")
    if start.derived and own is not None and written == own["written"].strip():
        plan.keep = plan.old_caption is not None and plan.old_caption.strip() != written
        if plan.keep:
            return
    record: dict[str, str | list[str] | int | None] = {
        "base": start.base,
        "source": plan.source,
        "written": written,
        "trigger": list(place.trigger),
        "head": head,
    }
    meta = sdprep_meta(sidecar)
    if meta.get("clean") != record:
        meta["clean"] = record
        plan.sidecar, plan.sidecar_text = sidecar, text


def _workers(n: int, decode: bool) -> int:
    """Threads pay off for image decoding only; caption files alone are faster in one thread."""
    return worker_count(n, None if decode else 1)


def run_clean(
    root: Path | str,
    opts: CleanOptions,
    *,
    report: Reporter = NullReporter(),
    on_diff: DiffSink | None = None,
    chain: Sequence[str] = (),
    executor: Executor | None = None,
) -> StageResult:
    """Rebuild the captions of every image under `root` from the rules; returns what changed.

    Each image's new caption is planned through `executor` (threads, or a Ray cluster); captions and
    sidecars are written here.

    `chain`: the caption-writing stages of the chain this run is part of, in order (`sdprep run`):
    what stages after clean built on its last output is rebuilt from clean's input (prep/lineage.py).
    """
    later = lineage.around(chain, "clean")[1]
    rules = opts.rules
    if rules.prune_core is not None and not (rules.trigger or rules.trigger_from_folder):
        raise ConfigError(
            "--prune-core needs a trigger token to absorb the pruned tags",
            "add --trigger TOKEN (or trigger_from_folder = true in the rules file)",
        )
    rs = RuleSet(rules)  # bad patterns and remove files are reported before the folder
    root = require_images(root, opts.recursive)
    count_tokens = None
    if rules.wants_tokenizer:
        from sdprep.prep.tokens import load_tokenizer

        count_tokens = load_tokenizer(rules.tokenizer)
    result = StageResult("clean" + (" (dry run)" if opts.dry_run else ""))
    pruned: dict[str, frozenset[str]] = {}
    if rules.prune_core is not None:
        with progress(report, None, "counting tags"):
            found, images = count_core(root, rs, opts.recursive, rules.prune_core, later)
        pruned = {c: frozenset(k for k, _ in tags) for c, tags in found.items()}
        _prune_notes(result, found, images, rules.prune_core)
    total = sum(1 for _ in iter_items(root, opts.recursive))
    stats = _Tally()
    with CaptionWriter(root, "clean", dry_run=opts.dry_run, on_diff=on_diff) as writer:
        plans = each_item(
            lambda it: plan_item(it, root, rs, pruned, count_tokens, later),
            iter_items(root, opts.recursive, on_clash=result.fail),  # a.png + a.jpg: one a.txt
            result,
            report,
            "clean",
            workers=_workers(opts.workers, rules.monochrome.enabled),
            total=total,
            executor=executor,
        )
        for item, plan in plans:
            # the sidecar first: killed in between, the record still names the caption's source
            if plan.sidecar is not None:
                writer.write_sidecar(item.sidecar_path, plan.sidecar, plan.sidecar_text)
            changed = not plan.keep and writer.write_caption(item.caption_path, plan.old_caption, plan.tags)
            result.changed += changed
            result.skipped += not changed
            stats.add(plan)
    stats.notes(result, writer)
    if writer.captions + writer.sidecars and not opts.dry_run:
        result.notes.append(f"undo: sdprep undo {root}")
    return result


def _prune_notes(
    result: StageResult, found: dict[str, list[tuple[str, float]]], images: dict[str, int], pct: float
) -> None:
    result.details["pruned"] = {c: [(k, round(f, 4)) for k, f in tags] for c, tags in found.items()}
    for concept, tags in sorted(found.items()):
        listing = ", ".join(f"{k} ({f * 100:.0f}%)" for k, f in tags) or "none"
        result.notes.append(
            f'core tags pruned for "{concept}" ({images[concept]} images, >= {pct:g}%): {listing}'
        )


@dataclass
class _Tally:
    """Counters for the summary lines."""

    sources: Counter[str] = field(default_factory=Counter)
    labels: Counter[str] = field(default_factory=Counter)
    measured: Counter[str] = field(default_factory=Counter)
    trimmed: int = 0
    audit: TokenAudit | None = None
    multiline: list[str] = field(default_factory=list)  # the first few names
    multiline_count: int = 0

    def add(self, plan: Plan) -> None:
        self.sources[plan.source] += 1
        if plan.old_caption is not None and len(plan.old_caption.strip().splitlines()) > 1:
            self.multiline_count += 1
            if len(self.multiline) < 20:
                self.multiline.append(plan.item.caption_path.name)
        self.labels[plan.label or monochrome.COLOUR] += 1
        if plan.measured:
            self.measured[plan.measured] += 1
        self.trimmed += bool(plan.trimmed)
        if plan.tokens is not None:
            if self.audit is None:
                from sdprep.prep.tokens import TokenAudit

                self.audit = TokenAudit()
            self.audit.add(plan.item.caption_path, plan.tokens)

    def notes(self, result: StageResult, writer: CaptionWriter) -> None:
        if self.sources:
            names = {
                "caption": "caption files",
                "wd14": "WD14 scores",
                "booru": "booru tags",
                "none": "no tags",
            }
            result.notes.append(
                "tags from: " + ", ".join(f"{n} {names[s]}" for s, n in sorted(self.sources.items()))
            )
        if sum(self.labels.values()) and (
            self.labels["greyscale"] + self.labels["monochrome"] or self.measured
        ):
            order = ("greyscale", "monochrome", monochrome.COLOUR)
            line = "monochrome: " + ", ".join(f"{self.labels[k]} {k}" for k in order)
            if self.measured:
                line += (
                    f" ({sum(self.measured.values())} measured, {self.measured['full']} at full resolution)"
                )
            result.notes.append(line)
        if self.audit is not None:
            result.notes += self.audit.lines()
            result.details["tokens"] = self.audit.as_dict()
        if self.trimmed:
            result.notes.append(f"trimmed tags to fit max_tokens in {self.trimmed} captions")
        if self.multiline_count:
            more = self.multiline_count - len(self.multiline)
            verb = "would be" if writer.dry_run else "were"
            result.notes.append(
                f"captions on several lines ({self.multiline_count}; kohya trains only the first line): "
                f"{verb} rewritten as one line, each line break a tag separator: "
                + ", ".join(self.multiline)
                + (f", ... and {more} more" if more else "")
            )
        if writer.sidecars:
            verb = "would update" if writer.dry_run else "updated"
            result.notes.append(f"{verb} {writer.sidecars} sidecars")
