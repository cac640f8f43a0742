"""Typed errors. Library code raises these; only `sdprep.cli` turns them into `Error: ...` and exit 1."""

from __future__ import annotations

import codecs
import contextlib
import difflib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO


class SdprepError(Exception):
    """Base error: a message saying what went wrong and a hint saying how to fix it.

    Every error carries `path` (the file it is about, or None) and `reason` (the message without
    that path), so a stage lists any of them as one file's failure the same way (`sdprep.stage`).
    """

    path: Path | None = None

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.reason = message

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nHint: {self.hint}"

    def __reduce__(self) -> tuple[Callable[..., SdprepError], tuple[Any, ...]]:
        """Pickled with all its attributes: a per-file error travels back from a Ray worker as a value
        (Exception's own pickling calls `cls(*args)`, which loses the hint and breaks FileError)."""
        return (_rebuild_error, (type(self), self.args, self.__dict__))


def _rebuild_error(cls: type[SdprepError], args: tuple[Any, ...], state: dict[str, Any]) -> SdprepError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


class ConfigError(SdprepError):
    """A configuration value, key or file is wrong."""


class DatasetError(SdprepError):
    """A dataset folder or one of its files is unusable."""


class FileError(DatasetError):
    """One file of a dataset cannot be used; the message is `<path>: <reason>`."""

    def __init__(self, path: Path | str, reason: str, hint: str | None = None):
        self.path = Path(path)
        super().__init__(f"{self.path}: {reason}", hint)
        self.reason = reason


class ImageError(FileError):
    """An image file cannot be read (corrupt, truncated, not an image, too large)."""


class CaptionError(FileError):
    """A caption or sidecar file cannot be read."""


class ModelError(SdprepError):
    """A model cannot be found, downloaded or loaded."""


class JournalError(SdprepError):
    """The undo journal is missing, damaged or has nothing to undo."""


class StateError(JournalError):
    """sdprep's own state folder (`.sdprep/`) holds something it will not use, e.g. a symlink."""


class InstallError(SdprepError):
    """The installed packages are missing or known not to work together."""


class ClusterError(SdprepError):
    """A Ray cluster cannot be reached, or its workers keep dying (`--executor ray`)."""


class BatchError(SdprepError):
    """A stage's batch function returned a different number of results than it was given items."""


class TrainingError(SdprepError):
    """Training stopped (NaN loss, failed save check, bad resume state...)."""


_OS_HINTS = {
    "ENAMETOOLONG": "shorten the file name (`sdprep rename DIR` gives short sequential names)",
    "ENOSPC": "free disk space and run the command again (it resumes; `sdprep undo` reverts)",
    "EDQUOT": "free disk space (quota) and run the command again",
    "EACCES": "fix the permissions (chmod / chown) of the file or its folder",
    "EPERM": "fix the permissions (chmod / chown) of the file or its folder",
    "EROFS": "the file system is read-only: copy the dataset somewhere writable",
    "EIO": "the disk reported a read/write error: check the drive, copy the file elsewhere",
}


def from_os_error(exc: OSError, path: Path | str | None = None) -> DatasetError:
    """A file-system error as a typed per-file error: the file it names, the reason and a hint.

    `path` is the dataset file being processed when the OS error named another one (a companion).
    """
    import errno as errno_names

    name = errno_names.errorcode.get(exc.errno or 0, "")
    reason = exc.strerror or str(exc)
    culprit = exc.filename
    if culprit is not None and path is not None and Path(culprit) != Path(path):
        reason = f"{reason}: {Path(culprit).name}"
    return ImageError(path if path is not None else (culprit or "?"), reason, _OS_HINTS.get(name))


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """Return 'did you mean "x"?' for the closest choice, or None when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f'did you mean "{close[0]}"?' if close else None


def unknown_choice(kind: str, value: str, choices: Iterable[str]) -> ConfigError:
    """Build the error for a value outside a known set, listing the valid choices."""
    choices = sorted(choices)
    hint = did_you_mean(value, choices)
    listing = "valid: " + ", ".join(choices)
    return ConfigError(f'unknown {kind} "{value}"', f"{hint} {listing}" if hint else listing)


# -- file names that are not UTF-8 ------------------------------------------------------------
# Python reads such a name as text with lone surrogates (U+DC80-U+DCFF stand for the bytes
# 0x80-0xFF), which no UTF-8 output accepts. sdprep shows those bytes as `\xNN`, as Python's
# bytes repr does, so the name stays recognisable and a message never crashes the command.


def _escaped(text: str) -> str:
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        else:
            out.append(ch.encode("ascii", "backslashreplace").decode("ascii"))
    return "".join(out)


def printable(text: str) -> str:
    """`text` with the undecodable bytes of a non-UTF-8 file name shown as `\\xNN`."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join(_escaped(ch) if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text)


def _escape_unencodable(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    return _escaped(exc.object[exc.start : exc.end]), exc.end


NAME_ESCAPES = "sdprep-escape"
codecs.register_error(NAME_ESCAPES, _escape_unencodable)


def escape_unencodable_output(*streams: TextIO) -> None:
    """Make text streams (stdout, stderr) write what they cannot encode as escapes: never raising
    (errors="strict"), never raw bytes that make the output invalid UTF-8 ("surrogateescape")."""
    for stream in streams:
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):  # a closed or odd stream: leave it
                reconfigure(errors=NAME_ESCAPES)
