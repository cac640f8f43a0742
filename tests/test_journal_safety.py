"""sdprep's own state, the tree lock, journal order, interrupted starts, exact undo, temp leftovers.

Each test is one finding of the 2026-12-07 attack (issue 18): a symlinked `.sdprep/...` path must
never lead sdprep outside the dataset, nested folders share one lock, undo order follows a
sequence number (not the local clock), an interrupted start cleans itself up, undo never discards
a later edit silently, and a disk-full error names its file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import corpus
import pytest
from crashkit import paused, sdprep

from sdprep import fileops, state
from sdprep.errors import JournalError, StateError


def outside_tree(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A folder beside the dataset with files and sub-folders; returns it and its snapshot."""
    out = tmp_path / "outside"
    (out / "sub" / "deeper").mkdir(parents=True)
    (out / "photo.png").write_bytes(b"not yours")
    (out / "sub" / "notes.txt").write_text("precious\n")
    (out / "sub" / "deeper" / "x.json").write_text("{}\n")
    return out, _snap(out)


def _snap(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): (p.read_text(errors="replace") if p.is_file() else "dir")
        for p in sorted(folder.rglob("*"))
    }


def dataset(tmp_path: Path, n: int = 3) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(n):
        (data / f"{i}.txt").write_text(f"smile, tag{i}\n")
    return data


# -- items 1-3: a symlinked state path is refused, nothing outside is touched ----------------------


def test_scrape_refuses_a_symlinked_incoming_folder(tmp_path):
    from sdprep.prep.scrape import ScrapeOptions, run_scrape

    out, before = outside_tree(tmp_path)
    data = tmp_path / "data"
    (data / ".sdprep" / "scrape").mkdir(parents=True)
    incoming = data / ".sdprep" / "scrape" / "incoming"
    incoming.symlink_to(out, target_is_directory=True)
    with pytest.raises(StateError) as err:
        run_scrape(data, ScrapeOptions(urls=("nosuchscheme://nothing/here",)))
    assert f"{incoming} is a symlink" in str(err.value)
    assert _snap(out) == before
    assert sorted(p.name for p in data.iterdir()) == [".sdprep"]  # nothing swept into the dataset


@pytest.mark.parametrize("link", ["lock", ".sdprep"])
def test_a_symlinked_lock_is_refused_and_its_target_kept(tmp_path, link):
    data = dataset(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    if link == ".sdprep":
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "lock").write_text("keep me too\n")
        (data / ".sdprep").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
        victim = tmp_path / "elsewhere" / "lock"
    else:
        (data / ".sdprep").mkdir()
        (data / ".sdprep" / "lock").symlink_to(victim)
    text = victim.read_text()
    done = sdprep("captions", "replace", "smile", "grin", str(data))
    assert done.returncode == 1
    linked = data / ".sdprep" if link == ".sdprep" else data / ".sdprep" / "lock"
    assert f"Error: {linked} is a symlink: sdprep keeps its own state there" in done.stderr
    assert victim.read_text() == text
    assert (data / "0.txt").read_text() == "smile, tag0\n"


def test_gc_refuses_a_symlinked_journal(tmp_path):
    out, before = outside_tree(tmp_path)
    data = dataset(tmp_path)
    (data / ".sdprep").mkdir()
    (data / ".sdprep" / "journal").symlink_to(out, target_is_directory=True)
    for args in (["gc", str(data)], ["undo", str(data)], ["undo", "--list", str(data)]):
        done = sdprep(*args)
        assert done.returncode == 1 and f"{data / '.sdprep' / 'journal'} is a symlink" in done.stderr, args
    assert _snap(out) == before


def test_gc_refuses_a_symlinked_operation_folder(tmp_path):
    out, before = outside_tree(tmp_path)
    data = dataset(tmp_path)
    with fileops.Journal(data).begin("demo", []) as op:
        op.write_text(data / "0.txt", "changed\n")
    planted = data / ".sdprep" / "journal" / "op000000-evil"
    planted.symlink_to(out, target_is_directory=True)
    with pytest.raises(StateError, match="op000000-evil is a symlink"):
        fileops.gc(data)
    assert _snap(out) == before and (data / "0.txt").read_text() == "changed\n"


