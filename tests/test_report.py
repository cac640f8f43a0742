"""sdprep report: well-formed self-contained HTML listing every image; JSON for scripts."""

import json
import shutil
import xml.etree.ElementTree as ET

from PIL import Image

from sdprep.cli import cli
from sdprep.prep.report import ReportOptions, find_duplicates, run_report


def _parse_html(text: str) -> ET.Element:
    assert text.startswith("<!DOCTYPE html>\n")
    return ET.fromstring(text.split("\n", 1)[1])  # XHTML-compatible markup: parses as XML


def test_html_is_well_formed_and_lists_every_image(sample_dataset, cli_runner):
    (sample_dataset / "masks").mkdir()
    Image.new("L", Image.open(sample_dataset / "b_portrait.png").size, 255).save(
        sample_dataset / "masks/b_portrait.png"
    )
    (sample_dataset / "b_portrait.txt").write_text("nazuna, 1girl, <script>alert(1)</script>\n")
    shutil.copy(sample_dataset / "h_wide.jpg", sample_dataset / "h_wide_copy.jpg")
    (sample_dataset / "broken.png").write_bytes(b"")
    res = cli_runner.invoke(cli, ["report", str(sample_dataset)])
    assert res.exit_code == 1, res.output  # the report is written, and the empty file is a failure
    assert "broken.png" in res.output
    text = (sample_dataset / "report.html").read_text()
    root = _parse_html(text)
    names = {el.text for el in root.iter("b")}
    expected = {p.name for p in sample_dataset.iterdir() if p.suffix in (".png", ".jpg", ".webp")}
    assert names == expected and len(expected) == 10
    imgs = [el.get("src") for el in root.iter("img")]
    assert all(src.startswith("data:image/jpeg;base64,") for src in imgs)  # self-contained
    assert len(imgs) == 9 + 1  # 9 decodable images + 1 mask overlay
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "h_wide.jpg, h_wide_copy.jpg" in text  # duplicate group
    assert "empty file (0 bytes)" in text and "no caption file" in text


def test_json_format(sample_dataset, tmp_path):
    out = tmp_path / "r.json"
    res = run_report(sample_dataset, ReportOptions(out=out, format="json"))
    doc = json.loads(out.read_text())
    assert len(doc["images"]) == 8 and doc["summary"]["images"] == 8
    sizes = {r["path"].rsplit("/", 1)[1]: tuple(r["size"]) for r in doc["images"]}
    assert sizes["g_tiny.png"] == (200, 150)
    tiny = next(r for r in doc["images"] if r["path"].endswith("g_tiny.png"))
    assert any("small for SDXL" in p for p in tiny["problems"])
    assert res.details["summary"]["buckets"]


def test_find_duplicates_groups_by_hamming_distance():
    hashes = [(0, 0b0), (1, 0b111), (2, 0b1), (3, (1 << 63) | 0xFFFF)]
    assert find_duplicates(hashes, 3) == [[0, 1, 2]]
    assert find_duplicates(hashes, 0) == []
