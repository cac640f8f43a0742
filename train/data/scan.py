"""Building the training image list: captions, metadata JSON, masks, sizes, buckets, reg balance.

Used by `sdprep.train.data.pipeline.build_dataset`; every image left out is recorded in `Findings.dropped`
with its reason, and anything ignored or assumed becomes a note.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NotRequired, TypedDict

from sdprep.buckets import Assignment, BucketSettings, assign_bucket, make_buckets
from sdprep.dataset import MASK_DIR, discover, is_image, loads_json, read_text_file
from sdprep.errors import CaptionError, ConfigError, DatasetError, SdprepError
from sdprep.images import image_size
from sdprep.progress import Reporter
from sdprep.stage import map_items
from sdprep.train.config.datasets import DatasetSpec, Findings, SubsetSpec
from sdprep.train.data.transforms import load_mask, load_rgb

if TYPE_CHECKING:
    import torch

    from sdprep.train.config.schema import TrainConfig

MAX_COVERAGE_SAMPLE = 2000  # masks decoded for the mean-coverage figure (a fixed sample beyond this)


class LatentEntry(TypedDict):
    """One image's latent cache entry (sdprep.train.data.cache): raw VAE samples at its bucket."""

    latents: torch.Tensor
    latents_flipped: torch.Tensor | None  # when the subset has flip_aug
    mask: torch.Tensor | None  # uint8 HxW, cut to the bucket
    key: NotRequired[str]  # in memory: the cache key it was encoded under


@dataclass
class ImageRecord:
    """One usable training image with everything decided at build time."""

    path: Path
    dataset: int
    subset: int
    caption: str  # raw caption, before per-epoch processing
    size: tuple[int, int]  # (w, h) as displayed (EXIF applied)
    assignment: Assignment
    num_repeats: int
    is_reg: bool
    mask_path: Path | None = None
    alpha_mask: bool = False
    coverage: float | None = None
    # filled by sdprep.train.data.cache
    latents: LatentEntry | None = None  # in-memory latent cache entry
    latents_file: Path | None = None
    te: tuple[torch.Tensor, torch.Tensor] | None = None  # (prompt_embeds [L,2048], pooled [1280]) in memory
    te_file: Path | None = None
    te_key: str | None = None

    @property
    def has_mask(self) -> bool:
        return self.mask_path is not None or self.alpha_mask


@dataclass
class _Found:
    path: Path
    caption: str
    mask: Path | None = None
    alpha: bool = False
    train_resolution: tuple[int, int] | None = None  # from a metadata JSON entry


@dataclass
class _Placed:
    """A found image with its size and bucket."""

    found: _Found
    size: tuple[int, int]
    assignment: Assignment


@dataclass
class _MaskStats:
    unused: int = 0  # mask files found while masked_loss is off
    missing: list[Path] = field(default_factory=list)  # images of a mask subset without a mask


def _read_caption_file(path: Path, wildcard: bool) -> str:
    lines = [line.strip() for line in read_text_file(path).splitlines()]
    if wildcard:
        return "\n".join(line for line in lines if line)
    return lines[0] if lines else ""


def _mask_index(folder: Path | None) -> dict[str, Path]:
    """stem -> mask file in a folder (PNG preferred over other image formats)."""
    if folder is None or not folder.is_dir():
        return {}
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and is_image(p) and (p.stem not in out or p.suffix.lower() == ".png"):
            out[p.stem] = p
    return out