def test_state_paths_are_checked_one_component_at_a_time(tmp_path):
    root = tmp_path / "data"
    (root / ".sdprep" / "a").mkdir(parents=True)
    (root / ".sdprep" / "a" / "file").write_text("x")
    assert state.folder(root, "a", "b", create=True) == root / ".sdprep" / "a" / "b"
    assert (root / ".sdprep" / "a" / "b").is_dir()
    with pytest.raises(StateError, match="file is not a folder"):
        state.folder(root, "a", "file", "c", create=True)
    (root / ".sdprep" / "a" / "link").symlink_to(tmp_path)
    with pytest.raises(StateError, match="link is a symlink"):
        state.file(root, "a", "link")
    with pytest.raises(StateError, match="link is a symlink"):
        state.read_bytes(root / ".sdprep" / "a" / "link")
    assert not (tmp_path / "c").exists()


# -- item 4: one lock per dataset tree ---------------------------------------------------------


def nested(tmp_path: Path) -> Path:
    data = dataset(tmp_path)
    (data / "sub").mkdir()
    for i in range(3):
        (data / "sub" / f"s{i}.txt").write_text(f"smile, sub{i}\n")
    return data


def test_a_command_below_a_running_command_is_refused(tmp_path):
    data = nested(tmp_path)
    args = ["captions", "replace", "smile", "grin", str(data), "-r"]
    with paused(args, "change", 2, tmp_path) as proc:
        done = sdprep("captions", "append", "extra", str(data / "sub"))
        assert done.returncode == 1
        assert (
            f"{data / 'sub'} is being changed by another sdprep command "
            f"(pid {proc.pid}: sdprep captions-replace) on {data}, which contains it"
        ) in done.stderr
    assert all("extra" not in p.read_text() for p in (data / "sub").glob("*.txt"))


def test_a_command_above_a_running_command_is_refused(tmp_path):
    data = nested(tmp_path)
    with paused(["captions", "append", "extra", str(data / "sub")], "change", 1, tmp_path) as proc:
        done = sdprep("captions", "replace", "smile", "grin", str(data), "-r")
        assert done.returncode == 1
        assert f"(pid {proc.pid}: sdprep captions-append) on {data / 'sub'}, inside it" in done.stderr
        assert sdprep("undo", str(data)).returncode == 1  # undo changes files too
    assert all("grin" not in p.read_text() for p in data.rglob("*.txt"))
    # the holder was killed: its lock went with it, and both folders work again
    assert sdprep("captions", "replace", "smile", "grin", str(data), "-r").returncode == 0


def test_sibling_folders_do_not_block_each_other(tmp_path):
    data = nested(tmp_path)
    (data / "other").mkdir()
    (data / "other" / "o.txt").write_text("smile\n")
    with paused(["captions", "append", "extra", str(data / "sub")], "change", 1, tmp_path):
        done = sdprep("captions", "replace", "smile", "grin", str(data / "other"))
        assert done.returncode == 0, done.stderr
    assert (data / "other" / "o.txt").read_text() == "grin\n"


# -- item 5: journal order is a sequence, not a clock ----------------------------------------------


def test_undo_order_does_not_follow_the_time_zone(tmp_path):
    data = dataset(tmp_path, n=1)
    east = sdprep("captions", "replace", "smile", "grin", str(data), env_extra={"TZ": "Etc/GMT-14"})
    west = sdprep("captions", "replace", "grin", "smirk", str(data), env_extra={"TZ": "Etc/GMT+12"})
    assert east.returncode == 0 and west.returncode == 0
    assert (data / "0.txt").read_text() == "smirk, tag0\n"
    listed = sdprep("undo", "--list", str(data)).stdout.splitlines()
    assert len(listed) == 2 and "smile grin" in listed[0] and "grin smirk" in listed[1]
    assert sdprep("undo", str(data), env_extra={"TZ": "UTC"}).returncode == 0
    assert (data / "0.txt").read_text() == "grin, tag0\n"  # the newer one went first
    assert sdprep("undo", str(data)).returncode == 0
    assert (data / "0.txt").read_text() == "smile, tag0\n"


