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

import dataclasses
import io
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w
from PIL import Image

from sdprep.buckets import Assignment, BucketSettings, assign_bucket, make_buckets
from sdprep.config import bounded, check_bounds
from sdprep.dataset import (
    MASK_DIR,
    Item,
    check_folder,
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
from sdprep.prep.bucket_json import BucketJson
from sdprep.prep.bucket_summary import Tally, summary
from sdprep.prep.lineage import recorded_trigger
from sdprep.prep.preview import Bucketed, Previews, record_bucketing, write_previews
from sdprep.prep.repeats import balance_reg_repeats, compute_repeats
from sdprep.progress import NullReporter, Reporter
from sdprep.stage import StageResult, chunked, failure_reason, progress

WRITE_BATCH = 256  # images whose files are journalled with one sync


@dataclass(frozen=True)
class BucketOptions:
    out: Path
    token: str = ""
    repeats: int | None = bounded(None, 1)  # fixed repeats for every concept
    target_steps: int | None = bounded(None, 1)  # steps per epoch wanted (at batch_size); repeats derived
    batch_size: int | None = bounded(
        None, 1
    )  # written to the TOML only when set (overrides train_batch_size)
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
        check_bounds(self)
        if self.mask_form not in MASK_FORMS:
            raise ConfigError(f"unknown mask form {self.mask_form!r}", "valid: " + ", ".join(MASK_FORMS))
        step, (w, h) = self.settings.step, self.settings.resolution
        if step < SDXL_MIN_STEP or step % SDXL_MIN_STEP:
            raise ConfigError(f"--step {step} is not a multiple of 32", "SDXL needs bucket steps of 32 or 64")
        if min(w, h) < MIN_RESOLUTION:
            raise ConfigError(
                f"--resolution {w},{h}: each side must be at least {MIN_RESOLUTION}", "e.g. --resolution 1024"
            )
        for name, n in self.tiers.items():
            if n < 1:
                raise ConfigError(
                    f'--tier "{name}={n}": repeats must be at least 1', "e.g. --tier 'high quality=40'"
                )


MASK_FORMS = ("alpha", "conditioning")
SDXL_MIN_STEP = 32  # bucket sides are multiples of this (SDXL's latent and U-Net strides)
MIN_RESOLUTION = 64


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
    dataset: Path | None = None  # the folder it is part of (symlink rule); None: `source` itself

    @property
    def folder(self) -> str:
        return format_repeat_folder(self.repeats, self.token)

    def items(self) -> Iterator[Item]:
        return iter_items(self.source, self.recursive, dataset=self.dataset)


# -- discovery -----------------------------------------------------------------------------------


def find_concepts(root: Path, opts: BucketOptions) -> list[Concept]:
    """One concept per folder with images: the root itself and/or its subfolders.

    - a subfolder already named `<N>_<tokens>` keeps its class tokens, and its repeats unless
      --repeats / --target-steps say otherwise;
    - a subfolder named in `tiers` gets the tier's repeats and the class tokens "<token> <tier>";
    - any other folder gets `--token` (plus its folder name when there are several such folders),
      or its folder name when no token is given.
    """
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
        concepts.append(Concept(name, token, folder, count, fixed_repeats=fixed, dataset=root))
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
        check_folder(reg_dir)
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
    buckets: list[tuple[int, int]],
    names: set[str] | None = None,
    alpha_mask: bool = False,
) -> _Placed | str:
    """Read an image's header, caption and mask and assign its bucket; a str is why it is left out.

    `names` (for concepts that gather subfolders into one folder) holds the names placed so far;
    `alpha_mask`: the concept's masks travel in the alpha channel of PNG copies.
    """
    try:
        header: ImageHeader = image_header(item.path, root=item.root)
        caption, multiline = _one_line(read_caption(item))
    except SdprepError as exc:
        return failure_reason(item.path, exc)  # names the caption when that is the file at fault
    own = item.mask_path()
    mask = own if own.exists() else None
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


