"""Normalise image files for training: format, first frame, EXIF orientation baked in, alpha.

An image is re-encoded only when something needs it (another format was asked for, an animation, a
rotation stored in EXIF, a mode trainers handle badly, transparency to flatten), so a second run does
nothing. The original stays in the journal until `sdprep gc`; when the extension changes, the sidecar
follows the new name (caption and mask are keyed by the stem, which does not change).

An image kept as it is is still decoded to the end (a truncated or corrupt file is listed as failed
and left alone); what passed is remembered in `DIR/.sdprep/convert-verified.json` by path, size,
mtime and inode, so a rerun decodes only files that changed.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sdprep import state
from sdprep.config import bounded, check_bounds
from sdprep.dataset import Item, dumps_json, loads_json
from sdprep.errors import ConfigError, ImageError, unknown_choice
from sdprep.executors import Executor
from sdprep.fileops import Journal, Operation, atomic_write_text
from sdprep.images import load_image, open_image, unwritable_size
from sdprep.prep.rename import companion_pairs
from sdprep.progress import NullReporter, Reporter
from sdprep.stage import MAX_WORKERS, StageResult, dataset_items, each_item, worker_count

# format name -> (Pillow format, extension)
FORMATS = {"png": ("PNG", ".png"), "jpg": ("JPEG", ".jpg"), "webp": ("WEBP", ".webp")}
KEPT_FORMATS = {"PNG", "JPEG", "WEBP"}  # without --format these stay as they are; others become PNG
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
GREY_MODES = {"L", "LA", "1", "I", "I;16", "I;16B", "I;16L", "F"}
PLAIN_MODES = {"RGB", "RGBA", "L", "LA", "P"}
VERIFIED_FILE = "convert-verified.json"  # in DIR/.sdprep: files that decoded to the end
VERIFY_VERSION = 1  # bump when the check gets stricter: every file is checked again


@dataclass(frozen=True)
class ConvertOptions:
    """format: png | jpg | webp, or None to keep PNG/JPEG/WebP and turn other formats into PNG.
    flatten: a colour to composite transparency onto; by default alpha is kept where the format
    can hold it (JPEG flattens onto white)."""

    format: str | None = None
    quality: int = bounded(95, 1, 100)
    flatten: tuple[int, int, int] | None = None
    keep_alpha: bool = False
    recursive: bool = False
    workers: int = bounded(1, 0, MAX_WORKERS)  # see sdprep.stage.WORKERS_HELP

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.format is not None and self.format not in FORMATS:
            raise unknown_choice("format", self.format, FORMATS)
        if self.keep_alpha and self.flatten is not None:
            raise ConfigError("--keep-alpha and --flatten contradict each other", "choose one")
        if self.keep_alpha and self.format == "jpg":
            raise ConfigError(
                "JPEG cannot keep an alpha channel", "use --format png or webp, or --flatten COLOR"
            )


@dataclass(frozen=True)
class Plan:
    """What converting one image means: where it goes, in which format, and why."""

    src: Path
    dst: Path
    pil_format: str
    reasons: tuple[str, ...]
    alpha: bool  # keep an alpha channel
    grey: bool
    icc: bytes | None
    root: str | None = None  # the dataset folder, for the symlink rule of the loader


def plan_image(path: Path, opts: ConvertOptions, root: str | None = None) -> Plan | None:
    """Inspect the header and decide; None when the file is already as asked."""
    try:
        with open_image(path, root=root) as im:  # links out of the dataset, bombs, unreadable files refused
            fmt, mode, frames, size = im.format, im.mode, getattr(im, "n_frames", 1), im.size
            orientation = _orientation(im)
            transparent = mode in ALPHA_MODES or (mode == "P" and "transparency" in im.info)
            icc = im.info.get("icc_profile")
    except OSError as exc:
        raise ImageError(path, f"cannot read ({exc})", "delete or replace the file") from exc
    target = FORMATS[opts.format][0] if opts.format else (fmt if fmt in KEPT_FORMATS else "PNG")
    keep_alpha = transparent and opts.flatten is None and target != "JPEG"
    reasons = []
    if fmt != target:
        reasons.append("format")
    if frames > 1:
        reasons.append("animated")
    if orientation not in (1, None):
        reasons.append("orientation")
    if mode not in PLAIN_MODES:
        reasons.append("mode")
    if transparent and not keep_alpha:
        reasons.append("alpha")
    if not reasons:
        return None
    _check_side(path, size, target)
    ext = {v[0]: v[1] for v in FORMATS.values()}[target]
    dst = path if fmt == target else path.with_suffix(ext)
    grey = mode in GREY_MODES and target != "WEBP"
    return Plan(path, dst, target, tuple(reasons), keep_alpha, grey, icc, root)


def _check_side(path: Path, size: tuple[int, int], target: str) -> None:
    """Refuse, before decoding or writing, an image too large for the format it would become."""
    problem = unwritable_size(size, target)
    if problem:
        raise ImageError(
            path,
            f"{size[0]}x{size[1]} {problem}",
            "convert it to PNG (--format png), or crop or resize it first",
        )


def _orientation(im: Image.Image) -> int | None:
    try:
        return im.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - a broken EXIF block: nothing to bake in
        return None


def encode(plan: Plan, opts: ConvertOptions) -> bytes:
    """Decode through the one safe loader (first frame, EXIF applied) and encode as planned."""
    background = opts.flatten or (255, 255, 255)
    if plan.alpha:
        im = load_image(plan.src, "RGBA", root=plan.root)
        if plan.grey and plan.pil_format == "PNG":
            im = im.convert("LA")
    else:
        im = load_image(plan.src, "L" if plan.grey else "RGB", background=background, root=plan.root)
    try:
        return save_bytes(im, plan.pil_format, opts.quality, plan.icc)
    except ValueError as exc:  # an encoder's own limit: this file's failure, not the run's
        raise ImageError(plan.src, f"cannot encode as {plan.pil_format}: {exc}", "try --format png") from exc


def save_bytes(im: Image.Image, pil_format: str, quality: int = 95, icc: bytes | None = None) -> bytes:
    """Encode for training data: JPEG 4:4:4 at quality >= 90, WebP lossless at 100, PNG level 6."""
    buf = io.BytesIO()
    extra = {"icc_profile": icc} if icc else {}
    if pil_format == "JPEG":
        im.save(buf, "JPEG", quality=quality, subsampling=0 if quality >= 90 else 2, **extra)
    elif pil_format == "WEBP":
        im.save(buf, "WEBP", quality=quality, lossless=quality == 100, method=4, **extra)
    elif pil_format == "PNG":
        im.save(buf, "PNG", compress_level=6, **extra)
    else:
        im.save(buf, pil_format, **extra)
    return buf.getvalue()


def _check_free(plan: Plan, data: bytes) -> None:
    """A new name must not be taken (`a.gif` -> `a.png` beside an existing `a.png`).

    The image's new name holding exactly `data` is no clash: a run killed after writing it and
    before removing the original left it, and this run finishes that step.
    """
    if plan.dst == plan.src:
        return
    for _, new in companion_pairs(plan.src, plan.dst):
        if new == plan.dst and _holds(new, data):
            continue
        if new.exists():
            raise ImageError(
                plan.src,
                f"cannot convert to {plan.dst.suffix[1:]}: {new.name} already exists",
                "rename one of them first (sdprep rename), then convert again",
            )


def _holds(path: Path, data: bytes) -> bool:
    try:
        return not path.is_symlink() and path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def file_key(path: Path) -> list[int]:
    """What identifies one version of a file for the verified cache: size, mtime (ns) and inode."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ImageError(path, f"cannot read ({exc})") from exc
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def verify_image(path: Path, root: str | None = None) -> None:
    """Check an image to its end: decode every pixel through the safe loader, read a PNG to IEND.

    Image.verify() alone misses a truncated JPEG; a full decode misses a PNG cut after its last
    pixel row (the tail of the zlib stream, IEND), which verify() catches.
    """
    load_image(path, "keep", root=root).close()  # links, bombs and unreadable files refused as everywhere
    with open_image(path, root=root) as im:
        if im.format != "PNG":
            return
        try:
            im.verify()
        except Exception as exc:  # noqa: BLE001 - Pillow raises SyntaxError, OSError, struct.error...
            raise ImageError(
                path, f"truncated or corrupt PNG ({exc})", "re-download or delete the file"
            ) from exc


