import hashlib
import os
from pathlib import Path

import pytest
from PIL import Image

from sdprep import fileops
from sdprep.cli import cli
from sdprep.errors import ConfigError, DatasetError, JournalError
from sdprep.prep.rename import RenameOptions, check_pattern, natural_key, normalise_extension, run_rename
from sdprep.progress import RecordingReporter


def tree(root: Path) -> dict[str, str]:
    """Every file outside .sdprep/ with a digest of its bytes (undo must restore it exactly)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".sdprep" not in p.parts
    }


def add_mask(image: Path, folder: str = "masks") -> Path:
    mask = image.parent / folder / (image.stem + ".png")
    mask.parent.mkdir(exist_ok=True)
    with Image.open(image) as im:
        Image.new("L", im.size, 255).save(mask)
    return mask


def test_pure_helpers():
    assert normalise_extension(".JPEG") == ".jpg"
    assert normalise_extension(".PNG") == ".png"
    assert sorted(["10.png", "2.png", "1.png"], key=natural_key) == ["1.png", "2.png", "10.png"]
    check_pattern("{token}_{n:04d}")
    with pytest.raises(ConfigError, match=r"unknown field \{num\}"):
        check_pattern("{num:03d}")
    for lookup in ("{n.__class__}", "{n[0]}", "{stem.__len__}"):  # format-string look-ups
        with pytest.raises(ConfigError, match="unknown field"):
            check_pattern(lookup + "{n}")
    with pytest.raises(ConfigError, match=r"has no \{n\}"):
        check_pattern("{token}")


def test_rename_moves_companions_and_undo_restores(sample_dataset):
    (sample_dataset / "a_landscape.txt").write_text("1girl, sky\n")
    add_mask(sample_dataset / "b_portrait.png")
    add_mask(sample_dataset / "b_portrait.png", "masks_face")  # `sdprep mask --out masks_face`
    before = tree(sample_dataset)
    rec = RecordingReporter()
    result = run_rename(sample_dataset, RenameOptions(), report=rec)
    assert result.changed == 8 and not result.failed
    assert rec.done == rec.total > 0
    names = sorted(p.name for p in sample_dataset.iterdir() if p.is_file())
    assert names[:4] == ["001.jpg", "001.jpg.json", "001.txt", "002.png"]
    assert (sample_dataset / "001.txt").read_text() == "1girl, sky\n"
    assert (sample_dataset / "masks" / "002.png").exists()
    assert not (sample_dataset / "masks" / "b_portrait.png").exists()
    assert sorted(p.name for p in (sample_dataset / "masks_face").iterdir()) == ["002.png"]
    # the sidecar moved with its image: b_portrait's metadata is now 002.png.json
    assert '"id": 1002' in (sample_dataset / "002.png.json").read_text()
    again = run_rename(sample_dataset, RenameOptions())
    assert again.changed == 0 and again.skipped == 8
    fileops.undo(sample_dataset)
    assert tree(sample_dataset) == before


def test_pattern_token_and_jpeg_extension(tmp_path):
    data = tmp_path / "10_nazuna"
    data.mkdir()
    for name in ["x.JPEG", "y.PNG", "z.jpeg"]:
        Image.new("RGB", (8, 8)).save(data / name, "JPEG" if "jp" in name.lower() else "PNG")
    (data / "x.txt").write_text("x\n")
    result = run_rename(data, RenameOptions(pattern="{token}_{n:04d}"))
    assert result.changed == 3
    assert sorted(p.name for p in data.iterdir() if p.is_file()) == [
        "nazuna_0001.jpg",
        "nazuna_0001.txt",
        "nazuna_0002.png",
        "nazuna_0003.jpg",
    ]


def test_two_phase_swaps_names_without_overwriting(tmp_path):
    # 1.png must become 001.png... and the existing names overlap the targets in a cycle
    for i, colour in enumerate(["red", "green", "blue"], start=1):
        Image.new("RGB", (4, 4), colour).save(tmp_path / f"{i:03d}.PNG")
        (tmp_path / f"{i:03d}.txt").write_text(colour)
    result = run_rename(tmp_path, RenameOptions(start=2))
    assert result.changed == 3
    assert (tmp_path / "002.txt").read_text() == "red"
    assert (tmp_path / "004.txt").read_text() == "blue"
    assert Image.open(tmp_path / "004.png").getpixel((0, 0)) == (0, 0, 255)
    assert not list(tmp_path.glob(".sdprep-rename-*"))


def test_conflict_with_an_orphan_caption_changes_nothing(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("mine")
    (tmp_path / "001.txt").write_text("orphan")
    before = tree(tmp_path)
    with pytest.raises(DatasetError, match="001.txt exists and is not part of the rename"):
        run_rename(tmp_path, RenameOptions())
    assert tree(tmp_path) == before


def test_dry_run_and_cli(sample_dataset, cli_runner):
    before = tree(sample_dataset)
    res = cli_runner.invoke(cli, ["rename", str(sample_dataset), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "a_landscape.jpg -> 001.jpg" in res.output
    assert "h_wide.jpg -> 008.jpg" in res.output
    assert "rename: 0 changed, 0 skipped, 0 failed" in res.output
    assert tree(sample_dataset) == before
    res = cli_runner.invoke(cli, ["-q", "rename", str(sample_dataset)])
    assert res.exit_code == 0 and res.output.startswith("rename: 8 changed, 0 skipped, 0 failed")
    res = cli_runner.invoke(cli, ["rename", str(sample_dataset), "--pattern", "{nope}"])
    assert res.exit_code == 1
    assert "Error: --pattern '{nope}' uses unknown field {nope}" in res.output


def test_recursive_numbers_each_folder(tmp_path):
    for sub in ["1_a", "2_b"]:
        (tmp_path / sub).mkdir()
        for name in ["q.png", "p.png"]:
            Image.new("RGB", (4, 4)).save(tmp_path / sub / name)
    result = run_rename(tmp_path, RenameOptions(recursive=True, pattern="{token}{n}"))
    assert result.changed == 4
    assert sorted(p.name for p in (tmp_path / "2_b").iterdir()) == ["b1.png", "b2.png"]


def test_move_many_refuses_before_changing_anything(tmp_path):
    for name in ["a", "b", "c"]:
        (tmp_path / name).write_text(name)
    with fileops.Journal(tmp_path).begin("t") as op:
        with pytest.raises(JournalError, match="over existing"):
            op.move_many([(tmp_path / "a", tmp_path / "x"), (tmp_path / "b", tmp_path / "c")])
        with pytest.raises(JournalError, match="over existing"):
            op.move_many([(tmp_path / "a", tmp_path / "x"), (tmp_path / "b", tmp_path / "x")])
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["a", "b", "c"]


def test_rename_interrupted_in_phase_two_is_undoable(sample_dataset, monkeypatch):
    before = tree(sample_dataset)
    real_rename, calls = os.rename, []

    def flaky(src, dst):
        calls.append(src)
        if len(calls) == 20:  # phase 1 moved all 16 files (8 images, 8 sidecars); die in phase 2
            raise OSError("disk went away")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky)
    with pytest.raises(OSError, match="disk went away"):
        run_rename(sample_dataset, RenameOptions())
    monkeypatch.setattr(os, "rename", real_rename)
    assert "(interrupted)" in fileops.Journal(sample_dataset).describe(
        fileops.Journal(sample_dataset).operations()[-1]
    )
    fileops.undo(sample_dataset)
    assert tree(sample_dataset) == before


@pytest.mark.parametrize("pattern", ["{n:040000000000d}", "{n:01000000000d}", "{n:.999999999}", "{n:x>201}"])
def test_pattern_wider_than_a_file_name_is_refused_before_formatting(pattern: str) -> None:
    with pytest.raises(ConfigError, match="wider than a file name"):
        check_pattern(pattern)


@pytest.mark.parametrize("pattern", ["{n:{token}}", "{n:04q?}"])
def test_pattern_with_a_nested_or_broken_spec_is_refused(pattern: str) -> None:
    with pytest.raises(ConfigError, match="invalid format spec"):
        check_pattern(pattern)


@pytest.mark.parametrize("pattern", ["{n:04d}", "{token}_{n:>6}", "{n:,}", "{n:+05d}", "{n:x^9}", "{n}"])
def test_ordinary_format_specs_pass(pattern: str) -> None:
    check_pattern(pattern)


def test_rename_cli_refuses_a_huge_width_without_touching_files(cli_runner, sample_dataset) -> None:
    before = sorted(p.name for p in sample_dataset.iterdir())
    res = cli_runner.invoke(cli, ["rename", str(sample_dataset), "--pattern", "{n:040000000000d}"])
    assert res.exit_code == 1
    assert "is wider than a file name (200 bytes at most)" in res.output
    assert sorted(p.name for p in sample_dataset.iterdir()) == before
