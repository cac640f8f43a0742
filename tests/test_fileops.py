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


def test_relink_interrupted_leaves_no_temporary_link(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(b"a")
    link = tmp_path / "latest.png"
    link.symlink_to("a.png")

    def boom(src, dst):
        raise KeyboardInterrupt("killed before the link was replaced")

    with fileops.Journal(tmp_path).begin("test", []) as op:
        monkeypatch.setattr(os, "replace", boom)
        with pytest.raises(KeyboardInterrupt):
            op.relink(link, "b.png")
        monkeypatch.undo()
    assert os.readlink(link) == "a.png"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".sdprep") == [
        "a.png",
        "latest.png",
    ]


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


def _dir_with(path, text):
    path.mkdir(parents=True, exist_ok=True)
    (path / "state.json").write_text(text)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "fallback"])
def test_atomic_write_dir_replaces_a_folder(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(fileops, "_exchange", lambda a, b: False)
    final = tmp_path / "x-state"
    fileops.atomic_write_dir(final, lambda tmp: (tmp / "state.json").write_text("one"))
    fileops.atomic_write_dir(final, lambda tmp: (tmp / "state.json").write_text("two"))
    assert (final / "state.json").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-state"]  # no hidden copies left

    def fail(tmp):
        (tmp / "state.json").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        fileops.atomic_write_dir(final, fail)
    assert (final / "state.json").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-state"]


def test_killed_in_the_fallback_swap_window_the_old_folder_comes_back(tmp_path):
    """Without an atomic exchange the old folder is moved aside first: a SIGKILL right then leaves
    only `.x-state.old-PID`. The next save, or a reader, puts it back; it is never lost."""
    import signal
    import subprocess
    import sys
    import time

    final = tmp_path / "x-state"
    _dir_with(final, "old")
    marker = tmp_path / "marker"
    code = (
        "import sys; from pathlib import Path; from sdprep import fileops\n"
        "fileops._exchange = lambda a, b: False\n"
        "fileops.atomic_write_dir(Path(sys.argv[1]), lambda t: (t / 'state.json').write_text('new'))\n"
    )
    env = dict(os.environ, SDPREP_TEST_PAUSE=f"swap:1:{marker}")
    proc = subprocess.Popen([sys.executable, "-c", code, str(final)], env=env)
    deadline = time.monotonic() + 60
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the save never reached the swap window"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not final.exists()
    assert [p.name for p in tmp_path.glob(".x-state.old-*")], "the old folder must still be on disk"
    assert fileops.recover_dir(final)
    assert (final / "state.json").read_text() == "old"
    assert not fileops.recover_dir(final)  # nothing to do when the folder is there


def test_resume_latest_repairs_a_state_folder_caught_mid_swap(tmp_path):
    from sdprep.train.save.weights import find_states

    out = tmp_path / "out"
    _dir_with(out / ".tiny-state.old-4242", "{}")
    find_states(out)  # the state.json is not a real one: only the repair is checked here
    assert (out / "tiny-state" / "state.json").read_text() == "{}"
    assert not list(out.glob(".tiny-state.old-*"))


def test_install_moves_a_streamed_file_in_and_undo_restores_the_old_one(tmp_path):
    def streamed(text: str):
        tmp = tmp_path / ".meta.json.tmp"
        tmp.write_text(text)
        tmp.chmod(0o600)  # as mkstemp makes it
        return tmp

    target = tmp_path / "meta.json"
    with fileops.Journal(tmp_path).begin("one", []) as op:
        assert op.install(streamed("first\n"), target)
    assert target.read_text() == "first\n" and oct(target.stat().st_mode & 0o777) == oct(
        0o666 & ~fileops._UMASK
    )
    target.chmod(0o640)
    stamp = target.stat().st_mtime_ns
    with fileops.Journal(tmp_path).begin("same", []) as op:
        assert not op.install(streamed("first\n"), target)  # same bytes: nothing changes
    assert target.stat().st_mtime_ns == stamp and not (tmp_path / ".meta.json.tmp").exists()
    assert len(fileops.Journal(tmp_path).operations()) == 1  # the no-op run left nothing to undo
    with fileops.Journal(tmp_path).begin("two", []) as op:
        assert op.install(streamed("second, longer\n"), target)
    assert target.read_text() == "second, longer\n" and target.stat().st_mode & 0o777 == 0o640
    assert fileops.undo(tmp_path) == ("two", 1) and target.read_text() == "first\n"
    assert fileops.undo(tmp_path) == ("one", 1) and not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".sdprep"]


