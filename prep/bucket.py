"""`sdprep bucket`: build the training-ready folder that kohya and `sdprep train` read.

Layout written under OUT (formats: shared/reference/kohya-formats.md):

    OUT/img/<N>_<token>/          images (hard links, or copies across filesystems) + <stem>.txt;
                                  PNG copies `<stem>.png` for EXIF-rotated images and, by default,
                                  for images whose mask is baked into the alpha channel
    OUT/img/<N>_<token>/masks/    <stem>.png masks (only with --mask-form conditioning)
    OUT/reg/<N>_<class>/          regularisation images (--reg), repeats balanced as kohya does
    OUT/dataset.toml              kohya dataset config that kohya's schema accepts as written
    OUT/metadata.json             kohya metadata: {"<image path>": {caption, tags, image_size, train_resolution}}
    OUT/buckets.json              the bucket preview: where every image lands, crops, drops

Masks reach kohya in one of two forms. "alpha" (default): every subset is an ordinary DreamBooth
subset in ONE dataset, masked concepts get `alpha_mask = true` and their masked images are PNG
copies with the mask as alpha, so class tokens and reg images keep working and kohya balances reg
images against all training images. "conditioning": masked concepts become kohya mask subsets
(`conditioning_data_dir`, no class_tokens / is_reg, only valid with --masked_loss) in their own
dataset; kohya cannot balance reg images against them, so that form refuses reg folders.

Paths in dataset.toml and metadata.json are relative to OUT (the TOML's folder): `sdprep train`
resolves them from there, kohya from its working folder (`cd OUT` first), and `--root PATH` writes
absolute paths for the machine where OUT will be. Captions are written as kohya trains them: one
line (kohya reads only a caption file's first line, so the lines of a multi-line caption are joined
with ", " and listed in the summary).

The user's originals are never moved or changed. Every file written in OUT goes through OUT's
journal, so `sdprep undo OUT` removes a build, and a re-run with the same input does no work. A
re-run removes (through the journal) what the previous run wrote and this one does not, and never
touches files a bucket run did not write.
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
from sdprep.images import ImageHeader, image_header, image_size
from sdprep.prep.bucket_files import Written, copy_reason, png_copy
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
    mask_form: str = "alpha"  # "alpha" (masks baked into PNG copies) | "conditioning" (mask files)
    root: str | None = None  # where OUT will be on the training machine: absolute paths from it

    def __post_init__(self) -> None:
        if self.mask_form not in MASK_FORMS:
            raise ConfigError(f"unknown mask form {self.mask_form!r}", "valid: " + ", ".join(MASK_FORMS))


MASK_FORMS = ("alpha", "conditioning")


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
    """Regularisation repeats so that kohya registers every reg image and tops the repeats up to
    exactly the training samples: the largest repeats with reg samples <= training samples (kohya
    stops registering reg images once they reach the training samples, see `kohya_reg_use`)."""
    total = sum(reg_sizes)
    if total == 0:
        return [1] * len(reg_sizes)
    return [max(1, train_samples // total)] * len(reg_sizes)


def kohya_reg_use(train_samples: int, reg: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """What kohya's DreamBoothDataset registers of reg subsets (images, repeats), in TOML order, in a
    dataset with `train_samples` training samples: per subset (images used, samples per epoch).

    Its rule: register reg images one by one, each with its subset's repeats, until the reg samples
    reach the training samples; if all are registered and still short, add one repeat to one image
    at a time, in order, until they match. No training samples: no reg image is used.
    """
    used = [0] * len(reg)
    samples = [0] * len(reg)
    n = 0
    for i, (count, repeats) in enumerate(reg):
        take = min(count, max(0, math.ceil((train_samples - n) / repeats))) if repeats > 0 else 0
        used[i], samples[i] = take, take * repeats
        n += take * repeats
    images = sum(used)
    if n < train_samples and images:  # the second loop: +1 per image in order, cycling
        short = train_samples - n
        rounds, rest = divmod(short, images)
        for i in range(len(reg)):
            samples[i] += rounds * used[i] + min(rest, used[i])
            rest -= min(rest, used[i])
    return list(zip(used, samples))


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
    copy: str | None = None  # why it is written as a PNG copy (None: linked)
    multiline: bool = False  # its caption file had several lines (joined here)
    alpha: bool = False  # its subset reads loss masks from the alpha channel (alpha_mask = true)


def _one_line(caption: str | None) -> tuple[str | None, bool]:
    """A caption as kohya trains it: kohya reads a caption file up to its first line break, so the
    non-empty lines of a multi-line caption are joined with ", " (nothing the user wrote is lost)."""
    if caption is None or "\n" not in caption and "\r" not in caption:
        return caption, False
    lines = [line.strip().strip(",").strip() for line in caption.splitlines()]
    lines = [line for line in lines if line]
    return ", ".join(lines), len(lines) > 1


def _prepare(
    item: Item,
    concept: Concept,
    base: Path,
    opts: BucketOptions,
    buckets: list,
    names: set[str] | None = None,
    alpha_mask: bool = False,
) -> _Placed | str:
    """Read an image's header, caption and mask and assign its bucket; a str is why it is left out.

    `names` (for concepts that gather subfolders into one folder) holds the names placed so far;
    `alpha_mask`: the concept's masks travel in the alpha channel of PNG copies.
    """
    try:
        header: ImageHeader = image_header(item.path)
        caption, multiline = _one_line(read_caption(item))
    except SdprepError as exc:
        reason = getattr(exc, "reason", str(exc))
        culprit = getattr(exc, "path", item.path)
        return reason if culprit == item.path else f"{culprit.name}: {reason}"  # e.g. its caption
    mask: Path | None = item.mask_path()
    mask = mask if mask.exists() else None
    why = copy_reason(header, mask, alpha_mask)
    name = item.path.stem + ".png" if why else item.name
    if names is not None:
        if name in names:
            return (
                f"another image of {concept.source} (in another subfolder) is also named {name} "
                f"and both would land in {base.name}/: rename one"
            )
        names.add(name)
    if why and name != item.name and (item.path.parent / name).exists():
        return f"needs a PNG copy ({why}) named {name}, but {name} is another image beside it: rename one"
    size = header.size
    assignment = assign_bucket(*size, opts.settings, buckets)
    if assignment.dropped:
        return f"dropped: {assignment.dropped}"
    p = _Placed(item, concept, size, assignment, base / name, caption, mask, why, multiline, alpha_mask)
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


def _plan(root: Path, out: Path, opts: BucketOptions) -> tuple[list[Concept], set[int]]:
    """Concepts (training then reg) with their repeats, and the ids of those that have masks."""
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
    buckets = make_buckets(opts.settings)
    masked = {id(c) for c in concepts + reg_concepts if _has_own_mask(c, opts, buckets)}
    if opts.mask_form == "conditioning" and masked and reg_concepts:
        raise ConfigError(
            "--mask-form conditioning cannot be used with --reg: kohya's mask subsets "
            "(conditioning_data_dir) must be a dataset of their own, and kohya balances reg images "
            "only within one dataset, so it would use too few of them or none",
            "leave out --mask-form (the default bakes masks into the images' alpha channel, "
            "which keeps reg images and class tokens working)",
        )
    # kohya balances reg images within one dataset: the one holding every training concept
    train_samples = sum(c.count * c.repeats for c in concepts)
    for concept, n in zip(reg_concepts, balance_reg_repeats(train_samples, [c.count for c in reg_concepts])):
        concept.repeats = n
    everything = concepts + reg_concepts
    _check_output_folders(everything, out)
    return everything, masked


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
    everything, masked = _plan(root, out, opts)
    buckets = make_buckets(opts.settings)

    result = StageResult("bucket")
    tally = _Tally()
    with Journal(out).begin("bucket", [str(root), "-o", str(out)]) as op, _Outputs(out, opts.root) as outputs:
        written = Written(out)
        try:
            report.start(sum(c.count for c in everything), "bucket")
            for concept in everything:
                base = _output_folder(out, concept)
                names: set[str] | None = set() if concept.recursive else None  # subfolders share one folder
                alpha = id(concept) in masked and opts.mask_form == "alpha"
                for items in _batches(concept):
                    batch = []
                    for item in items:
                        report.advance()
                        p = _prepare(item, concept, base, opts, buckets, names, alpha)
                        if isinstance(p, str):
                            result.fail(item.path, p)
                        else:
                            batch.append(p)
                    cond = id(concept) in masked and opts.mask_form == "conditioning"
                    batch = _write_files(op, batch, cond, opts, result, tally, written)
                    outputs.add(batch)
                    tally.add(batch)
            report.finish()
            _write_dataset_toml(op, out, everything, masked, opts)
            outputs.install(op, result)
            tally.removed = written.finish(op)
        finally:
            written.close()
    result.notes[:0] = _summary(everything, masked, opts, tally)
    return result


def _write_files(
    op: Operation,
    batch: list[_Placed],
    mask_files: bool,
    opts: BucketOptions,
    result: StageResult,
    tally: _Tally,
    written: Written,
) -> list[_Placed]:
    """A batch's images, captions and masks (one journal sync per batch for links and captions).

    Returns the images placed: a PNG copy that cannot be made (pixels unreadable past the header)
    fails its image, listed, and leaves nothing of it in OUT.
    """
    linked = [p for p in batch if p.copy is None]
    changed = dict(
        zip(map(id, linked), op.place_many([(p.item.path, p.dest) for p in linked], copy=opts.copy))
    )
    kept = []
    for p in batch:
        if p.copy is not None:
            try:
                data = png_copy(p.item.path, p.mask, p.alpha)
            except SdprepError as exc:
                result.fail(p.item.path, getattr(exc, "reason", str(exc)))
                continue
            changed[id(p)] = op.write_many([(p.dest, data)]) > 0
        kept.append(p)
    writes: list[tuple[Path, bytes]] = []
    masks: list[tuple[_Placed, Path, Path]] = []
    for p in kept:
        cap = p.dest.with_suffix(".txt")
        written.add(p.dest)
        written.add(cap)
        data = format_caption(_caption(p)).encode("utf-8")
        if not cap.is_file() or cap.read_bytes() != data:
            writes.append((cap, data))
            changed[id(p)] = True
        if mask_files:
            mask_dest = p.dest.parent / MASK_DIR / (p.dest.stem + ".png")
            written.add(mask_dest)
            if p.mask is not None:
                masks.append((p, p.mask, mask_dest))
                continue
            # kohya's mask subsets need a mask for every image: white = full loss, as unmasked
            buf = io.BytesIO()
            Image.new("L", p.size, 255).save(buf, "PNG")
            if not mask_dest.is_file() or mask_dest.read_bytes() != buf.getvalue():
                writes.append((mask_dest, buf.getvalue()))
                changed[id(p)] = True
            tally.white_masks.add(p.item.path.name)
    for (p, _, _), moved in zip(masks, op.place_many([(m, d) for _, m, d in masks], copy=opts.copy)):
        changed[id(p)] |= moved
    op.write_many(writes)
    n = sum(changed[id(p)] for p in kept)
    result.changed += n
    result.skipped += len(kept) - n
    return kept


def _caption(p: _Placed) -> str:
    return p.caption if p.caption is not None else p.concept.token


def _check_mask_size(p: _Placed) -> None:
    msize = image_size(p.mask)
    if msize != p.size:
        raise DatasetError(
            f"{p.mask}: mask is {msize[0]}x{msize[1]} but its image {p.item.path.name} is {p.size[0]}x{p.size[1]}",
            "masks must have the image's pixel size: re-run `sdprep mask` or `sdprep mask --check`",
        )


def toml_path(out: Path, path: Path, root: str | None) -> str:
    """A path inside OUT as dataset.toml and metadata.json write it: relative to OUT (the TOML's
    folder), or under `root` (where OUT will be on the training machine) when given."""
    rel = path.relative_to(out).as_posix()
    if root is None:
        return rel
    return root.rstrip("/\\") + "/" + rel


def _write_dataset_toml(
    op: Operation, out: Path, concepts: list[Concept], with_masks: set[int], opts: BucketOptions
) -> None:
    s = opts.settings
    conditioning = opts.mask_form == "conditioning"

    def subset(c: Concept) -> dict:
        folder = _output_folder(out, c)
        sub: dict = {"image_dir": toml_path(out, folder, opts.root), "num_repeats": c.repeats}
        if id(c) in with_masks and conditioning:  # kohya's mask schema: no class_tokens, no is_reg
            sub["caption_extension"] = ".txt"
            sub["conditioning_data_dir"] = toml_path(out, folder / MASK_DIR, opts.root)
            return sub
        sub["class_tokens"] = c.token
        sub["caption_extension"] = ".txt"
        if c.is_reg:
            sub["is_reg"] = True
        if id(c) in with_masks:
            sub["alpha_mask"] = True
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
    used = [c for c in concepts if c.placed]
    if conditioning:  # kohya cannot mix mask (conditioning_data_dir) subsets with others in one dataset
        groups = [[c for c in used if id(c) in with_masks], [c for c in used if id(c) not in with_masks]]
    else:
        groups = [used]
    datasets = [{**dataset_common, "subsets": [subset(c) for c in g]} for g in groups if g]
    doc = {"general": general, "datasets": datasets}
    where = (
        f"paths are under {opts.root} (--root)"
        if opts.root
        else "paths are relative to this file's folder: run kohya from it (cd here), sdprep from anywhere"
    )
    header = (
        "# Written by `sdprep bucket`. kohya sd-scripts: --dataset_config dataset.toml"
        + (" --masked_loss" if conditioning and any(id(c) in with_masks for c in used) else "")
        + "; sdprep: dataset_config = ...\n"
        + f"# {where}\n"
    )
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

    metadata.json is kohya's: {"<image path>": {caption, tags, image_size, train_resolution}}.
    Keys are paths relative to OUT with the extension (`image_dir = OUT` makes them kohya's "relative
    to image_dir" form; it rejects stem-only keys), or absolute under --root; `caption` holds the
    caption as written and `tags` is empty, because kohya appends `tags` to `caption`.
    buckets.json is the preview: {"images": [one row per placed image], "dropped": [...]}.
    """

    NAMES = ("metadata.json", "buckets.json")

    def __init__(self, out: Path, root: str | None = None):
        self.out, self.root = out, root
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
            key = toml_path(self.out, p.dest, self.root)
            self.meta.add(dumps_json(key) + ": " + _nested(entry, 1, False))
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


def bucket_table(counts: Counter) -> list[str]:
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


def _mask_lines(concepts: list[Concept], masked: set[int], opts: BucketOptions, tally: _Tally) -> list[str]:
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


def _summary(concepts: list[Concept], masked: set[int], opts: BucketOptions, tally: _Tally) -> list[str]:
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
