"""`sdprep bucket`: build the training-ready folder that kohya and `sdprep train` read.

Layout written under OUT (formats: shared/reference/kohya-formats.md):

    OUT/img/<N>_<token>/          images (hard links, or copies across filesystems) + <stem>.txt
    OUT/img/<N>_<token>/masks/    <stem>.png masks, same pixel size (when the concept has masks)
    OUT/reg/<N>_<class>/          regularisation images (--reg), repeats balanced as kohya does
    OUT/dataset.toml              kohya dataset config (caption_extension = ".txt", subsets, repeats,
                                  conditioning_data_dir for mask subsets, is_reg)
    OUT/metadata.json             kohya metadata: {"<full image path>": {caption, tags, image_size, train_resolution}}
    OUT/buckets.json              the bucket preview: where every image lands, crops, drops

The user's originals are never moved or changed. Every file written in OUT goes through OUT's
journal, so `sdprep undo OUT` removes a build, and a re-run with the same input does no work.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w
from PIL import Image

from sdprep.buckets import Assignment, BucketSettings, assign_bucket, make_buckets
from sdprep.dataset import (
    Item,
    discover,
    format_caption,
    format_repeat_folder,
    parse_repeat_folder,
    read_caption,
)
from sdprep.errors import ConfigError, DatasetError, SdprepError
from sdprep.fileops import Journal, Operation
from sdprep.images import image_size
from sdprep.progress import NullReporter, Reporter
from sdprep.stage import StageResult

WRITE_BATCH = 256  # images whose files are journalled with one sync


@dataclass(frozen=True)
class BucketOptions:
    out: Path
    token: str = ""
    repeats: int | None = None  # fixed repeats for every concept
    target_steps: int | None = None  # steps per epoch wanted (at batch_size); repeats derived
    batch_size: int | None = None  # written to the dataset TOML only when set (it overrides train_batch_size)
    tiers: dict[str, int] = field(default_factory=dict)  # subfolder name -> repeats (quality tiers)
    balance: bool = False  # concepts of different sizes contribute equally per epoch
    reg: tuple[Path, ...] = ()
    reg_token: str = ""  # class tokens of the regularisation folders (default: folder name)
    settings: BucketSettings = BucketSettings()
    copy: bool = False  # copy instead of hard-linking
    recursive: bool = True


@dataclass
class Concept:
    """A group of images trained with one repeat count and one class token (one kohya subset)."""

    name: str
    token: str
    items: list[Item]
    repeats: int = 1
    is_reg: bool = False
    fixed_repeats: int | None = None  # from a tier or an existing <N>_ folder name

    @property
    def folder(self) -> str:
        return format_repeat_folder(self.repeats, self.token)


# -- planning (pure) -----------------------------------------------------------------------------


def compute_repeats(
    sizes: list[int],
    *,
    repeats: int | None,
    target_steps: int | None,
    batch_size: int,
    balance: bool,
    fixed: list[int | None] | None = None,
) -> list[int]:
    """Repeats per concept: fixed, from a target number of steps per epoch, and/or balanced by size.

    - `repeats` sets every concept (except those with a fixed value, e.g. a tier);
    - `target_steps` chooses repeats so one epoch is about that many steps at `batch_size`;
    - `balance` makes every concept contribute about the same number of samples per epoch
      (the largest concept keeps the base repeats, smaller ones get proportionally more).
    """
    fixed = fixed or [None] * len(sizes)
    base = repeats or 1
    out = []
    largest = max(sizes) if sizes else 1
    for n, fix in zip(sizes, fixed):
        if fix is not None:
            out.append(fix)
        elif balance:
            out.append(max(1, round(base * largest / max(n, 1))))
        else:
            out.append(base)
    if target_steps:
        free = [i for i, f in enumerate(fixed) if f is None]
        fixed_samples = sum(sizes[i] * out[i] for i in range(len(sizes)) if fixed[i] is not None)
        free_samples = sum(sizes[i] * out[i] for i in free)
        wanted = target_steps * batch_size - fixed_samples
        if free and free_samples > 0:
            scale = max(wanted, 1) / free_samples
            for i in free:
                out[i] = max(1, round(out[i] * scale))
    return out


def balance_reg_repeats(train_samples: int, reg_sizes: list[int]) -> list[int]:
    """kohya's rule: regularisation repeats so reg samples (with repeats) match the training samples."""
    total = sum(reg_sizes)
    if total == 0:
        return [1] * len(reg_sizes)
    per_image = max(1, math.ceil(train_samples / total))
    return [per_image] * len(reg_sizes)