def test_operations_of_an_older_journal_sort_before_new_ones(tmp_path):
    data = dataset(tmp_path, n=1)
    old = data / ".sdprep" / "journal" / "20991231-235959-00000-old"  # a clock far ahead
    (old / "blobs").mkdir(parents=True)
    (old / "meta.json").write_text(json.dumps({"command": "old", "argv": [], "complete": True}))
    (old / "entries.jsonl").write_text(json.dumps({"action": "create", "path": "made.txt"}) + "\n")
    (data / "made.txt").write_text("x")
    with fileops.Journal(data).begin("new", []) as op:
        op.write_text(data / "0.txt", "new\n")
    assert [p.name for p in fileops.Journal(data).operations()] == [old.name, "op000001-new"]
    assert fileops.undo(data)[0] == "new"
    assert fileops.undo(data)[0] == "old" and not (data / "made.txt").exists()


# -- item 6: an interrupted start cleans itself up -------------------------------------------------


def test_a_command_killed_while_starting_its_journal_leaves_nothing_behind(tmp_path):
    data = dataset(tmp_path, n=1)
    assert sdprep("captions", "replace", "smile", "grin", str(data)).returncode == 0
    with paused(["captions", "replace", "grin", "smirk", str(data)], "begin", 1, tmp_path):
        pass
    jdir = data / ".sdprep" / "journal"
    assert any(p.name.startswith(".new-") for p in jdir.iterdir())  # the half-made folder
    listed = sdprep("undo", "--list", str(data))
    assert len(listed.stdout.splitlines()) == 1
    done = sdprep("undo", str(data))
    assert done.returncode == 0, done.stderr
    assert (data / "0.txt").read_text() == "smile, tag0\n"
    assert [p.name for p in jdir.iterdir()] == ["op000001-captions-replace"]


def test_an_operation_folder_without_meta_from_an_older_sdprep_is_cleaned_up(tmp_path):
    data = dataset(tmp_path, n=1)
    with fileops.Journal(data).begin("demo", []) as op:
        op.write_text(data / "0.txt", "changed\n")
    bare = data / ".sdprep" / "journal" / "20261207-101010-00001-tag"
    bare.mkdir()  # what a kill right after mkdir left before
    assert fileops.undo(data) == ("demo", 1)
    assert not bare.exists() and (data / "0.txt").read_text() == "smile, tag0\n"


def test_disk_full_while_starting_the_journal_names_the_file_and_leaves_nothing(tmp_path):
    data = dataset(tmp_path, n=1)
    done = sdprep(
        "captions", "replace", "smile", "grin", str(data), env_extra={"SDPREP_TEST_FAIL": "write:1:ENOSPC"}
    )
    assert done.returncode == 1
    meta = data / ".sdprep" / "journal" / ".new-op000001-captions-replace" / "meta.json"
    assert done.stderr.startswith(f"Error: {meta}: No space left on device\nHint: free disk space"), (
        done.stderr
    )
    assert list((data / ".sdprep" / "journal").iterdir()) == []
    assert sdprep("captions", "replace", "smile", "grin", str(data)).returncode == 0


