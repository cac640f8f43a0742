"""`sdprep report`: a self-contained HTML (or JSON) report of a dataset people can look at.

One pass over the images (streamed: memory stays flat in the number of files): size, caption,
tags, mask, monochrome label and a perceptual hash per image; thumbnails are written straight into
a temporary gallery file. Then the summary tables (tag frequencies, caption lengths, resolution and
aspect histograms, buckets, monochrome share, duplicates, problems) are written and the gallery
appended. The HTML needs no server and no network: images are embedded as data URIs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from sdprep.buckets import BucketSettings, assign_bucket
from sdprep.dataset import Item, iter_items, read_caption, read_sidecar, sdprep_meta, split_tags
from sdprep.errors import DatasetError, SdprepError
from sdprep.fileops import atomic_write_text
from sdprep.images import load_image
from sdprep.progress import NullReporter, Reporter
from sdprep.stage import StageResult

SMALL_AREA = 512 * 512


@dataclass(frozen=True)
class ReportOptions:
    out: Path | None = None  # default DIR/report.html (or .json)
    format: str = "html"  # html | json
    recursive: bool = True
    thumb_size: int = 160
    max_thumbs: int = 5000  # beyond this the gallery lists names only (keeps the file openable)
    duplicate_distance: int = 4  # pHash Hamming distance at or below which images count as duplicates
    tokenizer: str | None = None  # model folder / hub id for real CLIP token counts
    settings: BucketSettings = BucketSettings()


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
    problems: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # files that could not be used: "name: reason"

    def error(self, exc: SdprepError, what: str = "") -> None:
        """Record a file that cannot be read: a problem in the report and a line on the terminal."""
        reason = getattr(exc, "reason", str(exc))
        self.problems.append(f"{what}{reason}")
        name = Path(getattr(exc, "path", self.path)).name
        self.errors.append(f"{name}: {reason}")


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


def _phash(im: Image.Image) -> int:
    import imagehash

    return int(str(imagehash.phash(im)), 16)


def _token_counter(spec: str | None):
    if not spec:
        return None
    try:
        from sdprep.prep.tokens import load_tokenizer  # the clean stage's tokenizer loader
    except ImportError as exc:  # pragma: no cover - both ship together
        raise DatasetError("token counting needs sdprep.prep.tokens") from exc
    tok = load_tokenizer(spec)
    return lambda text: len(tok(text, add_special_tokens=False).input_ids)


def analyse_item(item: Item, opts: ReportOptions, count_tokens, thumbs: bool) -> tuple[ImageRow, str, str]:
    """Inspect one image; returns its row and thumbnail data URIs (image, mask overlay) or ""."""
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
            row.problems.append("no caption file")
        else:
            row.tags = len(split_tags(row.caption))
            if count_tokens:
                row.tokens = count_tokens(row.caption)
    except SdprepError as exc:
        row.error(exc)
    try:
        im = load_image(item.path)
    except SdprepError as exc:
        row.error(exc)
        return row, thumb, overlay
    row.size = im.size
    if im.size[0] * im.size[1] < SMALL_AREA:
        row.problems.append(f"small for SDXL ({im.size[0]}x{im.size[1]}); consider `sdprep upscale`")
    a = assign_bucket(*im.size, opts.settings)
    row.bucket = None if a.dropped else a.bucket
    if a.dropped:
        row.problems.append(f"dropped by the bucketer: {a.dropped}")
    small = im.copy()
    small.thumbnail((256, 256))
    row.phash = _phash(small)
    mask_path = item.mask_path()
    mask = None
    if mask_path.exists():
        try:
            mask = load_image(mask_path, mode="L")
            if mask.size != im.size:
                row.problems.append(f"mask {mask.size[0]}x{mask.size[1]} differs from image size")
                row.errors.append(f"{mask_path.parent.name}/{mask_path.name}: {row.problems[-1]}")
            row.mask_coverage = float(np.asarray(mask, dtype=np.float32).mean() / 255.0)
            if row.mask_coverage == 0:
                row.problems.append("mask is empty (all black)")
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
    from sdprep.prep.dedup import group

    idx = [i for i, _ in hashes]
    return sorted(sorted(idx[k] for k in g) for g in group([h for _, h in hashes], max_distance))


def _histogram(values: list[float], edges: list[float], labels: list[str]) -> list[tuple[str, int]]:
    counts = [0] * len(labels)
    for v in values:
        for i in range(len(labels)):
            if v < edges[i + 1] or i == len(labels) - 1:
                counts[i] += 1
                break
    return list(zip(labels, counts))


def summarise(rows: list[ImageRow], tag_counts: Counter, opts: ReportOptions) -> dict:
    sizes = [r.size for r in rows if r.size]
    mp = [w * h / 1e6 for w, h in sizes]
    aspects = [w / h for w, h in sizes]
    tokens = [r.tokens for r in rows if r.tokens is not None]
    dup = find_duplicates(
        [(i, r.phash) for i, r in enumerate(rows) if r.phash is not None], opts.duplicate_distance
    )
    mono = Counter(r.monochrome for r in rows if r.monochrome)
    return {
        "images": len(rows),
        "captioned": sum(r.caption is not None for r in rows),
        "with_mask": sum(r.mask_coverage is not None for r in rows),
        "problems": sum(bool(r.problems) for r in rows),
        "tags": tag_counts.most_common(),
        "tag_count_per_caption": _histogram(
            [r.tags for r in rows], [0, 1, 10, 20, 40, 1e9], ["0", "1-9", "10-19", "20-39", "40+"]
        ),
        "token_lengths": _histogram(tokens, [0, 76, 151, 226, 1e9], ["<=75", "76-150", "151-225", ">225"])
        if tokens
        else [],
        "resolution_mp": _histogram(
            mp, [0, 0.25, 0.5, 1.0, 2.0, 1e9], ["<0.25", "0.25-0.5", "0.5-1", "1-2", ">=2"]
        ),
        "aspect": _histogram(
            aspects,
            [0, 0.6, 0.9, 1.12, 1.7, 1e9],
            ["tall <0.6", "portrait", "square", "landscape", "wide >1.7"],
        ),
        "buckets": Counter(f"{b[0]}x{b[1]}" for b in (r.bucket for r in rows) if b).most_common(),
        "monochrome": dict(mono),
        "duplicates": [[rows[i].path for i in g] for g in dup],
    }


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.4em}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
.bar{background:#4a7;height:10px;display:inline-block}.grid{display:flex;flex-wrap:wrap;gap:10px}
.card{width:180px;border:1px solid #ddd;padding:6px;font-size:12px}.card img{max-width:100%;display:block}
.bad{border-color:#c33;background:#fee}.cap{max-height:6em;overflow:auto;color:#444}.sec{display:flex;gap:3em;flex-wrap:wrap}"""


