"""Safe file operations: atomic writes, and a per-dataset journal that makes every change undoable.

Every destructive change sdprep makes to a dataset (a move, an overwrite, a deletion, a new file)
goes through an `Operation`, which records it in `DATASET/.sdprep/journal/op<seq>-<command>/`
*before* doing it, with what it is about to write (a hash), and keeps the old bytes (a hard link to
the old inode when possible, else a copy). Operations are ordered by a sequence number, never by a
clock. `undo(root)` (sdprep/undo.py) reverses the newest operation that has not been undone, newest
change first. An operation that was interrupted (crash, SIGKILL) is still undoable: every entry is
durable before its change happens, and undo tolerates changes that never took place.
"""

from __future__ import annotations

import contextlib
import filecmp
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sdprep import state
from sdprep.dataset import is_within, loads_json
from sdprep.errors import JournalError
from sdprep.faults import pause_point
from sdprep.lock import dataset_lock, temp_prefix
from sdprep.state import state_dir

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


@contextlib.contextmanager
def naming(path: Path | str) -> Iterator[None]:
    """Give an OSError raised inside the name of the file being written when the OS gave none.

    A full disk fails `write` and `fsync` with a bare ENOSPC; the user must learn which file it was.
    """
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


def _replace_atomically(
    path: Path, write: Callable[[IO[Any]], object], *, binary: bool, sync: bool, keep_same: bool
) -> bool:
    """Write a temporary file beside `path` with `write(file)`, then rename it over `path`.

    The temporary name carries the pid (`.sdprep-tmp-<pid>-...`): a killed run's leftovers are
    removed by the next command on the dataset (sdprep/lock.py).
    """
    with naming(path):
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(), suffix=".tmp", dir=path.parent)
        with removed_on_error(tmp):
            f = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")
            with f:
                give_mode(f.fileno(), path)
                pause_point("write")
                write(f)
                f.flush()
                if sync:
                    os.fsync(f.fileno())
            if keep_same and path.is_file() and filecmp.cmp(tmp, path, shallow=False):
                os.unlink(tmp)
                return False
            pause_point("write")
            os.replace(tmp, path)
    return True