# -- item 17: disk-full errors name the file ------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_disk_full_names_the_file_and_undo_restores(tmp_path, n):
    data = dataset(tmp_path, n=4)
    before = {p.name: p.read_text() for p in data.glob("*.txt")}
    done = sdprep(
        "captions", "replace", "smile", "grin", str(data), env_extra={"SDPREP_TEST_FAIL": f"write:{n}:ENOSPC"}
    )
    assert done.returncode == 1
    first = done.stderr.splitlines()[0]
    assert first.startswith(f"Error: {data}") and first.endswith(": No space left on device"), done.stderr
    assert "?" not in first
    named = Path(first[len("Error: ") : -len(": No space left on device")])
    assert named.parent == data or named.parent.parent == data / ".sdprep" / "journal"  # caption or journal
    assert not [p for p in data.iterdir() if p.name.startswith(".sdprep-tmp")]
    assert sdprep("undo", str(data)).returncode in (0, 1)  # 1: nothing had been recorded yet
    assert {p.name: p.read_text() for p in data.glob("*.txt")} == before


# -- item 7: undo never discards a later edit silently ---------------------------------------------


def test_undo_refuses_over_a_hand_edited_caption_and_force_keeps_it(tmp_path, cli_runner):
    from sdprep.cli import cli

    data = dataset(tmp_path, n=3)
    assert cli_runner.invoke(cli, ["captions", "replace", "smile", "grin", str(data)]).exit_code == 0
    (data / "1.txt").write_text("grin, tag1, edited by hand\n")
    res = cli_runner.invoke(cli, ["undo", str(data)])
    assert res.exit_code == 1
    assert "would overwrite or delete 1 files changed since: 1.txt; nothing was undone" in res.output
    assert "sdprep undo --force" in res.output
    assert (data / "0.txt").read_text() == "grin, tag0\n"  # nothing was undone
    res = cli_runner.invoke(cli, ["undo", "--force", str(data)])
    assert res.exit_code == 0, res.output
    assert {p.name: p.read_text() for p in data.iterdir() if p.is_file()} == {
        "0.txt": "smile, tag0\n",
        "1.txt": "smile, tag1\n",
        "2.txt": "smile, tag2\n",
        "1.txt.sdprep-kept": "grin, tag1, edited by hand\n",
    }


def test_undo_refuses_to_delete_a_retouched_new_file_or_cover_a_new_one(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jpg").write_bytes(b"old jpeg")
    with fileops.Journal(data).begin("convert", []) as op:
        op.write_bytes(data / "a.png", b"new png")
        op.delete(data / "a.jpg")
    (data / "a.png").write_bytes(b"retouched png")
    (data / "a.jpg").write_bytes(b"another jpeg")
    with pytest.raises(JournalError) as err:
        fileops.undo(data)
    assert "2 files changed since: a.jpg, a.png" in str(err.value)
    fileops.undo(data, force=True)
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()} == {
        "a.jpg": b"old jpeg",
        "a.jpg.sdprep-kept": b"another jpeg",
        "a.png.sdprep-kept": b"retouched png",
    }


