import os

import pytest

from sdprep import fileops
from sdprep.errors import JournalError


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "caption.txt"
    target.write_text("old caption\n")

    def boom(src, dst):
        raise KeyboardInterrupt("killed between write and replace")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        fileops.atomic_write_text(target, "new caption that is longer\n")
    monkeypatch.undo()
    assert target.read_text() == "old caption\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["caption.txt"]


def test_undo_restores_moved_and_overwritten_files_byte_for_byte(tmp_path):
    a = tmp_path / "a.png"
    b = tmp_path / "b.txt"
    a_bytes = os.urandom(5000)
    a.write_bytes(a_bytes)
    b.write_bytes(b"\xef\xbb\xbfcaption, with bom\r\n")
    original_b = b.read_bytes()
    with fileops.Journal(tmp_path).begin("test", []) as op:
        op.move(a, tmp_path / "001.png")
        op.write_text(b, "rewritten\n")
        op.write_text(tmp_path / "new.txt", "created\n")
        op.delete(tmp_path / "001.png")
    assert not a.exists() and b.read_text() == "rewritten\n"
    desc, n = fileops.undo(tmp_path)
    assert desc == "test" and n == 4
    assert a.read_bytes() == a_bytes
    assert b.read_bytes() == original_b
    assert not (tmp_path / "new.txt").exists()
    assert not (tmp_path / "001.png").exists()
    with pytest.raises(JournalError, match="nothing to undo"):
        fileops.undo(tmp_path)


def test_undo_of_interrupted_operation(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("one\n")
    with pytest.raises(RuntimeError), fileops.Journal(tmp_path).begin("crashy", []) as op:
        op.write_text(f, "two\n")
        raise RuntimeError("crash")
    assert "interrupted" in fileops.Journal(tmp_path).describe(fileops.Journal(tmp_path).operations()[-1])
    fileops.undo(tmp_path)
    assert f.read_text() == "one\n"


def test_move_never_overwrites(tmp_path):
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    with (
        pytest.raises(JournalError, match="refusing to move"),
        fileops.Journal(tmp_path).begin("t", []) as op,
    ):
        op.move(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_text() == "b" and (tmp_path / "a").read_text() == "a"


def test_unchanged_write_is_not_journalled_and_gc(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("same\n")
    with fileops.Journal(tmp_path).begin("noop", []) as op:
        op.write_text(f, "same\n")
    assert fileops.Journal(tmp_path).operations() == []
    with fileops.Journal(tmp_path).begin("real", []) as op:
        op.write_text(f, "other\n")
    assert fileops.gc(tmp_path) == 1
    assert fileops.Journal(tmp_path).operations() == []