def _db_images(spec: SubsetSpec, findings: Findings) -> list[_Found]:
    """A DreamBooth subset: the folder's images, caption file or class tokens."""
    if spec.image_dir is None or not spec.image_dir.is_dir():
        raise ConfigError(f"{spec.origin}: image_dir {spec.image_dir}: no such folder", "check the path")
    found, missing, empty = [], 0, 0
    # a.png + a.jpg would both train with a.txt (and one mask): left out, as sdprep's stages do
    for item in discover(spec.image_dir, on_clash=findings.drop):
        cap_path = item.path.with_suffix(spec.caption_extension)
        try:
            if cap_path.is_file():
                caption = _read_caption_file(cap_path, spec.captions.enable_wildcard)
                empty += not caption
            else:
                caption, missing = spec.class_tokens or "", missing + 1
        except CaptionError as exc:
            findings.drop(item.path, f"caption unreadable: {exc.reason}")
            continue
        found.append(_Found(item.path, caption))
    if empty:
        findings.note(
            f"note: {spec.image_dir}: {empty} caption files are empty: those images train uncaptioned"
        )
    if missing:
        what = f'the class tokens "{spec.class_tokens}"' if spec.class_tokens else "an empty caption"
        findings.note(
            f"note: {spec.image_dir}: {missing} of {len(found)} images have no {spec.caption_extension} "
            f"caption file: they train with {what}"
        )
        others = {p.suffix for p in spec.image_dir.glob("*.txt")} | {
            p.suffix for p in spec.image_dir.glob("*.caption")
        }
        others.discard(spec.caption_extension)
        if others and missing == len(found):
            findings.note(f"  hint: the folder has {'/'.join(sorted(others))} files: set caption_extension")
    return found


def _metadata_caption(md: object, sep: str) -> str:
    if not isinstance(md, dict):
        raise ValueError("entry is not a JSON object")
    caption, tags = md.get("caption"), md.get("tags")
    if any(v is not None and not isinstance(v, str) for v in (caption, tags)):
        raise ValueError("caption/tags are not strings")
    if caption is None:
        caption, tags = tags, None
    if tags:
        caption = f"{caption}{sep}{tags}"
    return caption or ""


def _resolve_key(key: str, image_dir: Path | None) -> tuple[Path | None, bool]:
    """An image for a metadata key: full path, relative with extension, or stem-only (flagged)."""
    p = Path(key)
    if p.is_absolute() or image_dir is None:
        return (p if p.is_file() else None), False
    if (image_dir / p).is_file():
        return image_dir / p, False
    if p.is_file():
        return p, False
    if not p.suffix or not is_image(p):
        hits = sorted(q for q in image_dir.glob(f"{p.name}.*") if is_image(q))
        if hits:
            return hits[0], True
    return None, False


def _ft_images(spec: SubsetSpec, path: Path, findings: Findings) -> list[_Found]:
    """A fine-tuning subset (`path`: its metadata JSON): captions from it; unlisted images are reported."""
    try:
        data = loads_json(read_text_file(path, max_bytes=None))
    except (CaptionError, FileNotFoundError) as exc:
        raise ConfigError(f"{spec.origin}: metadata_file {path}: cannot read it ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{spec.origin}: metadata_file {path}: invalid JSON (line {exc.lineno})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{spec.origin}: metadata_file {path}: expected a JSON object of image entries")
    found, stem_only, seen = [], 0, set()
    for key, md in data.items():
        image, is_stem = _resolve_key(key, spec.image_dir)
        if image is None:
            findings.drop(
                Path(key),
                f"listed in {path.name} but no such image (keys are full paths or relative to image_dir)",
            )
            continue
        try:
            caption = _metadata_caption(md, spec.captions.caption_separator)
        except ValueError as exc:
            findings.drop(image, f"{path.name}: {exc}")
            continue
        stem_only += is_stem
        seen.add(image.resolve())
        res = md.get("train_resolution")
        res = tuple(res) if isinstance(res, list) and len(res) == 2 else None
        found.append(_Found(image, caption, train_resolution=res))
    if stem_only:
        findings.note(
            f"note: {path.name}: {stem_only} keys are stem-only (kohya's current trainer rejects them); "
            "accepted by matching the image's name"
        )
    if spec.image_dir is not None and spec.image_dir.is_dir():
        for item in discover(spec.image_dir):
            if item.path.resolve() not in seen:
                findings.drop(item.path, f"not listed in metadata_file {path.name}")
    return found