# -- discovery -----------------------------------------------------------------------------------


def find_concepts(root: Path, opts: BucketOptions) -> list[Concept]:
    """One concept per folder with images: the root itself and/or its subfolders.

    - a subfolder already named `<N>_<tokens>` keeps its class tokens, and its repeats unless
      --repeats / --target-steps say otherwise;
    - a subfolder named in `tiers` gets the tier's repeats and the class tokens "<token> <tier>";
    - any other folder gets `--token` (plus its folder name when there are several such folders),
      or its folder name when no token is given.
    """
    items = discover(root, recursive=opts.recursive)
    groups: dict[Path, list[Item]] = {}
    for item in items:
        groups.setdefault(item.path.parent, []).append(item)
    plain = [f for f in groups if f != root and not parse_repeat_folder(f.name) and f.name not in opts.tiers]
    concepts = []
    for folder, group in sorted(groups.items()):
        name = folder.relative_to(root).as_posix()
        parsed = parse_repeat_folder(folder.name) if folder != root else None
        fixed = None
        if parsed:
            token = parsed.tokens
            fixed = parsed.repeats if opts.repeats is None and opts.target_steps is None else None
        elif folder != root and folder.name in opts.tiers:
            token = f"{opts.token} {folder.name}" if opts.token else folder.name
            fixed = opts.tiers[folder.name]
        elif folder == root:
            token = opts.token
        else:
            token = (
                (f"{opts.token} {folder.name}" if len(plain) > 1 else opts.token)
                if opts.token
                else folder.name
            )
        if not token:
            raise ConfigError(
                f"{folder}: no class token for these images", "pass --token TOKEN (your trigger word)"
            )
        concepts.append(Concept(name, token, group, fixed_repeats=fixed))
    missing = set(opts.tiers) - {folder.name for folder in groups}
    if missing:
        raise ConfigError(
            f"--tier names folders without images under {root}: {', '.join(sorted(missing))}",
            "tiers are subfolder names, e.g. --tier 'high quality=40'",
        )
    return concepts


# -- the stage -----------------------------------------------------------------------------------


@dataclass
class _Placed:
    item: Item
    concept: Concept
    size: tuple[int, int]
    assignment: Assignment
    dest: Path
    caption: str | None
    mask: Path | None


def run_bucket(root: Path | str, opts: BucketOptions, *, report: Reporter = NullReporter()) -> StageResult:
    """Build OUT from the dataset at `root` (see the module docstring); returns counts and the preview."""
    root = Path(root).absolute()
    out = Path(opts.out).absolute()
    if root in out.parents or out == root:
        raise ConfigError(
            f"output folder {out} is inside the dataset {root}", "choose an OUT outside the dataset"
        )
    result = StageResult("bucket")
    concepts = find_concepts(root, opts)
    sizes = [len(c.items) for c in concepts]
    reps = compute_repeats(
        sizes,
        repeats=opts.repeats,
        target_steps=opts.target_steps,
        batch_size=opts.batch_size or 1,
        balance=opts.balance,
        fixed=[c.fixed_repeats for c in concepts],
    )
    for concept, n in zip(concepts, reps):
        concept.repeats = n
    reg_concepts: list[Concept] = []
    for reg_dir in opts.reg:
        reg_items = discover(reg_dir, recursive=True)
        if not reg_items:
            raise DatasetError(f"{reg_dir}: no images in the regularisation folder", "check the --reg path")
        reg_concepts.append(Concept(reg_dir.name, opts.reg_token or reg_dir.name, reg_items, is_reg=True))
    train_samples = sum(len(c.items) * c.repeats for c in concepts)
    for concept, n in zip(
        reg_concepts, balance_reg_repeats(train_samples, [len(c.items) for c in reg_concepts])
    ):
        concept.repeats = n

    buckets = make_buckets(opts.settings)
    placed: list[_Placed] = []
    total = sum(len(c.items) for c in concepts + reg_concepts)
    report.start(total, "bucket")
    for concept in concepts + reg_concepts:
        base = out / ("reg" if concept.is_reg else "img") / concept.folder
        for item in concept.items:
            report.advance()
            try:
                size = image_size(item.path)
                caption = read_caption(item)
            except SdprepError as exc:
                result.fail(item.path, getattr(exc, "reason", str(exc)))
                continue
            assignment = assign_bucket(*size, opts.settings, buckets)
            if assignment.dropped:
                result.fail(item.path, f"dropped: {assignment.dropped}")
                continue
            mask = item.mask_path()
            p = _Placed(
                item, concept, size, assignment, base / item.name, caption, mask if mask.exists() else None
            )
            if p.mask is not None:
                try:
                    _check_mask_size(p)  # a bad mask drops its image, listed; never trained unmasked
                except SdprepError as exc:
                    result.fail(item.path, exc.message)
                    continue
            placed.append(p)
    report.finish()

    with Journal(out).begin("bucket", [str(root), "-o", str(out)]) as op:
        _write_files(op, placed, opts, result)
        _write_dataset_toml(op, out, concepts, reg_concepts, placed, opts)
        _write_metadata(op, out, placed)
        _write_preview(op, out, placed, result)
    _summarise(result, concepts, reg_concepts, placed)
    return result