def _work(item: Item, opts: ConvertOptions, verified: list[int] | None) -> tuple[Plan, bytes] | list[int]:
    """The new bytes to write, or (image kept as it is) the file key it was verified under."""
    plan = plan_image(item.path, opts, item.root)
    if plan is None:
        key = file_key(item.path)  # before decoding: a change meanwhile means another check next time
        if key != verified:
            verify_image(item.path, item.root)
        return key
    data = encode(plan, opts)
    _check_free(plan, data)
    return plan, data


def load_verified(root: Path) -> dict[str, list[int]]:
    """Relative path -> file key of the images an earlier run decoded to the end ({} if unknown)."""
    try:
        data = loads_json(state.read_text(state.file(root, VERIFIED_FILE)))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != VERIFY_VERSION:
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def save_verified(root: Path, files: dict[str, list[int]]) -> None:
    """Write the cache; it is an optimisation, so a folder that cannot hold it is not an error."""
    try:
        text = dumps_json({"version": VERIFY_VERSION, "files": files})
        atomic_write_text(state.file(root, VERIFIED_FILE, create_parent=True), text + "\n")
    except OSError:
        pass


def apply_plan(op: Operation, plan: Plan, data: bytes) -> None:
    """Write the new file; when the name changes, move the sidecar and keep the original in the journal."""
    _check_free(plan, data)  # again: another image of this run may have taken the name meanwhile
    op.write_bytes(plan.dst, data)
    if plan.dst != plan.src:
        for old, new in companion_pairs(plan.src, plan.dst)[1:]:
            op.move(old, new)
        op.delete(plan.src)


