"""A file name that is not valid UTF-8 (bytes 0xFF 0xFE, legal on Linux): every command processes it.

Python reads such a name as text with lone surrogates, which strict UTF-8 output (a journal line,
a sidecar, a report, the terminal) cannot encode. The decision, the same in every stage: the image
is processed like any other; JSON written by sdprep (journal, sidecars, metadata, reports) keeps the
name exact with ASCII escapes, and messages show the bytes as `\\xff\\xfe` (Python's bytes repr),
so the output stays valid UTF-8. `sdprep rename` gives the image a plain name.
"""

from __future__ import annotations

import os
from pathlib import Path

import corpus
import pytest
from PIL import Image
from test_reliability_corpus import CASES, assert_kept_or_undone, failure_paths, run_case, run_cli

BAD = os.fsdecode(b"bad\xff\xfename")  # 'bad\udcff\udcfename'
SHOWN = "bad\\xff\\xfename"  # how sdprep prints it
# every image of this corpus is a PNG or JPEG already: convert decodes them all and changes nothing
NOTHING_TO_DO = {"convert"}


def build(root: Path) -> corpus.Corpus:
    c = corpus.plain(root, masks=True)
    bad = corpus.variant(corpus.SAMPLE_NAMES[5], 3)
    (root / f"{BAD}.png").write_bytes(corpus._encode(bad, "PNG"))
    (root / f"{BAD}.txt").write_text("1girl, smile\n")
    (root / f"{BAD}.png.json").write_text('{"tag_string": "1girl smile"}\n')
    Image.new("L", bad.size, 255).save(root / "masks" / f"{BAD}.png")
    c.good.append(f"{BAD}.png")
    return c


@pytest.mark.parametrize("name", list(CASES))
def test_command_with_a_name_that_is_not_utf8(
    name: str, tmp_path: Path, tiny_wd14: Path, tiny_sdxl: Path
) -> None:
    case = CASES[name]
    c = build(tmp_path / "data")
    before = corpus.snapshot(c.root)
    done, output = run_case(
        case, c, tmp_path, tiny_wd14, tiny_sdxl
    )  # run_cli decodes strictly: valid UTF-8 or the test fails
    assert "Traceback" not in output and "UnicodeEncodeError" not in output, output
    assert done.returncode == 0, output  # processed like any other image, in every stage
    assert not failure_paths(output), output
    assert "\udcff" not in output and "\ufffd" not in output  # shown as escapes, never mangled
    if name != "rename":  # rename gives it a plain name; every other stage keeps it
        assert (c.root / f"{BAD}.png").exists()
    assert_kept_or_undone(c.root, before, case.changes and name not in NOTHING_TO_DO)


def test_rename_journals_every_batch_before_moving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The name that once crashed rename's journal mid-run (after hiding a batch under temporary
    names) lies in the second batch here: the rename completes and undo restores the old names."""
    from sdprep import fileops
    from sdprep.prep import rename

    monkeypatch.setattr(rename, "BATCH", 2)
    c = build(tmp_path / "data")
    before = corpus.snapshot(c.root)
    result = rename.run_rename(c.root, rename.RenameOptions())
    assert result.ok and result.changed == 5
    names = sorted(os.listdir(c.root))
    assert not [n for n in names if n.startswith(rename.TEMP_PREFIX)], names
    assert all(n.isascii() for n in names), names
    fileops.undo(c.root)
    assert corpus.snapshot(c.root) == before


@pytest.mark.parametrize(
    "args",
    [
        ["clean", "{root}", "--trigger", "tok"],
        ["captions", "replace", "smile", "grin", "{root}"],
        ["tag", "{root}"],
    ],
)
def test_a_failure_names_the_file_with_escapes(args: list[str], tmp_path: Path, tiny_wd14: Path) -> None:
    """A per-file failure of the image with the odd name shows its bytes as \\xNN (valid UTF-8 output)."""
    c = build(tmp_path / "data")
    (c.root / f"{BAD}.txt").write_bytes("caf\xe9, smile\n".encode("latin-1"))  # not UTF-8: a failure
    if args[0] == "tag":
        args = [*args, "--model", str(tiny_wd14)]
    done = run_cli(
        [a.replace("{root}", str(c.root)) for a in args], {"SDPREP_CACHE": str(tmp_path / "cache")}
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    (line,) = [x for x in output.splitlines() if x.startswith("  failed: ")]
    assert line.startswith(f"  failed: {c.root}/{SHOWN}.") and f"{SHOWN}.txt: not UTF-8" in line, output


def test_rename_pattern_with_the_old_stem(tmp_path: Path) -> None:
    """{stem} of a name that is not UTF-8: measured in bytes as the file system does, no crash."""
    from sdprep.prep import rename

    c = build(tmp_path / "data")
    result = rename.run_rename(c.root, rename.RenameOptions(pattern="{stem}-{n}"))
    assert result.ok
    assert (c.root / f"{BAD}-3.png").is_file() and (c.root / f"{BAD}-3.txt").is_file()