def _write_files(op: Operation, placed: list[_Placed], opts: BucketOptions, result: StageResult) -> None:
    """Links, captions and masks, a batch at a time (one journal sync per batch, not per file)."""
    masked_concepts = {id(p.concept) for p in placed if p.mask is not None}
    for start in range(0, len(placed), WRITE_BATCH):
        batch = placed[start : start + WRITE_BATCH]
        changed = op.place_many([(p.item.path, p.dest) for p in batch], copy=opts.copy)
        writes: list[tuple[Path, bytes]] = []
        masks: list[tuple[int, Path, Path]] = []
        for k, p in enumerate(batch):
            text = p.caption if p.caption is not None else p.concept.token
            cap = p.dest.with_suffix(".txt")
            data = format_caption(text).encode("utf-8")
            if not cap.is_file() or cap.read_bytes() != data:
                writes.append((cap, data))
                changed[k] = True
            if id(p.concept) in masked_concepts:
                mask_dest = p.dest.parent / "masks" / (p.dest.stem + ".png")
                if p.mask is not None:
                    masks.append((k, p.mask, mask_dest))
                    continue
                # kohya's mask subsets need a mask for every image: white = full loss, as unmasked
                buf = io.BytesIO()
                Image.new("L", p.size, 255).save(buf, "PNG")
                if not mask_dest.is_file() or mask_dest.read_bytes() != buf.getvalue():
                    writes.append((mask_dest, buf.getvalue()))
                    changed[k] = True
                result.notes.append(f"  note: {p.item.path.name} has no mask; wrote a full-loss (white) mask")
        for (k, _, _), moved in zip(masks, op.place_many([(m, d) for _, m, d in masks], copy=opts.copy)):
            changed[k] |= moved
        op.write_many(writes)
        result.changed += sum(changed)
        result.skipped += len(changed) - sum(changed)


def _check_mask_size(p: _Placed) -> None:
    msize = image_size(p.mask)
    if msize != p.size:
        raise DatasetError(
            f"{p.mask}: mask is {msize[0]}x{msize[1]} but its image {p.item.path.name} is {p.size[0]}x{p.size[1]}",
            "masks must have the image's pixel size: re-run `sdprep mask` or `sdprep mask --check`",
        )