def _attach_masks(spec: SubsetSpec, found: list[_Found], masked_loss: bool, stats: _MaskStats) -> None:
    if spec.conditioning_data_dir is not None and not spec.conditioning_data_dir.is_dir():
        raise ConfigError(
            f"{spec.origin}: conditioning_data_dir {spec.conditioning_data_dir}: no such folder",
            "check the path",
        )
    indexes: dict[Path, dict[str, Path]] = {}
    for f in found:
        folder = spec.conditioning_data_dir or f.path.parent / MASK_DIR
        if folder not in indexes:
            indexes[folder] = _mask_index(folder)
        mask = indexes[folder].get(f.path.stem)
        if mask is not None and not masked_loss:
            stats.unused += 1
            mask = None
        f.mask = mask
        f.alpha = mask is None and spec.alpha_mask
        if masked_loss and mask is None and spec.conditioning_data_dir is not None and not spec.alpha_mask:
            stats.missing.append(f.path)
    if (
        masked_loss
        and spec.conditioning_data_dir is not None
        and found
        and all(f.mask is None for f in found)
    ):
        raise ConfigError(
            f"{spec.origin}: no mask in {spec.conditioning_data_dir} matches any image of {spec.image_dir}",
            "masks need the image's file name (stem) and pixel size; see `sdprep mask --check`",
        )


def _bucket_settings(spec: DatasetSpec) -> tuple[BucketSettings, list[tuple[int, int]] | None]:
    if not spec.enable_bucket:
        return BucketSettings(resolution=spec.resolution, step=8, min_side=8, max_side=10**6), [
            spec.resolution
        ]
    settings = BucketSettings(
        resolution=spec.resolution,
        step=spec.bucket_reso_steps,
        min_side=spec.min_bucket_reso,
        max_side=spec.max_bucket_reso,
        no_upscale=spec.bucket_no_upscale,
    )
    return settings, None if spec.bucket_no_upscale else make_buckets(settings)


def _size_and_bucket(found: list[_Found], spec: DatasetSpec, findings: Findings) -> list[_Placed]:
    settings, buckets = _bucket_settings(spec)
    usable = []
    for f, size in map_items(lambda f: image_size(f.path), found, workers=4):
        if isinstance(size, SdprepError):
            findings.drop(f.path, getattr(size, "reason", size.message))
            continue
        a = assign_bucket(size[0], size[1], settings, buckets)
        if a.dropped:
            findings.drop(f.path, a.dropped)
            continue
        usable.append(_Placed(f, size, a))
    differ = [
        p
        for p in usable
        if p.found.train_resolution and tuple(p.found.train_resolution) != p.assignment.bucket
    ]
    if differ:
        findings.note(
            f"note: {len(differ)} metadata entries give a train_resolution other than the bucket this config "
            f"computes (first: {differ[0].found.path.name}); sdprep buckets from the image and these settings"
        )
    return usable


def _rebalance_reg(train: list[int], reg: list[int], repeats: list[int]) -> set[int]:
    """kohya's rule: reg repeats grow (one image at a time) until reg samples match training samples.

    `train`/`reg` are indices into `repeats` (updated in place); returns the reg indices used.
    """
    target = sum(repeats[i] for i in train)
    used: set[int] = set()
    n, first = 0, True
    while reg and n < target:
        for i in reg:
            if first:
                used.add(i)
                n += repeats[i]
            else:
                repeats[i] += 1
                n += 1
            if n >= target:
                break
        first = False
    return used


