"""Give images clean sequential names; captions, sidecars and masks move with their image.

The rename is two-phase: every file first moves to a unique hidden temporary name in its own folder,
then to its final name, so no name collision can overwrite a file (as `mv -i` loops in shell scripts
do). Symlinks in the dataset that pointed at a renamed file are then pointed at its new name (a
repeat folder of links into `raw/` keeps working). Every change goes through the journal, so
`sdprep undo DIR` restores the old names; a rename that was killed is undone by the next rename
before it starts, so the re-run ends exactly as an uninterrupted run would.
"""

from __future__ import annotations

import os
import re
import string
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sdprep import state
from sdprep.config import bounded, check_bounds
from sdprep.dataset import MASK_DIR, Item, iter_items, parse_repeat_folder, require_images
from sdprep.errors import ConfigError, DatasetError
from sdprep.fileops import Journal, Operation, read_meta
from sdprep.lock import dataset_lock
from sdprep.progress import NullReporter, Reporter
from sdprep.stage import StageResult, progress

PATTERN_FIELDS = ("n", "token", "stem", "folder")
EXTENSION_MAP = {".jpeg": ".jpg", ".jpe": ".jpg", ".jfif": ".jpg", ".tif": ".tiff"}
MAX_NAME = 200
TEMP_PREFIX = ".sdprep-rename-"
BATCH = 256


@dataclass(frozen=True)
class RenameOptions:
    """pattern: a format string over n (1-based index), token, stem (old name), folder; None means
    zero-padded numbers (`001`, wider when a folder holds 1,000 images or more)."""

    pattern: str | None = None
    token: str | None = None
    start: int = bounded(1, 0)
    recursive: bool = False
    dry_run: bool = False

    def __post_init__(self) -> None:
        check_bounds(self)


def normalise_extension(suffix: str) -> str:
    """Lower-case an extension and map `.jpeg` (and its aliases) to `.jpg`."""
    suffix = suffix.lower()
    return EXTENSION_MAP.get(suffix, suffix)


def mask_dirs(folder: Path) -> tuple[str, ...]:
    """The mask folders beside the images of `folder`: `masks` and any `masks_<name>`."""
    try:
        names = {e.name for e in os.scandir(folder) if e.is_dir() and e.name.startswith(MASK_DIR)}
    except OSError:
        names = set()
    return tuple(sorted(n for n in names | {MASK_DIR} if n == MASK_DIR or n.startswith(MASK_DIR + "_")))


def companion_pairs(src: Path, dst: Path, masks: tuple[str, ...] = (MASK_DIR,)) -> list[tuple[Path, Path]]:
    """(old, new) paths for an image moving from src to dst and each of its existing companions:
    caption, sidecar, and its mask in each of the mask folders named in `masks`."""
    old, new = Item(src), Item(dst)
    candidates = [(old.caption_path, new.caption_path), (old.sidecar_path, new.sidecar_path)]
    candidates += [(old.mask_path(d), new.mask_path(d)) for d in masks]
    return [(src, dst)] + [(a, b) for a, b in candidates if a != b and os.path.exists(a)]


