"""Two images with one stem (`a.png` + `a.jpg`) share `a.txt` and `masks/a.png`, and kohya would
train both with one caption: every stage that reads or writes by stem reports both, per file, and
leaves their shared files alone (one function: `iter_items(..., on_clash=...)`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from sdprep.dataset import discover, iter_items

REASON = (
    'a.jpg and a.png share the stem "a", so they would share one caption file and one mask; '
    "rename one of them (sdprep rename)"
)


def make(root: Path) -> Path:
    root.mkdir()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(root / "a.png")
    Image.new("RGB", (64, 48), (10, 10, 200)).save(root / "a.jpg")
    Image.new("RGB", (64, 48), (10, 200, 10)).save(root / "b.png")
    for stem in "ab":
        (root / f"{stem}.txt").write_text("1girl, smile\n")
    return root


def test_iter_items_reports_clashes_per_folder(tmp_path: Path) -> None:
    root = make(tmp_path / "data")
    sub = root / "sub"
    sub.mkdir()
    Image.new("RGB", (8, 8)).save(sub / "a.png")  # same stem, another folder: no clash
    Image.new("RGB", (8, 8)).save(sub / "a.b.png")  # sorts between a.jpg-like names: stem "a.b"
    seen: list[tuple[str, str]] = []
    names = [
        i.path.relative_to(root).as_posix()
        for i in iter_items(root, True, lambda p, r: seen.append((p.name, r)))
    ]
    assert names == ["b.png", "sub/a.b.png", "sub/a.png"]
    assert seen == [("a.jpg", REASON), ("a.png", REASON)]
    assert [i.name for i in discover(root)] == ["a.jpg", "a.png", "b.png"]  # without on_clash: all


def _tag(root: Path, tiny_wd14: Path):
    from sdprep.prep.tag import TagOptions, run_tag

    return run_tag(root, TagOptions(model=str(tiny_wd14)))


def _clean(root: Path, tiny_wd14: Path):
    from sdprep.prep.clean import CleanOptions, run_clean
    from sdprep.prep.rules import CleanRules

    return run_clean(root, CleanOptions(rules=CleanRules(trigger=("tok",))))


def _bucket(root: Path, tiny_wd14: Path):
    from sdprep.prep.bucket import BucketOptions, run_bucket

    return run_bucket(root, BucketOptions(out=root.parent / "out", token="tok", repeats=1))


def _mask(root: Path, tiny_wd14: Path):
    from sdprep.prep.mask import MaskOptions, run_mask

    return run_mask(root, MaskOptions("full"))


@pytest.mark.parametrize("stage", [_tag, _clean, _bucket, _mask], ids=["tag", "clean", "bucket", "mask"])
def test_stage_reports_both_images_and_leaves_the_shared_caption(
    stage, tmp_path: Path, tiny_wd14: Path
) -> None:
    root = make(tmp_path / "data")
    result = stage(root, tiny_wd14)
    assert sorted((f.path.name, f.reason) for f in result.failed) == [("a.jpg", REASON), ("a.png", REASON)]
    assert result.changed == 1  # b.png only, never "2 changed" on one a.txt
    assert (root / "a.txt").read_text() == "1girl, smile\n"
    assert not (root / "masks" / "a.png").exists()
    if stage is _bucket:
        placed = sorted(p.name for p in (tmp_path / "out" / "img" / "1_tok").iterdir())
        assert placed == ["b.png", "b.txt"]