def test_one_command_changes_a_dataset_at_a_time(tmp_path):
    """A second process gets a clear error naming the first; a SIGKILLed holder leaves no stale lock."""
    import signal
    import subprocess
    import sys
    import time

    data = tmp_path / "data"
    data.mkdir()
    marker = tmp_path / "locked"
    code = (
        "import sys, time; from pathlib import Path; from sdprep import fileops\n"
        "with fileops.Journal(sys.argv[1]).begin('tag'):\n"
        "    Path(sys.argv[2]).write_text('x')\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(data), str(marker)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(JournalError) as err, fileops.Journal(data).begin("clean") as op:
            op.write_text(data / "a.txt", "never written")
        assert f"is being changed by another sdprep command (pid {proc.pid}: sdprep tag)" in str(err.value)
        assert not (data / "a.txt").exists()
        with pytest.raises(JournalError, match="another sdprep command"):
            fileops.undo(data)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with fileops.Journal(data).begin("clean") as op:  # the dead holder's lock is gone
        with fileops.Journal(data).begin("nested") as inner:  # re-entrant in one process
            inner.write_text(data / "b.txt", "b")
        op.write_text(data / "a.txt", "a")
    assert (data / "a.txt").read_text() == "a"
    fileops.undo(data)  # the nested operation started last
    assert not (data / "b.txt").exists()
    fileops.undo(data)
    assert not (data / "a.txt").exists()


@pytest.mark.parametrize(
    "entry",
    [
        {"action": "create", "path": "../victim.txt"},
        {"action": "create", "path": "/tmp/../victim.txt"},
        {"action": "write", "path": "a.txt", "blob": "../../../outside/secret.txt"},
        {"action": "create", "path": "linked/victim.txt"},  # a symlinked folder out of the dataset
        {"action": "move", "path": "a.txt", "dest": "../a.txt"},
        {"action": "chmod", "path": "a.txt"},
    ],
    ids=["dotdot", "absolute", "blob-path", "symlinked-folder", "move-out", "unknown-action"],
)
def test_undo_refuses_a_journal_that_leads_outside_the_dataset(tmp_path, entry):
    """A dataset downloaded with a crafted .sdprep/journal must not make `sdprep undo` touch anything else."""
    import json

    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    (tmp_path / "victim.txt").write_text("keep me")
    (outside / "victim.txt").write_text("keep me too")
    (outside / "secret.txt").write_text("secret")
    (data / "a.txt").write_text("a")
    (data / "linked").symlink_to(outside, target_is_directory=True)
    op = data / ".sdprep" / "journal" / "20260101-000000-00000-evil"
    (op / "blobs").mkdir(parents=True)
    (op / "meta.json").write_text(json.dumps({"command": "evil", "argv": [], "complete": True}))
    (op / "entries.jsonl").write_text(json.dumps(entry) + "\n")
    before = {
        p: p.read_text()
        for p in (tmp_path / "victim.txt", outside / "victim.txt", outside / "secret.txt", data / "a.txt")
    }
    with pytest.raises(JournalError, match="is not one sdprep writes .*nothing was undone"):
        fileops.undo(data)
    assert {p: p.read_text() for p in before} == before


def test_a_file_system_without_locks_still_works(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with fileops.Journal(tmp_path).begin("clean") as op:
        op.write_text(tmp_path / "a.txt", "a")
    fileops.undo(tmp_path)
    assert not (tmp_path / "a.txt").exists()


def test_a_mount_that_refuses_chmod_still_gets_atomic_writes(tmp_path, monkeypatch):
    calls = []

    def refuse(target, mode):
        calls.append(target)
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chmod", refuse)
    fileops.atomic_write_text(tmp_path / "a.txt", "a")
    assert (tmp_path / "a.txt").read_text() == "a"
    tmp = tmp_path / ".b.streamed"
    tmp.write_text("b")
    with fileops.Journal(tmp_path).begin("test") as op:  # a streamed file installed through the journal
        assert op.install(tmp, tmp_path / "b.txt")
    assert (tmp_path / "b.txt").read_text() == "b"
    assert tmp in calls and isinstance(calls[0], int)  # both paths tried to set the mode


def test_undo_of_a_journal_with_unreadable_files_is_an_error_not_a_crash(tmp_path):
    import json

    op = tmp_path / ".sdprep" / "journal" / "20260101-000000-00000-evil"
    (op / "blobs").mkdir(parents=True)
    (op / "entries.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")  # a nesting bomb
    (op / "meta.json").write_text("{not json")
    with pytest.raises(JournalError, match="meta.json is not one sdprep writes"):
        fileops.undo(tmp_path)
    (op / "meta.json").write_text(json.dumps({"command": "evil", "argv": []}))
    assert fileops.undo(tmp_path) == ("evil (interrupted)", 0)  # the bomb line was never an entry


@pytest.mark.parametrize(
    "entry",
    [
        {"action": "write", "path": 7, "blob": "0000001"},
        {"action": "move", "path": "a.txt", "dest": ["b.txt"]},
        {"action": "write", "path": "a.txt", "blob": {"n": 1}},
        {"action": 3, "path": "a.txt"},
        {"action": "create", "path": "a.txt", "sig": None, "extra": "x"},
        ["write", "a.txt"],
        "write a.txt",
        12,
    ],
    ids=["number-path", "list-dest", "dict-blob", "number-action", "unknown-key", "list", "string", "number"],
)
def test_undo_of_journal_entries_of_the_wrong_json_types_names_the_operation(tmp_path, entry):
    """Numbers, lists and objects where sdprep writes strings: a JournalError, never a TypeError."""
    import json

    (tmp_path / "a.txt").write_text("mine")
    with fileops.Journal(tmp_path).begin("captions") as op:
        op.write_text(tmp_path / "a.txt", "changed")
    (folder,) = fileops.Journal(tmp_path).operations()
    lines = (folder / "entries.jsonl").read_text().splitlines()
    (folder / "entries.jsonl").write_text(json.dumps(entry) + "\n" + "\n".join(lines) + "\n")
    with pytest.raises(JournalError) as err:
        fileops.undo(tmp_path)
    assert str(folder) in err.value.message and "is not one sdprep writes" in err.value.message
    assert (tmp_path / "a.txt").read_text() == "changed"  # nothing undone


@pytest.mark.parametrize("meta", [{"command": "x", "argv": {"a": 1}}, {"command": "x", "argv": [1, None]}])
def test_undo_list_with_meta_of_the_wrong_types(tmp_path, meta):
    import json

    (tmp_path / "a.txt").write_text("mine")
    with fileops.Journal(tmp_path).begin("captions") as op:
        op.write_text(tmp_path / "a.txt", "changed")
    (folder,) = fileops.Journal(tmp_path).operations()
    (folder / "meta.json").write_text(json.dumps({**meta, "complete": "yes"}))
    assert fileops.Journal(tmp_path).describe(folder).startswith("x")
    fileops.undo(tmp_path)
    assert (tmp_path / "a.txt").read_text() == "mine"