@contextlib.contextmanager
def removed_on_error(tmp: Path | str) -> Iterator[None]:
    """Delete the temporary file `tmp` when the block fails in any way (an error, Ctrl-C), then let
    the failure go on: a file that was never put in place leaves nothing behind."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
    done: int = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
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


def atomic_write_dir(final: Path, write: Callable[[Path], object]) -> None:
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


JOURNAL_DIR = "journal"
NEW_PREFIX = ".new-"  # an operation folder being set up; renamed to its final name when whole
GONE_PREFIX = ".gone-"  # an operation folder `gc` is deleting
_OP_NAME = re.compile(r"^op(\d+)-")
_active: set[str] = set()  # operation folders this process is recording into


def sha256_sig(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_sig(path: Path | str) -> str:
    """The signature undo compares a file with: its sha256 (read in chunks), or a link's target."""
    if os.path.islink(path):
        return "link:" + os.readlink(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:  # in chunks (hashlib.file_digest is Python 3.11+)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def inode_sig(st: os.stat_result) -> str:
    """A hard link's signature: the inode it shares (with size and mtime), cheap for big files."""
    return f"ino:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


@dataclass
class Entry:
    """One journalled change. `blob` is the saved old content, relative to the operation folder;
    `sig` says what the change put at `path` (see file_sig), so undo can tell a later edit."""

    action: str  # "move" | "write" | "create" | "delete" | "mkdir"
    path: str  # relative to the dataset root
    dest: str | None = None
    blob: str | None = None
    sig: str | None = None

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
        os.makedirs(self.blobs, exist_ok=True)
        fd = state.open_fd(folder / "entries.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self._log = os.fdopen(fd, "a", encoding="utf-8")
        self._n = 0
        self.changes = 0
        self._linkable: dict[tuple[int, int], bool] = {}
        _active.add(str(folder))

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
        with naming(self.folder / "entries.jsonl"):
            pause_point("write")
            self._log.write("".join(e.to_json() + "\n" for e in entries))
            self._log.flush()
            os.fsync(self._log.fileno())
        self.changes += len(entries)

    def _parents(self, path: Path, made: set[Path] | None = None) -> list[Entry]:
        """mkdir entries for the missing folders above `path` (outermost first), so undo removes them."""
        missing = []
        parent = path.parent
        while not os.path.lexists(parent) and parent != self.root and parent not in (made or ()):
            missing.append(parent)
            parent = parent.parent
        if made is not None:
            made.update(missing)
        return [Entry("mkdir", self._rel(p)) for p in reversed(missing)]

    def _keep(self, path: Path) -> str:
        """Preserve the current content of `path` in the journal and return its blob name."""
        self._n += 1
        blob = f"{self._n:07d}"
        target = self.blobs / blob
        with naming(target):
            try:
                os.link(path, target, follow_symlinks=False)  # the old inode survives the replace
            except (OSError, NotImplementedError):  # no hard links here (or no follow_symlinks)
                pause_point("write")
                shutil.copy2(path, target, follow_symlinks=False)
        return blob

    def _write_entries(
        self, path: Path, new: bytes | Path, made: set[Path] | None = None
    ) -> list[Entry] | None:
        """The journal entries for giving `path` the content `new` (bytes, or a finished file's): the
        old content kept for undo, or for a new file its missing folders (see `_parents`) and its
        creation. None when `path` is a regular file that holds that content already: nothing to do."""
        same: Callable[[], bool]
        if isinstance(new, Path):
            sig, same = file_sig(new), lambda: filecmp.cmp(new, path, shallow=False)  # streamed
        else:
            sig, same = sha256_sig(new), lambda: path.read_bytes() == new
        if os.path.lexists(path):
            if path.is_file() and not path.is_symlink() and same():
                return None
            return [Entry("write", self._rel(path), blob=self._keep(path), sig=sig)]
        return [*self._parents(path, made), Entry("create", self._rel(path), sig=sig)]

    # -- changes -----------------------------------------------------------------------------
    def write_bytes(self, path: Path | str, data: bytes) -> None:
        """Atomically write `path`, keeping its previous content (if any) for undo."""
        path = Path(path).absolute()
        entries = self._write_entries(path, data)
        if entries is None:
            return
        self._record_many(entries)
        path.parent.mkdir(parents=True, exist_ok=True)
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
        entries = self._write_entries(path, tmp)
        if entries is None:
            os.unlink(tmp)
            return False
        self._record_many(entries)
        give_mode(tmp, path)
        with open(tmp, "rb") as f, naming(tmp):
            os.fsync(f.fileno())
        pause_point("change")
        os.replace(tmp, path)
        return True

    def write_many(self, files: Sequence[tuple[Path | str, bytes]]) -> int:
        """Write many small files, in order, with one journal sync instead of two syncs per file.

        Every entry (and the old content) is in the journal before the first write; the writes are
        atomic but not fsynced one by one, so after a power loss a new file may be empty while the
        journal still restores the old one. Files that already hold `data` are left alone. Returns
        the number of files written.
        """
        todo: list[tuple[Path, bytes]] = []
        entries: list[Entry] = []
        made: set[Path] = set()
        for name, data in files:
            path = Path(name).absolute()
            new = self._write_entries(path, data, made)
            if new is None:
                continue
            entries += new
            todo.append((path, data))
        if not todo:
            return 0
        self._record_many(entries)
        for path, data in todo:
            path.parent.mkdir(parents=True, exist_ok=True)
            pause_point("change")
            atomic_write_bytes(path, data, sync=False)
        return len(todo)

    def move(self, src: Path | str, dst: Path | str) -> None:
        """Rename `src` to `dst`; refuses to overwrite an existing `dst`."""
        self.move_many([(src, dst)])

    def move_many(self, pairs: Sequence[tuple[Path | str, Path | str]]) -> None:
        """Rename many files with one journal sync (every entry is durable before the first rename).

        Refuses before changing anything when a destination exists or is named twice.
        """
        moves = [(Path(s).absolute(), Path(d).absolute()) for s, d in pairs]
        seen: set[Path] = set()
        for src, dst in moves:
            if dst.exists() or dst.is_symlink() or dst in seen:
                raise JournalError(f"refusing to move {src} over existing {dst}", "remove or rename it first")
            seen.add(dst)
        entries: list[Entry] = []
        made: set[Path] = set()
        for src, dst in moves:
            entries += [*self._parents(dst, made), Entry("move", self._rel(src), dest=self._rel(dst))]
        self._record_many(entries)
        for src, dst in moves:
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

    def relink(self, path: Path | str, target: str) -> bool:
        """Point the symlink `path` at `target` (in one atomic step); False when it already does."""
        path = Path(path).absolute()
        if os.path.islink(path) and os.readlink(path) == target:
            return False
        sig = "link:" + target
        if os.path.lexists(path):
            self._record(Entry("write", self._rel(path), blob=self._keep(path), sig=sig))
        else:
            self._record_many([*self._parents(path), Entry("create", self._rel(path), sig=sig)])
        tmp = path.with_name(f"{temp_prefix()}{os.urandom(4).hex()}.tmp")
        pause_point("change")
        os.symlink(target, tmp)
        with removed_on_error(tmp):
            os.replace(tmp, path)
        return True

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
        if not copy and not os.path.lexists(dst):
            return self.place_many([(src, dst)])[0]
        self.write_bytes(dst, src.read_bytes())
        return True

    def place_many(self, pairs: Sequence[tuple[Path | str, Path | str]], *, copy: bool = False) -> list[bool]:
        """`place` for many files; new hard links cost one journal sync in all, not one each.

        Returns, per pair, whether `dst` changed.
        """
        changed: list[bool] = []
        fresh: list[tuple[Path, Path, bool]] = []
        entries: list[Entry] = []
        made: set[Path] = set()
        for src, dst in pairs:
            src, dst = Path(src), Path(dst).absolute()
            if copy or os.path.lexists(dst):
                changed.append(self.place(src, dst, copy=copy))  # re-runs: usually no work
                continue
            link = self._can_link(src, dst)
            # a hard link shares the inode: that is what undo finds at dst if nobody changed it
            sig = inode_sig(src.stat()) if link else file_sig(src)
            fresh.append((src, dst, link))
            changed.append(True)
            entries += [*self._parents(dst, made), Entry("create", self._rel(dst), sig=sig)]
        if fresh:
            self._record_many(entries)
        for src, dst, link in fresh:
            dst.parent.mkdir(parents=True, exist_ok=True)
            pause_point("change")
            if link:
                try:
                    os.link(src, dst)
                    continue
                except OSError:  # refused after all: copy (undo will ask before removing the copy)
                    pass
            atomic_write_bytes(dst, src.read_bytes(), sync=False)
        return changed

    def _can_link(self, src: Path, dst: Path) -> bool:
        """Whether `src` can be hard-linked beside `dst` (tried once per pair of file systems)."""
        anchor = dst.parent
        while not anchor.is_dir():
            anchor = anchor.parent
        key = (src.stat().st_dev, anchor.stat().st_dev)
        if key not in self._linkable:
            probe = anchor / f"{temp_prefix()}{os.urandom(4).hex()}.tmp"
            try:
                os.link(src, probe)
            except OSError:
                self._linkable[key] = False
            else:
                os.unlink(probe)
                self._linkable[key] = True
        return self._linkable[key]

    def mkdir(self, path: Path | str) -> None:
        path = Path(path).absolute()
        if path.exists():
            return
        self._record_many([*self._parents(path), Entry("mkdir", self._rel(path))])
        path.mkdir(parents=True)

    def close(self, ok: bool) -> None:
        _active.discard(str(self.folder))
        self._log.close()
        meta_path = self.folder / "meta.json"
        meta = json.loads(state.read_text(meta_path))
        meta.update(finished=time.time(), complete=ok, changes=self.changes)
        if self.changes == 0:
            state.remove(self.folder)
        else:
            atomic_write_text(meta_path, json.dumps(meta, indent=1))


def op_order(name: str) -> tuple[int, int, str]:
    """Sort key of an operation folder: its sequence number; folders of older versions first."""
    m = _OP_NAME.match(name)
    return (1, int(m[1]), name) if m else (0, 0, name)


class Journal:
    """The list of operations recorded for one dataset root."""

    def __init__(self, root: Path | str):
        self.root = Path(root).absolute()
        self.dir = state_dir(self.root) / JOURNAL_DIR

    def checked_dir(self, create: bool = False) -> Path:
        """The journal folder, with no symlink on the way (a StateError otherwise)."""
        return state.folder(self.root, JOURNAL_DIR, create=create)

    @contextlib.contextmanager
    def begin(self, command: str, argv: list[str] | None = None) -> Iterator[Operation]:
        """Start an operation; changes made through it are undoable as one step."""
        with dataset_lock(self.root, command):
            self.tidy()
            yield from self._begin(command, argv)

    def _begin(self, command: str, argv: list[str] | None) -> Iterator[Operation]:
        jdir = self.checked_dir(create=True)
        seq = 1 + max((op_order(e.name)[1] for e in state.entries(jdir)), default=0)
        name = f"op{seq:06d}-{command}"
        new = jdir / f"{NEW_PREFIX}{name}"
        state.remove(new)
        meta = {
            "command": command,
            "argv": argv if argv is not None else sys.argv[1:],
            "started": time.time(),
            "seq": seq,
        }
        try:  # built aside and renamed: an operation folder always has its whole meta.json
            os.mkdir(new)
            with naming(new / "meta.json"):
                pause_point("begin")
                atomic_write_text(new / "meta.json", json.dumps(meta, indent=1))
            os.rename(new, jdir / name)
        except BaseException:
            with contextlib.suppress(OSError):
                state.remove(new)
            raise
        op = Operation(self.root, jdir / name)
        ok = False
        try:
            yield op
            ok = True
        finally:
            op.close(ok)

    def folders(self) -> list[Path]:
        """Every operation folder (undone ones too), oldest first; a symlink among them is refused."""
        jdir = self.checked_dir()
        out = []
        for e in state.entries(jdir):
            if e.name.startswith("."):
                continue
            if e.is_symlink():
                raise state.refuse(Path(e.path))
            if e.is_dir(follow_symlinks=False):
                out.append(Path(e.path))
        return sorted(out, key=lambda p: op_order(p.name))

    def operations(self) -> list[Path]:
        """Operation folders, oldest first, excluding those already undone."""
        return [p for p in self.folders() if not os.path.lexists(p / "undone")]

    def tidy(self) -> int:
        """Remove what interrupted runs leave (call with the lock held): folders still being set up
        or being deleted by gc, and operations that recorded no change (no meta.json, or killed
        before their first entry)."""
        jdir = self.checked_dir()
        removed = 0
        for e in state.entries(jdir):
            path = Path(e.path)
            if e.path in _active:
                continue
            if e.name.startswith((NEW_PREFIX, GONE_PREFIX)) or (
                e.is_dir(follow_symlinks=False) and not e.name.startswith(".") and _empty_operation(path)
            ):
                state.remove(path)
                removed += 1
        return removed

    def describe(self, folder: Path) -> str:
        meta = read_meta(folder)
        if meta is None:
            raise _foreign_journal(folder, "its meta.json is not one sdprep writes")
        status = "" if meta.get("complete", False) else " (interrupted)"
        argv = meta.get("argv", [])
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            argv = []
        parts = argv if argv[:1] == [meta["command"]] else [meta["command"], *argv]  # argv may start with it
        return " ".join(parts) + status


def read_meta(folder: Path) -> dict[str, Any] | None:
    """An operation's meta.json, or None when it is missing, unreadable or not sdprep's."""
    try:
        meta = loads_json(state.read_text(folder / "meta.json"))
    except (OSError, ValueError, JournalError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("command"), str):
        return None
    return meta


def _empty_operation(folder: Path) -> bool:
    """An operation folder that holds no change: nothing in its entry log, no kept content."""
    for name in ("entries.jsonl", "blobs"):
        path = folder / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_size == 0:
            continue
        if stat.S_ISDIR(st.st_mode) and not any(os.scandir(path)):
            continue
        return False
    return not os.path.lexists(folder / "undone")


def _foreign_journal(folder: Path, problem: str) -> JournalError:
    """A journal operation sdprep did not write (edited, or shipped with a downloaded dataset)."""
    return JournalError(
        f"{folder}: {problem}",
        f"this journal was edited or came from elsewhere: delete {folder} to drop that operation "
        f"(or {folder.parent} to drop all undo history)",
    )


def undo(root: Path | str, *, force: bool = False) -> tuple[str, int]:
    """Reverse the newest operation on `root`; returns (its description, number of changes reversed).

    See sdprep/undo.py: files changed since the operation are refused unless `force`.
    """
    from sdprep.undo import undo_last

    return undo_last(root, force=force)


def gc(root: Path | str, keep: int = 0) -> int:
    """Delete journalled operations (and the old content they keep), all but the newest `keep`."""
    from sdprep.undo import collect

    return collect(root, keep=keep)