def _table(title: str, rows: list[tuple], headers: tuple[str, ...], bar: bool = False) -> str:
    top = max((r[1] for r in rows), default=1) or 1
    out = [f"<div><h2>{html.escape(title)}</h2><table><tr>"]
    out += [f"<th>{html.escape(h)}</th>" for h in headers]
    out.append("</tr>")
    for r in rows:
        cells = "".join(f"<td>{html.escape(str(c))}</td>" for c in r)
        if bar:
            cells += f'<td><span class="bar" style="width:{int(200 * r[1] / top)}px"></span></td>'
        out.append(f"<tr>{cells}</tr>")
    out.append("</table></div>")
    return "".join(out)


def _card(row: ImageRow, thumb: str, overlay: str) -> str:
    name = html.escape(Path(row.path).name)
    cls = "card bad" if row.problems else "card"
    parts = [f'<div class="{cls}"><b>{name}</b>']
    if thumb:
        parts.append(f'<img src="{thumb}" alt="{name}"/>')
    if overlay:
        parts.append(f'<img src="{overlay}" alt="mask of {name}"/>')
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


def run_report(root: Path | str, opts: ReportOptions, *, report: Reporter = NullReporter()) -> StageResult:
    """Write the report for the dataset at `root`; result.details holds the summary dict."""
    root = Path(root)
    out = Path(opts.out) if opts.out else root / ("report." + ("json" if opts.format == "json" else "html"))
    result = StageResult("report")
    count_tokens = _token_counter(opts.tokenizer)
    rows: list[ImageRow] = []
    tag_counts: Counter = Counter()
    report.start(None, "report")
    with tempfile.TemporaryFile("w+", encoding="utf-8") as gallery:
        for n, item in enumerate(iter_items(root, opts.recursive)):
            row, thumb, overlay = analyse_item(item, opts, count_tokens, thumbs=n < opts.max_thumbs)
            rows.append(row)
            if row.caption:
                tag_counts.update(split_tags(row.caption))
            if opts.format == "html":
                gallery.write(_card(row, thumb, overlay))
            report.advance()
        report.finish()
        summary = summarise(rows, tag_counts, opts)
        if opts.format == "json":
            doc = {"dataset": str(root), "summary": summary, "images": [_row_json(r) for r in rows]}
            text = json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
            changed = not out.exists() or out.read_text(encoding="utf-8") != text
            if changed:
                atomic_write_text(out, text)
        else:
            gallery.seek(0)
            changed = _write_html(out, root, summary, rows, gallery, opts)
    result.changed, result.skipped = (1, 0) if changed else (0, 1)
    result.details = {"summary": summary, "out": str(out)}
    result.notes.append(
        f"report: {out} ({summary['images']} images, {summary['problems']} with problems, "
        f"{len(summary['duplicates'])} duplicate groups)"
    )
    for r in rows:  # unreadable files are failures: the report still lists them, the exit code says so
        for e in r.errors:
            result.fail(Path(r.path).parent / e.split(": ", 1)[0], e.split(": ", 1)[-1])
    unreadable = [f"  unreadable: {Path(r.path).parent / e}" for r in rows for e in r.errors]
    result.notes += unreadable[:MAX_LISTED]
    if len(unreadable) > MAX_LISTED:
        result.notes.append(
            f"  ... and {len(unreadable) - MAX_LISTED} more unreadable files (see the report)"
        )
    return result


