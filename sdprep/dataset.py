"""The dataset model: images, their caption files, their JSON sidecars, and kohya repeat-folder names.

Conventions (kohya's and gallery-dl's, so existing folders work as they are):
- caption: `<stem>.txt` beside the image (`001.png` -> `001.txt`), UTF-8, tags joined by ", ";
- sidecar: `<name>.<ext>.json` beside the image (`001.png` -> `001.png.json`), the name gallery-dl's
  metadata post-processor writes, so a scraped file's metadata is its starting sidecar. sdprep keeps
  what it derives under the top-level key "sdprep"; every other key is preserved untouched;
- masks: `<dataset>/masks/<stem>.png` (kohya's `conditioning_data_dir` layout); folders named
  `masks` or `masks_<name>` are never read as images;
- sdprep's own state lives in the hidden `.sdprep/` folder and is never treated as data.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import stat
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdprep.errors import CaptionError, DatasetError
from sdprep.sidecar_schema import sidecar_problem
from sdprep.tags import normalise_text

BASE_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
CAPTION_EXT = ".txt"
SIDECAR_SUFFIX = ".json"
SDPREP_KEY = "sdprep"
MASK_DIR = "masks"
DUPLICATES_DIR = "duplicates"  # where `sdprep dedup` moves the copies it does not keep
REJECTED_DIR = "rejected"  # where `sdprep scrape` puts downloads that fail its checks
EXCLUDED_DIR = "excluded"  # where `sdprep review` moves the images a person excludes
IGNORED_DIRS = {".sdprep", MASK_DIR, DUPLICATES_DIR, REJECTED_DIR, EXCLUDED_DIR, "__pycache__", ".git"}
MASK_DIR_PREFIX = MASK_DIR + "_"  # other mask folders (`sdprep mask --out masks_face`) are skipped too


def image_extensions() -> tuple[str, ...]:
    """Image extensions sdprep reads: the common ones plus AVIF/JXL when Pillow can decode them."""
    exts = list(BASE_IMAGE_EXTS)
    try:
        from PIL import features

        if features.check("avif"):
            exts.append(".avif")
    except Exception:  # noqa: BLE001 - an old Pillow without the feature check
        pass
    try:
        import pillow_jxl  # noqa: F401

        exts.append(".jxl")
    except ImportError:
        pass
    return tuple(exts)


_EXTS_CACHE: tuple[str, ...] | None = None


def name_suffix(name: str) -> str:
    """`Path(name).suffix` of a bare file name, without building a Path (cheap in listing loops)."""
    i = name.rfind(".")
    return name[i:] if 0 < i < len(name) - 1 else ""


def is_image(path: Path | str) -> bool:
    """Whether sdprep reads this file as an image (by extension); a str is a bare file name."""
    global _EXTS_CACHE
    if _EXTS_CACHE is None:
        _EXTS_CACHE = image_extensions()
    suffix = path.suffix if isinstance(path, Path) else name_suffix(path)
    return suffix.lower() in _EXTS_CACHE


@dataclass(frozen=True)
class Item:
    """One image of a dataset and the paths of its companions (which may not exist yet).

    `root`: the real path of the dataset folder it was listed from (`iter_items`), which the
    symlink rule of its readers honours (`unsafe_reason`); None for an image given on its own.
    """

    path: Path
    root: str | None = field(default=None, compare=False, repr=False)

    @property
    def caption_path(self) -> Path:
        return self.path.with_suffix(CAPTION_EXT)

    @property
    def sidecar_path(self) -> Path:
        return self.path.with_name(self.path.name + SIDECAR_SUFFIX)

    def mask_path(self, mask_dir: str = MASK_DIR) -> Path:
        return self.path.parent / mask_dir / (self.path.stem + ".png")

    @property
    def name(self) -> str:
        return self.path.name

    def companions(self) -> list[Path]:
        """The existing files that belong to this image and must move or be copied with it."""
        paths = [self.caption_path, self.sidecar_path, self.mask_path()]
        return [p for p in paths if os.path.exists(p)]  # never raises (e.g. ENAMETOOLONG)


OnClash = Callable[[Path, str], object]  # (image path, reason) of an image left out for its stem


def check_folder(root: Path | str) -> Path:
    """`root` as a Path, when it is an existing folder; else a DatasetError saying what it is."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: no such folder", "check the path")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder", "pass the folder that holds the images")
    return root


def discover(root: Path | str, recursive: bool = False, on_clash: OnClash | None = None) -> list[Item]:
    """List the images under `root`, sorted, skipping sdprep's own folders and hidden files
    (and images that share a stem, when `on_clash` is given: see `iter_items`)."""
    return list(iter_items(check_folder(root), recursive, on_clash))


