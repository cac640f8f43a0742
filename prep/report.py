"""`sdprep report`: a self-contained HTML (or JSON) report of a dataset people can look at.

One pass over the images (streamed: memory stays flat in the number of files): size, caption,
tags, mask, monochrome label and a perceptual hash per image; thumbnails are written straight into
a temporary gallery file. Then the summary tables (tag frequencies, caption lengths, resolution and
aspect histograms, buckets, monochrome share, duplicates, problems) are written and the gallery
appended. The HTML needs no server and no network: images are embedded as data URIs.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import os
import tempfile
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypedDict

import numpy as np
from PIL import Image

from sdprep.buckets import BucketSettings, assign_bucket
from sdprep.config import bounded, check_bounds
from sdprep.dataset import (
    Item,
    dumps_json,
    iter_items,
    read_caption,
    read_sidecar,
    require_images,
    sdprep_meta,
    split_tags,
)
from sdprep.errors import SdprepError, printable, unknown_choice
from sdprep.fileops import atomic_write_stream
from sdprep.images import load_image
from sdprep.prep.monochrome import COLOUR
from sdprep.prep.monochrome import LABELS as MONO_LABELS
from sdprep.prep.preview import PREVIEW_DIR, bucketed_with
from sdprep.progress import NullReporter, Reporter
from sdprep.stage import StageResult, progress
from sdprep.tags import tag_key

if TYPE_CHECKING:
    from sdprep.prep.tokens import TokenCounter

SMALL_AREA = 512 * 512
Counts = list[tuple[str, int]]  # (label, images) rows of a summary table


class BucketingRecord(TypedDict):
    """`Bucketing.as_dict`: the report's bucket settings, where they come from, the preview sheets."""

    source: str
    description: str
    out: str | None
    resolution: list[int]
    step: int
    min_side: int
    max_side: int
    no_upscale: bool
    sheets: list[list[str]]


class ReportSummary(TypedDict):
    """The report's summary (`Summary.as_dict`): the JSON report's "summary", the HTML tables."""

    images: int
    captioned: int
    with_mask: int
    problems: int
    tags: Counts
    tag_count_per_caption: Counts
    token_lengths: Counts
    resolution_mp: Counts
    aspect: Counts
    buckets: Counts
    monochrome: dict[str, int]
    monochrome_disagreeing_captions: int
    duplicates: list[list[str]]
    bucketing: BucketingRecord


@dataclass(frozen=True)
class ReportOptions:
    out: Path | None = None  # default DIR/report.html (or .json)
    format: str = "html"  # html | json
    recursive: bool = True
    thumb_size: int = bounded(160, 16)
    max_thumbs: int = bounded(5000, 0)  # beyond this the gallery lists names only (keeps the file openable)
    duplicate_distance: int = bounded(
        4, 0, 64
    )  # pHash Hamming distance at or below which images are duplicates
    tokenizer: str | None = None  # model folder / hub id for real CLIP token counts
    settings: BucketSettings | None = None  # None: as the dataset was last bucketed, else SDXL defaults

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.format not in REPORT_FORMATS:
            raise unknown_choice("report format", self.format, REPORT_FORMATS)


REPORT_FORMATS = ("html", "json")


MAX_LISTED = 50  # unreadable files named on the terminal; the report lists them all


@dataclass
class ImageRow:
    path: str
    size: tuple[int, int] | None = None
    caption: str | None = None
    tags: int = 0
    tokens: int | None = None
    bucket: tuple[int, int] | None = None
    monochrome: str | None = None
    mask_coverage: float | None = None
    phash: int | None = None
    mono_disagrees: str | None = None  # the caption's monochrome / greyscale tags vs the colour check
    problems: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # files that could not be used: "name: reason"

    def error(self, exc: SdprepError, what: str = "") -> None:
        """Record a file that cannot be read: a problem in the report and a line on the terminal."""
        self.problems.append(f"{what}{exc.reason}")
        self.errors.append(f"{Path(exc.path or self.path).name}: {exc.reason}")