def _has_own_mask(concept: Concept, opts: BucketOptions, buckets: list[tuple[int, int]]) -> bool:
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


def _batches(concept: Concept, result: StageResult) -> Iterator[list[Item]]:
    """The concept's images in batches; those sharing a stem (kohya would read one caption for
    both) are the result's failures."""
    yield from chunked(
        iter_items(concept.source, concept.recursive, result.fail, concept.dataset), WRITE_BATCH
    )


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


def _recorded_token(root: Path, opts: BucketOptions) -> str | None:
    """--token's default: the trigger `sdprep clean` recorded in the images' sidecars."""
    if opts.token:
        return None
    return recorded_trigger(iter_items(require_images(root, opts.recursive), opts.recursive))


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
    recorded = _recorded_token(root, opts)
    if recorded:
        opts = dataclasses.replace(opts, token=recorded)
    everything, masked = _plan(root, out, opts)
    buckets = make_buckets(opts.settings)

    result = StageResult("bucket")
    tally = Tally()
    previews = Previews()
    total = sum(c.count for c in everything)
    with (
        Journal(out).begin("bucket", [str(root), "-o", str(out)]) as op,
        BucketJson(out) as outputs,
        progress(report, total, "bucket"),
    ):
        written = Written(out)
        try:
            for concept in everything:
                base = _output_folder(out, concept)
                names: set[str] | None = set() if concept.recursive else None  # subfolders share one folder
                alpha = id(concept) in masked and opts.mask_form == "alpha"
                for items in _batches(concept, result):
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
                    for p in batch:
                        outputs.add(*_records(p, out, opts.root))
                        previews.add(p.item.path, p.assignment, p.item.root)
                    tally.add(batch)
            _write_dataset_toml(op, out, everything, masked, opts)
            outputs.install(op, [{"image": str(f.path), "reason": f.reason} for f in result.failed])
            sheets = write_previews(op, out, previews)
            tally.removed = written.finish(op)
        finally:
            written.close()
    record_bucketing(root, Bucketed(out, opts.settings, tuple(sheets)))
    result.notes[:0] = summary(everything, masked, opts, tally) + previews.crop_lines()
    if recorded:
        result.notes.insert(
            0, f"token: {recorded} (the trigger `sdprep clean` recorded; --token sets another)"
        )
    return result


def _write_files(
    op: Operation,
    batch: list[_Placed],
    mask_files: bool,
    opts: BucketOptions,
    result: StageResult,
    tally: Tally,
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
                data = png_copy(p.item.path, p.mask, p.alpha, p.item.root)
            except SdprepError as exc:
                result.fail_error(p.item.path, exc)
                continue
            changed[id(p)] = op.write_many([(p.dest, data)]) > 0
        kept.append(p)
    writes: list[tuple[Path | str, bytes]] = []  # as Operation.write_many takes them
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
    if p.mask is None:
        return
    msize = image_size(p.mask, root=p.item.root)
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

    def subset(c: Concept) -> dict[str, str | int | bool]:
        folder = _output_folder(out, c)
        sub: dict[str, str | int | bool] = {
            "image_dir": toml_path(out, folder, opts.root),
            "num_repeats": c.repeats,
        }
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


def _records(p: _Placed, out: Path, root: str | None) -> tuple[str, dict[str, object], dict[str, object]]:
    """An image's metadata.json key and entry, and its buckets.json row (see sdprep.prep.bucket_json).

    metadata.json keys are paths relative to OUT with the extension (`image_dir = OUT` makes them
    kohya's "relative to image_dir" form; it rejects stem-only keys), or absolute under --root;
    `caption` holds the caption as written and `tags` is empty, because kohya appends `tags` to it.
    """
    a = p.assignment
    entry: dict[str, object] = {
        "caption": _caption(p),
        "tags": "",
        "image_size": list(p.size),
        "train_resolution": list(a.bucket),
    }
    row: dict[str, object] = {
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
    return toml_path(out, p.dest, root), entry, row
