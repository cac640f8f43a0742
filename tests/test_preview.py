"""The bucket preview people look at (prep/preview.py) and the report built on the bucketing:
one PNG contact sheet per bucket showing each crop, linked from the report; the report assigns
buckets with the settings the dataset was bucketed with, labels mask overlays and flags captions
whose monochrome tags the colour check contradicts."""

from __future__ import annotations

import html
import io
import json
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from sdprep.buckets import Assignment, BucketSettings
from sdprep.cli import cli
from sdprep.prep.preview import CELL, PAD, TITLE_H, Previews, draw_sheet
from sdprep.prep.report import ReportOptions, mono_disagreement, run_report


def test_a_sheet_shades_what_the_crop_cuts_away(tmp_path: Path):
    Image.new("RGB", (400, 100), (120, 120, 120)).save(tmp_path / "wide.png")
    a = Assignment((300, 100), (400, 100), (50, 0, 350, 100), 1.0, 0.0)
    sheet = np.asarray(Image.open(io.BytesIO(draw_sheet((300, 100), [(tmp_path / "wide.png", a)], 1))))
    scale = CELL / 400
    top = TITLE_H + (CELL - round(100 * scale)) // 2 + 5
    left_margin = sheet[top, PAD + 5]  # inside the 50 px cut on the left
    middle = sheet[top, PAD + CELL // 2]
    assert left_margin[0] > left_margin[1] + 30  # shaded red
    assert abs(int(middle[0]) - 120) <= 2 and abs(int(middle[1]) - 120) <= 2  # kept as it is


def test_crop_summary_for_the_terminal():
    p = Previews()
    for i, cut in enumerate([0.0, 0.0, 0.1, 0.2, 0.5]):
        w = 100 / (1 - cut) if cut else 100
        p.add(Path(f"{i}.png"), Assignment((100, 100), (round(w), 100), (0, 0, 100, 100), 1.0, 0.0))
    lines = p.crop_lines()
    assert (
        lines[0]
        == "crop: median 10%, 90% of images 50% or less, largest 50% (4.png); 2 of 5 images uncropped"
    )


SMALL = ["--resolution", "256", "--step", "32", "--min-side", "128"]


def _bucket(cli_runner, data: Path, out: Path, *extra: str) -> str:
    res = cli_runner.invoke(cli, ["bucket", str(data), "-o", str(out), "--token", "tok", *extra])
    assert res.exit_code == 0, res.output
    return res.output


def _placed(out: Path) -> Counter:
    """Images per bucket ("WxH") as buckets.json lists them."""
    rows = json.loads((out / "buckets.json").read_text())["images"]
    return Counter(f"{r['bucket'][0]}x{r['bucket'][1]}" for r in rows)


def _sheets(out: Path) -> set[str]:
    return {p.stem for p in (out / "preview").iterdir()}


def test_bucket_writes_one_sheet_per_bucket_and_the_report_links_them(
    sample_dataset: Path, tmp_path, cli_runner
):
    out = tmp_path / "out"
    output = _bucket(cli_runner, sample_dataset, out, *SMALL)
    assert "\ncrop: median " in output and "bucket preview: one sheet per bucket in preview/" in output
    placed = _placed(out)
    assert _sheets(out) == set(placed)
    for sheet in (out / "preview").iterdir():
        im = Image.open(sheet)
        assert im.format == "PNG" and im.width >= CELL and im.height >= TITLE_H + CELL
    _bucket(cli_runner, sample_dataset, out)  # SDXL defaults: the sheets of unused buckets go
    assert _sheets(out) == set(_placed(out)) != set(placed)
    undo = cli_runner.invoke(cli, ["undo", str(out)])
    assert undo.exit_code == 0 and _sheets(out) == set(placed)

    # the report uses the settings the dataset was bucketed with, and links the sheets
    _bucket(cli_runner, sample_dataset, out, *SMALL)
    report = tmp_path / "r.html"
    res = run_report(sample_dataset, ReportOptions(out=report))
    summary = res.details["summary"]
    assert summary["bucketing"]["source"] == "bucketed" and summary["bucketing"]["resolution"] == [256, 256]
    assert dict(summary["buckets"]) == placed  # the buckets bucket assigned, not 1024x1024 ones
    root = ET.fromstring(report.read_text().split("\n", 1)[1])
    links = [a.get("href") for a in root.iter("a")]
    assert sorted(links) == sorted(f"out/preview/{b}.png" for b in placed)
    assert all((report.parent / link).is_file() for link in links)
    assert "as bucketed into " + str(out) in report.read_text()
    defaults = run_report(sample_dataset, ReportOptions(out=report, settings=BucketSettings()))
    assert defaults.details["summary"]["bucketing"]["source"] == "options"


def test_report_labels_mask_overlays_and_flags_monochrome_tags(sample_dataset: Path, tmp_path):
    from sdprep.prep.clean import CleanOptions, run_clean
    from sdprep.prep.rules import CleanRules

    run_clean(sample_dataset, CleanOptions(CleanRules(trigger=("tok",))))  # measures the colour labels
    (sample_dataset / "a_landscape.txt").write_text("tok, monochrome, smile\n")  # a colour image
    caption = (sample_dataset / "d_greyscale.txt").read_text().replace(", greyscale", "")
    (sample_dataset / "d_greyscale.txt").write_text(caption.replace(", monochrome", ""))
    (sample_dataset / "masks").mkdir()
    size = Image.open(sample_dataset / "b_portrait.png").size
    Image.new("L", size, 255).save(sample_dataset / "masks" / "b_portrait.png")
    report = tmp_path / "r.html"
    res = run_report(sample_dataset, ReportOptions(out=report))
    text = html.unescape(report.read_text())
    assert 'caption says "monochrome" but the colour check found colour' in text
    assert "the colour check found greyscale but the caption does not say so" in text
    assert res.details["summary"]["monochrome_disagreeing_captions"] == 2
    root = ET.fromstring(report.read_text().split("\n", 1)[1])
    card = next(
        d
        for d in root.iter("div")
        if d.get("class", "").startswith("card") and d.find("b").text == "b_portrait.png"
    )
    imgs = card.findall("img")
    assert len(imgs) == 2 and imgs[1].get("alt") == "mask of b_portrait.png"
    label = list(card)[list(card).index(imgs[1]) + 1]
    assert label.get("class") == "lbl" and label.text.startswith("mask: red = ignored")


def test_mono_disagreement():
    assert (
        mono_disagreement("a, monochrome", "colour")
        == 'caption says "monochrome" but the colour check found colour'
    )
    assert mono_disagreement("a, monochrome", "greyscale") is None  # boorus tag greyscale images both ways
    assert (
        mono_disagreement("a, b", "monochrome")
        == "the colour check found monochrome but the caption does not say so"
    )
    assert mono_disagreement("a, monochrome", None) is None  # not measured