def _thumb_uri(im: Image.Image, size: int) -> str:
    im = im.copy()
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _overlay(im: Image.Image, mask: Image.Image) -> Image.Image:
    """The image with the unmasked (ignored) part darkened and tinted red."""
    rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    m = np.asarray(mask.convert("L").resize(im.size), dtype=np.float32)[..., None] / 255.0
    tint = rgb * 0.35 + np.array([120, 0, 0], dtype=np.float32)
    return Image.fromarray(np.clip(rgb * m + tint * (1 - m), 0, 255).astype(np.uint8))


def mono_disagreement(caption: str, label: str | None) -> str | None:
    """Why a caption's greyscale / monochrome tags contradict the colour check's label, or None.

    Only measured labels count (`sdprep clean` stores them); a greyscale image tagged only
    "monochrome" agrees (boorus tag such images with both).
    """
    if label is None:
        return None
    said = sorted({tag_key(t) for t in split_tags(caption)} & set(MONO_LABELS))
    if label == COLOUR and said:
        return f'caption says "{", ".join(said)}" but the colour check found colour'
    if label in MONO_LABELS and not said:
        return f"the colour check found {label} but the caption does not say so"
    return None


def _phash(im: Image.Image) -> int:
    import imagehash

    return int(str(imagehash.phash(im)), 16)


def _token_counter(spec: str | None) -> TokenCounter | None:
    """The clean stage's token counter (caption tokens without start/end), or None without a spec."""
    if not spec:
        return None
    from sdprep.prep.tokens import load_tokenizer

    return load_tokenizer(spec)


NO_CAPTION = "no caption file"
MASK_EMPTY = "mask is empty (all black)"


def size_checks(size: tuple[int, int], settings: BucketSettings) -> tuple[tuple[int, int] | None, list[str]]:
    """The bucket an image of `size` lands in (None: dropped) and the report's size problems."""
    problems = []
    if size[0] * size[1] < SMALL_AREA:
        problems.append(f"small for SDXL ({size[0]}x{size[1]}); consider `sdprep upscale`")
    a = assign_bucket(*size, settings)
    if a.dropped:
        problems.append(f"dropped by the bucketer: {a.dropped}")
    return (None if a.dropped else a.bucket), problems


def mask_size_problem(mask_size: tuple[int, int], size: tuple[int, int]) -> str | None:
    if mask_size == size:
        return None
    return f"mask {mask_size[0]}x{mask_size[1]} differs from image size"


def analyse_item(
    item: Item,
    opts: ReportOptions,
    settings: BucketSettings,
    count_tokens: Callable[[str], int] | None,
    thumbs: bool,
) -> tuple[ImageRow, str, str]:
    """Inspect one image (its bucket by `settings`); returns its row and thumbnail data URIs (image,
    mask overlay) or ""."""
    row = ImageRow(str(item.path))
    thumb = overlay = ""
    try:
        sidecar = read_sidecar(item)
        meta = sdprep_meta(sidecar)
        mono = meta.get("monochrome")
        row.monochrome = mono.get("label") if isinstance(mono, dict) else mono
    except SdprepError as exc:
        row.error(exc)
    try:
        row.caption = read_caption(item)
        if row.caption is None:
            row.problems.append(NO_CAPTION)
        else:
            row.tags = len(split_tags(row.caption))
            row.mono_disagrees = mono_disagreement(row.caption, row.monochrome)
            if row.mono_disagrees:
                row.problems.append(row.mono_disagrees)
            if count_tokens:
                row.tokens = count_tokens(row.caption)
    except SdprepError as exc:
        row.error(exc)
    try:
        im = load_image(item.path, root=item.root)
    except SdprepError as exc:
        row.error(exc)
        return row, thumb, overlay
    row.size = im.size
    row.bucket, problems = size_checks(im.size, settings)
    row.problems += problems
    small = im.copy()
    small.thumbnail((256, 256))
    row.phash = _phash(small)
    mask_path = item.mask_path()
    mask = None
    if mask_path.exists():
        try:
            mask = load_image(mask_path, mode="L", root=item.root)
            problem = mask_size_problem(mask.size, im.size)
            if problem:
                row.problems.append(problem)
                row.errors.append(f"{mask_path.parent.name}/{mask_path.name}: {problem}")
            row.mask_coverage = float(np.asarray(mask, dtype=np.float32).mean() / 255.0)
            if row.mask_coverage == 0:
                row.problems.append(MASK_EMPTY)
        except SdprepError as exc:
            row.error(exc, "mask: ")
            mask = None
    if thumbs:
        thumb = _thumb_uri(small, opts.thumb_size)
        if mask is not None:
            overlay = _thumb_uri(_overlay(small, mask), opts.thumb_size)
    return row, thumb, overlay


