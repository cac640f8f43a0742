"""Download images with gallery-dl's Python API into a dataset folder, with booru tags and resume.

gallery-dl downloads into a private staging folder (`DIR/.sdprep/scrape/incoming/`), flat, with
file names built from ASCII-only fields and cut to a bounded length. Each finished file is then
checked (it must lie inside the staging folder, be an image, and pass the size / rating / tag
filters), given a safe name of sdprep's own, and written into DIR (or DIR/rejected/) through the
journal together with its sidecar: gallery-dl's metadata untouched plus `sdprep.booru` (tags by
category and rating) and `sdprep.scrape` (the URL asked for). gallery-dl's download archive lives in
`DIR/.sdprep/scrape/archive.sqlite3`, so re-running downloads nothing new and an interrupted scrape
resumes; the archive itself is journalled, so `sdprep undo` also forgets what the scrape fetched.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from sdprep import state
from sdprep.config import bounded, check_bounds
from sdprep.dataset import REJECTED_DIR, Item, dump_sidecar, is_image, is_within, loads_json, sdprep_meta
from sdprep.errors import ConfigError, DatasetError, ImageError, SdprepError
from sdprep.fileops import Journal, Operation, atomic_write_bytes
from sdprep.images import image_size
from sdprep.progress import NullReporter, Reporter
from sdprep.stage import StageResult, progress
from sdprep.tags import TagMatcher

CATEGORIES = ("general", "character", "copyright", "artist", "meta")
RATINGS = {"g": "g", "general": "g", "safe": "g", "s": "s", "sensitive": "s"}
RATINGS.update({"q": "q", "questionable": "q", "e": "e", "explicit": "e"})
FILENAME_FORMAT = "{category}_{id:?/_/}{filename[:100]}.{extension[:16]}"
MAX_STEM = 120
SCRAPE_DIR = ("scrape",)  # under DIR/.sdprep: incoming/ (gallery-dl's staging folder) and the archive
# Options a user's gallery-dl config may not set: sdprep decides where files go and what is recorded.
FORCED_KEYS = {
    "base-directory", "directory", "filename", "path-restrict", "path-replace", "path-remove",
    "path-strip", "path-extended", "path-convert", "path-sub", "extension-map", "part-directory",
    "archive", "archive-format", "archive-prefix", "archive-table", "archive-event", "postprocessors",
    "postprocess", "parent-directory", "skip", "output", "download",
}  # fmt: skip


@dataclass(frozen=True)
class ScrapeOptions:
    """urls: anything gallery-dl supports. limit: files per URL. min_side: shortest side in pixels.
    ratings: allowed booru ratings (g, s, q, e). sleep_request: seconds between requests (None =
    gallery-dl's polite default for the site)."""

    urls: tuple[str, ...]
    limit: int | None = bounded(None, 1)
    config_file: Path | None = None
    cookies_file: Path | None = None
    min_side: int = bounded(0, 0)
    ratings: tuple[str, ...] = ()
    exclude_tags: tuple[str, ...] = ()
    sleep_request: float | None = bounded(None, 0.0)

    def __post_init__(self) -> None:
        if not self.urls:
            raise ConfigError(
                "no URL given", "example: sdprep scrape 'https://danbooru.donmai.us/posts?tags=x' -o data/"
            )
        check_bounds(self)
        for r in self.ratings:
            if r not in RATINGS:
                raise ConfigError(f'unknown rating "{r}"', "valid: g (general), s (sensitive), q, e")
        for label, path in (("config", self.config_file), ("cookies", self.cookies_file)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"--{label} {path}: no such file")


# -- booru metadata ------------------------------------------------------------------------------


def normalise_rating(value: Any) -> str | None:
    """A booru rating as one letter (g, s, q, e); None when absent; unknown words kept as they are."""
    if not isinstance(value, str) or not value.strip():
        return None
    return RATINGS.get(value.strip().lower(), value.strip().lower())


def _tag_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [str(t) for t in value if isinstance(t, (str, int)) and str(t).strip()]
    return []


def booru_metadata(meta: dict[str, Any]) -> dict[str, Any] | None:
    """Tags by category and the rating from gallery-dl's metadata (Danbooru, Gelbooru, e621...).

    Danbooru-style `tags_<category>` lists (or `tag_string_<category>`) are used when present; e621's
    `tags` dict maps its categories (species, lore... count as general); a plain `tags` list or
    space-separated string (Gelbooru without categories, Moebooru) is all general. None when the
    metadata has neither tags nor a rating.
    """
    tags: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    for cat in CATEGORIES:
        tags[cat] = _tag_list(meta.get(f"tags_{cat}")) or _tag_list(meta.get(f"tag_string_{cat}"))
    if not any(tags.values()):
        raw = meta.get("tags")
        if isinstance(raw, dict):
            for cat, values in raw.items():
                tags[cat if cat in CATEGORIES else "general"] += _tag_list(values)
        else:
            tags["general"] = _tag_list(raw)
    rating = normalise_rating(meta.get("rating"))
    if not any(tags.values()) and rating is None:
        return None
    return {"tags": tags, "rating": rating}


# -- names and paths -----------------------------------------------------------------------------


def safe_name(name: str) -> str:
    """A file name that cannot escape its folder or hide: ASCII letters, digits, `_` and `-`, one dot."""
    stem, dot, ext = name.replace("\0", "").rpartition(".")
    if not dot:
        stem, ext = ext, ""
    ext = re.sub(r"[^a-z0-9]", "", ext.lower())[:10]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem)
    stem = re.sub(r"_{2,}", "_", stem).strip("_-")[:MAX_STEM] or "file"
    return f"{stem}.{ext}" if ext else stem


