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

import contextlib
import io
import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import tomli_w
from PIL import Image

from sdprep.buckets import Assignment, BucketSettings, assign_bucket, make_buckets
from sdprep.dataset import (
    MASK_DIR,
    Item,
    dumps_json,
    format_caption,
    format_repeat_folder,
    iter_items,
    parse_repeat_folder,
    read_caption,
    require_images,
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
    """A group of images trained with one repeat count and one class token (one kohya subset).

    Holds counts, never the images: `items()` lists its folder again, lazily, when needed.
    """

    name: str
    token: str
    source: Path  # the folder its images are in
    count: int  # images found when planning (repeats are computed from it)
    repeats: int = 1
    is_reg: bool = False
    fixed_repeats: int | None = None  # from a tier or an existing <N>_ folder name
    recursive: bool = False  # regularisation folders: images of subfolders too
    placed: int = 0  # images placed in OUT by this run

    @property
    def folder(self) -> str:
        return format_repeat_folder(self.repeats, self.token)

    def items(self) -> Iterator[Item]:
        return iter_items(self.source, recursive=self.recursive)


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


def _check_folder(root: Path) -> None:
    if not root.exists():
        raise DatasetError(f"{root}: no such folder", "check the path")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder", "pass the folder that holds the images")


def find_concepts(root: Path, opts: BucketOptions) -> list[Concept]:
    """One concept per folder with images: the root itself and/or its subfolders.

    - a subfolder already named `<N>_<tokens>` keeps its class tokens, and its repeats unless
      --repeats / --target-steps say otherwise;
    - a subfolder named in `tiers` gets the tier's repeats and the class tokens "<token> <tier>";
    - any other folder gets `--token` (plus its folder name when there are several such folders),
      or its folder name when no token is given.
    """
    _check_folder(root)
    require_images(root, opts.recursive)
    counts: Counter[Path] = Counter(item.path.parent for item in iter_items(root, recursive=opts.recursive))
    plain = [f for f in counts if f != root and not parse_repeat_folder(f.name) and f.name not in opts.tiers]
    concepts = []
    for folder, count in sorted(counts.items()):
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
        concepts.append(Concept(name, token, folder, count, fixed_repeats=fixed))
    missing = set(opts.tiers) - {folder.name for folder in counts}
    if missing:
        raise ConfigError(
            f"--tier names folders without images under {root}: {', '.join(sorted(missing))}",
            "tiers are subfolder names, e.g. --tier 'high quality=40'",
        )
    return concepts


def find_reg_concepts(opts: BucketOptions) -> list[Concept]:
    """One regularisation concept per --reg folder (its subfolders included)."""
    concepts = []
    for reg_dir in opts.reg:
        _check_folder(reg_dir)
        count = sum(1 for _ in iter_items(reg_dir, recursive=True))
        if not count:
            raise DatasetError(f"{reg_dir}: no images in the regularisation folder", "check the --reg path")
        token = opts.reg_token or reg_dir.name
        concepts.append(Concept(reg_dir.name, token, reg_dir, count, is_reg=True, recursive=True))
    return concepts


# -- the stage -----------------------------------------------------------------------------------


@dataclass
class _Placed:
    """One image of the batch being written (only a batch of these exists at a time)."""

    item: Item
    concept: Concept
    size: tuple[int, int]
    assignment: Assignment
    dest: Path
    caption: str | None
    mask: Path | None


def _prepare(
    item: Item,
    concept: Concept,
    base: Path,
    opts: BucketOptions,
    buckets: list,
    names: set[str] | None = None,
) -> _Placed | str:
    """Read an image's size, caption and mask and assign its bucket; a str is why it is left out.

    `names` (for concepts that gather subfolders into one folder) holds the names placed so far.
    """
    if names is not None:
        if item.name in names:
            return (
                f"another image of {concept.source} (in another subfolder) is also named {item.name} "
                f"and both would land in {base.name}/: rename one"
            )
        names.add(item.name)
    try:
        size = image_size(item.path)
        caption = read_caption(item)
    except SdprepError as exc:
        reason = getattr(exc, "reason", str(exc))
        culprit = getattr(exc, "path", item.path)
        return reason if culprit == item.path else f"{culprit.name}: {reason}"  # e.g. its caption
    assignment = assign_bucket(*size, opts.settings, buckets)
    if assignment.dropped:
        return f"dropped: {assignment.dropped}"
    mask = item.mask_path()
    p = _Placed(item, concept, size, assignment, base / item.name, caption, mask if mask.exists() else None)
    if p.mask is not None:
        try:
            _check_mask_size(p)  # a bad mask drops its image, listed; never trained unmasked
        except SdprepError as exc:
            return exc.message
    return p


def _has_own_mask(concept: Concept, opts: BucketOptions, buckets: list) -> bool:
    """Whether the build will place at least one image of `concept` with its own mask.

    A cheap first pass (stops at the first such image, holds nothing per image): a concept with one
    mask needs a mask for every image, and the dataset TOML marks it, so this is known before writing.
    """
    if not concept.recursive and not (concept.source / MASK_DIR).is_dir():
        return False
    for item in concept.items():
        if item.mask_path().exists() and isinstance(_prepare(item, concept, Path(), opts, buckets), _Placed):
            return True
    return False


def _output_folder(out: Path, concept: Concept) -> Path:
    return out / ("reg" if concept.is_reg else "img") / concept.folder


def _check_output_folders(concepts: list[Concept], out: Path) -> None:
    """Two source folders must not become one output folder (same class tokens and repeats): their
    images would mix and same-named ones overwrite each other, and kohya would read it twice."""
    seen: dict[Path, Concept] = {}
    for c in concepts:
        folder = _output_folder(out, c)
        if folder in seen:
            raise ConfigError(
                f"{seen[folder].source} and {c.source} would both become {folder}",
                "give the folders different names (the name is part of the class tokens), "
                "or bucket them in separate runs",
            )
        seen[folder] = c


def _batches(concept: Concept) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in concept.items():
        batch.append(item)
        if len(batch) == WRITE_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def run_bucket(root: Path | str, opts: BucketOptions, *, report: Reporter = NullReporter()) -> StageResult:
    """Build OUT from the dataset at `root` (see the module docstring); returns counts and a summary.

    Memory is flat in the number of images: images are read, placed and appended to metadata.json
    and buckets.json a batch at a time; only counts (and the first few names) outlive a batch.
    """
    root = Path(root).absolute()
    out = Path(opts.out).absolute()
    if root in out.parents or out == root:
        raise ConfigError(
            f"output folder {out} is inside the dataset {root}", "choose an OUT outside the dataset"
        )
    concepts = find_concepts(root, opts)
    reps = compute_repeats(
        [c.count for c in concepts],
        repeats=opts.repeats,
        target_steps=opts.target_steps,
        batch_size=opts.batch_size or 1,
        balance=opts.balance,
        fixed=[c.fixed_repeats for c in concepts],
    )
    for concept, n in zip(concepts, reps):
        concept.repeats = n
    reg_concepts = find_reg_concepts(opts)
    train_samples = sum(c.count * c.repeats for c in concepts)
    for concept, n in zip(reg_concepts, balance_reg_repeats(train_samples, [c.count for c in reg_concepts])):
        concept.repeats = n
    everything = concepts + reg_concepts
    _check_output_folders(everything, out)
    buckets = make_buckets(opts.settings)
    masked = {id(c) for c in everything if _has_own_mask(c, opts, buckets)}

    result = StageResult("bucket")
    tally = _Tally()
    with Journal(out).begin("bucket", [str(root), "-o", str(out)]) as op, _Outputs(out) as outputs:
        report.start(sum(c.count for c in everything), "bucket")
        for concept in everything:
            base = _output_folder(out, concept)
            names: set[str] | None = set() if concept.recursive else None  # subfolders share one folder
            for items in _batches(concept):
                batch = []
                for item in items:
                    report.advance()
                    p = _prepare(item, concept, base, opts, buckets, names)
                    if isinstance(p, str):
                        result.fail(item.path, p)
                    else:
                        batch.append(p)
                _write_files(op, batch, id(concept) in masked, opts, result, tally)
                outputs.add(batch)
                tally.add(batch)
        report.finish()
        _write_dataset_toml(op, out, everything, masked, opts)
        outputs.install(op, result)
    result.notes[:0] = _summary(everything, tally)
    return result


def _write_files(
    op: Operation, batch: list[_Placed], masked: bool, opts: BucketOptions, result: StageResult, tally: _Tally
) -> None:
    """A batch's links, captions and masks (one journal sync per batch, not per file)."""
    changed = op.place_many([(p.item.path, p.dest) for p in batch], copy=opts.copy)
    writes: list[tuple[Path, bytes]] = []
    masks: list[tuple[int, Path, Path]] = []
    for k, p in enumerate(batch):
        cap = p.dest.with_suffix(".txt")
        data = format_caption(_caption(p)).encode("utf-8")
        if not cap.is_file() or cap.read_bytes() != data:
            writes.append((cap, data))
            changed[k] = True
        if masked:
            mask_dest = p.dest.parent / MASK_DIR / (p.dest.stem + ".png")
            if p.mask is not None:
                masks.append((k, p.mask, mask_dest))
                continue
            # kohya's mask subsets need a mask for every image: white = full loss, as unmasked
            buf = io.BytesIO()
            Image.new("L", p.size, 255).save(buf, "PNG")
            if not mask_dest.is_file() or mask_dest.read_bytes() != buf.getvalue():
                writes.append((mask_dest, buf.getvalue()))
                changed[k] = True
            tally.white_masks.add(p.item.path.name)
    for (k, _, _), moved in zip(masks, op.place_many([(m, d) for _, m, d in masks], copy=opts.copy)):
        changed[k] |= moved
    op.write_many(writes)
    result.changed += sum(changed)
    result.skipped += len(changed) - sum(changed)


def _caption(p: _Placed) -> str:
    return p.caption if p.caption is not None else p.concept.token


def _check_mask_size(p: _Placed) -> None:
    msize = image_size(p.mask)
    if msize != p.size:
        raise DatasetError(
            f"{p.mask}: mask is {msize[0]}x{msize[1]} but its image {p.item.path.name} is {p.size[0]}x{p.size[1]}",
            "masks must have the image's pixel size: re-run `sdprep mask` or `sdprep mask --check`",
        )


def _write_dataset_toml(
    op: Operation, out: Path, concepts: list[Concept], with_masks: set[int], opts: BucketOptions
) -> None:
    s = opts.settings

    def subset(c: Concept) -> dict:
        folder = _output_folder(out, c)
        sub = {
            "image_dir": str(folder),
            "num_repeats": c.repeats,
            "class_tokens": c.token,
            "caption_extension": ".txt",
        }
        if c.is_reg:
            sub["is_reg"] = True
        if id(c) in with_masks:
            sub["conditioning_data_dir"] = str(folder / MASK_DIR)
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
    used = [c for c in concepts if c.placed]
    groups = [[c for c in used if id(c) in with_masks], [c for c in used if id(c) not in with_masks]]
    datasets = [{**dataset_common, "subsets": [subset(c) for c in g]} for g in groups if g]
    doc = {"general": general, "datasets": datasets}
    header = "# Written by `sdprep bucket`. kohya sd-scripts: --dataset_config dataset.toml; sdprep: dataset_config = ...\n"
    op.write_text(out / "dataset.toml", header + tomli_w.dumps(doc))


# -- metadata.json and buckets.json, streamed ----------------------------------------------------


def _nested(value: object, level: int, ensure_ascii: bool) -> str:
    """`json.dumps(value, indent=1)` as it reads `level` containers deep in an indent=1 document."""
    text = json.dumps(value, indent=1) if ensure_ascii else dumps_json(value, indent=1)
    return text.replace("\n", "\n" + " " * level)


class _Members:
    """The members of one JSON container, written one at a time (byte-identical to json.dumps indent=1)."""

    def __init__(self, f: TextIO, level: int):
        self.f, self.level, self.n = f, level, 0

    def add(self, text: str) -> None:
        self.f.write(("," if self.n else "") + "\n" + " " * (self.level + 1) + text)
        self.n += 1

    def close(self, closer: str) -> None:
        self.f.write(("\n" + " " * self.level if self.n else "") + closer)


class _Outputs:
    """metadata.json and buckets.json streamed into temp files in OUT, installed through the journal.

    metadata.json is kohya's: {"<full image path>": {caption, tags, image_size, train_resolution}}.
    Keys are full paths (kohya's current trainer rejects stem-only keys); `caption` holds the whole
    caption file text and `tags` is empty, because kohya appends `tags` to `caption`.
    buckets.json is the preview: {"images": [one row per placed image], "dropped": [...]}.
    """

    NAMES = ("metadata.json", "buckets.json")

    def __init__(self, out: Path):
        self.out = out
        self.tmp: dict[str, Path] = {}
        self.files: dict[str, TextIO] = {}

    def __enter__(self) -> _Outputs:
        try:
            for name in self.NAMES:
                fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.out)
                self.tmp[name] = Path(tmp)
                self.files[name] = open(fd, "w", encoding="utf-8", newline="")  # noqa: SIM115
        except BaseException:
            self.__exit__()
            raise
        self.files["metadata.json"].write("{")
        self.meta = _Members(self.files["metadata.json"], 0)
        self.files["buckets.json"].write('{\n "images": [')
        self.rows = _Members(self.files["buckets.json"], 1)
        return self

    def add(self, batch: list[_Placed]) -> None:
        for p in batch:
            a = p.assignment
            entry = {
                "caption": _caption(p),
                "tags": "",
                "image_size": list(p.size),
                "train_resolution": list(a.bucket),
            }
            self.meta.add(dumps_json(str(p.dest)) + ": " + _nested(entry, 1, False))
            row = {
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
            self.rows.add(_nested(row, 2, True))

    def install(self, op: Operation, result: StageResult) -> None:
        """Finish both files (buckets.json lists every failure as dropped) and put them in place."""
        self.meta.close("}")
        self.files["metadata.json"].write("\n")
        self.rows.close("]")
        dropped = [{"image": str(f.path), "reason": f.reason} for f in result.failed]
        self.files["buckets.json"].write(',\n "dropped": ' + _nested(dropped, 1, True) + "\n}\n")
        for name in self.NAMES:
            self.files[name].close()
            op.install(self.tmp[name], self.out / name)

    def __exit__(self, *exc: object) -> None:
        for name, tmp in self.tmp.items():
            if name in self.files:
                self.files[name].close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


# -- the summary ---------------------------------------------------------------------------------


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
class _Tally:
    """What the summary needs, kept across batches: counts and a few names, nothing per image."""

    buckets: Counter = field(default_factory=Counter)
    upscaled: _Names = field(default_factory=_Names)
    cropped: _Names = field(default_factory=_Names)
    white_masks: _Names = field(default_factory=_Names)

    def add(self, batch: list[_Placed]) -> None:
        for p in batch:
            a = p.assignment
            p.concept.placed += 1
            self.buckets[a.bucket] += 1
            if a.upscaled:
                self.upscaled.add(f"{p.item.path.name} x{a.scale:.2f}")
            if a.cropped_fraction > 0.1:
                self.cropped.add(f"{p.item.path.name} {a.cropped_fraction:.0%}")


def bucket_table(counts: Counter) -> list[str]:
    """`  w x h  images` lines, the most used bucket first."""
    return [f"  {w:>5}x{h:<5} {n:>6}" for (w, h), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def _summary(concepts: list[Concept], tally: _Tally) -> list[str]:
    lines = ["concepts:"]
    for c in concepts:
        kind = " (reg)" if c.is_reg else ""
        lines.append(
            f"  {c.folder}{kind}: {c.placed} images x {c.repeats} repeats = {c.placed * c.repeats} samples/epoch"
        )
    lines.append("buckets (w x h, images):")
    lines += bucket_table(tally.buckets)
    see = " (see buckets.json)"
    if tally.upscaled.count:
        lines.append(f"upscaled by the bucketer ({tally.upscaled.count}): " + tally.upscaled.text(see))
    if tally.cropped.count:
        lines.append(f"cropped over 10% ({tally.cropped.count}): " + tally.cropped.text(see))
    white = tally.white_masks
    if white.count == 1:
        lines.append(f"  note: {white.names[0]} has no mask; wrote a full-loss (white) mask")
    elif white.count:
        lines.append(
            f"  note: {white.count} images have no mask; wrote full-loss (white) masks: {white.text()}"
        )
    return lines