def _write_dataset_toml(
    op: Operation,
    out: Path,
    concepts: list[Concept],
    reg: list[Concept],
    placed: list[_Placed],
    opts: BucketOptions,
) -> None:
    s = opts.settings
    with_masks = {id(p.concept) for p in placed if p.mask is not None}
    used = {id(p.concept) for p in placed}

    def subset(c: Concept) -> dict:
        folder = out / ("reg" if c.is_reg else "img") / c.folder
        sub = {
            "image_dir": str(folder),
            "num_repeats": c.repeats,
            "class_tokens": c.token,
            "caption_extension": ".txt",
        }
        if c.is_reg:
            sub["is_reg"] = True
        if id(c) in with_masks:
            sub["conditioning_data_dir"] = str(folder / "masks")
        return sub

    general = {"caption_extension": ".txt", "shuffle_caption": False, "keep_tokens": 1 if opts.token else 0}
    dataset_common = {
        "resolution": list(s.resolution),
        "enable_bucket": True,
        "min_bucket_reso": s.min_side,
        "max_bucket_reso": s.max_side,
        "bucket_reso_steps": s.step,
        "bucket_no_upscale": s.no_upscale,
    }
    if opts.batch_size:
        dataset_common["batch_size"] = opts.batch_size
    # kohya cannot mix mask (conditioning_data_dir) subsets with plain ones in one dataset
    all_concepts = [c for c in concepts + reg if id(c) in used]
    groups = [
        [c for c in all_concepts if id(c) in with_masks],
        [c for c in all_concepts if id(c) not in with_masks],
    ]
    datasets = [{**dataset_common, "subsets": [subset(c) for c in g]} for g in groups if g]
    doc = {"general": general, "datasets": datasets}
    header = "# Written by `sdprep bucket`. kohya sd-scripts: --dataset_config dataset.toml; sdprep: dataset_config = ...\n"
    op.write_text(out / "dataset.toml", header + tomli_w.dumps(doc))


def _write_metadata(op: Operation, out: Path, placed: list[_Placed]) -> None:
    """kohya metadata JSON. Keys are full paths (kohya's current trainer rejects stem-only keys).

    `caption` holds the whole caption file text; `tags` is empty because kohya appends `tags` to
    `caption` and our caption file already holds the merged text.
    """
    meta = {}
    for p in placed:
        meta[str(p.dest)] = {
            "caption": p.caption if p.caption is not None else p.concept.token,
            "tags": "",
            "image_size": list(p.size),
            "train_resolution": list(p.assignment.bucket),
        }
    op.write_text(out / "metadata.json", json.dumps(meta, indent=1, ensure_ascii=False) + "\n")


def preview_rows(placed: list[_Placed]) -> list[dict]:
    rows = []
    for p in placed:
        a = p.assignment
        rows.append(
            {
                "image": str(p.item.path),
                "dest": str(p.dest),
                "size": list(p.size),
                "bucket": list(a.bucket),
                "resized": list(a.resized),
                "crop_ltrb": list(a.crop_ltrb),
                "cropped": round(a.cropped_fraction, 4),
                "scale": round(a.scale, 4),
                "upscaled": a.upscaled,
            }
        )
    return rows


def _write_preview(op: Operation, out: Path, placed: list[_Placed], result: StageResult) -> None:
    doc = {
        "images": preview_rows(placed),
        "dropped": [{"image": str(f.path), "reason": f.reason} for f in result.failed],
    }
    op.write_text(out / "buckets.json", json.dumps(doc, indent=1) + "\n")


def _first(names: Iterable[str], n: int = 20) -> str:
    """At most n names, then how many more (buckets.json lists every image)."""
    names = list(names)
    more = f", ... and {len(names) - n} more (see buckets.json)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def bucket_table(placed_buckets: list[tuple[int, int]]) -> list[str]:
    counts = Counter(placed_buckets)
    return [f"  {w:>5}x{h:<5} {n:>6}" for (w, h), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def _summarise(
    result: StageResult, concepts: list[Concept], reg: list[Concept], placed: list[_Placed]
) -> None:
    lines = ["concepts:"]
    for c in concepts + reg:
        n = sum(1 for p in placed if p.concept is c)
        kind = " (reg)" if c.is_reg else ""
        lines.append(f"  {c.folder}{kind}: {n} images x {c.repeats} repeats = {n * c.repeats} samples/epoch")
    lines.append("buckets (w x h, images):")
    lines += bucket_table([p.assignment.bucket for p in placed])
    up = [p for p in placed if p.assignment.upscaled]
    if up:
        lines.append(
            f"upscaled by the bucketer ({len(up)}): "
            + _first(f"{p.item.path.name} x{p.assignment.scale:.2f}" for p in up)
        )
    heavy = [p for p in placed if p.assignment.cropped_fraction > 0.1]
    if heavy:
        lines.append(
            f"cropped over 10% ({len(heavy)}): "
            + _first(f"{p.item.path.name} {p.assignment.cropped_fraction:.0%}" for p in heavy)
        )
    result.notes[:0] = lines
