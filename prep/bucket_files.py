"""What `sdprep bucket` writes per image beyond links: PNG copies, and the record of its own files.

- PNG copies: kohya trains an image's stored pixels (no EXIF rotation) and reads a loss mask from
  its alpha channel (`alpha_mask = true`). An image whose EXIF orientation rotates it, or whose mask
  travels in its alpha channel, is therefore written as `<stem>.png` with the pixels as displayed
  (and the mask as alpha), so kohya, sdprep's trainer and the tagger see the same image.
- The record (`OUT/.sdprep/bucket-files.txt`, one path relative to OUT per line): every file a
  bucket run wrote for its images. A re-run removes, through the journal, the files of the previous
  run that it no longer writes (e.g. `1_tok/` after re-bucketing with 10 repeats): `sdprep undo`
  restores them, and files sdprep did not write are never touched. An OUT bucketed before the record
  existed is cleaned from the journal's record of what earlier bucket runs created.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sdprep import state
from sdprep.dataset import is_within
from sdprep.fileops import Journal, Operation, read_meta
from sdprep.images import ImageHeader, load_image
from sdprep.lock import temp_prefix

RECORD_NAME = "bucket-files.txt"


def copy_reason(header: ImageHeader, mask: Path | None, alpha_mask: bool) -> str | None:
    """Why an image must be written as a PNG copy rather than linked (None: a link trains the same).

    `alpha_mask`: its subset reads masks from the alpha channel (`mask` is its mask file, if any).
    """
    if header.rotated:
        return "EXIF-rotated"
    if alpha_mask and mask is not None:
        return "mask as alpha"
    if alpha_mask and header.has_alpha:
        return "own transparency"  # kohya would read it as a loss mask: written opaque, full loss
    return None


def png_copy(image: Path, mask: Path | None, alpha_mask: bool, root: str | None = None) -> bytes:
    """The PNG kohya should train: the image as displayed (EXIF applied, transparency on white), with
    the mask's red channel as alpha when the subset reads alpha masks (full alpha without a mask).
    `root`: the dataset folder, for the symlink rule."""
    im = load_image(image, "RGB", root=root)
    if alpha_mask:
        alpha = load_image(mask, "RGB", background=(0, 0, 0), root=root).getchannel("R") if mask else None
        im = im.convert("RGBA")
        im.putalpha(alpha if alpha is not None else 255)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _key(rel: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(rel.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big"
    )


class Written:
    """The files this run wrote for its images, streamed to a temp file (8 bytes each held in memory)."""

    def __init__(self, out: Path):
        self.out = out
        self.keys = array("Q")
        folder = state.folder(out, create=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(), suffix="-bucket-files", dir=folder)
        self.tmp = Path(tmp)
        self.file = open(fd, "w", encoding="utf-8", errors="surrogateescape", newline="\n")  # noqa: SIM115

    def add(self, path: Path) -> None:
        rel = path.relative_to(self.out).as_posix()
        self.file.write(rel + "\n")
        self.keys.append(_key(rel))

    def finish(self, op: Operation) -> list[str]:
        """Remove the previous run's files that this run did not write; install the new record.

        Returns the removed paths (relative to OUT).
        """
        self.file.close()
        new = np.sort(np.frombuffer(self.keys, dtype=np.uint64)) if self.keys else np.zeros(0, np.uint64)
        removed, folders = [], set()
        for rel in _previous(self.out):
            k = np.uint64(_key(rel))
            i = int(np.searchsorted(new, k))
            if i < len(new) and new[i] == k:
                continue
            path = self.out / rel
            if not _ours(self.out, path) or not os.path.isfile(path) or os.path.islink(path):
                continue
            op.delete(path)
            removed.append(rel)
            folders.add(path.parent)
        op.install(self.tmp, state.file(self.out, RECORD_NAME))
        for folder in sorted(folders, key=lambda p: -len(p.parts)):
            _remove_empty(folder, self.out)
        return removed

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def _ours(out: Path, path: Path) -> bool:
    """Only image folders (`img/`, `reg/`) hold files a bucket run wrote per image."""
    parts = path.relative_to(out).parts
    return len(parts) >= 3 and parts[0] in ("img", "reg") and is_within(os.path.abspath(path), str(out))


def _previous(out: Path) -> Iterator[str]:
    """The previous run's record, or (an OUT bucketed before records existed) the journal's."""
    try:
        text = state.read_bytes(state.file(out, RECORD_NAME)).decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        yield from _journal_created(out)
        return
    for rel in text.splitlines():
        if rel and not rel.startswith("/") and ".." not in rel.split("/"):
            yield rel


def _journal_created(out: Path) -> Iterator[str]:
    """Paths that earlier bucket runs created, from the journal (nothing once `gc` removed it)."""
    from sdprep.undo import read_entries

    for folder in Journal(out).operations():
        meta = read_meta(folder)
        if meta is not None and meta.get("command") == "bucket":
            for entry in read_entries(folder):
                if entry.action == "create":
                    yield entry.path


def _remove_empty(folder: Path, out: Path) -> None:
    """Remove `folder` and its emptied parents up to (not including) OUT/img or OUT/reg."""
    while len(folder.relative_to(out).parts) >= 2:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


__all__ = ["RECORD_NAME", "Written", "copy_reason", "png_copy"]
