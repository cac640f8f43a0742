"""The mask stage: one greyscale mask PNG per image for masked-loss training.

Masks follow kohya's `conditioning_data_dir` layout: `<image folder>/masks/<stem>.png`, the same
pixel size as the image as displayed (EXIF rotation applied), white = full loss, black = none,
grey = partial. Each mask is written through the journal (`sdprep undo` removes it), and the image's
sidecar records how it was made under `sdprep.mask`:
`{"path": "masks/a.png", "method": "face", "options": {...}, "coverage": 0.23, "image_sha1": ...}`
(masks written to another folder, `--out masks_face`, are recorded under the key "masks_face").
A rerun with the same method and options on an unchanged image skips it; `force` redoes it.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
from PIL import Image

from sdprep.config import bounded, check_bounds
from sdprep.dataset import (
    MASK_DIR,
    MASK_DIR_PREFIX,
    Item,
    dump_sidecar,
    folder_in_the_way,
    read_sidecar,
    sdprep_meta,
    unsafe_reason,
)
from sdprep.errors import ConfigError, ImageError, ModelError, SdprepError, unknown_choice
from sdprep.executors import Executor
from sdprep.fileops import Journal
from sdprep.images import image_size, load_image
from sdprep.prep.masks.base import MaskMethod, MaskNotFound, MethodSettings, create_method, read_mask_image
from sdprep.prep.masks.postprocess import COMBINE_MODES, PostOptions, coverage, postprocess, to_uint8
from sdprep.progress import NullReporter, Reporter
from sdprep.stage import MAX_WORKERS, StageResult, dataset_items, each_item, worker_count

FALLBACKS = ("full",)
META_KEY = "mask"


def meta_key(out: str) -> str:
    """The sidecar key of a mask folder's record: "mask" for masks/, the folder name for masks_<name>/."""
    return META_KEY if out == MASK_DIR else out


@dataclass(frozen=True)
class MaskOptions:
    """What `sdprep mask` does: the method, its settings, the shared post-processing, where to write."""

    method: str
    settings: MethodSettings = field(default_factory=MethodSettings)
    post: PostOptions = field(default_factory=PostOptions)
    out: str = MASK_DIR  # folder beside the images; "masks" or "masks_<name>"
    fallback: str | None = None  # "full": an all-white mask where the method finds nothing
    force: bool = False
    recursive: bool = False
    workers: int = bounded(1, 0, MAX_WORKERS)  # a method that is not thread-safe runs on one

    def __post_init__(self) -> None:
        validate(self)


def check_out_dir(out: str) -> str:
    """The mask folder name: `masks` or `masks_<name>`, a plain folder name that other stages skip."""
    ok = out == MASK_DIR or (out.startswith(MASK_DIR_PREFIX) and len(out) > len(MASK_DIR_PREFIX))
    if not ok or "/" in out or "\\" in out or out in (".", ".."):
        raise ConfigError(
            f'--out "{out}": a mask folder is named "masks" or "masks_<name>" (e.g. masks_face)',
            "other stages skip folders with those names, so masks are never taken for training images",
        )
    return out


def validate(opts: MaskOptions) -> None:
    """Reject impossible options before touching any file."""
    check_out_dir(opts.out)
    post = opts.post
    if opts.fallback is not None and opts.fallback not in FALLBACKS:
        raise unknown_choice("fallback", opts.fallback, FALLBACKS)
    if post.combine is not None and post.combine not in COMBINE_MODES:
        raise unknown_choice("combine mode", post.combine, COMBINE_MODES)
    check_bounds(post)
    check_bounds(opts)


