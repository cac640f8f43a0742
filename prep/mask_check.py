"""`sdprep mask --check`: are the masks usable for training? And a preview sheet to look at them.

Checks that every image has a mask of its exact displayed size that is not all black, prints
coverage statistics (the mean learned fraction and the lowest ones), and draws a contact sheet:
each image with its ignored (black) areas darkened and tinted red, problems first, then the
lowest coverage, so a person sees at a glance what training will learn from.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sdprep import state
from sdprep.dataset import MASK_DIR, Item, discover
from sdprep.errors import SdprepError
from sdprep.fileops import atomic_write_bytes
from sdprep.images import image_size, load_image
from sdprep.prep.masks.base import read_mask_image
from sdprep.progress import NullReporter, Reporter
from sdprep.stage import Failure, progress

PREVIEW_NAME = "mask_preview.png"
CELL = 200  # thumbnail box of the preview sheet, px
LABEL = 30  # label strip under each thumbnail, px
HEADER = 22  # legend strip at the top of the sheet, px
LEGEND = (
    "masks overlaid: dark red = ignored (no loss), unchanged = learned; problems first, then lowest coverage"
)
PREVIEW_MAX = 48


def default_preview(root: Path | str) -> Path:
    return state.file(root, PREVIEW_NAME)  # checked: no symlink on the way


@dataclass
class MaskEntry:
    item: Item
    mask_path: Path
    coverage: float | None = None  # None when the mask is missing or unusable
    problem: str | None = None


@dataclass
class CheckReport:
    root: Path
    entries: list[MaskEntry] = field(default_factory=list)
    preview: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[Failure]:
        return [Failure(e.item.path, e.problem) for e in self.entries if e.problem]

    def lowest(self, n: int = 5) -> list[MaskEntry]:
        scored = [e for e in self.entries if e.coverage is not None]
        return sorted(scored, key=lambda e: (e.coverage, e.item.path))[:n]

    def summary(self) -> str:
        problems = self.problems
        with_mask = sum(1 for e in self.entries if e.coverage is not None)
        lines = [
            f"mask check: {len(self.entries)} images, {with_mask} usable masks, {len(problems)} problems"
        ]
        if with_mask:
            mean = float(np.mean([e.coverage for e in self.entries if e.coverage is not None]))
            lines.append(f"coverage: mean {mean:.3f} (fraction of each image that is learned)")
            low = ", ".join(f"{self._rel(e.item.path)} {e.coverage:.3f}" for e in self.lowest())
            lines.append(f"lowest: {low}")
        lines += [f"  problem: {self._rel(f.path)}: {f.reason}" for f in problems]
        if self.preview is not None:
            lines.append(f"preview: {self.preview}")
        lines += self.notes
        return "\n".join(lines)

    def _rel(self, path: Path | str) -> str:
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return str(path)


def check_entry(item: Item, out: str) -> MaskEntry:
    """Check one image's mask: present, readable, same size as the image, not all black."""
    entry = MaskEntry(item, item.mask_path(out))
    if not entry.mask_path.is_file():
        entry.problem = f"no mask (expected {out}/{entry.mask_path.name})"
        return entry
    try:
        size = image_size(item.path, root=item.root)
        mask = read_mask_image(entry.mask_path, root=item.root)
    except SdprepError as exc:
        entry.problem = exc.reason
        return entry
    msize = (mask.shape[1], mask.shape[0])
    if msize != size:
        entry.problem = (
            f"mask {out}/{entry.mask_path.name} is {msize[0]}x{msize[1]} but the image is {size[0]}x{size[1]}"
        )
    elif not mask.any():
        entry.problem = (
            f"mask {out}/{entry.mask_path.name} is empty (all black): the image would teach nothing"
        )
    else:
        entry.coverage = float(mask.mean(dtype=np.float64) / 255.0)
    return entry


def check_masks(
    root: Path | str,
    out: str = MASK_DIR,
    *,
    recursive: bool = False,
    preview: Path | None | bool = True,
    report: Reporter = NullReporter(),
) -> CheckReport:
    """Check every image's mask under `root`; `preview` True = default path, a Path, or False/None = none."""
    root = Path(root)
    items = discover(root, recursive)
    result = CheckReport(root)
    with progress(report, len(items), "mask check"):
        for item in items:
            result.entries.append(check_entry(item, out))
            report.advance()
    orphans = orphan_masks(root, items, out)
    if orphans:
        shown = ", ".join(result._rel(p) for p in orphans[:5]) + (", ..." if len(orphans) > 5 else "")
        result.notes.append(
            f"{len(orphans)} masks have no image (harmless; delete them if unwanted): {shown}"
        )
    if preview and result.entries:
        path = default_preview(root) if preview is True else Path(preview)
        try:
            write_preview(result, path)
            result.preview = path
        except OSError as exc:
            if preview is not True:  # a file the user asked for: its failure is an error
                raise
            # checking only reads: a dataset on a read-only disk or folder is checked all the same
            result.notes.append(
                f"preview not written ({path.parent}: {exc.strerror}); pass --preview FILE to draw it elsewhere"
            )
    return result