def _check_masks(records: list[ImageRecord], report: Reporter) -> None:
    """Mask files must match their image's size (an error naming every bad file); mean coverage."""
    bad = []
    masked = [r for r in records if r.has_mask]
    for r in masked:
        if r.mask_path is not None:
            try:
                msize = image_size(r.mask_path)
            except SdprepError as exc:
                bad.append(str(exc).split("\n")[0])
                continue
            if msize != r.size:
                bad.append(
                    f"{r.mask_path}: mask is {msize[0]}x{msize[1]} but its image {r.path.name} is {r.size[0]}x{r.size[1]}"
                )
    if bad:
        shown = "\n  ".join(bad[:10]) + (f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise DatasetError(
            f"{len(bad)} mask(s) cannot be used:\n  {shown}",
            "masks must have their image's pixel size: fix them with `sdprep mask --check` / `sdprep mask`",
        )
    step = max(1, len(masked) // MAX_COVERAGE_SAMPLE)
    sample = masked[::step]
    report.start(len(sample), "checking masks")
    for r, cov in map_items(_coverage, sample, workers=2):
        if isinstance(cov, SdprepError):
            raise cov
        r.coverage = cov
        report.advance()
    report.finish()


def _coverage(r: ImageRecord) -> float:
    if r.mask_path is not None:
        return float(load_mask(r.mask_path).mean() / 255.0)
    _, alpha = load_rgb(r.path, True)
    return float(alpha.mean() / 255.0)


def _mask_notes(stats: _MaskStats, masked_loss: bool, records: list[ImageRecord], findings: Findings) -> None:
    if stats.unused:
        findings.note(
            f"warning: {stats.unused} images have mask files but masked_loss is off: the masks are NOT used "
            "(set masked_loss = true)"
        )
    if masked_loss and not any(r.has_mask for r in records):
        findings.note(
            "warning: masked_loss is on but no image has a mask (conditioning_data_dir, masks/<stem>.png or "
            "alpha_mask): every image trains at full loss"
        )
    if stats.missing:
        findings.note(
            f"warning: {len(stats.missing)} images of mask subsets have no mask: they train at full loss "
            f"(first: {stats.missing[0]})"
        )


@dataclass
class Scan:
    """The result of scanning the sources: resolved datasets, used subsets, usable images."""

    datasets: list[DatasetSpec]
    subsets: list[SubsetSpec]
    records: list[ImageRecord]
    findings: Findings
    mask_stats: _MaskStats


def _scan_dataset(d: int, dspec: DatasetSpec, scan: Scan, masked_loss: bool) -> None:
    findings, subsets = scan.findings, scan.subsets
    seen: set[Path] = set()
    rows: list[tuple[_Placed, int]] = []
    for sspec in dspec.subsets:
        source = sspec.metadata_file or sspec.image_dir
        if source is None:
            raise ConfigError(f"{sspec.origin}: image_dir is required", 'add image_dir = "path/to/images"')
        key = source.resolve()
        if key in seen:
            findings.note(
                f"note: {sspec.origin}: same folder as an earlier subset of this dataset: ignored (kohya's rule)"
            )
            continue
        seen.add(key)
        if sspec.metadata_file is not None:
            found = _ft_images(sspec, sspec.metadata_file, findings)
        else:
            found = _db_images(sspec, findings)
        if sspec.num_repeats < 1:
            for f in found:
                findings.drop(f.path, f"{sspec.origin}: num_repeats is {sspec.num_repeats}")
            continue
        _attach_masks(sspec, found, masked_loss, scan.mask_stats)
        placed = _size_and_bucket(found, dspec, findings)
        subsets.append(sspec)
        rows += [(p, len(subsets) - 1) for p in placed]
    repeats = [subsets[s].num_repeats for _, s in rows]
    train = [i for i, (_, s) in enumerate(rows) if not subsets[s].is_reg]
    reg = [i for i, (_, s) in enumerate(rows) if subsets[s].is_reg]
    used = _rebalance_reg(train, reg, repeats) if reg else set()
    for i, (p, s) in enumerate(rows):
        f, is_reg = p.found, subsets[s].is_reg
        if is_reg and i not in used:
            findings.drop(
                f.path, "regularisation image not needed: reg samples already match the training samples"
            )
            continue
        rec = ImageRecord(f.path, d, s, f.caption, p.size, p.assignment, repeats[i], is_reg, f.mask, f.alpha)
        scan.records.append(rec)


def scan_sources(datasets: list[DatasetSpec], cfg: TrainConfig, findings: Findings, report: Reporter) -> Scan:
    """Read every subset of `datasets` into usable image records (see the module docstring)."""
    masked_loss = cfg.masked_loss
    scan = Scan(datasets, [], [], findings, _MaskStats())
    report.start(len(datasets), "reading images")
    for d, dspec in enumerate(datasets):
        _scan_dataset(d, dspec, scan, masked_loss)
        report.advance()
    report.finish()
    _mask_notes(scan.mask_stats, masked_loss, scan.records, findings)
    if not scan.records:
        left = f" ({len(findings.dropped)} left out)" if findings.dropped else ""
        listing = "\n".join(f"{p}: {why}" for p, why in findings.dropped[:10])
        raise DatasetError(
            f"no usable training images{left}", listing or "check train_data_dir / dataset_config"
        )
    _check_masks(scan.records, report)
    return scan
