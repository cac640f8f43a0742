"""Undo the newest journalled operation on a dataset exactly, and `gc` (forget old operations).

Before changing anything, undo walks the operation's entries newest first and checks every file it
would overwrite or delete against what the operation wrote there (the signature in each entry, or
the old content for a change that never happened because the run was killed first). A file the
user changed since (a hand-edited caption, a retouched converted image, a new file where a deleted
one goes back) stops the undo with a JournalError naming the files; with `force=True` each such file
is kept beside as `<name>.sdprep-kept` and the undo goes ahead.
"""

from __future__ import annotations

import filecmp
import os
import stat
import time
from collections import defaultdict
from pathlib import Path

from sdprep import state
from sdprep.dataset import is_within, loads_json
from sdprep.errors import JournalError
from sdprep.faults import pause_point
from sdprep.fileops import GONE_PREFIX, JOURNAL_DIR, Entry, Journal, _foreign_journal, file_sig, read_meta
from sdprep.lock import dataset_lock

ACTIONS = ("move", "write", "create", "delete", "mkdir")
KEPT_SUFFIX = ".sdprep-kept"


def read_entries(folder: Path) -> list[Entry]:
    """The entries of an operation, in the order they were recorded (a line cut short is skipped)."""
    try:
        text = state.read_text(folder / "entries.jsonl")
    except FileNotFoundError:
        return []
    entries = []
    for line in text.splitlines():
        try:
            data = loads_json(line)  # loads_json: nesting bombs are invalid too
        except ValueError:
            continue  # a line cut short by a crash was never acted upon
        entry = _entry(data)
        if entry is None:
            raise _foreign_journal(folder, f"the journal line {line[:80]!r} is not one sdprep writes")
        entries.append(entry)
    return entries


def _entry(data: object) -> Entry | None:
    """An Entry from one parsed journal line, or None when its fields are not sdprep's."""
    if not isinstance(data, dict) or not set(data) <= set(Entry.__dataclass_fields__):
        return None
    if not all(isinstance(v, str) for v in data.values()) or "action" not in data or "path" not in data:
        return None
    return Entry(**data)


def check_entries(base: Path, folder: Path, entries: list[Entry]) -> None:
    """Refuse, before changing anything, a journal whose entries lead outside the dataset.

    sdprep writes only relative paths inside the dataset and numbered blob names; anything else
    (`../..`, an absolute path, a blob path, a symlinked folder out) was not written by sdprep.
    """
    real_base = os.path.realpath(base)

    def bad(what: str) -> JournalError:
        return _foreign_journal(
            folder,
            f"the journal entry for {what!r} is not one sdprep writes (it leads outside the dataset or "
            "names an unknown action); nothing was undone",
        )

    if folder.is_symlink() or (folder / "blobs").is_symlink():
        raise bad(folder.name)
    for entry in entries:
        if entry.action not in ACTIONS:
            raise bad(entry.action)
        if entry.blob is not None and not entry.blob.isdigit():
            raise bad(entry.blob)
        for rel in (entry.path, entry.dest):
            if rel is None:
                continue
            parts = Path(rel).parts
            if not parts or Path(rel).is_absolute() or ".." in parts or "\0" in rel:
                raise bad(rel)
            parent = os.path.realpath((base / rel).parent)  # follows links in folders that exist
            if not is_within(parent, real_base):
                raise bad(rel)


def _accepted(entries: list[Entry]) -> dict[str, set[str]]:
    """Per path, the signatures of every content the operation put there (moves carry them along)."""
    accepted: dict[str, set[str]] = defaultdict(set)
    for e in entries:
        if e.action in ("write", "create") and e.sig:
            accepted[e.path].add(e.sig)
        elif e.action == "move" and e.dest is not None:
            accepted[e.dest] |= accepted.get(e.path, set())
    return accepted


def _same(path: Path, sigs: set[str], old: Path | None) -> bool:
    """Whether `path` holds what the operation wrote (or, when the change never happened, `old`)."""
    if not sigs:
        return True  # entries of an older sdprep carry no signature: nothing to compare with
    if any(s.startswith("ino:") for s in sigs):
        # a hard link: the same size and mtime (a copy made with `cp -a` has another inode) is unchanged
        st = os.lstat(path)
        if any(s.endswith(f":{st.st_size}:{st.st_mtime_ns}") for s in sigs if s.startswith("ino:")):
            return True
    if not _plain(path) or (old is not None and os.path.lexists(old) and not _plain(old)):
        return False  # a FIFO or device (read: a hang) is never what sdprep wrote
    try:
        if file_sig(path) in sigs:
            return True
    except OSError:
        return False
    if old is None or not os.path.lexists(old):
        return False
    if os.path.islink(path) or os.path.islink(old):
        return os.path.islink(path) and os.path.islink(old) and os.readlink(path) == os.readlink(old)
    return filecmp.cmp(path, old, shallow=False)


