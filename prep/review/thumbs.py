"""Thumbnails for the review page, made on first request and cached in `DATASET/.sdprep/thumbs/`.

A thumbnail's file name hashes the image's relative path, size and mtime with the thumbnail size,
so an edited or replaced image gets a new one; the cache is sdprep's own state (not journalled,
never read as data) and may be deleted at any time.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from sdprep import state
from sdprep.errors import StateError
from sdprep.fileops import atomic_write_bytes
from sdprep.images import load_image

THUMB_DIR = "thumbs"
THUMB_SIZE = 256


def thumb_name(rel: str, path: Path, size: int) -> str:
    st = os.stat(path)
    key = f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{size}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(key).hexdigest()[:32] + ".jpg"


def render_thumbnail(path: Path, size: int = THUMB_SIZE, root: Path | None = None) -> bytes:
    """A JPEG of the image (EXIF orientation applied, transparency on white) fitting size x size;
    `root`: the dataset folder, for the symlink rule."""
    im = load_image(path, "RGB", draft=(size, size), root=root)
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=82)
    return buf.getvalue()


def thumbnail(root: Path, rel: str, path: Path, size: int = THUMB_SIZE) -> bytes:
    """The cached thumbnail of the image at `path` (made and stored on first use)."""
    folder = state.folder(root, THUMB_DIR, create=True)
    cached = state.file(root, THUMB_DIR, thumb_name(rel, path, size))
    try:
        return state.read_bytes(cached)
    except FileNotFoundError:
        pass
    except StateError:
        if os.path.islink(cached):
            raise  # a planted link: refused, as everywhere in .sdprep/
        state.remove(cached)  # a FIFO or device where a cached thumbnail goes: a cache, so made anew
    data = render_thumbnail(path, size, root)
    state.check_inside(cached, folder)
    atomic_write_bytes(cached, data, sync=False)
    return data
