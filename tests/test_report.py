"""sdprep report: well-formed self-contained HTML listing every image; JSON for scripts."""

import json
import shutil
import xml.etree.ElementTree as ET

import pytest
from PIL import Image

from sdprep.cli import cli
from sdprep.errors import DatasetError
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


def test_json_is_written_as_json_dumps_would(sample_dataset, tmp_path):
    """The rows are streamed through a temporary file; the document is byte for byte json.dumps's."""
    shutil.copy(sample_dataset / "h_wide.jpg", sample_dataset / "h wide\ncopy é.jpg")
    (sample_dataset / "broken.png").write_bytes(b"")
    out = tmp_path / "r.json"
    res = run_report(sample_dataset, ReportOptions(out=out, format="json"))
    text = out.read_text(encoding="utf-8")
    doc = json.loads(text)
    assert text == json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
    images = sorted(str(p) for p in sample_dataset.iterdir() if p.suffix in (".png", ".jpg", ".webp"))
    assert [r["path"] for r in doc["images"]] == images
    assert doc["summary"] == json.loads(json.dumps(res.details["summary"]))
    names = [[p.rsplit("/", 1)[1] for p in g] for g in doc["summary"]["duplicates"]]
    assert names == [["h wide\ncopy é.jpg", "h_wide.jpg"]]
    assert [f.path.name for f in res.failed] == ["broken.png"]
    again = run_report(sample_dataset, ReportOptions(out=out, format="json"))
    assert (again.changed, again.skipped) == (0, 1)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no images found in"):  # an error, not empty tables
        run_report(empty, ReportOptions(out=out, format="json"))
    assert out.read_text(encoding="utf-8") == text  # the report of the dataset is left as it was


def test_html_problem_table_and_many_unreadable_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (1024, 1024), "red").save(data / "good.png")
    (data / "good.txt").write_text("1girl\n")
    res = run_report(data, ReportOptions(out=tmp_path / "r.html"))
    root = _parse_html((tmp_path / "r.html").read_text())
    tables = {
        div.find("h2").text: div.find("table") for div in root.iter("div") if div.find("h2") is not None
    }
    rows = [[td.text for td in tr.iter("td")] for tr in tables["Images with problems"].iter("tr")]
    assert rows[1:] == [["none", None]] and res.ok

    for i in range(53):
        (data / f"bad{i:02d}.png").write_bytes(b"not an image")
    res = run_report(data, ReportOptions(out=tmp_path / "r.html"))
    root = _parse_html((tmp_path / "r.html").read_text())
    tables = {
        div.find("h2").text: div.find("table") for div in root.iter("div") if div.find("h2") is not None
    }
    rows = [[td.text for td in tr.iter("td")] for tr in tables["Images with problems"].iter("tr")]
    assert [r[0] for r in rows[1:]] == [f"bad{i:02d}.png" for i in range(53)]
    assert len(res.failed) == 53
    assert res.notes[-1] == "  ... and 3 more unreadable files (see the report)"
    assert sum(n.startswith("  unreadable: ") for n in res.notes) == 50