def _plain(path: Path) -> bool:
    """Whether `path` is a regular file or a symlink (what sdprep writes), so reading it cannot hang."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) or stat.S_ISLNK(mode)


def find_conflicts(base: Path, folder: Path, entries: list[Entry]) -> list[Path]:
    """The files undo would overwrite or delete that hold neither what the operation wrote nor the
    old content: changed by the user since. Walks the entries as undo will, newest first."""
    accepted = _accepted(entries)
    blobs = folder / "blobs"
    where: dict[str, Path | None] = {}  # path -> the file that will be there when undo reaches it

    def now(rel: str) -> Path | None:
        p = where.get(rel, base / rel)
        return p if p is not None and os.path.lexists(p) else None

    conflicts: list[Path] = []
    for e in reversed(entries):
        blob = blobs / e.blob if e.blob else None
        current = now(e.path)
        if e.action == "move" and e.dest is not None:
            moved = now(e.dest)
            if moved is not None and current is None:
                where[e.path], where[e.dest] = moved, None
        elif e.action == "write" and blob is not None and os.path.lexists(blob):
            if current is not None and not _same(current, accepted[e.path], blob):
                conflicts.append(current)
            where[e.path] = blob
        elif e.action == "create" and current is not None:
            if not _same(current, accepted[e.path], None):
                conflicts.append(current)
            where[e.path] = None
        elif e.action == "delete" and blob is not None and os.path.lexists(blob):
            if current is not None:
                conflicts.append(current)  # a new file where the deleted one goes back
            where[e.path] = blob
    return list(dict.fromkeys(p for p in conflicts if p.parent != blobs))


def keep_aside(path: Path) -> Path:
    """Move the user's version of `path` to `<name>.sdprep-kept` (numbered when taken)."""
    dest, n = path.with_name(path.name + KEPT_SUFFIX), 2
    while os.path.lexists(dest):
        dest = path.with_name(f"{path.name}{KEPT_SUFFIX}-{n}")
        n += 1
    os.rename(path, dest)
    return dest


def undo_last(root: Path | str, *, force: bool = False) -> tuple[str, int]:
    """Reverse the newest operation on `root`; returns (its description, number of changes reversed)."""
    jdir = Journal(root).checked_dir()
    if not jdir.is_dir():
        return _undo(root, force)  # nothing to undo: says so without creating a lock file
    with dataset_lock(root, "undo"):
        Journal(root).tidy()
        return _undo(root, force)


def _undo(root: Path | str, force: bool) -> tuple[str, int]:
    journal = Journal(root)
    ops = journal.operations() if journal.checked_dir().is_dir() else []
    if not ops:
        raise JournalError(
            f"nothing to undo in {journal.root}",
            "sdprep records its changes only for commands run on this folder",
        )
    folder = ops[-1]
    description = journal.describe(folder)
    entries = read_entries(folder)
    base = journal.root
    check_entries(base, folder, entries)  # a journal that came with a downloaded dataset is input too
    conflicts = find_conflicts(base, folder, entries)
    if conflicts and not force:
        shown = ", ".join(str(p.relative_to(base)) for p in conflicts[:10])
        more = f" and {len(conflicts) - 10} more" if len(conflicts) > 10 else ""
        raise JournalError(
            f"undo of `{description}` would overwrite or delete {len(conflicts)} files changed since: "
            f"{shown}{more}; nothing was undone",
            f"to undo anyway and keep your versions beside as <name>{KEPT_SUFFIX}: "
            f"sdprep undo --force {root}",
        )
    for path in conflicts:
        keep_aside(path)
    undone = _reverse(base, folder, entries)
    state.write_new(folder / "undone", time.strftime("%Y-%m-%d %H:%M:%S").encode())
    state.remove(folder / "blobs")
    return description, undone


def _reverse(base: Path, folder: Path, entries: list[Entry]) -> int:
    """Apply the entries backwards; changes that never happened (a killed run) are skipped."""
    undone = 0
    for entry in reversed(entries):
        path = base / entry.path
        blob = folder / "blobs" / entry.blob if entry.blob else None
        pause_point("change")  # a killed undo is finished by the next: every step below is idempotent
        # lexists, not exists: a symlink (even a dangling or looping one) is a file to move back
        if entry.action == "move" and entry.dest is not None:
            dest = base / entry.dest
            if os.path.lexists(dest) and not os.path.lexists(path):
                os.rename(dest, path)
                undone += 1
        elif entry.action == "write":
            if blob and os.path.lexists(blob):
                os.replace(blob, path)
                undone += 1
        elif entry.action == "create":
            if os.path.lexists(path):
                path.unlink()
                undone += 1
        elif entry.action == "delete":
            if blob and os.path.lexists(blob) and not os.path.lexists(path):
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(blob, path)
                undone += 1
        elif entry.action == "mkdir":
            try:
                path.rmdir()
                undone += 1
            except OSError:
                pass  # not empty (the user put files there) or already gone
    return undone


def roll_back_interrupted(root: Path | str, command: str) -> tuple[str, int] | None:
    """Undo the newest operation on `root` when it is an interrupted run of `command`.

    For commands whose steps move several files together (rename, dedup): a re-run after a kill
    first puts the dataset back as it was, then does the whole job, so it ends exactly as an
    uninterrupted run would. Call with the dataset lock held. Returns what undo returned, or None.
    """
    journal = Journal(root)
    if not journal.checked_dir().is_dir():
        return None
    journal.tidy()
    ops = journal.operations()
    meta = read_meta(ops[-1]) if ops else None
    if meta is None or meta["command"] != command or meta.get("complete", False):
        return None
    return _undo(root, force=False)


def collect(root: Path | str, keep: int = 0) -> int:
    """Delete journalled operations (and the old content they keep), all but the newest `keep`."""
    journal = Journal(root)
    if not state.folder(root, JOURNAL_DIR).is_dir():
        return 0
    with dataset_lock(root, "gc"):
        folders = journal.folders()
        doomed = folders[: max(0, len(folders) - keep)]
        for folder in doomed:  # renamed first: a gc killed halfway never leaves half an operation
            gone = folder.with_name(GONE_PREFIX + folder.name)
            os.rename(folder, gone)
            pause_point("change")
            state.remove(gone)
        journal.tidy()
        return len(doomed)
