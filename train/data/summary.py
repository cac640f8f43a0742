"""The data summary the trainer prints at start: buckets, dropped and upscaled images, masks, steps."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from sdprep.train.data.pipeline import TrainDataset

MAX_LISTED = 20  # dropped / upscaled images listed one per line; the rest are counted


@dataclass
class SubsetRow:
    origin: str
    folder: str
    repeats: int
    effective_repeats: tuple[int, int]  # min, max after regularisation rebalancing
    images: int
    is_reg: bool
    kind: str  # "dreambooth" | "fine-tune"
    masked: int


@dataclass
class DataSummary:
    """Facts about the training data; `str()` gives the lines the CLI prints."""

    images: int
    reg_images: int
    samples_per_epoch: int
    steps_per_epoch: int
    batch_sizes: list[int]
    subsets: list[SubsetRow]
    buckets: list[tuple[tuple[int, int], int, int]]  # (w, h), images, samples per epoch
    dropped: list[tuple[Path, str]]
    upscaled: list[tuple[Path, float]]
    masked: int
    mask_coverage: float | None
    coverage_sample: int
    notes: list[str] = field(default_factory=list)

    @property
    def bucket_table(self) -> dict[tuple[int, int], int]:
        """bucket (w, h) -> samples per epoch."""
        return {b: samples for b, _, samples in self.buckets}

    def lines(self) -> list[str]:
        bs = "/".join(str(b) for b in sorted(set(self.batch_sizes)))
        reg = f" ({self.reg_images} regularisation)" if self.reg_images else ""
        out = [
            f"data: {self.images} images{reg}, {self.samples_per_epoch} samples per epoch, "
            f"{self.steps_per_epoch} steps per epoch at batch size {bs}"
        ]
        out.append("subsets:")
        for s in self.subsets:
            lo, hi = s.effective_repeats
            rep = f"{s.repeats} repeats" + (
                f" (rebalanced to {lo}-{hi})" if (lo, hi) != (s.repeats, s.repeats) else ""
            )
            tags = (" reg" if s.is_reg else "") + (" fine-tune" if s.kind == "fine-tune" else "")
            masks = f", {s.masked} with masks" if s.masked else ""
            out.append(f"  {s.folder}{tags}: {s.images} images, {rep}{masks}")
        out.append("buckets (width x height: images, samples per epoch):")
        out += [f"  {w}x{h}: {n} images, {samples} samples" for (w, h), n, samples in self.buckets]
        if self.masked:
            cov = "" if self.mask_coverage is None else f", mean coverage {self.mask_coverage:.1%}"
            sampled = f" (over {self.coverage_sample} of them)" if self.coverage_sample < self.masked else ""
            out.append(f"masks: {self.masked} of {self.images} images have masks{cov}{sampled}")
        else:
            out.append("masks: none")
        if self.upscaled:
            out.append(f"upscaled: {len(self.upscaled)} images smaller than their bucket (enlarged):")
            out += [f"  {p} (x{scale:.2f})" for p, scale in self.upscaled[:MAX_LISTED]]
            if len(self.upscaled) > MAX_LISTED:
                out.append(f"  ... and {len(self.upscaled) - MAX_LISTED} more")
        if self.dropped:
            out.append(f"dropped: {len(self.dropped)} images not used:")
            out += [f"  {p}: {why}" for p, why in self.dropped[:MAX_LISTED]]
            if len(self.dropped) > MAX_LISTED:
                out.append(f"  ... and {len(self.dropped) - MAX_LISTED} more")
        out += self.notes
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def summarize(ds: TrainDataset) -> DataSummary:
    """Build the DataSummary of a TrainDataset."""
    recs = ds.records
    images: Counter[tuple[int, int]] = Counter()
    samples: Counter[tuple[int, int]] = Counter()
    for r in recs:
        images[r.assignment.bucket] += 1
        samples[r.assignment.bucket] += r.num_repeats
    by_subset = ds.by_subset()
    rows = []
    for i, spec in enumerate(ds.subsets):
        mine = by_subset[i]
        eff = (min(r.num_repeats for r in mine), max(r.num_repeats for r in mine)) if mine else (0, 0)
        folder = str(spec.image_dir) if spec.image_dir is not None else str(spec.metadata_file)
        kind = "fine-tune" if spec.is_finetune else "dreambooth"
        masked = sum(1 for r in mine if r.has_mask)
        row = SubsetRow(spec.origin, folder, spec.num_repeats, eff, len(mine), spec.is_reg, kind, masked)
        rows.append(row)
    covs = [r.coverage for r in recs if r.coverage is not None]
    upscaled = sorted(
        ((r.path, r.assignment.scale) for r in recs if r.assignment.upscaled), key=lambda t: -t[1]
    )
    return DataSummary(
        images=len(recs),
        reg_images=sum(1 for r in recs if r.is_reg),
        samples_per_epoch=sum(r.num_repeats for r in recs),
        steps_per_epoch=ds.steps_per_epoch(),
        batch_sizes=[d.batch_size for d in ds.datasets],
        subsets=rows,
        buckets=[(b, images[b], samples[b]) for b in sorted(images)],
        dropped=list(ds.findings.dropped),
        upscaled=upscaled,
        masked=sum(1 for r in recs if r.has_mask),
        mask_coverage=sum(covs) / len(covs) if covs else None,
        coverage_sample=len(covs),
        notes=list(ds.findings.notes),
    )
