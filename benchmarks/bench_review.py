"""Benchmark: the review page with 5,000 images in a real headless chromium.

Measures, against the named baseline "100 images" measured in the same run with the same code:
- first screen: from navigation to every thumbnail in view decoded (thumbnails made on demand, the
  cache empty), and the server's start-up (indexing) time;
- memory while scrolling from the top to the bottom of the grid in 60 jumps, waiting at each for
  the thumbnails in view: the page's JS heap (after a forced GC), its attached DOM elements, and the
  server's resident memory, each as max-while-scrolling / first-screen (flat = about 1.0).

    python benchmarks/bench_review.py              # 100 (baseline) and 5,000 images
    python benchmarks/bench_review.py --sizes 100 20000
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from benchutil import empty_folder, random_caption  # noqa: E402
from review_support import Server, browser_problem, chromium  # noqa: E402

WORK = Path(os.environ.get("SDPREP_BENCH_DIR", Path(tempfile.gettempdir()) / "sdprep-bench-review"))
VOCAB = [f"tag {i}" for i in range(800)] + ["blue eyes", "pink hair", "1girl", "solo", "smile"]
SIZES = [(832, 1216), (1024, 1024), (1216, 832), (896, 1152)]
VISIBLE_LOADED = (
    "(() => { const g = document.getElementById('grid'); const r = g.getBoundingClientRect();"
    " const imgs = [...document.querySelectorAll('.cell img')].filter(i => {"
    " const b = i.getBoundingClientRect(); return b.bottom > r.top && b.top < r.bottom; });"
    " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); })()"
)


def make_dataset(root: Path, n: int) -> None:
    """n JPEGs of SDXL bucket sizes (a few distinct pictures, each file its own) with captions."""
    from PIL import Image, ImageDraw

    empty_folder(root)
    rng = random.Random(0)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        im = Image.new("RGB", (w, h), tuple(rng.randrange(40, 220) for _ in range(3)))
        ImageDraw.Draw(im).ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=(250, 220, 200))
        im.save(root / f"{i:06d}.jpg", quality=70)
        (root / f"{i:06d}.txt").write_text(random_caption(rng, VOCAB, 30))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def measure(browser, root: Path, scroll_steps: int) -> dict:
    """One run: server start, first screen, then (scroll_steps > 0) scrolling to the bottom."""
    started = time.perf_counter()
    server = Server(root)
    startup = time.perf_counter() - started
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        cdp = page.context.new_cdp_session(page)
        cdp.send("Performance.enable")
        t0 = time.perf_counter()
        page.goto(server.url)
        page.wait_for_function(VISIBLE_LOADED, timeout=60000, polling=20)
        first = time.perf_counter() - t0

        def metrics() -> dict:
            cdp.send("HeapProfiler.collectGarbage")
            m = {x["name"]: x["value"] for x in cdp.send("Performance.getMetrics")["metrics"]}
            nodes = page.evaluate("document.getElementsByTagName('*').length")  # attached elements
            return {"heap": m["JSHeapUsedSize"] / 2**20, "nodes": nodes, "rss": rss_mb(server.proc.pid)}

        page.wait_for_function("document.querySelectorAll('#tag-list li').length > 0", timeout=60000)
        base = metrics()
        peak = dict(base)
        height = page.evaluate("document.getElementById('grid').scrollHeight")
        for k in range(1, scroll_steps + 1):
            page.evaluate(f"document.getElementById('grid').scrollTop = {height * k / scroll_steps}")
            page.wait_for_function(VISIBLE_LOADED, timeout=60000, polling=20)
            if k % 10 == 0 or k == scroll_steps:
                now = metrics()
                peak = {key: max(peak[key], now[key]) for key in peak}
        cells = page.evaluate("document.querySelectorAll('.cell').length")
        page.close()
    finally:
        server.stop()
    return {"startup": startup, "first": first, "base": base, "peak": peak, "cells": cells}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 5000])
    ap.add_argument("--repeats", type=int, default=3, help="first-screen runs per size (median reported)")
    ap.add_argument("--scroll-steps", type=int, default=60)
    args = ap.parse_args()
    problem = browser_problem()
    if problem:
        print(f"bench_review: skipped: {problem}")
        return
    results = {}
    with chromium() as browser:
        for n in args.sizes:
            root = WORK / f"n{n}"
            make_dataset(root, n)
            runs = []
            for k in range(args.repeats):
                shutil.rmtree(root / ".sdprep", ignore_errors=True)  # an empty thumbnail cache each time
                runs.append(measure(browser, root, args.scroll_steps if k == args.repeats - 1 else 0))
            results[n] = runs
            first = statistics.median(r["first"] for r in runs)
            last = runs[-1]
            b, p = last["base"], last["peak"]
            print(
                f"{n:>6} images: first screen {first:.2f} s (median of {len(runs)}), server start "
                f"{statistics.median(r['startup'] for r in runs):.2f} s; scrolling to the end: JS heap "
                f"{b['heap']:.1f} -> max {p['heap']:.1f} MB ({p['heap'] / b['heap']:.2f}x), DOM elements "
                f"{b['nodes']:.0f} -> max {p['nodes']:.0f} ({p['nodes'] / b['nodes']:.2f}x), server RSS "
                f"{b['rss']:.0f} -> max {p['rss']:.0f} MB ({p['rss'] / b['rss']:.2f}x), cells in the DOM {last['cells']}"
            )
    baseline = args.sizes[0]
    for n in args.sizes[1:]:
        ratio = statistics.median(r["first"] for r in results[n]) / statistics.median(
            r["first"] for r in results[baseline]
        )
        print(f"first screen, {n} images vs the {baseline}-image baseline: {ratio:.2f}x")
        worst = max(r["first"] for r in results[n])
        print(
            f"  {n} images: slowest first screen {worst:.2f} s ({'under' if worst < 2 else 'OVER'} the 2 s goal)"
        )
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