def run_convert(
    root: Path | str,
    opts: ConvertOptions,
    *,
    report: Reporter = NullReporter(),
    executor: Executor | None = None,
) -> StageResult:
    """Re-encode the images of `root` that need it and decode the others to the end (decoding and
    encoding run through `executor`: threads by default, or a Ray cluster; files are written here).

    Originals stay in the journal until `sdprep gc`; a truncated or corrupt image is listed as failed.
    """
    root, items = dataset_items(root, opts.recursive)
    result = StageResult("convert")
    reasons: Counter[str] = Counter()

    def rel(path: Path) -> str:
        return path.relative_to(root).as_posix()

    known = load_verified(root)
    names = {rel(i.path) for i in items}
    verified = {k: v for k, v in known.items() if k not in names}  # files this run does not look at

    def work(item: Item) -> tuple[Plan, bytes] | list[int]:
        return _work(item, opts, known.get(rel(item.path)))

    with Journal(root).begin("convert") as op:
        try:
            for item, out in each_item(
                work, items, result, report, "convert", workers=worker_count(opts.workers), executor=executor
            ):
                if isinstance(out, list):
                    verified[rel(item.path)] = out
                    result.skipped += 1
                else:
                    plan, data = out
                    try:
                        apply_plan(op, plan, data)
                    except ImageError as exc:
                        result.fail_error(item.path, exc)
                        continue
                    with contextlib.suppress(ImageError):  # our own encoder's complete output
                        verified[rel(plan.dst)] = file_key(plan.dst)
                    reasons.update(plan.reasons)
                    result.changed += 1
        finally:  # an interrupted run keeps what it checked
            if verified != known:
                save_verified(root, verified)
    if reasons:
        result.notes.append("  re-encoded for: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
        result.notes.append("  originals are kept in the journal: `sdprep undo` restores, `sdprep gc` frees")
    return result