def require_images(root: Path | str, recursive: bool = False) -> Path:
    """Check that `root` is a folder with at least one image (what every stage needs); returns it.

    No image is a DatasetError "no images found in DIR", whose hint says to add -r when the images
    are in subfolders (a kohya `img/40_token/` layout, a bucket output).
    """
    root = check_folder(root)
    if next(iter_items(root, recursive), None) is not None:
        return root
    if not recursive:
        inner = next(iter_items(root, True), None)
        if inner is not None:
            where = inner.path.parent.relative_to(root).as_posix()
            raise DatasetError(
                f"no images found in {root}",
                f"the images are in subfolders (e.g. {where}/): add -r / --recursive (recursive = true in a project)",
            )
    raise DatasetError(
        f"no images found in {root}",
        f"put images ({', '.join(BASE_IMAGE_EXTS)}) in it, or pass the folder holding them",
    )


def iter_items(
    root: Path, recursive: bool = False, on_clash: OnClash | None = None, dataset: Path | str | None = None
) -> Iterator[Item]:
    """Stream the images under `root` in sorted order (memory grows with one folder, not the tree).

    `on_clash`: stages that read or write what images share by stem (the caption `<stem>.txt`, the
    mask `masks/<stem>.png`, kohya's caption look-up) leave out images whose folder holds another
    image of the same stem (`a.png` and `a.jpg`) and report each with `on_clash(path, reason)`.

    Each item carries the real path of `dataset` (the dataset folder `root` belongs to; default
    `root` itself) as its `root`: symlinks inside the dataset may point anywhere inside it.
    Only the image names of the folder being listed are held (plain strings, sorted): about 70 bytes
    per image, where a sorted list of DirEntry objects took about 450.
    """
    yield from _iter_folder(root, recursive, on_clash, os.path.realpath(root if dataset is None else dataset))


def _iter_folder(root: Path, recursive: bool, on_clash: OnClash | None, dataset: str) -> Iterator[Item]:
    names, subdirs = _list_images(root)
    if on_clash is not None:
        names = _drop_stem_clashes(root, names, on_clash)
    for name in names:
        # Symlinks (even looping or dangling ones) and special files are listed too, so the stage
        # reports them: the readers refuse what `unsafe_reason` names.
        yield Item(Path(os.path.join(root, name)), dataset)
    del names
    if recursive:
        for sub in subdirs:
            yield from _iter_folder(Path(os.path.join(root, sub)), True, on_clash, dataset)


def _stem(name: str) -> str:
    return name[: len(name) - len(name_suffix(name))]


def _drop_stem_clashes(root: Path, names: list[str], on_clash: OnClash) -> list[str]:
    """`names` (one folder's images) without those sharing a stem, each reported to `on_clash`."""
    stems = Counter(_stem(n) for n in names)
    if len(stems) == len(names):
        return names
    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        if stems[_stem(name)] > 1:
            groups[_stem(name)].append(name)
    for stem, group in groups.items():
        for name in group:
            on_clash(
                Path(os.path.join(root, name)),
                f'{" and ".join(group)} share the stem "{stem}", so they would share one caption file '
                "and one mask; rename one of them (sdprep rename)",
            )
    return [n for n in names if _stem(n) not in groups]


def shares_stem(path: Path) -> bool:
    """Whether another image in `path`'s folder has its stem (they share a caption and a mask)."""
    pattern = glob.escape(path.stem) + ".*"
    return any(p != path and p.stem == path.stem and is_image(p) for p in path.parent.glob(pattern))


def _list_images(root: Path) -> tuple[list[str], list[str]]:
    """(image names, sub-folder names to descend into) of one folder, each sorted."""
    names: list[str] = []
    subdirs: list[str] = []
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith("."):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if name not in IGNORED_DIRS and not name.startswith(MASK_DIR_PREFIX):
                            subdirs.append(name)
                        continue
                    if not is_image(name) or (entry.is_symlink() and os.path.isdir(entry.path)):
                        continue
                except OSError:  # vanished meanwhile
                    continue
                names.append(name)
    except OSError as exc:
        raise DatasetError(f"{root}: cannot list folder ({exc.strerror})") from exc
    names.sort()
    subdirs.sort()
    return names, subdirs


# -- which files sdprep reads -----------------------------------------------------------------

FOLLOW_SYMLINKS_ENV = "SDPREP_FOLLOW_SYMLINKS"


def is_within(path: str, folder: str) -> bool:
    """True when the path `path` is `folder` or lies below it (both already resolved, absolute)."""
    return os.path.commonpath([path, folder]) == folder