def orphan_masks(root: Path, items: list[Item], out: str) -> list[Path]:
    """Mask files whose image is gone (kohya ignores them, but they are usually a mistake)."""
    folders = {root} | {i.path.parent for i in items}
    stems = {(i.path.parent, i.path.stem) for i in items}
    orphans = []
    for folder in sorted(folders):
        mask_dir = folder / out
        if mask_dir.is_dir():
            orphans += [
                p for p in sorted(mask_dir.glob("*.png")) if (folder, p.stem) not in stems and p.is_file()
            ]
    return orphans


def overlay(image: Image.Image, mask: np.ndarray | None) -> Image.Image:
    """The image with ignored areas darkened and tinted red (mask 0 -> 30% brightness + red)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    if mask is None:
        return Image.fromarray((rgb * 0.3).astype(np.uint8), "RGB")
    m = (mask.astype(np.float32) / 255.0)[..., None]
    red = np.array([180.0, 20.0, 20.0], dtype=np.float32)
    shaded = rgb * (0.3 + 0.7 * m) + red * (1.0 - m) * 0.5
    return Image.fromarray(np.clip(shaded, 0, 255).astype(np.uint8), "RGB")


def _thumb(entry: MaskEntry) -> Image.Image:
    try:
        image = load_image(entry.item.path, mode="RGB", root=entry.item.root)
    except SdprepError:
        return Image.new("RGB", (CELL, CELL), (60, 0, 0))
    image.thumbnail((CELL, CELL))
    mask = None
    if entry.mask_path.is_file():
        try:
            mask_im = Image.fromarray(read_mask_image(entry.mask_path, root=entry.item.root), "L")
            mask = np.asarray(mask_im.resize(image.size, Image.Resampling.BILINEAR))
        except SdprepError:
            mask = None
    return overlay(image, mask)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def write_preview(result: CheckReport, path: Path, limit: int = PREVIEW_MAX) -> int:
    """Draw the contact sheet (problems first, then lowest coverage) to `path`; returns thumbnails drawn."""
    ordered = sorted(
        result.entries,
        key=lambda e: (e.problem is None, e.coverage if e.coverage is not None else 0.0, str(e.item.path)),
    )[:limit]
    cols = min(8, max(1, math.ceil(math.sqrt(len(ordered)))))
    rows = math.ceil(len(ordered) / cols)
    pad = 6
    width = cols * (CELL + pad) + pad
    sheet = Image.new("RGB", (width, HEADER + rows * (CELL + LABEL + pad) + pad), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    font = _font(12)
    legend = LEGEND if draw.textlength(LEGEND, font=font) <= width - 2 * pad else LEGEND.split(";")[0]
    draw.text((pad, 5), legend, fill=(235, 235, 235), font=font)
    for i, entry in enumerate(ordered):
        x = pad + (i % cols) * (CELL + pad)
        y = HEADER + pad + (i // cols) * (CELL + LABEL + pad)
        thumb = _thumb(entry)
        sheet.paste(thumb, (x + (CELL - thumb.width) // 2, y + (CELL - thumb.height) // 2))
        name = entry.item.name if len(entry.item.name) <= 30 else entry.item.name[:27] + "..."
        if entry.problem:
            status, colour = _short_problem(entry.problem), (255, 110, 110)
        else:
            status, colour = f"coverage {entry.coverage:.2f}", (200, 200, 200)
        draw.text((x + 2, y + CELL + 2), name, fill=(235, 235, 235), font=font)
        draw.text((x + 2, y + CELL + 15), status, fill=colour, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    sheet.save(buf, "PNG")
    atomic_write_bytes(path, buf.getvalue())
    if len(result.entries) > len(ordered):
        result.notes.append(
            f"preview shows {len(ordered)} of {len(result.entries)} (problems, then lowest coverage)"
        )
    return len(ordered)


def _short_problem(problem: str) -> str:
    if problem.startswith("no mask"):
        return "NO MASK"
    if "empty" in problem:
        return "EMPTY MASK"
    if " but the image is " in problem:
        return "WRONG SIZE"
    return "UNREADABLE"