def test_undo_follows_a_written_file_through_a_later_move(tmp_path):
    """dedup writes a sidecar and then moves it to duplicates/: an edit there is seen too."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.json").write_text("{}\n")
    with fileops.Journal(data).begin("dedup", []) as op:
        op.write_text(data / "x.json", '{"a": 1}\n')
        op.write_text(data / "x.json", '{"a": 2}\n')
        op.move(data / "x.json", data / "duplicates" / "x.json")
    (data / "duplicates" / "x.json").write_text('{"mine": true}\n')
    with pytest.raises(JournalError, match="duplicates/x.json"):
        fileops.undo(data)
    fileops.undo(data, force=True)
    assert (data / "x.json").read_text() == "{}\n"
    assert (data / "duplicates" / "x.json.sdprep-kept").read_text() == '{"mine": true}\n'


def test_undo_of_an_unchanged_interrupted_operation_needs_no_force(tmp_path):
    """A kill after an entry was recorded but before its change: the old content is no user edit."""
    data = dataset(tmp_path, n=2)
    args = ["captions", "replace", "smile", "grin", str(data)]
    with paused(args, "change", 2, tmp_path):
        pass  # 0.txt changed, 1.txt recorded but not yet written
    done = sdprep("undo", str(data))
    assert done.returncode == 0, done.stderr
    assert (data / "0.txt").read_text() == "smile, tag0\n" and (data / "1.txt").read_text() == "smile, tag1\n"


# -- items 24, 25: no leftovers ----------------------------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_files_of_dead_runs_are_removed_by_the_next_command(tmp_path):
    data = dataset(tmp_path, n=1)
    (data / "sub").mkdir()
    (data / ".sdprep" / "scrape").mkdir(parents=True)
    dead = [
        data / f".sdprep-tmp-{dead_pid()}-abcd1234.tmp",
        data / "sub" / ".0.txt.k3j_x9ab.tmp",  # an older sdprep's name (mkstemp), hours old
        data / "sub" / ".a.PNG.abcd1234.tmp",
        data / ".sdprep" / "scrape" / f".sdprep-tmp-{dead_pid()}-abcd1234.tmp",  # in sdprep's own state
    ]
    live = data / f".sdprep-tmp-{os.getpid()}-abcd1234.tmp"  # a running process's: left alone
    kept = [
        data / ".notes.tmp",  # not sdprep's
        data / ".notes.abcd1234.tmp",  # a user's file with a temp-like name, old
        data / "sub" / ".model.bin.ab12cd34.tmp",  # another tool's, not a kind of file sdprep writes
        data / "sub" / ".1.txt.ab12cd34.tmp",  # legacy-like but fresh: maybe another tool at work now
    ]
    hours_ago = time.time() - 3 * 3600
    for p in [*dead, live, *kept]:
        p.write_text("partial")
        if p.name != ".1.txt.ab12cd34.tmp":
            os.utime(p, (hours_ago, hours_ago))
    with fileops.Journal(data).begin("demo", []) as op:
        op.write_text(data / "0.txt", "x\n")
    assert [p.name for p in dead if p.exists()] == []
    assert live.exists() and all(p.exists() for p in kept)


def test_undo_removes_the_folders_an_operation_made(tmp_path):
    data = dataset(tmp_path, n=2)
    with fileops.Journal(data).begin("dedup", []) as op:
        op.move(data / "0.txt", data / "duplicates" / "deep" / "0.txt")
        op.write_text(data / "new" / "a" / "b.txt", "b\n")
        op.place_many([(data / "1.txt", data / "linked" / "1.txt")])
    fileops.undo(data)
    assert sorted(p.name for p in data.iterdir()) == [".sdprep", "0.txt", "1.txt"]


def test_undo_keeps_a_made_folder_the_user_put_files_in(tmp_path):
    data = dataset(tmp_path, n=1)
    with fileops.Journal(data).begin("dedup", []) as op:
        op.move(data / "0.txt", data / "duplicates" / "0.txt")
    (data / "duplicates" / "mine.txt").write_text("mine\n")
    fileops.undo(data)
    assert sorted(p.name for p in (data / "duplicates").iterdir()) == ["mine.txt"]


def test_killed_holder_of_the_lock_never_blocks(tmp_path):
    data = dataset(tmp_path, n=1)
    with paused(["captions", "replace", "smile", "grin", str(data)], "change", 1, tmp_path) as proc:
        os.kill(proc.pid, signal.SIGKILL)
    assert sdprep("captions", "replace", "smile", "grin", str(data)).returncode == 0


# -- the class: every command meets a symlinked state path ---------------------------------------

STATE_USERS = {  # command -> the state paths it uses (a link at any of them must stop it)
    "captions": ("lock", "journal"),
    "clean": ("lock", "journal"),
    "rename": ("lock", "journal"),
    "dedup": ("lock", "journal"),
    "convert": ("lock", "journal", "convert-verified.json"),
    "upscale": ("lock", "journal"),
    "mask": ("lock", "journal"),
    "mask-check": (),
    "scrape": ("lock", "journal", "scrape/incoming"),
    "undo": ("lock", "journal"),
    "gc": ("journal",),
}


def command_args(name: str, data: Path) -> list[str]:
    return {
        "captions": ["captions", "replace", "smile", "grin", data],
        "clean": ["clean", data, "--trigger", "tok"],
        "rename": ["rename", data],
        "dedup": ["dedup", data],
        "convert": ["convert", data, "--format", "png"],
        "upscale": ["upscale", data, "--min-side", "64"],
        "mask": ["mask", data, "--method", "color", "--fallback", "full"],
        "mask-check": ["mask", "--check", data],
        "scrape": ["scrape", "nosuchscheme://nothing", "-o", data],
        "undo": ["undo", data],
        "gc": ["gc", data],
    }[name]


@pytest.mark.parametrize("rel", list(corpus.STATE_LINKS))
def test_every_command_refuses_a_symlinked_state_path_and_touches_nothing(rel, zygote, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for name, uses in STATE_USERS.items():
        data = tmp_path / f"data-{name}"
        data.mkdir()
        for i in range(2):
            (data / f"img{i}.png").write_bytes(corpus.sample_bytes(corpus.SAMPLE_NAMES[i], "PNG", side=48))
            (data / f"img{i}.txt").write_text("smile, solo\n")
        with fileops.Journal(data).begin("seed", []) as op:  # something to undo
            op.write_text(data / "img0.txt", "smile, solo, seeded\n")
        link = corpus.plant_state_link(data, rel, outside)
        before, outside_before = corpus.snapshot(data), _snap(outside)
        code, output, _ = zygote.run(command_args(name, data))
        refused = rel == ".sdprep" or rel.removeprefix(".sdprep/") in uses
        if refused:
            assert code == 1 and f"{link} is a symlink: sdprep keeps its own state there" in output, (
                name,
                output,
            )
            assert corpus.snapshot(data) == before, name
        assert _snap(outside) == outside_before, (name, rel)


def test_undo_puts_back_a_symlink_that_a_write_replaced(tmp_path):
    data = dataset(tmp_path, n=1)
    (data / "link.txt").symlink_to("0.txt")
    with fileops.Journal(data).begin("clean", []) as op:
        op.write_text(data / "link.txt", "own caption now\n")
    assert not (data / "link.txt").is_symlink() and (data / "0.txt").read_text() == "smile, tag0\n"
    fileops.undo(data)
    assert os.readlink(data / "link.txt") == "0.txt" and (data / "0.txt").read_text() == "smile, tag0\n"


def test_the_train_cache_beside_the_images_refuses_a_symlinked_state_folder(tmp_path):
    from types import SimpleNamespace

    from sdprep.train.data.cache import _cache_path

    (tmp_path / "outside").mkdir()
    (tmp_path / "img").mkdir()
    rec = SimpleNamespace(path=tmp_path / "img" / "a.png")
    assert _cache_path(rec, "latents", None) == tmp_path / "img" / ".sdprep" / "latents" / "a.png.safetensors"
    (tmp_path / "img" / ".sdprep").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(StateError, match=r"img/\.sdprep is a symlink"):
        _cache_path(rec, "latents", None)


def test_a_gc_killed_halfway_leaves_no_half_operation(tmp_path):
    data = dataset(tmp_path, n=3)
    for i in range(3):
        assert sdprep("captions", "append", f"x{i}", str(data)).returncode == 0
    with paused(["gc", str(data), "--keep", "1"], "change", 2, tmp_path):
        pass  # the oldest operation is gone, the second renamed aside and half deleted at most
    jdir = data / ".sdprep" / "journal"
    assert sorted(p.name for p in jdir.iterdir() if not p.name.startswith(".gone-")) == [
        "op000003-captions-append"
    ]
    assert sdprep("undo", str(data)).returncode == 0
    assert sorted(p.name for p in jdir.iterdir()) == ["op000003-captions-append"]  # tidied
    assert sdprep("undo", str(data)).returncode == 1
    assert (data / "0.txt").read_text() == "smile, tag0, x0, x1\n"