def find_duplicates(hashes: list[tuple[int, int]], max_distance: int) -> list[list[int]]:
    """Groups of row indices whose 64-bit pHashes are within `max_distance` bits (union-find).

    dedup's tiled search: memory stays flat (the former 1024 x N x 64-bit matrix took 1.3 GB at
    20,000 images).
    """
    idx = [i for i, _ in hashes]
    return [[idx[k] for k in g] for g in _groups([h for _, h in hashes], max_distance)]


def _groups(hashes: Sequence[int], max_distance: int) -> list[list[int]]:
    """Positions in `hashes` (a list or an array('Q')) of the duplicate groups, sorted."""
    from sdprep.prep.dedup import group

    return sorted(sorted(g) for g in group(hashes, max_distance))


class Histogram:
    """Counts of values per range: `edges[i] <= v < edges[i + 1]` is `labels[i]`, the last is open."""

    def __init__(self, edges: list[float], labels: list[str]) -> None:
        self.edges, self.labels, self.counts = edges, labels, [0] * len(labels)

    def add(self, v: float) -> None:
        last = len(self.labels) - 1
        self.counts[next(i for i in range(last + 1) if i == last or v < self.edges[i + 1])] += 1

    def items(self) -> list[tuple[str, int]]:
        return list(zip(self.labels, self.counts))


class _Paths:
    """Strings kept in a temporary file and read back by index (8 bytes of memory each)."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file, self.starts, self.end = file, array("Q"), 0

    def append(self, text: str) -> None:
        data = text.encode("utf-8", "surrogatepass")
        self.file.seek(self.end)
        self.file.write(data)
        self.starts.append(self.end)
        self.end += len(data)

    def __getitem__(self, i: int) -> str:
        stop = self.starts[i + 1] if i + 1 < len(self.starts) else self.end
        self.file.seek(self.starts[i])
        return self.file.read(stop - self.starts[i]).decode("utf-8", "surrogatepass")


class Summary:
    """The report's summary tables, accumulated row by row.

    Memory grows with distinct tags and buckets, not with images: counts and histograms only, the
    pHashes 8 bytes each in an array, and the paths of hashed images in a temporary file.
    """

    def __init__(self, path_file: IO[bytes]) -> None:
        self.images = self.captioned = self.with_mask = self.problems = 0
        self.tags: Counter[str] = Counter()
        self.tag_count = Histogram([0, 1, 10, 20, 40, 1e9], ["0", "1-9", "10-19", "20-39", "40+"])
        self.tokens = Histogram([0, 76, 151, 226, 1e9], ["<=75", "76-150", "151-225", ">225"])
        self.any_tokens = False
        self.mp = Histogram([0, 0.25, 0.5, 1.0, 2.0, 1e9], ["<0.25", "0.25-0.5", "0.5-1", "1-2", ">=2"])
        self.aspect = Histogram(
            [0, 0.6, 0.9, 1.12, 1.7, 1e9], ["tall <0.6", "portrait", "square", "landscape", "wide >1.7"]
        )
        self.buckets: Counter[str] = Counter()
        self.mono: Counter[str] = Counter()
        self.mono_disagree = 0
        self.hashes = array("Q")
        self.hashed = _Paths(path_file)

    def add(self, r: ImageRow) -> None:
        self.images += 1
        self.captioned += r.caption is not None
        self.with_mask += r.mask_coverage is not None
        self.problems += bool(r.problems)
        if r.caption:
            self.tags.update(split_tags(r.caption))
        self.tag_count.add(r.tags)
        if r.tokens is not None:
            self.any_tokens = True
            self.tokens.add(r.tokens)
        if r.size:
            w, h = r.size
            self.mp.add(w * h / 1e6)
            self.aspect.add(w / h)
        if r.bucket:
            self.buckets[f"{r.bucket[0]}x{r.bucket[1]}"] += 1
        if r.monochrome:
            self.mono[r.monochrome] += 1
        self.mono_disagree += bool(r.mono_disagrees)
        if r.phash is not None:
            self.hashes.append(r.phash)
            self.hashed.append(r.path)

    def as_dict(self, opts: ReportOptions, bucketing: Bucketing) -> ReportSummary:
        dup = _groups(self.hashes, opts.duplicate_distance)
        return {
            "images": self.images,
            "captioned": self.captioned,
            "with_mask": self.with_mask,
            "problems": self.problems,
            "tags": self.tags.most_common(),
            "tag_count_per_caption": self.tag_count.items(),
            "token_lengths": self.tokens.items() if self.any_tokens else [],
            "resolution_mp": self.mp.items(),
            "aspect": self.aspect.items(),
            "buckets": self.buckets.most_common(),
            "monochrome": dict(self.mono),
            "monochrome_disagreeing_captions": self.mono_disagree,
            "duplicates": [[self.hashed[k] for k in g] for g in dup],
            "bucketing": bucketing.as_dict(),
        }


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.4em}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
.bar{background:#4a7;height:10px;display:inline-block}.grid{display:flex;flex-wrap:wrap;gap:10px}
.card{width:180px;border:1px solid #ddd;padding:6px;font-size:12px}.card img{max-width:100%;display:block}
.bad{border-color:#c33;background:#fee}.lbl{color:#666;font-size:11px;margin-bottom:4px}.cap{max-height:6em;overflow:auto;color:#444}.sec{display:flex;gap:3em;flex-wrap:wrap}"""