def inside(path: Path | str, folder: Path) -> bool:
    """True when `path` (symlinks resolved) lies inside `folder`."""
    real, base = os.path.realpath(path), os.path.realpath(folder)
    return is_within(real, base) and real != base


def _free_name(folder: Path, name: str, data: bytes) -> tuple[Path, bool]:
    """(destination, already_there): a name not taken by other bytes, numbered when needed."""
    dest, n = folder / name, 1
    while dest.exists() or Item(dest).sidecar_path.exists():
        if dest.is_file() and dest.stat().st_size == len(data) and dest.read_bytes() == data:
            return dest, True
        stem, dot, ext = name.rpartition(".")
        dest = folder / (f"{stem}-{n}.{ext}" if dot else f"{name}-{n}")
        n += 1
    return dest, False


# -- gallery-dl ------------------------------------------------------------------------------------


def _strip_forced(conf: Any) -> Any:
    if isinstance(conf, dict):
        return {k: _strip_forced(v) for k, v in conf.items() if k not in FORCED_KEYS}
    return conf


def _load_user_config(gconfig: ModuleType, path: Path) -> None:
    """Load a gallery-dl config file (logins, site options) minus the keys sdprep controls."""
    try:
        loads_json(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read ({exc.strerror})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        line = getattr(exc, "lineno", "?")
        raise ConfigError(f"--config {path}: not a valid JSON gallery-dl config (line {line})") from exc
    gconfig.load([str(path)], strict=False, loads=lambda text: _strip_forced(loads_json(text)))


def configure(gconfig: ModuleType, opts: ScrapeOptions, incoming: Path, archive: Path) -> None:
    """Reset gallery-dl's global config and set sdprep's: flat safe names, archive, metadata JSON."""
    gconfig.clear()
    if opts.config_file is not None:
        _load_user_config(gconfig, Path(opts.config_file))
    ex = ("extractor",)
    gconfig.set((), "base-directory", str(incoming))
    gconfig.set(ex, "base-directory", str(incoming))
    gconfig.set(ex, "directory", [])
    gconfig.set(ex, "filename", FILENAME_FORMAT)
    gconfig.set(ex, "path-restrict", "ascii")
    gconfig.set(ex, "path-remove", "\x00-\x1f\x7f")
    gconfig.set(ex, "parent-directory", False)
    gconfig.set(ex, "archive", str(archive))
    gconfig.set(ex, "skip", True)
    gconfig.set(ex, "postprocess", True)
    gconfig.set(ex, "postprocessors", [{"name": "metadata", "mode": "json"}])
    gconfig.set(("output",), "mode", "null")
    if opts.cookies_file is not None:
        gconfig.set(ex, "cookies", str(opts.cookies_file))
    if opts.limit is not None:
        gconfig.set(ex, "image-range", f"1-{opts.limit}")
    if opts.sleep_request is not None:
        gconfig.set(ex, "sleep-request", opts.sleep_request)


class _Logs(logging.Handler):
    """gallery-dl's warnings and errors, kept for the summary instead of printed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.messages.append(record.getMessage())

    def take(self) -> list[str]:
        out, self.messages = self.messages, []
        return out


@contextlib.contextmanager
def _captured_logs() -> Iterator[_Logs]:
    handler = _Logs()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


class _Job(Protocol):
    def run(self) -> int: ...


class _JobClass(Protocol):
    """What `_job_class` returns: builds the job that downloads one URL into `intake`."""

    def __call__(self, url: str, *, intake: Intake) -> _Job: ...


def _job_class() -> _JobClass:
    from gallery_dl import exception as gexc
    from gallery_dl.job import DownloadJob

    class SdprepJob(DownloadJob):  # type: ignore[misc]  # gallery-dl ships no type information
        """gallery-dl's DownloadJob with sdprep's hooks: a path guard, per-file intake, skip count."""

        hooks: dict[str, list[Callable[[Any], None]]]  # gallery-dl's, by event; arguments: a PathFormat

        def __init__(self, url: str, parent: SdprepJob | None = None, intake: Intake | None = None) -> None:
            super().__init__(url, parent)
            given = intake if parent is None else parent.intake
            if given is None:
                raise TypeError("an SdprepJob needs an intake, or a parent job that has one")
            self.intake: Intake = given

        def initialize(self, kwdict: dict[str, Any] | None = None) -> None:
            super().initialize(kwdict)
            if not self.hooks:
                self.hooks = collections.defaultdict(list)
            self.hooks["prepare-after"].append(self._guard)
            self.hooks["after"].append(lambda pathfmt: self.intake.take(Path(pathfmt.realpath)))

        def _guard(self, pathfmt: Any) -> None:  # gallery-dl's PathFormat
            if not inside(pathfmt.realpath, self.intake.incoming):
                self.intake.refuse(pathfmt.realpath)
                raise gexc.StopExtraction()

        def handle_skip(self) -> None:
            self.intake.skipped()
            super().handle_skip()

    return SdprepJob


# -- intake: from the staging folder into the dataset ------------------------------------------


@dataclass
class Intake:
    """Moves finished downloads from the staging folder into the dataset, through the journal."""

    root: Path
    incoming: Path
    op: Operation
    opts: ScrapeOptions
    result: StageResult
    report: Reporter
    url: str = ""
    seen: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.matcher = TagMatcher(self.opts.exclude_tags)

    def skipped(self) -> None:
        self.seen += 1
        self.result.skipped += 1
        self.report.advance()

    def refuse(self, path: str) -> None:
        self.result.fail(self.root, f"{self.url}: refused to write {path!r} outside {self.incoming}")

    def verdict(self, path: Path, booru: dict[str, Any] | None) -> tuple[str, str] | None:
        """(kind, reason) when a download is rejected, None when it joins the dataset."""
        if not is_image(path):
            return "not an image", f"not an image ({path.suffix or 'no extension'})"
        try:
            w, h = image_size(path)
        except ImageError as exc:
            return "unreadable", f"unreadable image ({exc.reason})"
        if min(w, h) < self.opts.min_side:
            return "too small", f"{w}x{h} is below --min-side {self.opts.min_side}"
        rating = booru["rating"] if booru else None
        allowed = {RATINGS[r] for r in self.opts.ratings}
        if allowed and rating and rating not in allowed:
            return "rating", f"rating {rating} not allowed"
        if self.matcher and booru:
            hits = [t for tags in booru["tags"].values() for t in tags if self.matcher.matches(t)]
            if hits:
                return "excluded tag", f"excluded tag {hits[0]}"
        return None

    def take(self, path: Path) -> None:
        """Check one downloaded file and write it (and its sidecar) into DIR or DIR/rejected/."""
        self.seen += 1
        self.report.advance()
        side_src = path.with_name(path.name + ".json")
        try:
            if not inside(path, self.incoming):
                self.refuse(str(path))
                return
            if not path.is_file():
                return
            meta = loads_json(side_src.read_text(encoding="utf-8")) if side_src.is_file() else {}
            booru = booru_metadata(meta)
            self._place(path, meta, booru, self.verdict(path, booru))
        except (OSError, json.JSONDecodeError, SdprepError) as exc:  # never raise into gallery-dl
            self.result.fail(self.root, f"{self.url}: {path.name}: {exc}")
        finally:
            for p in (path, side_src):
                with contextlib.suppress(OSError):
                    if inside(p, self.incoming):
                        p.unlink()

    def _place(
        self, path: Path, meta: dict[str, Any], booru: dict[str, Any] | None, verdict: tuple[str, str] | None
    ) -> None:
        folder = self.root if verdict is None else self.root / REJECTED_DIR
        data = path.read_bytes()
        dest, present = _free_name(folder, safe_name(path.name), data)
        if not (inside(dest, self.root) and dest.parent == folder):  # cannot happen; checked anyway
            raise DatasetError(f"unsafe destination {dest}")
        extra = sdprep_meta(meta)
        if booru is not None:
            extra["booru"] = booru
        extra["scrape"] = {"url": self.url}
        if verdict is not None:
            extra["rejected"] = verdict[1]
        if present:
            sidecar = Item(dest).sidecar_path
            if not os.path.lexists(sidecar):  # a killed run wrote the image, not yet its sidecar
                self.op.write_text(sidecar, dump_sidecar(meta))
            self.result.skipped += 1
            return
        if verdict is not None:
            self.rejected[verdict[0]] += 1
        if not folder.exists():
            self.op.mkdir(folder)
        self.op.write_bytes(dest, data)
        self.op.write_text(Item(dest).sidecar_path, dump_sidecar(meta))
        if verdict is None:
            self.result.changed += 1

    def sweep(self) -> None:
        """Take files left in the staging folder (an interrupted run, files no hook reported).

        Only regular files are taken; links and folders in it are removed as they are (never followed).
        """
        state.folder(self.root, *SCRAPE_DIR, "incoming")  # still a real folder, not a link
        for entry in state.entries(self.incoming):
            if entry.is_file(follow_symlinks=False) and not entry.name.endswith((".json", ".part")):
                self.take(Path(entry.path))
        for entry in state.entries(self.incoming):
            with contextlib.suppress(OSError):
                state.remove(entry.path)


def _status_reason(status: int, messages: list[str]) -> str:
    text = "; ".join(dict.fromkeys(m.strip() for m in messages if m.strip()))
    return text[:500] if text else f"gallery-dl finished with status {status}"


def run_scrape(root: Path | str, opts: ScrapeOptions, *, report: Reporter = NullReporter()) -> StageResult:
    """Download every URL of `opts` into the dataset folder `root` (created when missing)."""
    from gallery_dl import config as gconfig

    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    result = StageResult("scrape")
    total = opts.limit * len(opts.urls) if opts.limit else None
    job_class = _job_class()
    with Journal(root).begin("scrape") as op, _captured_logs() as logs:
        # sdprep's own folders, none of them a symlink (a linked `incoming` would be swept out)
        incoming = state.folder(root, *SCRAPE_DIR, "incoming", create=True)
        archive = state.file(root, *SCRAPE_DIR, "archive.sqlite3")
        scratch = state.file(root, *SCRAPE_DIR, "archive.work.sqlite3")
        state.remove(scratch)
        if archive.exists():
            shutil.copyfile(archive, scratch)
        current = state.file(root, *SCRAPE_DIR, "current-url")  # what a killed run was fetching
        intake = Intake(root, incoming, op, opts, result, report)
        with contextlib.suppress(FileNotFoundError):
            intake.url = state.read_text(current)  # its downloads keep the URL they came from
        intake.sweep()
        try:
            configure(gconfig, opts, incoming, scratch)
            with progress(report, total, "scrape"):
                for url in opts.urls:
                    atomic_write_bytes(current, url.encode("utf-8", "surrogateescape"), sync=False)
                    intake.url, intake.seen = url, 0
                    _scrape_url(job_class, url, intake, logs, result)
        finally:
            gconfig.clear()
            if scratch.exists():
                op.write_bytes(archive, scratch.read_bytes())
                scratch.unlink()
        state.remove(current)
    _summarise(intake, result)
    return result


def _scrape_url(job_class: _JobClass, url: str, intake: Intake, logs: _Logs, result: StageResult) -> None:
    from gallery_dl import exception as gexc

    try:
        job = job_class(url, intake=intake)
    except gexc.NoExtractorError:
        result.fail(intake.root, f"{url}: no gallery-dl extractor supports this URL")
        return
    status = job.run()
    intake.sweep()
    messages = logs.take()
    if status:
        result.fail(intake.root, f"{url}: {_status_reason(status, messages)}")
    elif intake.seen == 0:
        result.notes.append(f"  note: {url}: no files found")


def _summarise(intake: Intake, result: StageResult) -> None:
    if intake.rejected:
        n = sum(intake.rejected.values())
        why = ", ".join(f"{count} {reason}" for reason, count in intake.rejected.most_common(5))
        result.notes.append(f"  rejected {n} (kept in {REJECTED_DIR}/): {why}")
    if result.skipped:
        result.notes.append("  skipped: already downloaded (gallery-dl's archive in .sdprep/scrape/)")
