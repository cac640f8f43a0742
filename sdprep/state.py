"""sdprep's own state under `DATASET/.sdprep/`, reached without ever following a symlink.

A dataset may come from anywhere (a download, a shared drive), and its `.sdprep/` folder with it.
sdprep writes, sweeps and deletes in there (the journal, the lock, scrape's staging folder), so a
symlink planted at `.sdprep/journal` or `.sdprep/scrape/incoming` would turn those changes into
changes outside the dataset. Every path into the state folder therefore goes through this module:
each component is checked with lstat (a symlink, or a file where a folder belongs, is a StateError
naming it), folders are created one level at a time, and files are opened with O_NOFOLLOW (and
O_NONBLOCK, so a planted FIFO is refused instead of hanging the command).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from pathlib import Path

from sdprep.errors import StateError

STATE_DIR = ".sdprep"
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
CLOEXEC = getattr(os, "O_CLOEXEC", 0)
NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def state_dir(root: Path | str) -> Path:
    """The hidden folder where sdprep keeps its journal and caches for a dataset (not checked)."""
    return Path(root) / STATE_DIR


def refuse(path: Path | str, what: str = "a symlink") -> StateError:
    """The error for a state path sdprep will not use."""
    return StateError(
        f"{path} is {what}: sdprep keeps its own state there and never follows links in it",
        f"remove {path} (sdprep recreates what it needs); if the dataset was downloaded, "
        "check what else came with it",
    )


def _walk(root: Path | str, parts: tuple[str, ...], *, create: bool, last_is_dir: bool) -> Path:
    """Check (and with `create`, make) root/.sdprep/parts..., one component at a time."""
    path = state_dir(root)
    chain = [path]
    for part in parts:
        if part in ("", ".", "..") or "/" in part:
            raise ValueError(f"not a state path component: {part!r}")
        path = path / part
        chain.append(path)
    for i, p in enumerate(chain):
        want_dir = i < len(chain) - 1 or last_is_dir
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            if not (create and want_dir):
                return path  # the rest does not exist: nothing to follow
            with contextlib.suppress(FileExistsError):  # made meanwhile: checked below
                os.mkdir(p)
            st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            raise refuse(p)
        if want_dir and not stat.S_ISDIR(st.st_mode):
            raise refuse(p, "not a folder")
        if not want_dir and stat.S_ISDIR(st.st_mode):
            raise refuse(p, "a folder where sdprep keeps a file")
    return path


def folder(root: Path | str, *parts: str, create: bool = False) -> Path:
    """The state folder root/.sdprep/parts... (made when `create`), with no symlink on the way."""
    return _walk(root, parts, create=create, last_is_dir=True)


def file(root: Path | str, *parts: str, create_parent: bool = False) -> Path:
    """The state file root/.sdprep/parts...: its folders are real folders, it is not a symlink."""
    return _walk(root, parts, create=create_parent, last_is_dir=False)


def check_inside(path: Path | str, base: Path | str) -> Path:
    """Check that nothing from `base` (a checked state folder) down to `path` is a symlink."""
    path, base = Path(path), Path(base)
    rel = path.relative_to(base)
    current = base
    for i, part in enumerate(rel.parts):
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return path
        if stat.S_ISLNK(st.st_mode):
            raise refuse(current)
        if i < len(rel.parts) - 1 and not stat.S_ISDIR(st.st_mode):
            raise refuse(current, "not a folder")
    return path


def open_fd(path: Path | str, flags: int, mode: int = 0o644) -> int:
    """os.open of a regular file, never following a symlink at `path` (its folders must be checked).

    A FIFO or device planted in `.sdprep/` (a downloaded dataset's `meta.json` or thumbnail) would
    block an open or read forever: the file is opened with O_NONBLOCK, anything but a regular file
    is refused, then the descriptor is made blocking again for ordinary reads and writes.
    """
    try:
        fd = os.open(path, flags | NOFOLLOW | CLOEXEC | NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise refuse(path) from None
        if exc.errno == errno.ENXIO:  # a FIFO opened for writing with no reader
            raise refuse(path, "not a regular file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise refuse(path, "not a regular file")
        if NONBLOCK:
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(path: Path | str) -> bytes:
    """The content of a state file (FileNotFoundError when missing; a symlink, FIFO, ... is refused)."""
    with os.fdopen(open_fd(path, os.O_RDONLY), "rb") as f:
        return f.read()


def read_text(path: Path | str) -> str:
    return read_bytes(path).decode("utf-8")


def write_new(path: Path | str, data: bytes) -> None:
    """Write a small state file in place (created or truncated), never through a symlink."""
    fd = open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as exc:  # a full disk fails the write with no file name: give it one
        exc.filename = exc.filename or str(path)
        raise


def entries(path: Path | str) -> list[os.DirEntry[str]]:
    """The entries of a checked state folder, sorted by name ([] when it does not exist)."""
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except FileNotFoundError:
        return []


def remove(path: Path | str) -> None:
    """Remove a state file or folder; a symlink is removed as a link, its target never touched."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)  # never follows links inside (fd-based where the OS allows)
    else:
        os.unlink(path)
