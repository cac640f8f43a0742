"""The bucket preview people look at: one PNG contact sheet per bucket, showing the crop each image gets.

`sdprep bucket` writes `OUT/preview/<w>x<h>.png` beside buckets.json. Each cell is an image scaled
as the trainer scales it for its bucket, with the part the centre crop cuts away shaded red, and
under it the image's name and how much is cut (or how much it is upscaled). A sheet shows the first
MAX_PER_SHEET images of its bucket by name and says how many more there are.

Memory stays flat in the number of images: while bucketing only the first images of each bucket
are kept (paths and crop boxes, not pixels) plus a fixed histogram of crop amounts; the sheets are
drawn one at a time afterwards, each image decoded at thumbnail size. The crop amounts are
summarised for the terminal (`crop_lines`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sdprep import state
from sdprep.buckets import Assignment, BucketSettings
from sdprep.dataset import loads_json
from sdprep.errors import SdprepError
from sdprep.fileops import Operation, atomic_write_text
from sdprep.images import load_image

PREVIEW_DIR = "preview"
MAX_PER_SHEET = 48
CELL = 160  # an image fits in CELL x CELL pixels
COLUMNS = 8
LABEL_H = 30  # two lines of text under each image
TITLE_H = 24
PAD = 6
SHEET_NAME = re.compile(r"^\d+x\d+\.png$")
STEPS = 1000  # crop amounts are counted in 0.1% steps


def sheet_name(bucket: tuple[int, int]) -> str:
    return f"{bucket[0]}x{bucket[1]}.png"


@dataclass
class Previews:
    """Collects, image by image, what the sheets and the crop summary need."""

    per_sheet: int = MAX_PER_SHEET
    shown: dict[tuple[int, int], list[tuple[Path, Assignment]]] = field(default_factory=dict)
    counts: Counter[tuple[int, int]] = field(default_factory=Counter)
    crops: list[int] = field(default_factory=lambda: [0] * (STEPS + 1))
    most: tuple[float, str] = (0.0, "")
    roots: dict[Path, str] = field(default_factory=dict)  # the dataset folder of a shown image

    def add(self, image: Path, a: Assignment, root: str | None = None) -> None:
        """Count `image` (listed from the dataset folder `root`, for the symlink rule) in its bucket."""
        self.counts[a.bucket] += 1
        rows = self.shown.setdefault(a.bucket, [])
        if len(rows) < self.per_sheet:
            rows.append((image, a))
            if root is not None:
                self.roots[image] = root
        cut = max(0.0, min(1.0, a.cropped_fraction))
        self.crops[round(cut * STEPS)] += 1
        if cut > self.most[0]:
            self.most = (cut, image.name)

    def sheets(self) -> Iterator[tuple[str, bytes]]:
        """(file name, PNG bytes) of each bucket's sheet, the most used bucket first."""
        for bucket, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            rows = sorted(self.shown[bucket], key=lambda r: r[0].name)
            yield sheet_name(bucket), draw_sheet(bucket, rows, n, self.roots)

    def crop_lines(self) -> list[str]:
        """The crop amounts in one line: median, 90th percentile, largest (with its image)."""
        total = sum(self.crops)
        if not total:
            return []

        def pct(q: float) -> float:
            """The smallest amount at least a share q of the images is cropped by or less (nearest rank)."""
            seen, rank = 0, math.ceil(q * total)
            for step, n in enumerate(self.crops):
                seen += n
                if seen >= rank:
                    return step / STEPS
            return 1.0

        uncut = self.crops[0]
        line = (
            f"crop: median {pct(0.5):.0%}, 90% of images {pct(0.9):.0%} or less, largest {self.most[0]:.0%}"
        )
        line += f" ({self.most[1]})" if self.most[1] else ""
        line += f"; {uncut} of {total} images uncropped"
        return [
            line,
            f"bucket preview: one sheet per bucket in {PREVIEW_DIR}/ (the shaded part is cropped away)",
        ]


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def draw_sheet(
    bucket: tuple[int, int],
    rows: list[tuple[Path, Assignment]],
    total: int,
    roots: dict[Path, str] | None = None,
) -> bytes:
    """One bucket's contact sheet as PNG bytes (`roots`: an image's dataset folder, if known)."""
    cols = max(1, min(COLUMNS, len(rows)))
    lines = -(-len(rows) // cols)
    font = _font()
    title = f"bucket {bucket[0]}x{bucket[1]}: {total} image{'s' if total != 1 else ''}"
    if total > len(rows):
        title += f" (the first {len(rows)} by name shown)"
    title += "; red = cropped away"
    text_w = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=font)
    width = max(cols * (CELL + PAD) + PAD, int(text_w) + 2 * PAD)
    height = TITLE_H + lines * (CELL + LABEL_H + PAD) + PAD
    sheet = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, 6), title, fill=(0, 0, 0), font=font)
    for k, (image, a) in enumerate(rows):
        x = PAD + (k % cols) * (CELL + PAD)
        y = TITLE_H + (k // cols) * (CELL + LABEL_H + PAD)
        _cell(sheet, draw, font, (x, y), image, a, (roots or {}).get(image))
    buf = io.BytesIO()
    sheet.save(buf, "PNG", optimize=False)
    return buf.getvalue()


def _cell(
    sheet: Image.Image,
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    at: tuple[int, int],
    image: Path,
    a: Assignment,
    root: str | None,
) -> None:
    """The image as resized for its bucket, the cropped-away margins shaded, and a two-line label."""
    x, y = at
    rw, rh = a.resized
    scale = CELL / max(rw, rh, 1)
    w, h = max(1, round(rw * scale)), max(1, round(rh * scale))
    ox, oy = x + (CELL - w) // 2, y + (CELL - h) // 2
    try:
        thumb = load_image(image, "RGB", draft=(w, h), root=root).resize((w, h), Image.Resampling.BILINEAR)
    except SdprepError:
        thumb = Image.new("RGB", (w, h), (200, 200, 200))  # bucket lists unreadable images itself
    left, top, right, bottom = (round(v * scale) for v in a.crop_ltrb)
    box = (left, top, max(left, right - 1), max(top, bottom - 1))
    shade = Image.new("RGB", (w, h), (200, 30, 30))
    keep = Image.new("L", (w, h), 110)
    ImageDraw.Draw(keep).rectangle(box, fill=0)
    thumb.paste(shade, (0, 0), keep)
    sheet.paste(thumb, (ox, oy))
    draw.rectangle((ox + box[0], oy + box[1], ox + box[2], oy + box[3]), outline=(255, 255, 255))
    name = image.name if len(image.name) <= 26 else image.name[:12] + "..." + image.name[-11:]
    detail = f"cropped {a.cropped_fraction:.0%}" if a.cropped_fraction >= 0.005 else "not cropped"
    if a.upscaled:
        detail += f", upscaled x{a.scale:.2f}"
    draw.text((x, y + CELL + 2), name, fill=(0, 0, 0), font=font)
    draw.text((x, y + CELL + 15), detail, fill=(90, 90, 90), font=font)


def stale_sheets(folder: Path, written: set[str]) -> list[Path]:
    """Sheets of buckets this run no longer has (only sdprep's own `<w>x<h>.png` names)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if SHEET_NAME.match(p.name) and p.name not in written)


def write_previews(op: Operation, out: Path, previews: Previews) -> list[str]:
    """Write the sheets into OUT/preview/ through the journal (unchanged ones are left alone) and
    remove the sheets of buckets no longer used; returns the sheet names."""
    folder = out / PREVIEW_DIR
    names = []
    for name, data in previews.sheets():
        op.write_bytes(folder / name, data)
        names.append(name)
    for stale in stale_sheets(folder, set(names)):
        op.delete(stale)
    return names


# -- what a dataset was bucketed with (read by the report) ---------------------------------------

RECORD = "bucket.json"


@dataclass(frozen=True)
class Bucketed:
    """The last `sdprep bucket` of a dataset: where to, with which settings, which sheets."""

    out: Path
    settings: BucketSettings
    sheets: tuple[str, ...] = ()


def record_bucketing(root: Path, bucketed: Bucketed) -> None:
    """Note in the dataset's state folder how it was bucketed (best effort: the dataset may be read-only)."""
    s = bucketed.settings
    doc = {
        "out": str(bucketed.out),
        "settings": {
            "resolution": list(s.resolution),
            "step": s.step,
            "min_side": s.min_side,
            "max_side": s.max_side,
            "no_upscale": s.no_upscale,
        },
        "sheets": list(bucketed.sheets),
    }
    with contextlib.suppress(OSError, SdprepError):
        path = state.file(root, RECORD, create_parent=True)
        text = json.dumps(doc, indent=1) + "\n"
        if not path.exists() or state.read_text(path) != text:
            atomic_write_text(path, text)


def bucketed_with(root: Path) -> Bucketed | None:
    """The record `record_bucketing` left, or None (never bucketed, or unreadable)."""
    try:
        doc = loads_json(state.read_text(state.file(root, RECORD)))
        s = doc["settings"]
        width, height = (int(v) for v in s["resolution"])
        settings = BucketSettings(
            (width, height),
            int(s["step"]),
            int(s["min_side"]),
            int(s["max_side"]),
            bool(s["no_upscale"]),
        )
        return Bucketed(Path(doc["out"]), settings, tuple(str(n) for n in doc.get("sheets", [])))
    except (OSError, SdprepError, ValueError, KeyError, TypeError):
        return None
