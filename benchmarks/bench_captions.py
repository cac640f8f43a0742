"""Benchmark: `sdprep clean` and `sdprep captions` on 10,000 and 100,000 caption files.

Baseline (named, measured in the same run): the seed's approach as a plain loop, read each caption,
regex-remove tags, prepend the trigger, write it back in place (no journal, no undo, no atomicity).
Each measurement runs in its own process so its peak RSS is its own: memory must stay flat from
10k to 100k files (streamed, not loaded). Files are in folders of 1,000 (kohya-style subfolders);
images are hard links to one tiny PNG (clean runs with --no-monochrome here: see bench_monochrome).

    python benchmarks/bench_captions.py            # 10k and 100k
    python benchmarks/bench_captions.py --sizes 10000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import empty_folder, peak_rss_mb, random_caption

PER_FOLDER = 1000
WORK = Path(os.environ.get("SDPREP_BENCH_DIR", Path(tempfile.gettempdir()) / "sdprep-bench-captions"))
VOCAB = [f"tag {i}" for i in range(3000)] + ["blue eyes", "pink hair", "1girl", "solo", "smile"]


def make_dataset(root: Path, n: int) -> None:
    """n images (hard links) with captions of 15-40 tags, in folders of PER_FOLDER."""
    from PIL import Image

    empty_folder(root)
    rng = random.Random(0)
    for i in range(n):
        folder = root / f"{10 + i // PER_FOLDER}_concept{i // PER_FOLDER}"
        png = folder / ".seed.png"  # one per folder: ext4 allows 65,000 links to a file
        if i % PER_FOLDER == 0:
            folder.mkdir()
            Image.new("RGB", (8, 8)).save(png)
        os.link(png, folder / f"{i:06d}.png")
        (folder / f"{i:06d}.txt").write_text(random_caption(rng, VOCAB, 38))


def baseline(root: Path) -> None:
    """The seed's loop: read, regex out tags, prepend the trigger, overwrite in place."""
    for folder in sorted(root.iterdir()):
        if not folder.is_dir():
            continue
        for txt in sorted(folder.glob("*.txt")):
            content = txt.read_text(encoding="utf-8").strip()
            content = "tok, " + content
            for tag in ("blue eyes", "pink hair"):
                content = re.sub(rf",\s*{re.escape(tag)}", "", content)
            txt.write_text(content, encoding="utf-8")


COMMANDS = {
    "clean": ["clean", "{root}", "-r", "--trigger", "tok", "--remove", "blue eyes", "--remove", "pink hair", "--no-monochrome"],
    "clean again (no-op)": ["clean", "{root}", "-r", "--trigger", "tok", "--remove", "blue eyes", "--remove", "pink hair", "--no-monochrome"],
    "clean --prune-core": ["clean", "{root}", "-r", "--trigger", "tok", "--prune-core", "--no-monochrome", "--dry-run"],
    "captions remove": ["captions", "remove", "smile", "{root}", "-r"],
    "captions stats": ["captions", "stats", "{root}", "-r"],
}  # fmt: skip


def child(name: str, root: str) -> None:
    """Run one measurement in this process and print its wall time and peak RSS as JSON."""
    start = time.perf_counter()
    if name == "baseline":
        baseline(Path(root))
    else:
        from sdprep.cli import main

        argv = ["-q", *(a.format(root=root) for a in COMMANDS[name])]
        try:
            main(argv)
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise
    seconds = time.perf_counter() - start
    rss = peak_rss_mb()
    print(json.dumps({"seconds": seconds, "rss_mb": rss}), file=sys.stderr)


def measure(name: str, root: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", name, str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=True,
    )
    return json.loads(out.stderr.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"caption benchmark in {WORK} (threads: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})")
    rows = []
    for n in args.sizes:
        root = WORK / f"n{n}"
        t = time.perf_counter()
        make_dataset(root, n)
        print(f"\n{n:,} caption files generated in {time.perf_counter() - t:.1f} s")
        base = measure("baseline", root)
        make_dataset(root, n)
        for name in COMMANDS:
            r = measure(name, root)
            per10k = r["seconds"] / n * 10_000
            ratio = r["seconds"] / base["seconds"]
            rows.append((n, name, r["seconds"], per10k, r["rss_mb"]))
            print(
                f"  {name:22s} {r['seconds']:7.2f} s  {per10k:5.2f} s/10k files  "
                f"{ratio:5.1f}x the baseline  peak RSS {r['rss_mb']:6.1f} MB"
            )
        print(f"  {'baseline (seed loop)':22s} {base['seconds']:7.2f} s  peak RSS {base['rss_mb']:6.1f} MB")
        shutil.rmtree(root)
    if len(args.sizes) > 1:
        small, big = min(args.sizes), max(args.sizes)
        print(f"\npeak RSS {small:,} -> {big:,} files:")
        for name in COMMANDS:
            a = next(r[4] for r in rows if r[0] == small and r[1] == name)
            b = next(r[4] for r in rows if r[0] == big and r[1] == name)
            print(f"  {name:22s} {a:6.1f} MB -> {b:6.1f} MB ({b / a:.2f}x)")


if __name__ == "__main__":
    main()