def file_sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def encode_png(mask: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG of a float mask."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(mask), "L").save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Job:
    """One image to mask: its sidecar (read while planning) and the record that will describe it."""

    item: Item
    sidecar: dict[str, Any]
    record: dict[str, Any]
    mask_path: Path
    existing: bool  # a mask file is already there (combine reads it)
    relink: bool = False  # the mask is up to date; only the record's path changes (a renamed image)
    foreign: bool = False  # a mask is there without our record: replaced only if it is what we make


def foreign_mask(job: Job, out: str) -> str:
    return (
        f"{out}/{job.mask_path.name} exists and was not made by sdprep mask; pass --force to "
        "replace it, --combine union|intersection to merge with it, or import it with --method import"
    )


def _holds(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


@dataclass
class Made:
    png: bytes
    coverage: float
    fallback: bool
    notes: list[str] = field(default_factory=list)  # the method's remarks, from a remote worker


class _RemoteMask:
    """`make_mask` in a remote worker (`--executor ray`): the method loads there, once, and its
    remarks about each image travel back with the mask."""

    def __init__(self, method: MaskMethod, opts: MaskOptions):
        self.method, self.opts = method, opts

    def __call__(self, job: Job) -> Made:
        self.method.ready()
        made = make_mask(job, self.method, self.opts)
        made.notes, self.method.notes = self.method.notes, []  # one job at a time in a worker
        return made


def wanted_record(item: Item, method: MaskMethod, opts: MaskOptions) -> dict[str, Any]:
    """The sidecar record a fresh mask of `item` gets (without its coverage)."""
    options = {**method.options(), **opts.post.record()}
    if opts.fallback:
        options["fallback"] = opts.fallback
    record: dict[str, Any] = {
        "path": f"{opts.out}/{item.path.stem}.png",
        "method": method.name,
        "options": options,
        "image_sha1": file_sha1(item.path),
    }
    inputs = method.inputs(item)
    if inputs:
        record["inputs"] = inputs
    return record


def _folder(record: dict[str, Any]) -> str:
    return str(record.get("path", "")).rpartition("/")[0]


def _same(old: object, new: dict[str, Any]) -> TypeGuard[dict[str, Any]]:
    """Same method, options and inputs; the path may differ in its file name (the image was renamed)."""
    if not isinstance(old, dict) or _folder(old) != _folder(new):
        return False
    keys = ("method", "options", "image_sha1", "inputs")
    return all(old.get(k) == new.get(k) for k in keys)


def plan(items: list[Item], method: MaskMethod, opts: MaskOptions, result: StageResult) -> list[Job]:
    """Decide per image: skip (done with these options), fail (a conflict), or a Job.

    The record lives in the image's own sidecar, which moves with the image, so a record for the same
    mask folder means the mask there is ours even when a rename changed its file name; such a record
    only gets its path updated (a Job with `relink`).
    """
    jobs = []
    for item in items:
        mask_path = item.mask_path(opts.out)
        try:
            sidecar = read_sidecar(item)
            record = wanted_record(item, method, opts)
        except (SdprepError, OSError) as exc:
            result.fail_error(item.path, exc)
            continue
        # a folder, FIFO or link out where the mask goes, or a file named like the mask folder
        problem = folder_in_the_way(mask_path.parent) or unsafe_reason(mask_path, item.root)
        if problem:
            where = opts.out if folder_in_the_way(mask_path.parent) else f"{opts.out}/{mask_path.name}"
            result.fail(item.path, f"{where}: {problem}; move it away, then run mask again")
            continue
        old = sdprep_meta(sidecar).get(meta_key(opts.out))
        exists = mask_path.is_file()
        if exists and not opts.force and _same(old, record) and _mask_fits(mask_path, item):
            if old["path"] == record["path"]:
                result.skipped += 1
            else:
                jobs.append(Job(item, sidecar, {**old, "path": record["path"]}, mask_path, True, relink=True))
            continue
        ours = isinstance(old, dict) and _folder(old) == _folder(record)
        # a mask without our record: the user's, or one a killed run wrote before its record (then
        # it is exactly what this run makes, and only the record is missing): told apart once made
        foreign = exists and not (ours or opts.force or opts.post.combine)
        jobs.append(Job(item, sidecar, record, mask_path, exists, foreign=foreign))
    return jobs


def _mask_fits(mask_path: Path, item: Item) -> bool:
    try:
        return image_size(mask_path, root=item.root) == image_size(item.path, root=item.root)
    except ImageError:
        return False


def make_mask(job: Job, method: MaskMethod, opts: MaskOptions) -> Made:
    """Compute one mask (runs in worker threads: no writes here)."""
    image = load_image(job.item.path, mode=method.image_mode, root=job.item.root)
    w, h = image.size
    try:
        raw = method.make(image, job.item)
    except MaskNotFound:
        if opts.fallback != "full":
            raise
        full = np.ones((h, w), dtype=np.float32)
        return Made(encode_png(full), 1.0, True)
    if raw.shape != (h, w):
        raise ImageError(
            job.item.path, f"{method.name} made a {raw.shape[1]}x{raw.shape[0]} mask for a {w}x{h} image"
        )
    existing = None
    if opts.post.combine and job.existing:
        existing = read_mask_image(job.mask_path, root=job.item.root)
        if existing.shape != (h, w):
            raise ImageError(
                job.item.path,
                f"cannot combine: {job.mask_path.name} is {existing.shape[1]}x{existing.shape[0]}, the image {w}x{h}",
                "remove the old mask or run without --combine",
            )
    mask = postprocess(raw, opts.post, existing)
    if float(mask.max(initial=0.0)) < 0.5 / 255:
        if opts.fallback == "full":
            return Made(encode_png(np.ones((h, w), dtype=np.float32)), 1.0, True)
        raise MaskNotFound(
            job.item.path,
            f"the {method.name} mask is empty (all black): this image would teach nothing",
            "loosen the options (--tolerance, --threshold, --prompt...), or use --fallback full",
        )
    return Made(encode_png(mask), coverage(to_uint8(mask).astype(np.float32) / 255.0), False)


def run_mask(
    root: Path | str,
    opts: MaskOptions,
    *,
    report: Reporter = NullReporter(),
    executor: Executor | None = None,
) -> StageResult:
    """Write a mask for every image of the dataset at `root` (see the module docstring).

    Masks are made through `executor` (threads, or a Ray cluster where each worker loads the
    method's model once); masks and sidecars are written here.
    """
    method = create_method(opts.method, opts.settings)
    result = StageResult("mask")
    root, items = dataset_items(root, opts.recursive, result.fail)
    jobs = plan(items, method, opts, result)
    relinks = [j for j in jobs if j.relink]
    jobs = [j for j in jobs if not j.relink]
    if not jobs and not relinks:
        return _finish(result, root, {}, [], method)
    local = executor is None or executor.local
    if jobs and local:
        method.ready()  # a remote worker loads its own copy
    key = meta_key(opts.out)
    coverages: dict[Path, float] = {}
    fallbacks: list[str] = []
    whole: list[str] = []  # opaque images under --method alpha: no mask, trained on the whole image
    missing: list[MaskNotFound] = []
    with Journal(root).begin("mask") as op:
        for job in relinks:
            sdprep_meta(job.sidecar)[key] = job.record
            op.write_text(job.item.sidecar_path, dump_sidecar(job.sidecar))
        if relinks:
            result.skipped += len(relinks)
            result.notes.append(f"updated the mask path of {len(relinks)} renamed images")

        def nothing_found(job: Job, exc: SdprepError) -> bool:
            """An opaque image under --method alpha is skipped (trained whole); other misses fail."""
            if isinstance(exc, MaskNotFound) and exc.whole_image and not job.existing:
                result.skipped += 1
                whole.append(job.item.name)
                return True
            if isinstance(exc, MaskNotFound):
                missing.append(exc)
            return False

        made_masks = each_item(
            (lambda j: make_mask(j, method, opts)) if local else _RemoteMask(method, opts),
            jobs,
            result,
            report,
            f"mask ({method.name})",
            workers=worker_count(opts.workers) if method.thread_safe else 1,
            path_of=lambda j: j.item.path,
            on_error=nothing_found,
            stop=(ModelError,),  # a model that cannot load (in a remote worker): no one image's fault
            executor=executor,
            gpu=method.gpu,
        )
        for job, made in made_masks:
            method.notes += made.notes
            if job.foreign and not _holds(job.mask_path, made.png):
                result.fail(job.item.path, foreign_mask(job, opts.out))
                continue
            op.mkdir(job.mask_path.parent)
            op.write_bytes(job.mask_path, made.png)
            record = {**job.record, "coverage": round(made.coverage, 4)}
            if made.fallback:
                record["fallback_used"] = opts.fallback
                fallbacks.append(job.item.name)
            sdprep_meta(job.sidecar)[key] = record
            op.write_text(job.item.sidecar_path, dump_sidecar(job.sidecar))
            coverages[job.item.path] = made.coverage
            result.changed += 1
    _nothing_found_notes(result, whole, missing, len(items))
    return _finish(result, root, coverages, fallbacks, method)


def _nothing_found_notes(
    result: StageResult, whole: list[str], missing: list[MaskNotFound], total: int
) -> None:
    """Say what happens to images without transparency, and what to do where the method found nothing."""
    if whole:
        shown = ", ".join(sorted(whole)[:20]) + (
            f", ... and {len(whole) - 20} more" if len(whole) > 20 else ""
        )
        result.notes.append(
            f"no transparency in {len(whole)} of {total} images: no mask written, they are trained on the "
            f"whole image: {shown}"
        )
    if missing:
        first = missing[0]
        result.notes.append(
            f"nothing to mask in {len(missing)} of {total} images ({first.reason}): add --fallback full "
            "to train them on the whole image" + (f" ({first.hint})" if first.hint else "")
        )


def _finish(
    result: StageResult, root: Path, coverages: dict[Path, float], fallbacks: list[str], method: MaskMethod
) -> StageResult:
    if coverages:
        values = list(coverages.values())
        low = min(coverages, key=coverages.__getitem__)
        result.notes.append(
            f"coverage: mean {np.mean(values):.2f} over {len(values)} new masks "
            f"(lowest {low.relative_to(root).as_posix()} {coverages[low]:.2f})"
        )
    if fallbacks:
        result.notes.append(f"fallback (full mask) for {len(fallbacks)}: {', '.join(sorted(fallbacks))}")
    result.notes.extend(sorted(method.notes))
    result.details["coverage"] = {str(p): c for p, c in coverages.items()}
    return result
