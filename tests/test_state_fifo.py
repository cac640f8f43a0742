"""A FIFO (or other non-regular file) planted in `.sdprep/` is refused or replaced, never waited on.

A downloaded dataset may carry `.sdprep/journal/op.../meta.json` or a cached thumbnail as a FIFO:
opening it for reading without O_NONBLOCK blocks until a writer appears, i.e. forever. Every call
that could hang runs in a subprocess with a timeout, so a regression fails instead of hanging.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from crashkit import cli_env
from PIL import Image

from sdprep import fileops, state
from sdprep.errors import StateError

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")

TIMEOUT = 60  # seconds: far beyond the real run time; a hang fails here instead of blocking pytest


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=TIMEOUT,
    )


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "sdprep.cli", "-q", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=TIMEOUT)


def written_once(tmp_path: Path) -> Path:
    """A dataset whose 0.txt one journalled operation changed from "a" to "b"."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "0.txt").write_text("a\n")
    with fileops.Journal(data).begin("demo", []) as op:
        op.write_text(data / "0.txt", "b\n")
    return data


def test_reading_a_fifo_state_file_is_a_state_error_naming_it(tmp_path):
    (tmp_path / ".sdprep").mkdir()
    os.mkfifo(tmp_path / ".sdprep" / "x")
    proc = run_python(f"""
        from sdprep import state
        from sdprep.errors import StateError
        try:
            state.read_bytes(state.file({str(tmp_path)!r}, "x"))
        except StateError as exc:
            print("refused:", exc, "|", exc.hint)
        """)
    assert proc.returncode == 0, proc.stderr
    assert "refused:" in proc.stdout and "not a regular file" in proc.stdout
    assert str(tmp_path / ".sdprep" / "x") in proc.stdout and "remove" in proc.stdout


def test_writing_a_fifo_state_file_is_refused_not_blocked(tmp_path):
    (tmp_path / ".sdprep").mkdir()
    os.mkfifo(tmp_path / ".sdprep" / "x")
    proc = run_python(f"""
        from sdprep import state
        from sdprep.errors import StateError
        try:
            state.write_new(state.file({str(tmp_path)!r}, "x"), b"data")
        except StateError as exc:
            print("refused:", exc)
        """)
    assert proc.returncode == 0, proc.stderr
    assert "refused:" in proc.stdout and "not a regular file" in proc.stdout


def test_a_regular_state_file_reads_and_its_descriptor_blocks_again(tmp_path):
    path = state.file(tmp_path, "x", create_parent=True)
    state.write_new(path, b"hello")
    assert state.read_bytes(path) == b"hello"
    fd = state.open_fd(path, os.O_RDONLY)
    try:
        assert os.get_blocking(fd)  # O_NONBLOCK was only for the open
    finally:
        os.close(fd)


def test_a_fifo_opened_read_write_is_refused_by_its_type(tmp_path):
    (tmp_path / ".sdprep").mkdir()
    os.mkfifo(tmp_path / ".sdprep" / "lock")
    with pytest.raises(StateError, match="not a regular file"):
        # O_RDWR does not block on a FIFO (Linux): this checks the type check itself
        state.open_fd(state.file(tmp_path, "lock"), os.O_RDWR)


def test_undo_with_a_fifo_meta_json_exits_1_promptly_with_a_clear_error(tmp_path):
    data = written_once(tmp_path)
    (meta,) = (data / ".sdprep" / "journal").glob("op*/meta.json")
    meta.unlink()
    os.mkfifo(meta)
    for args in (["undo", str(data)], ["undo", "--list", str(data)], ["gc", str(data)]):
        proc = run_cli(*args)
        if args[0] == "undo" and "--list" not in args:
            assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
            assert str(meta.parent) in proc.stderr and "Hint:" in proc.stderr
        else:
            assert proc.returncode in (0, 1), (args, proc.stdout, proc.stderr)
    assert (data / "0.txt").read_text() == "b\n"  # nothing undone from a journal sdprep cannot read


def test_a_fifo_thumbnail_is_made_anew(tmp_path):
    from sdprep.prep.review.thumbs import THUMB_DIR, THUMB_SIZE, thumb_name

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(data / "a.png")
    cached = state.folder(data, THUMB_DIR, create=True) / thumb_name("a.png", data / "a.png", THUMB_SIZE)
    os.mkfifo(cached)
    proc = run_python(f"""
        from pathlib import Path
        from sdprep.prep.review.thumbs import thumbnail
        root = Path({str(data)!r})
        print(len(thumbnail(root, "a.png", root / "a.png")))
        """)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) > 0
    assert cached.is_file() and not cached.is_fifo()
    with Image.open(cached) as im:
        assert max(im.size) <= THUMB_SIZE


def test_undo_over_a_fifo_where_it_wrote_a_file_names_it_as_changed(tmp_path):
    """The dataset file undo compares with what it wrote is now a FIFO: a changed file, not a hang."""
    data = written_once(tmp_path)
    (data / "0.txt").unlink()
    os.mkfifo(data / "0.txt")
    proc = run_cli("undo", str(data))
    assert proc.returncode == 1 and "0.txt" in proc.stderr and "--force" in proc.stderr, proc.stderr
    assert (data / "0.txt").is_fifo()  # nothing undone
    proc = run_cli("undo", "--force", str(data))
    assert proc.returncode == 0, proc.stderr
    assert (data / "0.txt").read_text() == "a\n" and (data / "0.txt.sdprep-kept").is_fifo()
