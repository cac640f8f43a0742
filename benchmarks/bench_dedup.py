"""Benchmark: dedup's grouping of perceptual hashes (`sdprep.prep.dedup.group`, also the report's
duplicate groups) against the previous implementation, on 20,000 hashes.

Cases (deterministic, seed 0):
- random:   20,000 random 64-bit hashes (almost no pair within the threshold);
- clusters: half of them within distance 4 of 300 centres (about 33 near-duplicates per centre);
- one-blob: half of them within distance 3 of ONE centre (10,000 mutual near-duplicates, about 50
  million close pairs: the near-quadratic case).
Baseline `reference_group` is the implementation before this change, kept here verbatim: the same
tiled popcount search, then one Python union-find step per close pair. Each (implementation, case)
runs in its own subprocess so its peak RSS is its own; "extra" is the peak growth during grouping
(above the process after imports and hash generation). Both results must be identical.

Usage: python benchmarks/bench_dedup.py [--n 20000] [--threshold 6]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
from benchutil import peak_rss_mb

CASES = {"random": (0.0, 1, 0), "clusters": (0.5, 300, 4), "one-blob": (0.5, 1, 3)}
BLOCK = 512


def make_hashes(n: int, case: str, seed: int = 0) -> list[int]:
    """n random hashes; a fraction of them replaced by copies of `centres` hashes with <= radius flips."""
    fraction, centres, radius = CASES[case]
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    picked = rng.permutation(n)[: int(n * fraction)]
    near = hashes[rng.integers(0, centres, len(picked))]  # the first `centres` hashes are the centres
    flips = rng.integers(0, radius + 1, len(picked))
    for r in range(radius):  # up to `radius` random bit flips (a repeated bit cancels: still within)
        bits = rng.integers(0, 64, len(picked))
        near ^= np.where(flips > r, np.left_shift(np.uint64(1), bits.astype(np.uint64)), np.uint64(0))
    hashes[picked] = near
    return [int(h) for h in hashes]


# -- the baseline: dedup.group before this change -----------------------------------------------


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x)


def reference_close_pairs(hashes: np.ndarray, threshold: int) -> Iterator[tuple[int, int]]:
    n = len(hashes)
    for a in range(0, n, BLOCK):
        rows = hashes[a : a + BLOCK]
        for b in range(a, n, BLOCK):
            dist = _popcount(rows[:, None] ^ hashes[None, b : b + BLOCK])
            ii, jj = np.nonzero(dist <= threshold)
            for i, j in zip((ii + a).tolist(), (jj + b).tolist()):
                if j > i:
                    yield i, j


def reference_group(hashes: list[int], threshold: int) -> list[list[int]]:
    parent = list(range(len(hashes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in reference_close_pairs(np.array(hashes, dtype=np.uint64), threshold):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(len(hashes)):
        groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


# -- worker and driver ----------------------------------------------------------------------------


def _rss_mb() -> float:
    return peak_rss_mb()


def worker(kind: str, case: str, n: int, threshold: int) -> None:
    import scipy.sparse.csgraph  # noqa: F401 - imported before timing (dedup imports it on first use)

    from sdprep.prep.dedup import group

    fn = group if kind == "sdprep" else reference_group
    hashes = make_hashes(n, case)
    before = _rss_mb()
    start = time.perf_counter()
    groups = fn(hashes, threshold)
    seconds = time.perf_counter() - start
    digest = hash(tuple(tuple(g) for g in groups))
    out = {"seconds": seconds, "rss_mb": _rss_mb(), "extra_mb": _rss_mb() - before}
    print(json.dumps({**out, "groups": len(groups), "members": sum(map(len, groups)), "digest": digest}))


def measure(kind: str, case: str, n: int, threshold: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, __file__, "--worker", kind, case, str(n), str(threshold)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--threshold", type=int, default=6)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, case, n, threshold = args.worker
        worker(kind, case, int(n), int(threshold))
        return
    print(f"bench_dedup: {args.n} hashes, threshold {args.threshold}, python {sys.version.split()[0]}")
    print(
        f"{'case':<9} {'groups':>6} {'members':>7} {'sdprep s':>9} {'baseline s':>10} {'speed-up':>8}  peak RSS"
    )
    for case in CASES:
        new = measure("sdprep", case, args.n, args.threshold)
        old = measure("baseline", case, args.n, args.threshold)
        if (new["digest"], new["groups"]) != (old["digest"], old["groups"]):
            raise SystemExit(f"{case}: the groups differ from the baseline's")
        print(
            f"{case:<9} {new['groups']:>6} {new['members']:>7} {new['seconds']:>9.2f} {old['seconds']:>10.2f} "
            f"{old['seconds'] / new['seconds']:>7.1f}x  sdprep {new['rss_mb']:.0f} MB "
            f"(+{new['extra_mb']:.0f}), baseline {old['rss_mb']:.0f} MB (+{old['extra_mb']:.0f})"
        )
    print(
        "speed-up = baseline seconds / sdprep seconds (identical groups checked); +N = growth while grouping"
    )


if __name__ == "__main__":
    main()