def _table(
    title: str, rows: Sequence[tuple[object, ...]], headers: tuple[str, ...], bar: bool = False
) -> str:
    """A table of `rows`; with `bar`, each row's second cell (a count) is drawn as a bar too."""
    top = max((r[1] for r in rows if isinstance(r[1], int)), default=1) or 1
    return _table_head(title, headers) + "".join(_table_row(r, bar, top) for r in rows) + _TABLE_END


def _table_head(title: str, headers: tuple[str, ...]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    return f"<div><h2>{html.escape(title)}</h2><table><tr>{cells}</tr>"


def _table_row(r: tuple[object, ...], bar: bool = False, top: int = 1) -> str:
    cells = "".join(f"<td>{html.escape(str(c))}</td>" for c in r)
    if bar and isinstance(r[1], int):
        cells += f'<td><span class="bar" style="width:{int(200 * r[1] / top)}px"></span></td>'
    return f"<tr>{cells}</tr>"


_TABLE_END = "</table></div>"


def _card(row: ImageRow, thumb: str, overlay: str) -> str:
    name = html.escape(Path(row.path).name)
    cls = "card bad" if row.problems else "card"
    parts = [f'<div class="{cls}"><b>{name}</b>']
    if thumb:
        parts.append(f'<img src="{thumb}" alt="{name}"/>')
    if overlay:
        parts.append(f'<img src="{overlay}" alt="mask of {name}" title="mask overlay of {name}"/>')
        parts.append('<div class="lbl">mask: red = ignored (no loss), as is = learned</div>')
    info = []
    if row.size:
        info.append(f"{row.size[0]}x{row.size[1]}")
    if row.bucket:
        info.append(f"bucket {row.bucket[0]}x{row.bucket[1]}")
    if row.monochrome:
        info.append(row.monochrome)
    if row.mask_coverage is not None:
        info.append(f"mask {row.mask_coverage:.0%}")
    if row.tokens is not None:
        info.append(f"{row.tokens} tokens")
    parts.append(f"<div>{html.escape(', '.join(info))}</div>")
    parts.append(f'<div class="cap">{html.escape(row.caption or "")}</div>')
    parts += [f'<div style="color:#c33">{html.escape(p)}</div>' for p in row.problems]
    parts.append("</div>")
    return "".join(parts)


@dataclass(frozen=True)
class Bucketing:
    """The bucket settings the report assigns with, where they come from, and the preview sheets."""

    settings: BucketSettings
    source: str  # "options", "bucketed" or "defaults"
    out: str | None = None  # the bucket output folder (when bucketed)
    sheets: tuple[tuple[str, str], ...] = ()  # (bucket "WxH", link relative to the report)

    def as_dict(self) -> BucketingRecord:
        s = self.settings
        return {
            "source": self.source,
            "description": self.describe(),
            "out": self.out,
            "resolution": list(s.resolution),
            "step": s.step,
            "min_side": s.min_side,
            "max_side": s.max_side,
            "no_upscale": s.no_upscale,
            "sheets": [list(x) for x in self.sheets],
        }

    def describe(self) -> str:
        s = self.settings
        what = f"max area {s.resolution[0]}x{s.resolution[1]}, step {s.step}, sides {s.min_side}-{s.max_side}"
        if self.source == "bucketed":
            return f"as bucketed into {self.out} ({what})"
        if self.source == "options":
            return f"as given ({what})"
        return f"SDXL defaults ({what}): the dataset has not been bucketed"


def _bucketing(root: Path, opts: ReportOptions, out: Path) -> Bucketing:
    if opts.settings is not None:
        return Bucketing(opts.settings, "options")
    done = bucketed_with(root)
    if done is None:
        return Bucketing(BucketSettings(), "defaults")
    folder = done.out / PREVIEW_DIR
    sheets = tuple(
        (name.removesuffix(".png"), Path(os.path.relpath(folder / name, out.absolute().parent)).as_posix())
        for name in done.sheets
        if (folder / name).is_file()
    )
    return Bucketing(done.settings, "bucketed", str(done.out), sheets)


def run_report(root: Path | str, opts: ReportOptions, *, report: Reporter = NullReporter()) -> StageResult:
    """Write the report for the dataset at `root`; result.details holds the summary dict.

    One streamed pass: per image only what the summary needs is kept (see `Summary`); the gallery
    cards (HTML), the problem rows (HTML) or the per-image rows (JSON) go to temporary files.
    """
    root = require_images(root, opts.recursive)
    out = Path(opts.out) if opts.out else root / ("report." + ("json" if opts.format == "json" else "html"))
    bucketing = _bucketing(root, opts, out)
    result = StageResult("report")
    count_tokens = _token_counter(opts.tokenizer)
    unreadable: list[str] = []
    with contextlib.ExitStack() as stack:
        gallery = stack.enter_context(tempfile.TemporaryFile("w+", encoding="utf-8"))  # or JSON rows
        problems = stack.enter_context(tempfile.TemporaryFile("w+", encoding="utf-8"))
        stats = Summary(stack.enter_context(tempfile.TemporaryFile("w+b")))
        with progress(report, None, "report"):
            for n, item in enumerate(iter_items(root, opts.recursive)):
                thumbs = opts.format == "html" and n < opts.max_thumbs
                row, thumb, overlay = analyse_item(
                    item, opts, bucketing.settings, count_tokens, thumbs=thumbs
                )
                stats.add(row)
                if opts.format == "json":
                    gallery.write((",\n  " if n else "") + _json_text(_row_json(row)).replace("\n", "\n  "))
                else:
                    gallery.write(printable(_card(row, thumb, overlay)))  # names that are not UTF-8
                    if row.problems:
                        problems.write(printable(_table_row((Path(row.path).name, "; ".join(row.problems)))))
                # unreadable files are failures: the report still lists them, the exit code says so
                for e in row.errors:
                    parts = e.split(": ", 1)
                    result.fail(Path(row.path).parent / parts[0], parts[-1])
                    if len(unreadable) < MAX_LISTED:
                        unreadable.append(f"  unreadable: {Path(row.path).parent / e}")
                report.advance()
        summary = stats.as_dict(opts, bucketing)
        gallery.seek(0)
        problems.seek(0)
        if opts.format == "json":
            changed = atomic_write_stream(out, lambda f: _write_json(f, root, summary, gallery))
        else:
            changed = atomic_write_stream(
                out, lambda f: _write_html(f, root, summary, problems, gallery, opts)
            )
    result.changed, result.skipped = (1, 0) if changed else (0, 1)
    result.details = {"summary": summary, "out": str(out)}
    result.notes.append(
        f"report: {out} ({summary['images']} images, {summary['problems']} with problems, "
        f"{len(summary['duplicates'])} duplicate groups)"
    )
    result.notes += unreadable
    more = len(result.failed) - len(unreadable)
    if more > 0:
        result.notes.append(f"  ... and {more} more unreadable files (see the report)")
    return result


def _json_text(data: object) -> str:
    return dumps_json(data, indent=1)


def _row_json(r: ImageRow) -> dict[str, object]:
    d = {k: v for k, v in r.__dict__.items() if k != "phash"}
    d["phash"] = f"{r.phash:016x}" if r.phash is not None else None
    return d


def _write_json(f: IO[str], root: Path, summary: ReportSummary, rows: IO[str]) -> None:
    """The JSON document `json.dumps(doc, indent=1)` would give, with the rows copied from `rows`."""
    head = _json_text({"dataset": str(root), "summary": summary})[: -len("\n}")] + ',\n "images": ['
    first = rows.read(1 << 20)
    if not first:
        f.write(head + "]\n}\n")
        return
    f.write(head + "\n  " + first)
    _copy(rows, f)
    f.write("\n ]\n}\n")


def _write_html(
    f: IO[str], root: Path, summary: ReportSummary, problems: IO[str], gallery: IO[str], opts: ReportOptions
) -> None:
    title = html.escape(printable(f"sdprep report: {root}"))
    f.write(
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"/><title>{title}</title><style>{CSS}</style></head><body>'
    )
    f.write(
        f"<h1>{title}</h1><p>{summary['images']} images, {summary['captioned']} captioned, "
        f"{summary['with_mask']} with masks, {summary['problems']} with problems.</p>"
    )
    f.write('<div class="sec">')
    f.write(_table("Resolution (megapixels)", summary["resolution_mp"], ("range", "images", ""), bar=True))
    f.write(_table("Aspect ratio", summary["aspect"], ("shape", "images", ""), bar=True))
    f.write(_bucket_table(summary))
    f.write(_table("Tags per caption", summary["tag_count_per_caption"], ("tags", "captions", ""), bar=True))
    if summary["token_lengths"]:
        f.write(
            _table(
                "Caption length (CLIP tokens)", summary["token_lengths"], ("tokens", "captions", ""), bar=True
            )
        )
    mono = sorted(summary["monochrome"].items()) or [("(not analysed: run sdprep clean)", 0)]
    if summary["monochrome_disagreeing_captions"]:
        mono.append(
            ("captions disagreeing with the colour check", summary["monochrome_disagreeing_captions"])
        )
    f.write(_table("Monochrome", mono, ("label", "images")))
    f.write("</div>")
    f.write(_table_head("Images with problems", ("image", "problems")))
    if not _copy(problems, f):
        f.write(_table_row(("none", "")))
    f.write(_TABLE_END)
    dups = [
        (i + 1, printable(", ".join(Path(p).name for p in g))) for i, g in enumerate(summary["duplicates"])
    ]
    f.write(_table("Duplicates (perceptual hash)", dups or [("none", "")], ("group", "images")))
    f.write(_table("Tag frequency", summary["tags"][:300], ("tag", "images", ""), bar=True))
    f.write('<h2>Images</h2><div class="grid">')
    _copy(gallery, f)
    f.write("</div>")
    if summary["images"] > opts.max_thumbs:
        f.write(f"<p>Thumbnails shown for the first {opts.max_thumbs} images only.</p>")
    f.write("</body></html>\n")


def _bucket_table(summary: ReportSummary) -> str:
    """The bucket histogram; each bucket links to its contact sheet when `sdprep bucket` drew one."""
    b = summary["bucketing"]
    links = dict(b["sheets"])
    rows = summary["buckets"]
    top = max((n for _, n in rows), default=1) or 1
    body = []
    for name, n in rows:
        cell = html.escape(name)
        if name in links:
            cell = f'<a href="{html.escape(links[name])}">{cell}</a>'
        bar = f'<span class="bar" style="width:{int(200 * n / top)}px"></span>'
        body.append(f"<tr><td>{cell}</td><td>{n}</td><td>{bar}</td></tr>")
    note = f'<p class="lbl">{html.escape(printable(b["description"]))}'
    if links:
        note += "; a bucket links to its preview sheet (the crop each image gets)"
    return (
        _table_head("Buckets", ("bucket", "images", ""))
        + "".join(body)
        + _TABLE_END.replace("</table>", "</table>" + note + "</p>", 1)
    )


def _copy(src: IO[str], dst: IO[str]) -> bool:
    """Copy a text file into another in chunks; False when `src` was empty."""
    copied = False
    while chunk := src.read(1 << 20):
        dst.write(chunk)
        copied = True
    return copied
