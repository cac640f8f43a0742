"""Find duplicates and near-duplicates by perceptual hash; keep the best copy, move the others aside.

pHash (imagehash's DCT hash, 64 bits) survives re-encoding, resizing and small edits; two images are
near-duplicates when the Hamming distance of their hashes is at most `threshold`. Pairs are found with
a vectorised numpy popcount over tiles of 512 x 512 (flat memory for any number of images) and joined
into connected components in batches with scipy's csgraph, so thousands of mutual near-duplicates
cost no Python step per pair. In each group the largest image is kept, then the sharpest (variance of
the Laplacian). The others move into `DIR/duplicates/` with their companions, through the journal.
The hash is cached in the sidecar with the file's size and mtime, so a rerun decodes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdprep import state
from sdprep.config import bounded, check_bounds
from sdprep.dataset import (
    DUPLICATES_DIR,
    UNSAFE_HINT,
    Item,
    dump_sidecar,
    folder_in_the_way,
    read_sidecar,
    require_images,
    sdprep_meta,
    shares_stem,
    unsafe_reason,
)
from sdprep.errors import DatasetError, ImageError
from sdprep.executors import Executor
from sdprep.fileops import Journal, Operation
from sdprep.images import load_image
from sdprep.lock import dataset_lock
from sdprep.prep.rename import companion_pairs, mask_dirs, natural_key, symlinks
from sdprep.progress import NullReporter, Reporter
from sdprep.stage import MAX_WORKERS, StageResult, dataset_items, each_item, progress, worker_count

ALGO = "phash-8"  # recorded with the cached hash; a change of algorithm invalidates the cache
BLOCK = 512
MERGE_BATCH = 1 << 16  # close pairs collected before they are merged into components


@dataclass(frozen=True)
class DedupOptions:
    """threshold: the largest Hamming distance (of 64 bits) that still counts as a duplicate."""

    threshold: int = bounded(6, 0, 32)
    dry_run: bool = False
    recursive: bool = False
    workers: int = bounded(1, 0, MAX_WORKERS)  # see sdprep.stage.WORKERS_HELP

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass
class Fingerprint:
    """What dedup knows about one image; `sidecar` is set when the cache in it must be written."""

    item: Item
    phash: int
    width: int
    height: int
    sharpness: float
    sidecar: dict[str, Any] | None = field(default=None, repr=False)  # set when the cache in it is new

    @property
    def area(self) -> int:
        return self.width * self.height


def laplacian_variance(grey: np.ndarray) -> float:
    """Sharpness: variance of the 4-neighbour Laplacian (higher = more fine detail)."""
    a = grey.astype(np.float32)
    if a.shape[0] < 3 or a.shape[1] < 3:
        return 0.0
    lap = a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:] - 4 * a[1:-1, 1:-1]
    return float(lap.var())


def _file_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def fingerprint(item: Item) -> Fingerprint:
    """Hash one image, or read the hash cached in its sidecar when the file has not changed."""
    import imagehash

    # before the cache: a looping link cannot be stat-ed, a link out of the dataset is refused
    problem = unsafe_reason(item.path, item.root)
    if problem:
        raise ImageError(item.path, problem, UNSAFE_HINT)
    sidecar = read_sidecar(item)
    cached = sdprep_meta(dict(sidecar)).get("dedup")
    key = _file_key(item.path)
    if isinstance(cached, dict) and cached.get("algo") == ALGO and cached.get("file") == key:
        w, h = cached["size"]
        return Fingerprint(item, int(cached["phash"], 16), w, h, float(cached["sharpness"]))
    im = load_image(item.path, "RGB", root=item.root)
    grey = im.convert("L")
    del im
    phash = int(str(imagehash.phash(grey)), 16)
    fp = Fingerprint(item, phash, grey.width, grey.height, laplacian_variance(np.asarray(grey)))
    sdprep_meta(sidecar)["dedup"] = {
        "algo": ALGO,
        "phash": f"{phash:016x}",
        "size": [fp.width, fp.height],
        "sharpness": round(fp.sharpness, 3),
        "file": key,
    }
    fp.sidecar = sidecar
    return fp


def popcount(x: np.ndarray) -> np.ndarray:
    """Number of set bits of each uint64."""
    if hasattr(np, "bitwise_count"):
        counted: np.ndarray = np.bitwise_count(x)
        return counted
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    summed: np.ndarray = table[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1)
    return summed


def _tiles(n: int) -> Iterator[tuple[slice, slice]]:
    """Row and column spans of the BLOCK x BLOCK tiles on and above the diagonal of an n x n grid.

    Comparing one tile at a time keeps memory flat for any n (a full n x n matrix took 1.3 GB at 20,000).
    """
    for a in range(0, n, BLOCK):
        for b in range(a, n, BLOCK):
            yield slice(a, min(a + BLOCK, n)), slice(b, min(b + BLOCK, n))


def _close(hashes: np.ndarray, rows: slice, cols: slice, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """Global indices (i, j) of the tile's pairs within `threshold` (both orders and i == j included)."""
    ii, jj = np.nonzero(popcount(hashes[rows, None] ^ hashes[None, cols]) <= threshold)
    return ii + rows.start, jj + cols.start


