"""Safe file operations: atomic writes, and a per-dataset journal that makes every change undoable.

Every destructive change sdprep makes to a dataset (a move, an overwrite, a deletion, a new file)
goes through an `Operation`, which records it in `DATASET/.sdprep/journal/<id>/` *before* doing it
and keeps the old bytes (a hard link to the old inode when possible, else a copy). `undo(root)`
reverses the newest operation that has not been undone, newest change first. An operation that was
interrupted (crash, SIGKILL) is still undoable: every entry is durable before its change happens,
and undo tolerates changes that never took place.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from sdprep.dataset import is_within, loads_json
from sdprep.errors import JournalError
from sdprep.faults import pause_point

STATE_DIR = ".sdprep"
_UMASK = os.umask(0o022)  # read once, at import (one thread): os.umask can only be read by setting it
os.umask(_UMASK)
JOURNAL_DIR = "journal"


def atomic_write_bytes(path: Path | str, data: bytes, *, sync: bool = True) -> None:
    """Write `data` to `path` so readers see either the old file or the whole new one, never a part.

    `sync=False` skips the fsync: still atomic for readers and safe against a killed process, but
    after a power loss the file may be empty (callers keep the old content elsewhere, as the journal).
    """
    _replace_atomically(Path(path), lambda f: f.write(data), binary=True, sync=sync, keep_same=False)


def atomic_write_stream(path: Path | str, write: Callable[[IO[str]], object]) -> bool:
    """`atomic_write_text` for text written piece by piece by `write(file)` (never held whole).

    When `path` already holds the same bytes (compared in chunks) it is left alone, mtime included,
    and False is returned.
    """
    return _replace_atomically(Path(path), write, binary=False, sync=True, keep_same=True)


def _replace_atomically(path: Path, write: Callable, *, binary: bool, sync: bool, keep_same: bool) -> bool:
    """Write a temporary file beside `path` with `write(file)`, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:40]}.", suffix=".tmp", dir=path.parent)
    try:
        f = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")
        with f:
            give_mode(f.fileno(), path)
            write(f)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        if keep_same and path.is_file() and filecmp.cmp(tmp, path, shallow=False):
            os.unlink(tmp)
            return False
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


def give_mode(target: int | Path | str, like: Path) -> None:
    """Give `target` (a descriptor or a path) the mode of `like`, or a new file's (mkstemp makes 0600).

    Best effort: mounts that refuse chmod (SMB, FUSE) and systems without fd chmod keep their mode.
    """
    with contextlib.suppress(OSError, NotImplementedError, TypeError):
        os.chmod(target, _mode_for(like))


def give_new_file_mode(path: Path | str) -> None:
    """Give a file written for the user the mode a new file gets under the umask (0644 under 022).

    For writers that create the file privately (safetensors' `save_file` makes 0600): otherwise a UI
    running as another user could not read the LoRA, embedding or checkpoint. Best effort, as give_mode.
    """
    with contextlib.suppress(OSError, NotImplementedError):
        os.chmod(path, 0o666 & ~_UMASK)


def _mode_for(path: Path) -> int:
    """mkstemp makes 0600 files: keep the replaced file's mode, or give a new file the umask's."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_UMASK


def atomic_write_text(path: Path | str, text: str) -> None:
    """Atomically write UTF-8 text (no BOM, newlines kept as given)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False when unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # an old glibc
        return False
    at_fdcwd, rename_exchange = -100, 2
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return done == 0


def recover_dir(final: Path) -> bool:
    """Put back a folder that `atomic_write_dir` had moved aside when a crash hit its rename window.

    Only the fallback path (no atomic exchange) has that window: `final` is missing and its previous
    version is `.<name>.old-<pid>`. Returns True when a folder was restored.
    """
    if final.exists():
        return False
    olds = sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not olds:
        return False
    os.replace(olds[-1], final)
    return True