UNSAFE_HINT = "copy the file into the dataset, or set SDPREP_FOLLOW_SYMLINKS=1 if you trust every link in it"


def unsafe_reason(path: Path | str, root: Path | str | None = None) -> str | None:
    """Why sdprep refuses to read `path`, or None when it may (missing files are the caller's job).

    A dataset may come from anywhere, so sdprep follows a symlink only when its target lies in the
    link's own folder or below it, or, when `root` (the dataset folder the file was listed from,
    `Item.root`) holds the link, anywhere in `root` (e.g. `10_tok/a.png -> ../raw/a.png`): a link to
    `~/.ssh/id_rsa` named `001.txt` must not end up in a caption, a report or a training run. The
    answer depends on the arguments only, never on what was read before. Loops, dangling links and
    special files (a FIFO would block the reader forever) are refused too.
    With `root`, a file whose real location is outside `root`'s is refused even when only a folder
    on its way is a link (`masks -> /elsewhere` makes `masks/a.png` unsafe); a linked folder that
    stays inside the dataset is followed. SDPREP_FOLLOW_SYMLINKS=1 lifts the folder rule.
    """
    path = Path(path)
    try:
        st = os.lstat(path)
    except OSError:
        return None
    trusted = os.environ.get(FOLLOW_SYMLINKS_ENV) == "1"
    if root is not None and not trusted:
        real = os.path.realpath(path)
        if not is_within(real, os.path.realpath(root)):
            via = "symlink to" if stat.S_ISLNK(st.st_mode) else "reached through a linked folder at"
            return f"{via} {real}, outside the dataset: sdprep does not follow links out of it"
    if stat.S_ISLNK(st.st_mode):
        try:
            st = os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "symlink loop (the link points back at itself)"
            return f"broken symlink (to {os.readlink(path)})"
        real = os.path.realpath(path)
        folder = os.path.realpath(path.parent)
        inside = is_within(real, folder)
        if not inside and root is not None:
            dataset = os.path.realpath(root)
            inside = is_within(folder, dataset) and is_within(real, dataset)
        if not inside and not trusted:
            return f"symlink to {real}, outside the dataset: sdprep does not follow links out of it"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a folder, FIFO or device)"
    return None


def folder_in_the_way(path: Path | str) -> str | None:
    """Why sdprep cannot put files into the folder `path` it would create (masks/, duplicates/):
    something else has its name (a file, a link). None when it is missing or a real folder."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode):
        return None
    kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a file"
    return f"{kind} named {Path(path).name} is where sdprep keeps its {Path(path).name} folder"


# -- captions --------------------------------------------------------------------------------


TEXT_MAX_BYTES = 16 << 20  # a caption or sidecar bigger than this is not one (and would fill memory)


def read_text_file(
    path: Path, max_bytes: int | None = TEXT_MAX_BYTES, *, root: Path | str | None = None
) -> str:
    """Read a caption-like text file: UTF-8 (a BOM is dropped); anything else is a CaptionError.

    Files over `max_bytes` are refused before reading (None: no limit, for kohya metadata files);
    `root`: the dataset folder, for the symlink rule (`unsafe_reason`).
    """
    problem = unsafe_reason(path, root)
    if problem:
        raise CaptionError(path, problem, UNSAFE_HINT)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if max_bytes is not None and size > max_bytes:
                raise CaptionError(
                    path,
                    f"{size:,} bytes: too large for a caption or sidecar (the limit is {max_bytes:,})",
                    "this is not a caption: move it out of the dataset",
                )
            raw = f.read()
    except OSError as exc:
        raise CaptionError(path, f"cannot read ({exc.strerror})") from exc
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        utf16 = raw[:2] in (b"\xff\xfe", b"\xfe\xff")  # Windows Notepad's "Unicode"
        raise CaptionError(
            path,
            f"not UTF-8 text (byte {exc.start}{': it starts like UTF-16' if utf16 else ''})",
            "re-save the file as UTF-8; sdprep will not rewrite it",
        ) from exc


def loads_json(text: str | bytes) -> Any:
    """`json.loads`, where what the parser cannot hold is a JSONDecodeError like any other invalid
    JSON, not an exception that would crash the command: nesting too deep (a JSON bomb, a
    RecursionError) and an integer longer than Python converts (4,300 digits, a ValueError)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        problem = "nested too deeply"
    except ValueError:  # int max str digits (CVE-2020-10735's limit)
        problem = f"an integer over {getattr(sys, 'get_int_max_str_digits', lambda: 4300)():,} digits"
    shown = text[:200] if isinstance(text, str) else text[:200].decode("utf-8", "replace")
    raise json.JSONDecodeError(problem, shown, 0) from None


