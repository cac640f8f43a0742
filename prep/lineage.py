"""Where a caption file came from: the records the caption-writing stages (clean, tag) keep.

Each of them records under its key in the sidecar's "sdprep" part what it wrote (`written`) and
the caption it started from (`base`: absent or None when the image had none). From those a stage
tells what the caption file in front of it is:
- its own last output, or that output changed since only by stages that come after it in the same
  chain (`later`: clean before `tag --merge append` in a project): it starts again from its recorded
  base, so a re-run after an edit of the rules equals a fresh run instead of cleaning its own output;
- the last output of another stage (one before it in the chain): that is its input;
- anything else was edited by hand or by another tool, and the edit is the new source.
Run on their own (no chain), clean after tag cleans the tagged caption and tag with unchanged
settings leaves any caption alone, as a reader expects; `sdprep run` passes its chain.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from sdprep.dataset import SDPREP_KEY, Item, read_sidecar, split_tags
from sdprep.errors import SdprepError
from sdprep.tags import tag_key

WRITERS = ("clean", "tag")  # the stages that record what they write into caption files


def around(chain: Sequence[str], stage: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(earlier, later): the stages of `chain` before and after `stage` (both empty when it is not in it)."""
    if stage not in chain:
        return (), ()
    i = list(chain).index(stage)
    return tuple(chain[:i]), tuple(chain[i + 1 :])


def record(meta: Mapping[str, Any], stage: str) -> Mapping[str, Any] | None:
    """The stage's caption record from an image's sdprep metadata, or None."""
    rec = meta.get(stage)
    return rec if isinstance(rec, Mapping) and isinstance(rec.get("written"), str) else None


def _same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.strip() == b.strip()


def derived_from(
    meta: Mapping[str, Any], stage: str, caption: str | None, later: Collection[str] = ()
) -> bool:
    """True when `caption` is `stage`'s last output, changed since (if at all) only by stages in `later`."""
    own = record(meta, stage)
    if own is None or caption is None:
        return False
    current, used = caption, set()
    while not _same(current, own["written"]):
        for name in later:
            rec = record(meta, name) if name != stage and name not in used else None
            if rec is not None and _same(rec["written"], current) and isinstance(rec.get("base"), str):
                used.add(name)
                current = rec["base"]
                break
        else:
            return False
    return True


def written_by(meta: Mapping[str, Any], caption: str | None) -> str | None:
    """The stage whose last output `caption` is, or None (no caption, or edited since)."""
    return next((s for s in WRITERS if (r := record(meta, s)) and _same(r["written"], caption)), None)


def kept_head(meta: Mapping[str, Any], tags: list[str]) -> int:
    """How many leading tags of a caption are the head `clean` placed (trigger, prefixes, kept tags),
    when the caption still starts with them; 0 without a clean record."""
    rec = record(meta, "clean")
    if rec is None:
        return 0
    n = rec.get("head")
    if not isinstance(n, int) or n <= 0:
        return 0
    head = split_tags(rec["written"])[:n]
    return len(head) if [tag_key(t) for t in tags[: len(head)]] == [tag_key(t) for t in head] else 0


def recorded_trigger(items: Iterable[Item]) -> str | None:
    """The trigger `clean` recorded for these images (tokens joined by ", ") when they agree on one;
    None when none was recorded or folders have their own (`trigger_from_folder`)."""
    found: set[tuple[str, ...]] = set()
    for item in items:
        try:
            meta = read_sidecar(item).get(SDPREP_KEY)
        except SdprepError:
            continue  # the stage that reads it reports it
        rec = record(meta, "clean") if isinstance(meta, Mapping) else None
        trigger = rec.get("trigger") if rec is not None else None
        if isinstance(trigger, list) and trigger:
            found.add(tuple(str(t) for t in trigger))
            if len(found) > 1:
                return None
    return ", ".join(found.pop()) if found else None
