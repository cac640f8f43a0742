"""sdprep bucket streams its work a batch at a time: outputs, re-runs, undo and summaries stay exact.

The memory figures themselves are in benchmarks/bench_load.py; here WRITE_BATCH is made tiny so
every property is checked across many batch boundaries.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from sdprep import fileops
from sdprep.prep import bucket
from sdprep.prep.bucket import BucketOptions, run_bucket


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    monkeypatch.setattr(bucket, "WRITE_BATCH", 4)


def make_data(root: Path, n: int = 11) -> Path:
    """n images (one unreadable, one too small to bucket), unicode names and captions, one mask late."""
    (root / "masks").mkdir(parents=True)
    for i in range(n):
        name = f"é {i:02d}"
        Image.new("RGB", (512 + 64 * (i % 3), 512), (i * 20, 0, 0)).save(root / f"{name}.png")
        if i % 2:
            (root / f"{name}.txt").write_text(f'tok, "quoted" ✓, tag{i}\n', encoding="utf-8")
    Image.new("L", (512 + 64 * (9 % 3), 512), 128).save(root / "masks" / "é 09.png")  # in the 3rd batch
    (root / "broken.png").write_bytes(b"not an image")
    Image.new("RGB", (16, 16)).save(root / "speck.png")
    return root


def test_streamed_json_is_exactly_what_json_dumps_writes(tmp_path):
    data = make_data(tmp_path / "data")
    out = tmp_path / "out"
    opts = BucketOptions(out=out, token="tok", repeats=2, settings=bucket.BucketSettings(no_upscale=True))
    res = run_bucket(data, opts)
    assert res.changed == 11 and sorted(f.path.name for f in res.failed) == ["broken.png", "speck.png"]

    raw = (out / "metadata.json").read_text(encoding="utf-8")
    meta = json.loads(raw)
    assert raw == json.dumps(meta, indent=1, ensure_ascii=False) + "\n"
    assert list(meta) == [f"img/2_tok/é {i:02d}.png" for i in range(11)]
    assert meta["img/2_tok/é 01.png"]["caption"] == 'tok, "quoted" ✓, tag1'
    assert meta["img/2_tok/é 02.png"]["caption"] == "tok"

    raw = (out / "buckets.json").read_text(encoding="utf-8")
    preview = json.loads(raw)
    assert raw == json.dumps(preview, indent=1) + "\n"
    assert [r["dest"] for r in preview["images"]] == [str(out / key) for key in meta]
    assert [Path(d["image"]).name for d in preview["dropped"]] == ["broken.png", "speck.png"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_one_late_mask_gives_every_image_of_its_concept_a_mask(tmp_path):
    """The mask of the 10th image decides, before the first batch is written, that all get masks."""
    data = make_data(tmp_path / "data", n=25)
    out = tmp_path / "out"
    res = run_bucket(data, BucketOptions(out=out, token="tok", mask_form="conditioning"))
    masks = out / "img" / "1_tok" / "masks"
    placed = sorted(p.name for p in masks.parent.glob("*.png"))
    assert placed == ["speck.png"] + [f"é {i:02d}.png" for i in range(25)]  # speck: upscaled
    assert sorted(p.name for p in masks.iterdir()) == placed
    assert Image.open(masks / "é 09.png").getextrema() == (128, 128)
    assert Image.open(masks / "é 00.png").getextrema() == (255, 255)
    assert "conditioning_data_dir" in (out / "dataset.toml").read_text()
    # the summary names 20 images and counts the rest, never one line per image
    first = ["speck.png"] + [f"é {i:02d}.png" for i in (*range(9), *range(10, 20))]
    assert [n for n in res.notes if "no mask" in n] == [
        "  note: 25 images have no mask; wrote full-loss (white) masks: "
        + ", ".join(first)
        + ", ... and 5 more"
    ]


def test_rerun_leaves_outputs_alone_and_undo_restores_them(tmp_path):
    data = make_data(tmp_path / "data")
    out = tmp_path / "out"
    opts = BucketOptions(out=out, token="tok", repeats=2)
    run_bucket(data, opts)
    first = {name: (out / name).read_bytes() for name in ("metadata.json", "buckets.json", "dataset.toml")}
    stamps = {name: (out / name).stat().st_mtime_ns for name in first}

    again = run_bucket(data, opts)
    assert again.changed == 0 and again.skipped == 12
    assert {name: (out / name).stat().st_mtime_ns for name in first} == stamps
    assert len(fileops.Journal(out).operations()) == 1  # the re-run recorded nothing

    (data / "é 01.txt").write_text("tok, changed\n", encoding="utf-8")
    third = run_bucket(data, opts)
    assert third.changed == 1
    assert "tok, changed" in (out / "metadata.json").read_text(encoding="utf-8")
    fileops.undo(out)
    assert {name: (out / name).read_bytes() for name in first} == first
    fileops.undo(out)
    assert not (out / "metadata.json").exists() and not (out / "buckets.json").exists()
    assert not any(p.is_file() for p in (out / "img").rglob("*"))


def test_a_crash_mid_run_leaves_no_temp_file_and_undo_cleans_up(tmp_path, monkeypatch):
    data = make_data(tmp_path / "data")
    out = tmp_path / "out"
    calls = []
    real = bucket._write_files

    def crash_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(bucket, "_write_files", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run_bucket(data, BucketOptions(out=out, token="tok"))
    assert sorted(p.name for p in out.iterdir()) == [".sdprep", "img"]  # no metadata, no temp files
    assert len(list((out / "img" / "1_tok").glob("*.png"))) == 7  # two batches of 4, broken.png in one
    fileops.undo(out)
    assert not any(p.is_file() for p in (out / "img").rglob("*"))