def natural_key(name: str) -> list[int | str]:
    """Sort key that orders `2.png` before `10.png`, so renamed folders keep their order."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


# width and precision of a format spec: [[fill]align][sign][z][#][0][width][grouping][.precision][type]
_SPEC_SIZES = re.compile(r"(?:.?[<>=^])?[-+ ]?z?#?0?(?P<width>\d*)[,_]?(?:\.(?P<precision>\d*))?[a-zA-Z%]?")


def check_pattern(pattern: str) -> None:
    """Reject a pattern with unknown fields or without `{n}` (every name must be unique), and one
    whose format spec would build a string longer than a file name (`{n:040000000000d}` would first
    fill gigabytes of memory)."""
    try:
        parsed = [(f, spec or "") for _, f, spec, _ in string.Formatter().parse(pattern) if f is not None]
    except ValueError as exc:
        raise ConfigError(f"invalid --pattern {pattern!r}: {exc}", "example: {token}_{n:04d}") from exc
    fields = [f for f, _ in parsed]
    for name, spec in parsed:
        sizes = _SPEC_SIZES.fullmatch(spec)
        if sizes is None or "{" in spec:
            raise ConfigError(
                f"--pattern {pattern!r} has an invalid format spec {spec!r}", "example: {n:04d}"
            )
        if any(len(v) > 3 or int(v) > MAX_NAME for v in sizes.groups() if v):
            raise ConfigError(
                f"--pattern {pattern!r}: {{{name}:{spec}}} is wider than a file name ({MAX_NAME} bytes at most)",
                "example: {token}_{n:04d}",
            )
    for name in fields:
        if name not in PATTERN_FIELDS:  # plain fields only: no {n.attr} or {n[0]} look-ups
            raise ConfigError(
                f"--pattern {pattern!r} uses unknown field {{{name}}}",
                "fields: " + ", ".join("{" + f + "}" for f in PATTERN_FIELDS),
            )
    if "n" not in fields:
        raise ConfigError(
            f"--pattern {pattern!r} has no {{n}}, so every image would get the same name",
            "add a number, e.g. {token}_{n:04d}",
        )


def _render(pattern: str, **values: object) -> str:
    try:
        name = pattern.format(**values)
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
        raise ConfigError(f"--pattern {pattern!r} cannot be filled in: {exc}", "example: {n:03d}") from exc
    if not name or name.startswith(".") or "/" in name or "\\" in name or "\0" in name:
        raise ConfigError(f"--pattern {pattern!r} gives the invalid file name {name!r}")
    if len(os.fsencode(name)) > MAX_NAME:  # fsencode: {stem} of a name that is not UTF-8
        raise ConfigError(f"--pattern {pattern!r} gives a name over {MAX_NAME} bytes: {name[:40]}...")
    return name


def _folder_token(folder: Path, token: str | None) -> str:
    if token is not None:
        return token
    repeat = parse_repeat_folder(folder.name)
    return repeat.tokens if repeat else folder.name


def plan_folder(folder: Path, items: list[Item], opts: RenameOptions) -> list[tuple[Path, Path]]:
    """(old, new) image paths for one folder, numbered in natural name order."""
    items = sorted(items, key=lambda i: natural_key(i.name))
    width = max(3, len(str(opts.start + len(items) - 1)))
    pattern = opts.pattern or f"{{n:0{width}d}}"
    token = _folder_token(folder, opts.token)
    plan: list[tuple[Path, Path]] = []
    seen: dict[str, str] = {}
    for index, item in enumerate(items, start=opts.start):
        stem = _render(pattern, n=index, token=token, stem=item.path.stem, folder=folder.name)
        new = folder / (stem + normalise_extension(item.path.suffix))
        if new.name in seen:
            raise ConfigError(
                f"--pattern {pattern!r} gives {new.name} to both {seen[new.name]} and {item.name}",
                "use {n} in the pattern so every name is unique",
            )
        seen[new.name] = item.name
        plan.append((item.path, new))
    return plan


def _file_moves(plan: list[tuple[Path, Path]], result: StageResult) -> list[tuple[Path, Path]]:
    """Every file move (images and companions) of a plan, each companion claimed once."""
    moves: list[tuple[Path, Path]] = []
    claimed: dict[Path, Path] = {}
    masks: dict[Path, tuple[str, ...]] = {}
    for src, dst in plan:
        if src.parent not in masks:
            masks[src.parent] = mask_dirs(src.parent)
        for old, new in companion_pairs(src, dst, masks[src.parent]):
            if old in claimed:
                result.notes.append(
                    f"  note: {src.name} shares {old.name} with {claimed[old].name}; it stays with {claimed[old].name}"
                )
                continue
            claimed[old] = src
            moves.append((old, new))
    return moves


def _check_conflicts(moves: list[tuple[Path, Path]]) -> None:
    """Refuse the whole rename before touching anything if a final name is taken by a file that stays."""
    sources = {old for old, _ in moves}
    targets: dict[Path, Path] = {}
    conflicts = []
    for old, new in moves:
        if new in targets:
            conflicts.append(f"{new} (from {targets[new].name} and {old.name})")
        targets[new] = old
        if new.exists() and new not in sources and not _same_file(old, new):
            conflicts.append(f"{new} exists and is not part of the rename")
    if conflicts:
        raise DatasetError(
            "rename would overwrite files: " + "; ".join(conflicts[:5]),
            "move or delete those files (orphan captions or masks?), then run rename again",
        )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def run_rename(root: Path | str, opts: RenameOptions, *, report: Reporter = NullReporter()) -> StageResult:
    """Rename the images of `root` (each folder numbered from `opts.start`) with their companions."""
    root = Path(root)
    if opts.pattern is not None:
        check_pattern(opts.pattern)
    if opts.dry_run:
        return _rename(root, opts, report, None)
    if not state.state_dir(root).exists():  # nothing to roll back: an empty folder fails before the lock
        require_images(root, opts.recursive)
    with dataset_lock(root, "rename"):
        from sdprep.undo import roll_back_interrupted

        rolled = roll_back_interrupted(root, "rename")
        return _rename(root, opts, report, rolled)


def _rename(root: Path, opts: RenameOptions, report: Reporter, rolled: tuple[str, int] | None) -> StageResult:
    require_images(root, opts.recursive)
    _refuse_leftovers(root)
    plan = []
    for folder, items in _by_folder(iter_items(root, opts.recursive)).items():
        plan += plan_folder(folder, items, opts)
    result = StageResult("rename")
    if rolled is not None:
        result.notes.append(
            f"  first undid the interrupted `{rolled[0]}` ({rolled[1]} changes), then renamed"
        )
    todo = [(src, dst) for src, dst in plan if src != dst]
    result.skipped = len(plan) - len(todo)
    result.details["plan"] = todo
    if not todo:
        result.notes.append("  nothing to do: every image already has its name")
        return result
    if opts.dry_run:
        result.notes.append(f"  dry run: {len(todo)} images would be renamed; nothing was changed")
        return result
    moves = _file_moves(todo, result)
    _check_conflicts(moves)
    _apply(root, moves, report)
    result.changed = len(todo)
    return result


def _refuse_leftovers(root: Path) -> None:
    """A killed rename leaves files under hidden temporary names: renaming again would hide them for good.

    The next rename undoes the killed one by itself; this catches what it cannot (the killed rename
    is no longer the newest operation, or the journal was deleted)."""
    left = [p for p in root.rglob(TEMP_PREFIX + "*") if ".sdprep" not in p.relative_to(root).parts]
    if not left:
        return
    journal = Journal(root)
    ops = journal.operations() if journal.checked_dir().is_dir() else []
    if any((read_meta(op) or {}).get("command") == "rename" for op in ops):
        hint = (
            f"later commands ran since: undo back to the interrupted rename (`sdprep undo --list {root}` "
            f"shows the order; `sdprep undo {root}` undoes the newest), then rename again"
        )
    else:
        hint = "the journal no longer holds their old names (deleted by `sdprep gc`?): name them by hand"
    raise DatasetError(
        f"{root}: an interrupted rename left {len(left)} files under temporary names ({left[0].name}...)",
        hint,
    )


def _by_folder(items: Iterable[Item]) -> dict[Path, list[Item]]:
    folders: dict[Path, list[Item]] = {}
    for item in items:
        folders.setdefault(item.path.parent, []).append(item)
    return folders


def _apply(root: Path, moves: list[tuple[Path, Path]], report: Reporter) -> None:
    """Phase 1: every file to a unique temporary name; phase 2: temporary names to final names."""
    run_id = uuid.uuid4().hex[:8]
    temps = [old.parent / f"{TEMP_PREFIX}{run_id}-{k}{old.suffix}" for k, (old, _) in enumerate(moves)]
    phases: list[list[tuple[Path | str, Path | str]]] = [  # as Operation.move_many takes them
        [(old, t) for (old, _), t in zip(moves, temps)],
        [(t, new) for (_, new), t in zip(moves, temps)],
    ]
    links = retargets(root, moves)
    with progress(report, len(moves) * 2, "rename"), Journal(root).begin("rename") as op:
        for phase in phases:  # every file to its temporary name, then every file to its final name
            for start in range(0, len(phase), BATCH):  # one journal sync per batch of moves
                op.move_many(phase[start : start + BATCH])
                report.advance(len(phase[start : start + BATCH]))
        relink(op, links)


def _key(path: Path) -> str:
    """A path with its folder resolved: how a symlink's first hop is compared with a renamed file."""
    return os.path.join(os.path.realpath(path.parent), path.name)


def retargets(root: Path, moves: list[tuple[Path, Path]]) -> list[tuple[Path, str]]:
    """(where the link is after the moves, its new target) for every symlink in the dataset that
    points at a file being moved. A relative link stays relative, an absolute one absolute."""
    moved = {_key(old): new for old, new in moves}
    out = []
    for link in symlinks(root):
        target = os.readlink(link)
        hop = os.path.normpath(os.path.join(os.path.realpath(link.parent), target))
        if hop not in moved:
            continue
        new, after = moved[hop], moved.get(_key(link), link)  # the link may be renamed too
        new_real = os.path.join(os.path.realpath(new.parent), new.name)
        absolute = os.path.isabs(target)
        out.append(
            (after, new_real if absolute else os.path.relpath(new_real, os.path.realpath(after.parent)))
        )
    return out


def symlinks(root: Path) -> Iterator[Path]:
    """Every symlink to a file under `root` (sdprep's own folder excluded; linked folders not entered)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".sdprep"]
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                yield path


def relink(op: Operation, links: list[tuple[Path, str]]) -> None:
    for link, target in links:
        op.relink(link, target)
