"""The summary `sdprep bucket` prints: concepts with kohya's reg numbers, buckets, upscales and crops,
the mask form, rotated copies, multi-line captions, files removed from an earlier run. Counts and a
few names only, kept across batches (memory flat in the number of images)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sdprep.prep.repeats import kohya_reg_use

if TYPE_CHECKING:
    from sdprep.prep.bucket import BucketOptions, Concept, _Placed


@dataclass
class _Names:
    """How many, and the first few names (a summary never lists thousands of files)."""

    count: int = 0
    names: list[str] = field(default_factory=list)

    def add(self, name: str, keep: int = 20) -> None:
        self.count += 1
        if len(self.names) < keep:
            self.names.append(name)

    def text(self, see: str = "") -> str:
        more = f", ... and {self.count - len(self.names)} more{see}" if self.count > len(self.names) else ""
        return ", ".join(self.names) + more


@dataclass
class Tally:
    """What the summary needs, kept across batches: counts and a few names, nothing per image."""

    buckets: Counter[tuple[int, int]] = field(default_factory=Counter)
    upscaled: _Names = field(default_factory=_Names)
    cropped: _Names = field(default_factory=_Names)
    white_masks: _Names = field(default_factory=_Names)
    rotated: _Names = field(default_factory=_Names)
    in_alpha: _Names = field(default_factory=_Names)
    multiline: _Names = field(default_factory=_Names)
    removed: list[str] = field(default_factory=list)

    def add(self, batch: list[_Placed]) -> None:
        for p in batch:
            a = p.assignment
            p.concept.placed += 1
            self.buckets[a.bucket] += 1
            if p.copy == "EXIF-rotated":
                self.rotated.add(p.item.path.name)
            if p.alpha and p.mask is not None:
                self.in_alpha.add(p.item.path.name)
            if p.multiline:
                self.multiline.add(p.item.path.name)
            if a.upscaled:
                self.upscaled.add(f"{p.item.path.name} x{a.scale:.2f}")
            if a.cropped_fraction > 0.1:
                self.cropped.add(f"{p.item.path.name} {a.cropped_fraction:.0%}")


def bucket_table(counts: Counter[tuple[int, int]]) -> list[str]:
    """`  w x h  images` lines, the most used bucket first."""
    return [f"  {w:>5}x{h:<5} {n:>6}" for (w, h), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def _concept_lines(concepts: list[Concept]) -> list[str]:
    """Images, repeats and samples per concept, reg images as kohya will register them."""
    train = sum(c.placed * c.repeats for c in concepts if not c.is_reg)
    regs = [c for c in concepts if c.is_reg]
    use = dict(zip(map(id, regs), kohya_reg_use(train, [(c.placed, c.repeats) for c in regs])))
    lines = ["concepts:"]
    for c in concepts:
        used, samples = use.get(id(c), (c.placed, c.placed * c.repeats))
        if not c.is_reg:
            lines.append(f"  {c.folder}: {c.placed} images x {c.repeats} repeats = {samples} samples/epoch")
        elif used < c.placed:
            lines.append(
                f"  {c.folder} (reg): {used} of {c.placed} images used x {c.repeats} repeats = {samples} "
                f"samples/epoch (kohya stops adding reg images at the {train} training samples)"
            )
        elif samples > used * c.repeats:
            lines.append(
                f"  {c.folder} (reg): {used} images x {c.repeats}-{c.repeats + 1} repeats = {samples} "
                f"samples/epoch (kohya adds repeats to match the {train} training samples)"
            )
        else:
            lines.append(f"  {c.folder} (reg): {used} images x {c.repeats} repeats = {samples} samples/epoch")
    return lines


def _mask_lines(concepts: list[Concept], masked: set[int], opts: BucketOptions, tally: Tally) -> list[str]:
    if not any(id(c) in masked and c.placed for c in concepts):
        return []
    if opts.mask_form == "conditioning":
        lines = [
            "masks: written as mask files (conditioning_data_dir, --mask-form conditioning) in a dataset "
            "of their own; kohya reads this dataset.toml only with --masked_loss"
        ]
        white = tally.white_masks
        if white.count == 1:
            lines.append(f"  note: {white.names[0]} has no mask; wrote a full-loss (white) mask")
        elif white.count:
            lines.append(
                f"  note: {white.count} images have no mask; wrote full-loss (white) masks: {white.text()}"
            )
        return lines
    return [
        f"masks: {tally.in_alpha.count} images carry their mask as the alpha channel of a PNG copy "
        "(alpha_mask = true; kohya applies it with or without --masked_loss): this form keeps class "
        "tokens and reg images in one kohya dataset; images without a mask train at full loss"
    ]


def summary(concepts: list[Concept], masked: set[int], opts: BucketOptions, tally: Tally) -> list[str]:
    lines = _concept_lines(concepts)
    lines.append("buckets (w x h, images):")
    lines += bucket_table(tally.buckets)
    see = " (see buckets.json)"
    if tally.upscaled.count:
        lines.append(f"upscaled by the bucketer ({tally.upscaled.count}): " + tally.upscaled.text(see))
    if tally.cropped.count:
        lines.append(f"cropped over 10% ({tally.cropped.count}): " + tally.cropped.text(see))
    lines += _mask_lines(concepts, masked, opts, tally)
    if tally.rotated.count:
        lines.append(
            f"EXIF-rotated, written as rotated PNG copies ({tally.rotated.count}; kohya trains the stored "
            "pixels): " + tally.rotated.text()
        )
    if tally.multiline.count:
        lines.append(
            f"captions on several lines ({tally.multiline.count}; kohya trains only the first line): "
            "written as one line joined with ', ': " + tally.multiline.text()
        )
    if tally.removed:
        shown = ", ".join(tally.removed[:5]) + (
            f", ... and {len(tally.removed) - 5} more" if len(tally.removed) > 5 else ""
        )
        lines.append(
            f"removed {len(tally.removed)} files an earlier bucket run wrote and this one does not "
            f"(`sdprep undo {opts.out}` restores them): {shown}"
        )
    return lines