def _row_json(r: ImageRow) -> dict:
    d = {k: v for k, v in r.__dict__.items() if k != "phash"}
    d["phash"] = f"{r.phash:016x}" if r.phash is not None else None
    return d


def _write_html(
    out: Path, root: Path, summary: dict, rows: list[ImageRow], gallery, opts: ReportOptions
) -> bool:
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        title = html.escape(f"sdprep report: {root}")
        f.write(
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"/><title>{title}</title><style>{CSS}</style></head><body>'
        )
        f.write(
            f"<h1>{title}</h1><p>{summary['images']} images, {summary['captioned']} captioned, "
            f"{summary['with_mask']} with masks, {summary['problems']} with problems.</p>"
        )
        f.write('<div class="sec">')
        f.write(
            _table("Resolution (megapixels)", summary["resolution_mp"], ("range", "images", ""), bar=True)
        )
        f.write(_table("Aspect ratio", summary["aspect"], ("shape", "images", ""), bar=True))
        f.write(_table("Buckets", summary["buckets"], ("bucket", "images", ""), bar=True))
        f.write(
            _table("Tags per caption", summary["tag_count_per_caption"], ("tags", "captions", ""), bar=True)
        )
        if summary["token_lengths"]:
            f.write(
                _table(
                    "Caption length (CLIP tokens)",
                    summary["token_lengths"],
                    ("tokens", "captions", ""),
                    bar=True,
                )
            )
        mono = summary["monochrome"]
        f.write(
            _table(
                "Monochrome",
                sorted(mono.items()) or [("(not analysed: run sdprep clean)", 0)],
                ("label", "images"),
            )
        )
        f.write("</div>")
        problems = [(Path(r.path).name, "; ".join(r.problems)) for r in rows if r.problems]
        f.write(_table("Images with problems", problems or [("none", "")], ("image", "problems")))
        dups = [(i + 1, ", ".join(Path(p).name for p in g)) for i, g in enumerate(summary["duplicates"])]
        f.write(_table("Duplicates (perceptual hash)", dups or [("none", "")], ("group", "images")))
        f.write(_table("Tag frequency", summary["tags"][:300], ("tag", "images", ""), bar=True))
        f.write('<h2>Images</h2><div class="grid">')
        while chunk := gallery.read(1 << 20):
            f.write(chunk)
        f.write("</div>")
        if len(rows) > opts.max_thumbs:
            f.write(f"<p>Thumbnails shown for the first {opts.max_thumbs} images only.</p>")
        f.write("</body></html>\n")
    if out.exists() and out.read_bytes() == tmp.read_bytes():
        tmp.unlink()  # same report as last time: leave the file (and its mtime) alone
        return False
    tmp.replace(out)
    return True