def close_pairs(hashes: np.ndarray, threshold: int) -> Iterator[tuple[int, int]]:
    """(i, j) with i < j and Hamming(hashes[i], hashes[j]) <= threshold, block by block."""
    for rows, cols in _tiles(len(hashes)):
        ii, jj = _close(hashes, rows, cols, threshold)
        for i, j in zip(ii.tolist(), jj.tolist()):
            if j > i:
                yield i, j


def _merge(root: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Join the components of each pair of roots; every node then points at its new root (the least)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ri, rj = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    nodes, local = np.unique(np.concatenate([ri, rj]), return_inverse=True)
    k = len(ri)
    graph = coo_matrix((np.ones(k, dtype=bool), (local[:k], local[k:])), shape=(len(nodes), len(nodes)))
    _, label = connected_components(graph, directed=False)
    least = nodes[np.unique(label, return_index=True)[1]]  # nodes are sorted: first of a label = least
    root[nodes] = least[label]
    merged: np.ndarray = root[root]
    return merged  # members of a merged component follow their old root to the new one


def _components(hashes: np.ndarray, threshold: int) -> np.ndarray:
    """Root (least index) of each hash's component, with close pairs merged in vectorised batches.

    After a merge every node points straight at its root, so a pair already joined costs one gather
    and a comparison (no Python step per pair), and a tile whose rows and columns all share one root
    is not compared at all. Pending pairs are capped (MERGE_BATCH), so memory stays flat.
    """
    root = np.arange(len(hashes))
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    count = 0
    for rows, cols in _tiles(len(hashes)):
        first = root[rows.start]
        if (root[rows] == first).all() and (root[cols] == first).all():
            continue  # one component already: no pair in here can join anything
        ii, jj = _close(hashes, rows, cols, threshold)
        ri, rj = root[ii], root[jj]
        apart = ri != rj
        if apart.any():
            pending.append((ri[apart], rj[apart]))
            count += len(pending[-1][0])
        if count >= MERGE_BATCH:
            root, pending, count = _merge(root, pending), [], 0
    return _merge(root, pending) if pending else root


def group(hashes: Sequence[int], threshold: int) -> list[list[int]]:
    """Indices of the connected components of "within threshold" (transitive), two or more each.

    Members ascending, groups ordered by their first member. Identical hashes are merged first (one
    node each), then components are found tile by tile with flat memory.
    """
    if not hashes:
        return []
    unique, inverse = np.unique(np.array(hashes, dtype=np.uint64), return_inverse=True)
    comp = _components(unique, threshold)[inverse.reshape(-1)]
    order = np.argsort(comp, kind="stable")  # members of a component together, ascending
    starts = np.flatnonzero(np.r_[True, np.diff(comp[order]) != 0])
    ends = np.r_[starts[1:], len(order)]
    big = ends - starts > 1
    groups = [order[s:e].tolist() for s, e in zip(starts[big], ends[big])]
    groups.sort(key=lambda g: g[0])
    return groups


def best_first(fps: list[Fingerprint], pinned: frozenset[str] = frozenset()) -> list[Fingerprint]:
    """Largest area first, then sharpest, then name order (so the choice is stable); images a
    symlink points at (real paths in `pinned`) before all others, as they cannot move."""
    return sorted(
        fps,
        key=lambda f: (
            os.path.realpath(f.item.path) not in pinned,
            -f.area,
            -f.sharpness,
            natural_key(f.item.name),
        ),
    )


def link_targets(root: Path) -> frozenset[str]:
    """Real paths of the files that symlinks in the dataset point at: moving one would break a link."""
    return frozenset(os.path.realpath(link) for link in symlinks(root))


def distance(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def free_destination(root: Path, src: Path, folder: str = DUPLICATES_DIR) -> Path:
    """Where an image moved aside goes: DIR/<folder>/<relative path>, numbered when taken."""
    rel = src.relative_to(root)
    dest = root / folder / rel
    n, masks = 1, mask_dirs(src.parent)
    while any(new.exists() for _, new in companion_pairs(src, dest, masks)):
        dest = dest.with_name(f"{src.stem}-{n}{src.suffix}")
        n += 1
    return dest


def _fingerprints(
    items: list[Item],
    opts: DedupOptions,
    op: Operation | None,
    result: StageResult,
    report: Reporter,
    executor: Executor | None = None,
) -> list[Fingerprint]:
    """Hash every image; new hashes are cached in the sidecars at once (nothing is held back)."""
    fps = []
    hashed = each_item(
        fingerprint,
        items,
        result,
        report,
        "dedup: hashing",
        workers=worker_count(opts.workers),
        executor=executor,
    )
    for item, out in hashed:
        if out.sidecar is not None and op is not None:
            op.write_text(item.sidecar_path, dump_sidecar(out.sidecar))
        out.sidecar = None
        fps.append(out)
    return fps


def _move_duplicate(op: Operation, root: Path, dup: Fingerprint, keep: Fingerprint) -> bool:
    """Move a duplicate and its companions aside; a caption or mask it shares by stem with an image
    that stays (a.jpg moved, a.png kept: one a.txt) stays too. Returns whether one stayed."""
    sidecar = read_sidecar(dup.item)
    sdprep_meta(sidecar)["duplicate_of"] = keep.item.path.relative_to(root).as_posix()
    op.write_text(dup.item.sidecar_path, dump_sidecar(sidecar))
    dest = free_destination(root, dup.item.path)
    shared, held = shares_stem(dup.item.path), False
    for old, new in companion_pairs(dup.item.path, dest, mask_dirs(dup.item.path.parent)):
        if shared and old not in (dup.item.path, dup.item.sidecar_path):
            held = True
            continue
        op.move(old, new)
    return held


def run_dedup(
    root: Path | str,
    opts: DedupOptions,
    *,
    report: Reporter = NullReporter(),
    executor: Executor | None = None,
) -> StageResult:
    """Group near-duplicate images of `root`; keep the best of each group, move the rest aside.

    Hashing runs through `executor` (threads, or a Ray cluster); grouping sees every hash here.
    """
    result = StageResult("dedup")
    if opts.dry_run:
        root, items = dataset_items(root, opts.recursive)
        _dedup(root, items, opts, None, result, report, executor)
        return result
    if not state.state_dir(root).exists():  # nothing to roll back: an empty folder fails before the lock
        require_images(root, opts.recursive)
    with dataset_lock(root, "dedup"):
        from sdprep.undo import roll_back_interrupted

        # a killed dedup moved some files of a group, not all: undo it, then do the whole job
        rolled = roll_back_interrupted(root, "dedup")
        if rolled is not None:
            result.notes.append(f"  first undid the interrupted `{rolled[0]}` ({rolled[1]} changes)")
        root, items = dataset_items(root, opts.recursive)
        with Journal(root).begin("dedup") as op:
            _dedup(root, items, opts, op, result, report, executor)
    return result


def _dedup(
    root: Path,
    items: list[Item],
    opts: DedupOptions,
    op: Operation | None,
    result: StageResult,
    report: Reporter,
    executor: Executor | None = None,
) -> None:
    fps = _fingerprints(items, opts, op, result, report, executor)
    pinned = link_targets(root)
    groups = [best_first([fps[i] for i in g], pinned) for g in group([f.phash for f in fps], opts.threshold)]
    groups.sort(key=lambda g: natural_key(g[0].item.path.relative_to(root).as_posix()))
    real = {id(f): os.path.realpath(f.item.path) for g in groups for f in g}
    # a link and its target are one file, not duplicates; another copy a link points at cannot move
    same = [d for g in groups for d in g[1:] if real[id(d)] == real[id(g[0])]]
    held = [d for g in groups for d in g[1:] if real[id(d)] in pinned and real[id(d)] != real[id(g[0])]]
    if held:
        names = ", ".join(d.item.name for d in held[:5])
        result.notes.append(
            f"  kept {len(held)} duplicates in place, a symlink in the dataset points at them: {names}"
        )
    groups = [[g[0], *(d for d in g[1:] if d not in held and d not in same)] for g in groups]
    groups = [g for g in groups if len(g) > 1]
    result.details["groups"] = [
        (g[0].item.path, [(d.item.path, distance(g[0].phash, d.phash)) for d in g[1:]]) for g in groups
    ]
    n_dups = sum(len(g) - 1 for g in groups)
    if op is None:
        result.skipped = len(fps)
        result.notes.append(f"  dry run: {len(groups)} groups, {n_dups} duplicates; nothing was changed")
        return
    problem = folder_in_the_way(root / DUPLICATES_DIR) if n_dups else None
    if problem:  # every duplicate goes there: the run's problem, found before the first move
        raise DatasetError(f"{root / DUPLICATES_DIR}: {problem}", "move or rename it, then run dedup again")
    with progress(report, n_dups, "dedup: moving"):
        for g in groups:
            for dup in g[1:]:
                if _move_duplicate(op, root, dup, g[0]):
                    result.notes.append(
                        f"  {dup.item.name} shares its caption/mask with another image of its stem: they stay"
                    )
                result.changed += 1
                report.advance()
    result.skipped = len(fps) - n_dups
    if groups:
        result.notes.append(
            f"  {len(groups)} groups: kept the largest/sharpest of each, moved {n_dups} to {DUPLICATES_DIR}/"
        )