def atomic_write_dir(final: Path, write) -> None:
    """Build a folder under a temporary name with `write(tmp)`, then put it at `final` atomically.

    Readers see the old folder or the whole new one. An existing `final` is swapped with the new one
    in one step where the OS allows (Linux); elsewhere it is moved aside first, and a crash in that
    window is repaired by `recover_dir` (called here and by readers such as `--resume latest`).
    Temporary folders left by a killed run are never complete and are removed.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final)
    for stale in [*final.parent.glob(f".{final.name}.tmp-*"), *final.parent.glob(f".{final.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        write(tmp)
        for path in tmp.rglob("*"):
            if path.is_file() and not path.is_symlink():
                give_new_file_mode(path)
        if not final.exists():
            os.replace(tmp, final)
        elif not _exchange(tmp, final):
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            pause_point("swap")  # crash tests stop here: the one window of the fallback
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after an exchange: the old folder


def state_dir(root: Path | str) -> Path:
    """The hidden folder where sdprep keeps its journal and caches for a dataset."""
    return Path(root) / STATE_DIR


@dataclass
class Entry:
    """One journalled change. `blob` is the saved old content, relative to the operation folder."""

    action: str  # "move" | "write" | "create" | "delete" | "mkdir"
    path: str  # relative to the dataset root
    dest: str | None = None
    blob: str | None = None

    def to_json(self) -> str:
        # ASCII escapes keep a file name that is not UTF-8 (a lone surrogate in Python) exact
        return json.dumps({k: v for k, v in self.__dict__.items() if v is not None})


class Operation:
    """A journalled group of changes to one dataset; use `Journal.begin(...)` as a context manager."""

    def __init__(self, root: Path, folder: Path):
        self.root = root
        self._real_root = os.path.realpath(root)
        self.folder = folder
        self.blobs = folder / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self._log = open(folder / "entries.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._n = 0
        self.changes = 0

    # -- recording ---------------------------------------------------------------------------
    def _rel(self, path: Path | str) -> str:
        p = Path(path).absolute()
        try:
            rel = p.relative_to(self.root).as_posix()
        except ValueError:
            raise JournalError(
                f"{p} is outside the dataset {self.root}", "sdprep only changes files inside the dataset"
            ) from None
        real_parent = os.path.realpath(p.parent)
        if not is_within(real_parent, self._real_root):
            raise JournalError(
                f"{p} is inside a symlinked folder that leads out of the dataset (to {real_parent})",
                "sdprep only changes files inside the dataset: replace the link by a real folder",
            )
        return rel

    def _record(self, entry: Entry) -> None:
        self._record_many([entry])

    def _record_many(self, entries: list[Entry]) -> None:
        """Append entries to the journal and make them durable (one fsync) before any change."""
        self._log.write("".join(e.to_json() + "\n" for e in entries))
        self._log.flush()
        os.fsync(self._log.fileno())
        self.changes += len(entries)

    def _keep(self, path: Path) -> str:
        """Preserve the current content of `path` in the journal and return its blob name."""
        self._n += 1
        blob = f"{self._n:07d}"
        target = self.blobs / blob
        try:
            os.link(path, target)  # the old inode survives the os.replace that follows
        except OSError:
            shutil.copy2(path, target, follow_symlinks=False)
        return blob

    # -- changes -----------------------------------------------------------------------------
    def write_bytes(self, path: Path | str, data: bytes) -> None:
        """Atomically write `path`, keeping its previous content (if any) for undo."""
        path = Path(path).absolute()
        if os.path.lexists(path):
            if path.is_file() and path.read_bytes() == data:
                return
            self._record(Entry("write", self._rel(path), blob=self._keep(path)))
        else:
            self._record(Entry("create", self._rel(path)))
            path.parent.mkdir(parents=True, exist_ok=True)  # as move() and place() do
        pause_point("change")
        atomic_write_bytes(path, data)

    def write_text(self, path: Path | str, text: str) -> None:
        self.write_bytes(path, text.encode("utf-8"))

    def install(self, tmp: Path | str, path: Path | str) -> bool:
        """Move the finished file `tmp` (e.g. streamed there) to `path`, keeping the old content for undo.

        `tmp` must be on `path`'s filesystem (in the same folder). When `path` already holds the same
        bytes (compared by streaming, never read whole) `tmp` is removed and `path` is left alone.
        Returns whether `path` changed.
        """
        tmp, path = Path(tmp), Path(path).absolute()
        if os.path.lexists(path):
            if path.is_file() and filecmp.cmp(tmp, path, shallow=False):
                os.unlink(tmp)
                return False
            self._record(Entry("write", self._rel(path), blob=self._keep(path)))
        else:
            self._record(Entry("create", self._rel(path)))
        give_mode(tmp, path)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        pause_point("change")
        os.replace(tmp, path)
        return True

    def write_many(self, files: list[tuple[Path | str, bytes]]) -> int:
        """Write many small files, in order, with one journal sync instead of two syncs per file.

        Every entry (and the old content) is in the journal before the first write; the writes are
        atomic but not fsynced one by one, so after a power loss a new file may be empty while the
        journal still restores the old one. Files that already hold `data` are left alone. Returns
        the number of files written.
        """
        todo = []
        for path, data in files:
            path = Path(path).absolute()
            if os.path.lexists(path):
                if path.is_file() and path.read_bytes() == data:
                    continue
                entry = Entry("write", self._rel(path), blob=self._keep(path))
            else:
                entry = Entry("create", self._rel(path))
            todo.append((path, data, entry))
        if not todo:
            return 0
        self._record_many([e for _, _, e in todo])
        for path, data, _ in todo:
            path.parent.mkdir(parents=True, exist_ok=True)
            pause_point("change")
            atomic_write_bytes(path, data, sync=False)
        return len(todo)

    def move(self, src: Path | str, dst: Path | str) -> None:
        """Rename `src` to `dst`; refuses to overwrite an existing `dst`."""
        src, dst = Path(src).absolute(), Path(dst).absolute()
        if dst.exists() or dst.is_symlink():
            raise JournalError(f"refusing to move {src} over existing {dst}", "remove or rename it first")
        self._record(Entry("move", self._rel(src), dest=self._rel(dst)))
        dst.parent.mkdir(parents=True, exist_ok=True)
        pause_point("change")
        os.rename(src, dst)

    def move_many(self, pairs: list[tuple[Path | str, Path | str]]) -> None:
        """Rename many files with one journal sync (every entry is durable before the first rename).

        Refuses before changing anything when a destination exists or is named twice.
        """
        pairs = [(Path(s).absolute(), Path(d).absolute()) for s, d in pairs]
        seen: set[Path] = set()
        for src, dst in pairs:
            if dst.exists() or dst.is_symlink() or dst in seen:
                raise JournalError(f"refusing to move {src} over existing {dst}", "remove or rename it first")
            seen.add(dst)
        self._record_many([Entry("move", self._rel(src), dest=self._rel(dst)) for src, dst in pairs])
        for src, dst in pairs:
            dst.parent.mkdir(parents=True, exist_ok=True)
            pause_point("change")
            os.rename(src, dst)

    def delete(self, path: Path | str) -> None:
        """Remove `path` from the dataset; its content stays in the journal until `gc`."""
        path = Path(path).absolute()
        self._n += 1
        blob = f"{self._n:07d}"
        self._record(Entry("delete", self._rel(path), blob=blob))
        pause_point("change")
        os.replace(path, self.blobs / blob)

    def place(self, src: Path | str, dst: Path | str, *, copy: bool = False) -> bool:
        """Put the file `src` at `dst` as a hard link (or a copy across filesystems / when asked).

        `src` is never changed. Returns False when `dst` already holds the same bytes (no work).
        """
        src, dst = Path(src), Path(dst).absolute()
        if dst.exists():
            try:
                if os.path.samefile(src, dst):
                    return False
            except OSError:
                pass
            if dst.stat().st_size == src.stat().st_size and dst.read_bytes() == src.read_bytes():
                return False
        if not copy and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            self._record(Entry("create", self._rel(dst)))
            try:
                os.link(src, dst)
                return True
            except OSError:
                pass  # another filesystem, or links not supported: copy below
        self.write_bytes(dst, src.read_bytes())
        return True

    def place_many(self, pairs: list[tuple[Path | str, Path | str]], *, copy: bool = False) -> list[bool]:
        """`place` for many files; new hard links cost one journal sync in all, not one each.

        Returns, per pair, whether `dst` changed.
        """
        changed: list[bool] = []
        fresh: list[tuple[Path, Path]] = []
        for src, dst in pairs:
            dst = Path(dst).absolute()
            if copy or os.path.lexists(dst):
                changed.append(self.place(src, dst, copy=copy))  # re-runs: usually no work
            else:
                fresh.append((Path(src), dst))
                changed.append(True)
        if fresh:
            self._record_many([Entry("create", self._rel(dst)) for _, dst in fresh])
        for src, dst in fresh:
            dst.parent.mkdir(parents=True, exist_ok=True)
            pause_point("change")
            try:
                os.link(src, dst)
            except OSError:  # another filesystem, or links not supported
                atomic_write_bytes(dst, src.read_bytes(), sync=False)
        return changed

    def mkdir(self, path: Path | str) -> None:
        path = Path(path).absolute()
        if path.exists():
            return
        self._record(Entry("mkdir", self._rel(path)))
        path.mkdir(parents=True)

    def close(self, ok: bool) -> None:
        self._log.close()
        meta = json.loads((self.folder / "meta.json").read_text())
        meta.update(finished=time.time(), complete=ok, changes=self.changes)
        atomic_write_text(self.folder / "meta.json", json.dumps(meta, indent=1))
        if self.changes == 0:
            shutil.rmtree(self.folder, ignore_errors=True)


LOCK_FILE = "lock"
_held: dict[str, tuple[int, int]] = {}  # dataset state dir -> (lock file descriptor, depth) in this process


@contextlib.contextmanager
def dataset_lock(root: Path | str, command: str) -> Iterator[None]:
    """Hold the dataset's lock: one sdprep command changes a dataset at a time.

    Another process holding it is a JournalError naming it (two commands interleaving their changes
    would make `undo` restore the wrong bytes). The OS drops the lock when its process dies, even by
    SIGKILL, so a crash never leaves a stale lock. Re-entrant within one process.
    """
    folder = state_dir(Path(root).absolute())
    key = str(folder)
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _held[key]
            _held[key] = (fd, depth - 1)
        return
    try:
        import fcntl
    except ImportError:  # not POSIX (Windows): no advisory locks, work unlocked
        yield
        return

    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise JournalError(
            f"{Path(root)} is being changed by another sdprep command ({holder})",
            "wait for it to finish (or stop it), then run this command again",
        ) from None
    except OSError:  # a file system without locks (some network / FUSE mounts): work unlocked
        pass
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}: sdprep {command}".encode(), 0)
    _held[key] = (fd, 1)
    try:
        yield
    finally:
        fd, depth = _held[key]
        if depth <= 1:
            del _held[key]
            os.close(fd)  # releases the lock
        else:
            _held[key] = (fd, depth - 1)


class Journal:
    """The list of operations recorded for one dataset root."""

    def __init__(self, root: Path | str):
        self.root = Path(root).absolute()
        self.dir = state_dir(self.root) / JOURNAL_DIR

    @contextlib.contextmanager
    def begin(self, command: str, argv: list[str] | None = None) -> Iterator[Operation]:
        """Start an operation; changes made through it are undoable as one step."""
        with dataset_lock(self.root, command):
            yield from self._begin(command, argv)

    def _begin(self, command: str, argv: list[str] | None) -> Iterator[Operation]:
        self.dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        n = len(list(self.dir.iterdir()))
        folder = self.dir / f"{stamp}-{n:05d}-{command}"
        folder.mkdir()
        meta = {
            "command": command,
            "argv": argv if argv is not None else sys.argv[1:],
            "started": time.time(),
        }
        atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1))
        op = Operation(self.root, folder)
        ok = False
        try:
            yield op
            ok = True
        finally:
            op.close(ok)

    def operations(self) -> list[Path]:
        """Operation folders, oldest first, excluding those already undone."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.is_dir() and not (p / "undone").exists())

    def describe(self, folder: Path) -> str:
        try:
            meta = loads_json((folder / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        if not isinstance(meta, dict) or not isinstance(meta.get("command"), str):
            raise _foreign_journal(folder, "its meta.json is not one sdprep writes")
        status = "" if meta.get("complete", False) else " (interrupted)"
        argv = meta.get("argv", [])
        parts = argv if argv[:1] == [meta["command"]] else [meta["command"], *argv]  # argv may start with it
        return " ".join(parts) + status


def _foreign_journal(folder: Path, problem: str) -> JournalError:
    """A journal operation sdprep did not write (edited, or shipped with a downloaded dataset)."""
    return JournalError(
        f"{folder}: {problem}",
        f"this journal was edited or came from elsewhere: delete {folder.parent} to drop it",
    )


def _entries(folder: Path) -> list[Entry]:
    entries = []
    log = folder / "entries.jsonl"
    if not log.exists():
        return entries
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(Entry(**loads_json(line)))  # loads_json: nesting bombs are invalid too
        except (json.JSONDecodeError, TypeError):
            continue  # a line cut short by a crash was never acted upon
    return entries


ACTIONS = ("move", "write", "create", "delete", "mkdir")


def _check_entries(base: Path, folder: Path, entries: list[Entry]) -> None:
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
            if not parts or Path(rel).is_absolute() or ".." in parts:
                raise bad(rel)
            parent = os.path.realpath((base / rel).parent)  # follows links in folders that exist
            if not is_within(parent, real_base):
                raise bad(rel)


def undo(root: Path | str) -> tuple[str, int]:
    """Reverse the newest operation on `root`; returns (its description, number of changes reversed)."""
    if not Journal(root).dir.is_dir():
        return _undo(root)  # nothing to undo: says so without creating a lock file
    with dataset_lock(root, "undo"):
        return _undo(root)


def _undo(root: Path | str) -> tuple[str, int]:
    journal = Journal(root)
    ops = journal.operations()
    if not ops:
        raise JournalError(
            f"nothing to undo in {journal.root}",
            "sdprep records its changes only for commands run on this folder",
        )
    folder = ops[-1]
    description = journal.describe(folder)
    entries = _entries(folder)
    base = journal.root
    _check_entries(base, folder, entries)  # a journal that came with a downloaded dataset is input too
    undone = 0
    for entry in reversed(entries):
        path = base / entry.path
        blob = folder / "blobs" / entry.blob if entry.blob else None
        # lexists, not exists: a symlink (even a dangling or looping one) is a file to move back
        if entry.action == "move":
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
            with contextlib.suppress(OSError):
                path.rmdir()
                undone += 1
    (folder / "undone").write_text(time.strftime("%Y-%m-%d %H:%M:%S"))
    shutil.rmtree(folder / "blobs", ignore_errors=True)
    return description, undone


def gc(root: Path | str, keep: int = 0) -> int:
    """Delete journalled operations (and the old content they keep), all but the newest `keep`."""
    journal = Journal(root)
    if not journal.dir.is_dir():
        return 0
    with dataset_lock(root, "gc"):
        return _gc(journal, keep)


def _gc(journal: Journal, keep: int) -> int:
    folders = sorted(p for p in journal.dir.iterdir() if p.is_dir())
    doomed = folders[: max(0, len(folders) - keep)]
    for folder in doomed:
        shutil.rmtree(folder)
    return len(doomed)
