"""Benchmark: greyscale / monochrome detection on 1,000 JPEGs of 1024x1536, against the seed's method.

Baseline (named, measured in the same run on the same files): seed 003's tag.py, i.e. PIL decode at
full resolution, `convert("RGB")`, OpenCV HSV of every pixel, numpy mean / std. sdprep: JPEG DCT
decoding at 1/4 scale, point sampling to ~256 px, OpenCV statistics, and a full-resolution
re-measure when the result is within 25% of a threshold (sdprep.prep.monochrome). Both run on one
thread with the files in the page cache. The labels must be identical on every image.

The images (every synthetic kind in turn: colour, greyscale, sepia, blue tint, pastel, grey with a
colour patch, noisy grey, red tint; JPEG quality 90) are generated once into a cache folder.

    python benchmarks/bench_monochrome.py [--count 1000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
from benchutil import peak_rss_mb  # noqa: E402
from PIL import Image  # noqa: E402

from sdprep.prep import monochrome as mono  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from seed_tagpy import seed_label  # noqa: E402  (seed 003's method, verbatim: the baseline)

CACHE = Path(os.environ.get("SDPREP_BENCH_DIR", Path(tempfile.gettempdir()) / "sdprep-bench")) / "monochrome"
SIZE = (1024, 1536)


def images(count: int) -> list[Path]:
    """The cached benchmark JPEGs (generated on first use)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    paths = []
    made = 0
    for i in range(count):
        kind = mono.SYNTHETIC_KINDS[i % len(mono.SYNTHETIC_KINDS)]
        path = CACHE / f"{i:04d}_{kind}.jpg"
        if not path.exists():
            Image.fromarray(mono.synthetic_image(kind, seed=i, size=SIZE)).save(path, quality=90)
            made += 1
        paths.append(path)
    if made:
        print(f"generated {made} images in {CACHE}")
    return paths


def timed(fn, paths: list[Path]) -> tuple[list, list[float], float]:
    """Results, wall time per image, and the CPU time of the whole loop (immune to other processes)."""
    results, times = [], []
    cpu = time.process_time()
    for path in paths:
        t = time.perf_counter()
        results.append(fn(path))
        times.append(time.perf_counter() - t)
    return results, times, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    paths = images(args.count)
    for p in paths:  # page cache: both methods read warm files
        p.read_bytes()
    settings = mono.MonochromeSettings()
    full = 0

    def ours(path: Path) -> str | None:
        nonlocal full
        stats = mono.measure(path, settings)
        full += stats.measured == "full"
        return mono.classify(stats.saturation, stats.hue_std, settings)

    base_labels, base_t, base_cpu = timed(seed_label, paths)
    our_labels, our_t, our_cpu = timed(ours, paths)
    mismatches = [(p.name, a, b) for p, a, b in zip(paths, base_labels, our_labels) if a != b]
    mean_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
    print(f"{len(paths)} JPEGs {SIZE[0]}x{SIZE[1]} (mean {mean_kb:.0f} KB), 1 thread")
    for name, t, cpu in (
        ("baseline (seed, full-resolution HSV)", base_t, base_cpu),
        ("sdprep (reduced)", our_t, our_cpu),
    ):
        med = statistics.median(t) * 1000
        print(f"  {name:37s} wall {sum(t):6.2f} s (median {med:5.1f} ms/image), CPU {cpu:6.2f} s")
    print(
        f"  speed-up: {sum(base_t) / sum(our_t):.1f}x wall total, "
        f"{statistics.median(base_t) / statistics.median(our_t):.1f}x median, {base_cpu / our_cpu:.1f}x CPU time"
    )
    counts = {label or "colour": our_labels.count(label) for label in ("greyscale", "monochrome", None)}
    print(f"  labels: {counts}; re-measured at full resolution: {full}")
    print(f"  same label as the baseline on {len(paths) - len(mismatches)} of {len(paths)} images")
    for name, a, b in mismatches[:10]:
        print(f"    MISMATCH {name}: seed {a}, sdprep {b}")
    print(f"  peak RSS {peak_rss_mb():.0f} MB")
    if mismatches:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
