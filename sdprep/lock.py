"""One lock per dataset tree, and the temporary files that dead runs leave behind.

A command that changes a folder holds `FOLDER/.sdprep/lock` (an advisory flock the OS drops when
the process dies, even by SIGKILL). Datasets nest (`data/` and its repeat folders `data/10_x/`), and
two commands on nested folders would interleave their changes to the same files, so a command is
also refused while a command holds the lock of any folder above its folder or below it: each
command first takes its own lock, then probes the others, so of two racing commands at least one
sees the other.

While the lock is held no other sdprep command writes in the tree, so the temporary files of
sdprep's atomic writes (`.sdprep-tmp-<pid>-...`) whose process is gone are leftovers of a killed
run: `dataset_lock` removes them. sdprep before 2026-12 named them `.<file>.<8 random>.tmp` (mkstemp
with the target's name): those are removed only when the target is a kind of file sdprep writes (a
caption, an image, its JSON/TOML) and the temp file is over an hour old, so another tool's
in-progress temp file or a user's `.notes.abcd1234.tmp` is never touched.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from sdprep import state
from sdprep.errors import JournalError

LOCK_FILE = "lock"
TEMP_PREFIX = ".sdprep-tmp-"
_TEMP = re.compile(r"^\.sdprep-tmp-(\d+)-")
# mkstemp names of sdprep before 2026-12: `.<target name>.<8 random>.tmp`, for the files it wrote
_LEGACY_TEMP = re.compile(r"^\..+\.(txt|caption|json|toml|png|jpe?g|webp|bmp|gif)\.[a-z0-9_]{8}\.tmp$", re.I)
LEGACY_AGE = 3600.0  # seconds: a legacy-named temp file younger than this may be another tool's, at work
SKIP_DIRS = {state.STATE_DIR, ".git", "__pycache__"}
_held: dict[str, tuple[int, int]] = {}  # real state dir -> (lock file descriptor, depth) in this process
_held_guard = threading.RLock()  # _held is shared by the process's threads (re-entered while probing)


def temp_prefix() -> str:
    """The name prefix of this process's temporary files (`mkstemp(prefix=temp_prefix())`)."""
    return f"{TEMP_PREFIX}{os.getpid()}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def is_dead_temp(name: str, mtime: float | None = None) -> bool:
    """Whether `name` is a temporary file of an sdprep process that no longer runs.

    A legacy name (no pid in it) counts only with its `mtime` given and over LEGACY_AGE old.
    """
    m = _TEMP.match(name)
    if m:
        return not _alive(int(m[1]))
    return mtime is not None and time.time() - mtime > LEGACY_AGE and bool(_LEGACY_TEMP.match(name))


def _dead_temps(dirpath: str, filenames: list[str]) -> list[str]:
    """The temporary files of dead sdprep runs among `filenames` in `dirpath`."""
    found = []
    for name in filenames:
        if not name.startswith("."):
            continue
        path = os.path.join(dirpath, name)
        mtime = None
        if not _TEMP.match(name) and _LEGACY_TEMP.match(name):
            try:
                mtime = os.lstat(path).st_mtime
            except OSError:
                continue
        if is_dead_temp(name, mtime):
            found.append(path)
    return found


@contextlib.contextmanager
def dataset_lock(root: Path | str, command: str) -> Iterator[None]:
    """Hold the lock of the dataset tree at `root`: one sdprep command changes a tree at a time.

    A command running on `root`, on a folder above it or on one below it is a JournalError naming
    it. Re-entrant within one process. On entry, temporary files of dead runs are removed.
    """
    root = Path(root).absolute()
    key = os.path.realpath(state.state_dir(root))
    if importlib.util.find_spec("fcntl") is None:  # not POSIX (Windows): no advisory locks, work unlocked
        yield
        return
    with _held_guard:  # a second thread of this process waits here, then re-enters
        _acquire(root, key, command)
    try:
        yield
    finally:
        with _held_guard:
            fd, depth = _held[key]
            if depth <= 1:
                del _held[key]
                os.close(fd)  # releases the lock
            else:
                _held[key] = (fd, depth - 1)


def _acquire(root: Path, key: str, command: str) -> None:
    """Take the lock of `root` (or count one more use of it when this process holds it)."""
    import fcntl

    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        return
    root.mkdir(parents=True, exist_ok=True)  # bucket's output folder may not exist yet
    path = state.file(root, LOCK_FILE, create_parent=True)
    fd = state.open_fd(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise _busy(root, root, holder) from None
    except OSError:  # a file system without locks (some network / FUSE mounts): work unlocked
        pass
    _held[key] = (fd, 1)
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}: sdprep {command}".encode(), 0)
        except OSError as exc:  # a full disk: say which file
            exc.filename = exc.filename or str(path)
            raise
        temps = _check_tree(root)
        for temp in temps:
            with contextlib.suppress(OSError):
                os.unlink(temp)
    except BaseException:
        del _held[key]
        os.close(fd)
        raise


def _holder(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"


def _busy(root: Path, other: Path, holder: str) -> JournalError:
    if other == root:
        where = ""
    elif is_inside(root, other):
        where = f" on {other}, which contains it"
    else:
        where = f" on {other}, inside it"
    return JournalError(
        f"{root} is being changed by another sdprep command ({holder}){where}",
        "wait for it to finish (or stop it), then run this command again",
    )


def is_inside(path: Path, folder: Path) -> bool:
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return p != f and os.path.commonpath([p, f]) == f


def _probe(folder: Path) -> str | None:
    """The holder of `folder`'s lock when another process holds it, else None."""
    import fcntl

    lock = folder / state.STATE_DIR / LOCK_FILE
    with _held_guard:
        if os.path.realpath(lock.parent) in _held:
            return None  # this process: a re-entrant use, not a conflict
    try:  # O_NONBLOCK: a FIFO planted as the lock file must not hang the probe
        fd = os.open(lock, os.O_RDONLY | state.NOFOLLOW | state.CLOEXEC | state.NONBLOCK)
    except OSError:  # no lock there (or a link: not sdprep's)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)
    except OSError:
        return None
    finally:
        os.close(fd)  # also drops the probe's shared lock
    return None


def _check_tree(root: Path) -> list[str]:
    """Refuse when a folder above or below `root` is locked; return the dead temporary files below."""
    real = Path(os.path.realpath(root))
    for above in real.parents:
        holder = _probe(above)
        if holder:
            raise _busy(root, above, holder)
    temps = []
    for dirpath, _, filenames in os.walk(state.state_dir(root)):  # the state's own scratch files too
        temps += _dead_temps(dirpath, filenames)
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath != str(root) and state.STATE_DIR in dirnames:
            holder = _probe(Path(dirpath))
            if holder:
                raise _busy(root, Path(dirpath), holder)
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        temps += _dead_temps(dirpath, filenames)
    return temps
