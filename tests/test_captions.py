"""`sdprep captions ...`: tag-aware batch edits over several folders, dry-run diffs, undo, stats, find."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from sdprep import fileops
from sdprep.cli import cli
from sdprep.errors import ConfigError
from sdprep.prep.captions import CaptionsOptions, check_roots, make_edit, run_edit

IMAGE_CAPTIONS = {
    "a/1": "blue eyes, light blue eyes, smile\n",
    "a/2": "Blue_Eyes,smile,smile",
    "a/3": None,  # an image without a caption
    "b/1": "solo, blue eyes\n",
}


@pytest.fixture
def folders(tmp_path: Path, monkeypatch) -> Path:
    """Two caption folders: a/ (images 1-3) and b/ (image 1, an orphan caption, non-caption texts)."""
    for stem, caption in IMAGE_CAPTIONS.items():
        image = tmp_path / f"{stem}.png"
        image.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(image)
        if caption is not None:
            image.with_suffix(".txt").write_text(caption)
    (tmp_path / "b" / "orphan.txt").write_text("orphan, blue eyes\n")
    (tmp_path / "b" / "README.txt").write_text("blue eyes, read me\n")
    (tmp_path / "b" / "notes2.txt").write_text("blue eyes\nsecond line\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def text(path: str) -> str:
    return Path(path).read_text()


def test_remove_is_tag_aware_over_several_folders_and_undo_per_folder(cli_runner, folders: Path):
    res = cli_runner.invoke(cli, ["captions", "remove", "blue eyes", "a", "b"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == [
        "captions: 4 changed, 0 skipped, 0 failed",
        "  skipped 1: no caption file",
        "  skipped 1: not a caption (by name)",
        "  skipped 1: not a caption (several lines)",
        "undo: sdprep undo a && sdprep undo b",
    ]
    assert text("a/1.txt") == "light blue eyes, smile\n"
    assert text("a/2.txt") == "smile, smile\n"
    assert text("b/1.txt") == "solo\n"
    assert text("b/orphan.txt") == "orphan\n"
    assert text("b/README.txt") == "blue eyes, read me\n"  # not a caption: untouched
    assert text("b/notes2.txt") == "blue eyes\nsecond line\n"
    assert not Path("a/3.txt").exists()
    assert cli_runner.invoke(cli, ["undo", "b"]).exit_code == 0
    assert text("b/1.txt") == "solo, blue eyes\n" and text("b/orphan.txt") == "orphan, blue eyes\n"
    assert text("a/1.txt") == "light blue eyes, smile\n"  # a/ has its own journal
    assert cli_runner.invoke(cli, ["undo", "a"]).exit_code == 0
    assert text("a/2.txt") == "Blue_Eyes,smile,smile"  # byte for byte, no newline added


def test_dry_run_diff_and_nothing_written(cli_runner, folders: Path):
    res = cli_runner.invoke(cli, ["captions", "remove", "blue eyes", "a", "--dry-run"])
    assert res.exit_code == 0
    assert res.output == (
        "--- a/1.txt\n+++ a/1.txt\n@@ -1 +1 @@\n"
        "-blue eyes, light blue eyes, smile\n+light blue eyes, smile\n"
        "--- a/2.txt\n+++ a/2.txt\n@@ -1 +1 @@\n"
        "-Blue_Eyes,smile,smile\n\\ No newline at end of file\n+smile, smile\n"
        "captions (dry run): 2 changed, 0 skipped, 0 failed\n"
        "  skipped 1: no caption file\n"
    )
    assert text("a/1.txt") == IMAGE_CAPTIONS["a/1"]
    assert not (folders / "a" / ".sdprep").exists()


def test_no_orphans(cli_runner, folders: Path):
    res = cli_runner.invoke(cli, ["captions", "remove", "blue eyes", "b", "--no-orphans"])
    assert res.output.startswith("captions: 1 changed, 0 skipped, 0 failed\n")
    assert text("b/orphan.txt") == "orphan, blue eyes\n"


def test_replace_modes(cli_runner, folders: Path):
    assert (
        cli_runner.invoke(cli, ["captions", "replace", "blue eyes", "aqua eyes, sparkle", "a"]).exit_code == 0
    )
    assert text("a/1.txt") == "aqua eyes, sparkle, light blue eyes, smile\n"
    assert text("a/2.txt") == "aqua eyes, sparkle, smile\n"  # replace also dedupes the result
    assert cli_runner.invoke(cli, ["captions", "replace", "blue", "green", "a", "--substring"]).exit_code == 0
    assert text("a/1.txt") == "aqua eyes, sparkle, light green eyes, smile\n"
    res = cli_runner.invoke(cli, ["captions", "replace", r"(\w+) eyes", r"\1 pupils", "a", "--regex"])
    assert res.exit_code == 0
    assert text("a/1.txt") == "aqua pupils, sparkle, light green pupils, smile\n"
    bad = cli_runner.invoke(cli, ["captions", "replace", "(", "x", "a", "--regex"])
    assert bad.exit_code == 1
    assert (
        bad.output
        == 'Error: invalid regular expression "(": missing ), unterminated subpattern at position 0\n'
    )


def test_prepend_append_move_tags_and_create_no_files(cli_runner, folders: Path):
    assert cli_runner.invoke(cli, ["captions", "prepend", "smile", "tok", "a"]).exit_code == 0
    assert text("a/1.txt") == "smile, tok, blue eyes, light blue eyes\n"
    assert not Path("a/3.txt").exists()
    assert cli_runner.invoke(cli, ["captions", "append", "blue eyes", "a"]).exit_code == 0
    assert text("a/1.txt") == "smile, tok, light blue eyes, blue eyes\n"
    res = cli_runner.invoke(cli, ["captions", "append", "blue eyes", "a"])
    assert res.output.startswith("captions: 0 changed, 2 skipped, 0 failed\n")


def test_dedupe_and_sort(cli_runner, folders: Path):
    assert cli_runner.invoke(cli, ["captions", "dedupe", "a"]).exit_code == 0
    assert text("a/2.txt") == "Blue_Eyes, smile\n"
    assert cli_runner.invoke(cli, ["captions", "sort", "a", "--keep-first", "1"]).exit_code == 0
    assert text("a/1.txt") == "blue eyes, light blue eyes, smile\n"
    assert cli_runner.invoke(cli, ["captions", "sort", "a"]).exit_code == 0
    assert text("a/2.txt") == "Blue_Eyes, smile\n"


def test_sort_by_score_uses_sidecars(cli_runner, folders: Path):
    scores = {"smile": 0.9, "light_blue_eyes": 0.5, "blue_eyes": 0.7}
    Path("a/1.png.json").write_text(json.dumps({"sdprep": {"wd14": {"scores": scores, "categories": {}}}}))
    assert cli_runner.invoke(cli, ["captions", "sort", "a", "--by", "score"]).exit_code == 0
    assert text("a/1.txt") == "smile, blue eyes, light blue eyes\n"


def test_latin1_caption_reported_not_destroyed(cli_runner, folders: Path):
    raw = "caf\xe9, blue eyes\n".encode("latin-1")
    Path("a/1.txt").write_bytes(raw)
    res = cli_runner.invoke(cli, ["captions", "remove", "blue eyes", "a"])
    assert res.exit_code == 1
    assert res.output.splitlines() == [
        "captions: 1 changed, 0 skipped, 1 failed",
        "  skipped 1: no caption file",
        "undo: sdprep undo a",
        "  failed: a/1.txt: not UTF-8 text (byte 3)",
    ]
    assert Path("a/1.txt").read_bytes() == raw
    stats = cli_runner.invoke(cli, ["captions", "stats", "a"])
    assert stats.exit_code == 1 and "  failed: a/1.txt: not UTF-8 text (byte 3)" in stats.output


def test_stats(cli_runner, folders: Path):
    res = cli_runner.invoke(cli, ["captions", "stats", "a", "b", "--top", "3"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == [
        "captions: 4 (1 without an image, 0 empty), 2.5 tags each, 5 distinct tags",
        "images: 4, 1 without a caption",
        "top 3 tags:",
        "        4  100.0%  blue eyes",
        "        2   50.0%  smile",
        "        1   25.0%  light blue eyes",
        "  skipped 1: not a caption (by name)",
        "  skipped 1: not a caption (several lines)",
    ]


def test_find(cli_runner, folders: Path):
    res = cli_runner.invoke(cli, ["captions", "find", "blue eyes", "a", "b"])
    assert res.exit_code == 0
    assert res.output == "a/1.png\na/2.png\nb/1.png\nb/orphan.txt\nfound in 4 of 4 captions\n"
    res = cli_runner.invoke(cli, ["captions", "find", "light*", "a", "b"])
    assert res.output == "a/1.png\nfound in 1 of 4 captions\n"


def test_recursive_and_nested_roots(cli_runner, folders: Path):
    (folders / "a" / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(folders / "a" / "sub" / "x.png")
    (folders / "a" / "sub" / "x.txt").write_text("blue eyes\n")
    res = cli_runner.invoke(cli, ["captions", "remove", "blue eyes", "a", "a/sub", "-r"])
    assert res.exit_code == 1
    assert res.output == "Error: a/sub is inside a and --recursive is on\nHint: pass only a\n"
    assert cli_runner.invoke(cli, ["captions", "remove", "blue eyes", ".", "-r"]).exit_code == 0
    assert text("a/sub/x.txt") == ""  # every tag removed: an empty caption
    assert fileops.Journal(folders).operations()  # one journal at the root given


def test_tags_and_folders_split(cli_runner, folders: Path):
    res = cli_runner.invoke(cli, ["captions", "remove", "a"])
    assert res.exit_code == 2 and "give at least one tag before the folders (or use -t TAG)" in res.output
    res = cli_runner.invoke(cli, ["captions", "remove", "smile", "nosuchdir"])
    assert res.exit_code == 2 and "give at least one existing folder after the tags" in res.output
    # a tag named like a folder: -t makes every argument a folder
    Path("a/1.txt").write_text("b, smile\n")
    assert cli_runner.invoke(cli, ["captions", "remove", "-t", "b", "a"]).exit_code == 0
    assert text("a/1.txt") == "smile\n"


def test_library_api_and_root_checks(folders: Path):
    edit = make_edit("remove", ("re:^blue",))
    result = run_edit([folders / "a"], edit, CaptionsOptions(dry_run=True))
    assert result.changed == 2 and text("a/1.txt") == IMAGE_CAPTIONS["a/1"]
    with pytest.raises(ConfigError, match="is given twice"):
        check_roots([folders / "a", folders / "a"], False)
    with pytest.raises(ConfigError, match='unknown caption action "shuffle"'):
        make_edit("shuffle")


def test_caption_files_order_shared_stems_and_orphans(tmp_path: Path):
    """Listed by caption name; of images sharing a stem the first by name owns `<stem>.txt`."""
    from collections import Counter

    from sdprep.prep.captions import iter_caption_files

    for name in ["a.png", "a.jpg", "a.q.png", "a-b.png", "c.png", "README.txt", ".hidden.png", "x."]:
        (tmp_path / name).write_bytes(b"")
    for name in ["a.txt", "a.TXT", "b.txt", "f.tar.gz.txt", "notes.TXT"]:
        (tmp_path / name).write_text("t\n")
    (tmp_path / "d.txt").mkdir()
    (tmp_path / "l.png").symlink_to(tmp_path / "d.txt")
    skipped: Counter = Counter()
    files = iter_caption_files(tmp_path, False, True, skipped)
    listed = [(cf.path.name, cf.image and cf.image.name) for cf in files]
    assert listed == [
        ("a-b.txt", "a-b.png"),
        ("a.q.txt", "a.q.png"),
        ("a.txt", "a.jpg"),  # a.png is listed once, as the caption is one file
        ("b.txt", None),
        ("c.txt", "c.png"),
        ("f.tar.gz.txt", None),
    ]  # a.TXT belongs to an image; README and notes are not captions
    assert skipped == Counter({"not a caption (by name)": 2})
    assert [cf.path.name for cf in iter_caption_files(tmp_path, False, False, Counter())] == [
        "a-b.txt",
        "a.q.txt",
        "a.txt",
        "c.txt",
    ]


def test_sort_keeps_the_trigger_first(cli_runner, sample_dataset: Path, tmp_path: Path):
    """The trigger clean put first (and its kept prefix) stays first: keep_tokens = 1 training
    needs it there. In a kohya <N>_<tokens> folder the class tokens stay first."""
    from sdprep.prep.clean import CleanOptions, run_clean
    from sdprep.prep.monochrome import MonochromeSettings
    from sdprep.prep.rules import CleanRules

    rules = CleanRules(trigger=("zz trigger",), prefix={"*": ("masterpiece",)})
    run_clean(sample_dataset, CleanOptions(replace(rules, monochrome=MonochromeSettings(enabled=False))))
    assert cli_runner.invoke(cli, ["captions", "sort", str(sample_dataset)]).exit_code == 0
    sorted_captions = sorted(sample_dataset.glob("*.txt"))
    assert len(sorted_captions) == 8  # the loop below checks something
    for caption in sorted_captions:
        tags = caption.read_text().strip().split(", ")
        assert tags[:2] == ["zz trigger", "masterpiece"] and tags[2:] == sorted(tags[2:], key=str.casefold)
    kohya = tmp_path / "img" / "10_zz tok"
    kohya.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(kohya / "x.png")
    (kohya / "x.txt").write_text("zz tok, smile, blue eyes\n")
    assert cli_runner.invoke(cli, ["captions", "sort", str(tmp_path / "img"), "-r"]).exit_code == 0
    assert (kohya / "x.txt").read_text() == "zz tok, blue eyes, smile\n"
    assert cli_runner.invoke(cli, ["captions", "sort", str(kohya), "--keep-first", "0"]).exit_code == 0
    assert (kohya / "x.txt").read_text() == "blue eyes, smile, zz tok\n"  # asked for: sorted whole