def dumps_json(data: Any, **kwargs: Any) -> str:
    """`json.dumps` with non-ASCII text kept readable, except that a document holding a file name that
    is not UTF-8 (lone surrogates in Python) is written with ASCII escapes: valid UTF-8 that
    `loads_json` reads back to the same name, where the readable form could not be encoded at all."""
    text = json.dumps(data, ensure_ascii=False, **kwargs)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(data, **kwargs)
    return text


def read_caption(item: Item) -> str | None:
    """The caption text without its trailing newline, or None when the image has no caption file."""
    if not item.caption_path.exists():
        return None
    return read_text_file(item.caption_path, root=item.root).strip()


_SPACES = re.compile(r"\s+")


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """Split a caption into tags: the text normalised (`sdprep.tags.normalise_text`), a line break
    separating tags as `separator` does (CRLF too), whitespace collapsed, empty tags dropped."""
    parts = (t for line in normalise_text(caption).splitlines() for t in line.split(separator))
    tags = (_SPACES.sub(" ", t).strip() for t in parts)
    return [t for t in tags if t]


def join_tags(tags: list[str], separator: str = ", ") -> str:
    return separator.join(tags)


def format_caption(text: str) -> str:
    """The bytes sdprep writes for a caption: one line ending with a newline (kohya's tagger does so)."""
    return text.strip() + "\n"


# -- sidecars --------------------------------------------------------------------------------


def read_sidecar(item: Item) -> dict[str, Any]:
    """The sidecar dict ({} when there is none). Invalid JSON is a CaptionError naming the file."""
    path = item.sidecar_path
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:  # `<name>.<ext>.json` is 5 bytes over the image's name
            raise CaptionError(
                item.path,
                f"file name too long: its sidecar's name would be {len(os.fsencode(path.name))} bytes, "
                "over the file system's limit",
                "shorten the file name (`sdprep rename DIR` gives short sequential names)",
            ) from exc
        return {}
    text = read_text_file(path, root=item.root)
    try:
        data = loads_json(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise CaptionError(
            path,
            f"invalid JSON (line {exc.lineno}: {exc.msg})",
            "fix or delete the sidecar; sdprep leaves it as it is",
        ) from exc
    if not isinstance(data, dict):
        raise CaptionError(path, "sidecar is not a JSON object", "fix or delete the sidecar")
    problem = sidecar_problem(data, SDPREP_KEY, MASK_DIR_PREFIX)
    if problem:
        raise CaptionError(
            path,
            f"wrong type in the sidecar: {problem}",
            "fix that value, or delete its key: the sdprep stage that writes it makes it again",
        )
    return data


def dump_sidecar(data: dict[str, Any]) -> str:
    """Serialise a sidecar deterministically (key order kept, UTF-8, trailing newline)."""
    return dumps_json(data, indent=2) + "\n"


def sdprep_meta(sidecar: dict[str, Any]) -> dict[str, Any]:
    """The part of a sidecar that sdprep owns (created when missing)."""
    meta = sidecar.get(SDPREP_KEY)
    if not isinstance(meta, dict):
        meta = {}
        sidecar[SDPREP_KEY] = meta
    return meta


# -- kohya repeat folders --------------------------------------------------------------------


@dataclass(frozen=True)
class RepeatFolder:
    """A kohya DreamBooth folder name `<N>_<class tokens>`, e.g. `40_mytoken` or `10_high quality`."""

    repeats: int
    tokens: str

    @property
    def name(self) -> str:
        return format_repeat_folder(self.repeats, self.tokens)


def parse_repeat_folder(name: str) -> RepeatFolder | None:
    """Parse `<N>_<tokens>` as kohya does (split on "_", integer first part); None when not of that form."""
    parts = name.split("_")
    if len(parts) < 2:
        return None
    try:
        repeats = int(parts[0])
    except ValueError:
        return None
    if repeats < 1 or not parts[0].isdigit():
        return None
    return RepeatFolder(repeats, "_".join(parts[1:]))


def format_repeat_folder(repeats: int, tokens: str) -> str:
    """The folder name kohya parses back to (repeats, tokens)."""
    if repeats < 1:
        raise DatasetError(f"repeat count must be at least 1, got {repeats}")
    if not tokens or "/" in tokens or "\\" in tokens or tokens in (".", ".."):
        raise DatasetError(f"invalid class tokens for a folder name: {tokens!r}")
    return f"{repeats}_{tokens}"
