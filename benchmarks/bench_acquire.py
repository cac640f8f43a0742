"""Benchmark: sdprep rename + convert + dedup over generated datasets, against plain-script baselines.

Each stage runs in its own subprocess (so its peak RSS is its own) on 500 and on 2,000 generated
256x256 JPEG images (`.jpeg` extensions; every 10th image a near-duplicate of the one before).
Baselines, measured in the same run on an identical copy of the data, are what a user's glue script
does (seed 003's rename.sh and friends):
- rename:  a plain `os.rename` loop to 0001.jpg, 0002.jpg... (no companions, no journal, no checks);
- convert: a PIL open -> save PNG -> unlink loop (no journal: the originals are gone);
- dedup:   an imagehash.phash loop and a pure-Python pairwise Hamming comparison (no moves).
The ratio printed is sdprep's time over the baseline's (above 1 = sdprep slower; that is the price of
the journal, the two-phase rename and the companion files). Peak memory must not grow with the number
of images: the 2,000 / 500 RSS ratio is printed too.

Usage: python benchmarks/bench_acquire.py [--sizes 500,2000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import peak_rss_mb

STAGES = ("rename", "convert", "dedup")


def generate(root: Path, n: int, seed: int = 0) -> None:
    """n JPEGs of 256x256: smooth random patterns (distinct hashes), every 10th a near-duplicate."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    previous = None
    for i in range(n):
        if i % 10 == 9 and previous is not None:
            arr = np.clip(previous.astype(np.int16) + rng.integers(-6, 7, previous.shape), 0, 255)
            im = Image.fromarray(arr.astype(np.uint8))
        else:
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            im = Image.fromarray(small).resize((256, 256), Image.BICUBIC)
        previous = np.asarray(im)
        im.save(root / f"img_{i:05d}_{rng.integers(1 << 30):x}.jpeg", quality=90)


# -- what runs inside the subprocess ---------------------------------------------------------------


def run_sdprep(stage: str, root: Path) -> int:
    if stage == "rename":
        from sdprep.prep.rename import RenameOptions, run_rename

        return run_rename(root, RenameOptions()).changed
    if stage == "convert":
        from sdprep.prep.convert import ConvertOptions, run_convert

        return run_convert(root, ConvertOptions(format="png")).changed
    from sdprep.prep.dedup import DedupOptions, run_dedup

    return run_dedup(root, DedupOptions()).changed


def run_baseline(stage: str, root: Path) -> int:
    files = sorted(p for p in root.iterdir() if p.is_file())
    if stage == "rename":
        for i, path in enumerate(files, start=1):
            os.rename(path, root / f"{i:04d}.jpg")
        return len(files)
    from PIL import Image

    if stage == "convert":
        for path in files:
            with Image.open(path) as im:
                im.convert("RGB").save(path.with_suffix(".png"))
            path.unlink()
        return len(files)
    import imagehash

    hashes = []
    for path in files:
        with Image.open(path) as im:
            hashes.append(int(str(imagehash.phash(im)), 16))
    pairs = 0
    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            if bin(hashes[i] ^ hashes[j]).count("1") <= 6:
                pairs += 1
    return pairs


def worker(kind: str, stage: str, root: Path) -> None:
    start = time.perf_counter()
    count = (run_sdprep if kind == "sdprep" else run_baseline)(stage, root)
    seconds = time.perf_counter() - start
    rss_mb = peak_rss_mb()
    print(json.dumps({"seconds": seconds, "rss_mb": rss_mb, "count": count}))


# -- the driver --------------------------------------------------------------------------------------


def measure(kind: str, stage: str, root: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, __file__, "--worker", kind, stage, str(root)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500,2000")
    parser.add_argument("--keep", type=Path, default=None, help="Work here and keep the data.")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "STAGE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], Path(args.worker[2]))
        return
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench_acquire_"))
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"bench_acquire: python {sys.version.split()[0]}, one thread per stage, 256x256 JPEG inputs")
    print(
        f"{'images':>6} {'stage':<8} {'sdprep img/s':>12} {'baseline img/s':>14} {'ratio':>6} {'sdprep RSS':>10}"
    )
    rss: dict[tuple[str, int], float] = {}
    try:
        for n in sizes:
            ours, theirs = base / f"sdprep_{n}", base / f"baseline_{n}"
            generate(ours, n)
            shutil.copytree(ours, theirs)
            for stage in STAGES:
                a, b = measure("sdprep", stage, ours), measure("baseline", stage, theirs)
                rss[(stage, n)] = a["rss_mb"]
                ratio = a["seconds"] / b["seconds"]
                line = f"{n:>6} {stage:<8} {n / a['seconds']:>12.0f} {n / b['seconds']:>14.0f} {ratio:>6.2f}"
                print(f"{line} {a['rss_mb']:>8.0f}MB   (sdprep changed {a['count']})")
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        growth = ", ".join(f"{s} {rss[(s, hi)] / rss[(s, lo)]:.2f}x" for s in STAGES)
        print(f"peak RSS {hi} vs {lo} images: {growth} (1.00x = flat)")
    print("ratio = sdprep seconds / baseline seconds (journal, two-phase rename, companions, checks)")


if __name__ == "__main__":
    main()
