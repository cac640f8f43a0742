"""Benchmark: 20,000 small images through clean, captions, bucket and report (memory flat, no fd leak).

Datasets of 64x64 PNGs with 6-15 tag captions (tests/corpus.py `small_dataset`) are generated once
into a cache folder and copied fresh for every run. Each stage runs in its own subprocess, in this
order on the same copy: `clean --trigger tok --remove tag0*`, `captions replace smile grin`,
`bucket -o OUT --token tok`, `report -o report.html`. A subprocess reports its wall time, its peak
RSS and its open file descriptors before and after the stage (in the same process).

Baselines, measured in the same run: the same stage on an EMPTY folder (the RSS of the interpreter
and the stage's imports), and the smaller size. Memory is flat in the number of files when the RSS
above the empty-folder baseline grows much less than the file count; time should grow about linearly
(20,000 / 5,000 = 4.0).

Usage: python benchmarks/bench_load.py [--sizes 5000,20000] [--stages clean,report] [--cache DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import peak_rss_mb

REPO = Path(__file__).resolve().parent.parent
STAGES = ("clean", "captions", "bucket", "report")


def stage_args(stage: str, data: Path, work: Path) -> list[str]:
    return {
        "clean": ["clean", str(data), "--trigger", "tok", "--remove", "tag0*"],
        "captions": ["captions", "replace", "smile", "grin", str(data)],
        "bucket": ["bucket", str(data), "-o", str(work / "out"), "--token", "tok", "--repeats", "2"],
        "report": ["report", str(data), "-o", str(work / "report.html")],
    }[stage]


def child(stage: str, data: Path, work: Path) -> None:
    """Run one stage in this process; print its time, peak RSS and open descriptors as JSON."""
    from sdprep.cli import cli

    fds = len(os.listdir("/proc/self/fd"))
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        try:
            cli.main(args=["-q", *stage_args(stage, data, work)], prog_name="sdprep", standalone_mode=False)
            code = 0
        except SystemExit as exc:  # click's Exit(1) when a file failed
            code = int(exc.code or 0)
    seconds = time.perf_counter() - start
    rss_mb = peak_rss_mb()
    doc = {
        "seconds": seconds,
        "rss_mb": rss_mb,
        "fds_start": fds,
        "fds_end": len(os.listdir("/proc/self/fd")),
        "exit": code,
        "summary": out.getvalue().splitlines()[:1],
    }
    print(json.dumps(doc))


def measure(stage: str, data: Path, work: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--child", stage, str(data), str(work)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{stage} crashed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def dataset(cache: Path, n: int) -> Path:
    """The pristine generated dataset of n images (generated on first use)."""
    sys.path.insert(0, str(REPO / "tests"))
    import corpus

    folder = cache / f"load-{n}"
    if not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        corpus.small_dataset(folder, n)
        (folder / ".complete").write_text("")
        print(f"generated {n} images in {time.perf_counter() - start:.1f} s into {folder}")
    return folder


def run_size(cache: Path, n: int, stages: tuple[str, ...]) -> dict[str, dict]:
    pristine = dataset(cache, n)
    with tempfile.TemporaryDirectory(prefix="sdprep-bench-load-") as tmp:
        work = Path(tmp)
        data = work / "data"
        shutil.copytree(pristine, data, ignore=shutil.ignore_patterns(".complete"))
        results = {stage: measure(stage, data, work) for stage in stages}
    for stage, r in results.items():
        if r["exit"] != 0:
            raise SystemExit(f"{stage} failed on {n} images: {r['summary']}")
    return results


def baselines(stages: tuple[str, ...]) -> dict[str, dict]:
    """Each stage on an empty folder: the interpreter plus the stage's imports."""
    with tempfile.TemporaryDirectory(prefix="sdprep-bench-load-") as tmp:
        work = Path(tmp)
        (work / "data").mkdir()
        return {stage: measure(stage, work / "data", work) for stage in stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="5000,20000")
    parser.add_argument(
        "--stages", default=",".join(STAGES), help="comma-separated subset, run in this order"
    )
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "sdprep-bench")
    parser.add_argument("--child", nargs=3, metavar=("STAGE", "DATA", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        stage, data, work = args.child
        child(stage, Path(data), Path(work))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    stages = tuple(s for s in args.stages.split(",") if s)
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    base = baselines(stages)
    runs = {n: run_size(args.cache, n, stages) for n in sizes}

    print(
        f"\n{'stage':<9} {'images':>7} {'seconds':>8} {'ms/img':>7} {'peak RSS':>9} {'above empty':>12} {'fds':>9}"
    )
    for stage in stages:
        b = base[stage]
        print(
            f"{stage:<9} {'(empty)':>7} {b['seconds']:8.2f} {'':>7} {b['rss_mb']:7.0f}MB {'':>12} {b['fds_start']:>4}->{b['fds_end']}"
        )
        for n in sizes:
            r = runs[n][stage]
            above = r["rss_mb"] - b["rss_mb"]
            print(
                f"{'':<9} {n:>7} {r['seconds']:8.2f} {r['seconds'] / n * 1000:7.2f} {r['rss_mb']:7.0f}MB "
                f"{above:10.0f}MB {r['fds_start']:>4}->{r['fds_end']}"
            )
    if len(sizes) >= 2:
        small, big = sizes[0], sizes[-1]
        print(f"\nratios {big} / {small} images (files x{big / small:.1f}):")
        for stage in stages:
            a, b, e = runs[small][stage], runs[big][stage], base[stage]
            grow = (b["rss_mb"] - e["rss_mb"]) / max(a["rss_mb"] - e["rss_mb"], 1.0)
            print(
                f"  {stage:<9} time x{b['seconds'] / a['seconds']:.2f}   peak RSS x{b['rss_mb'] / a['rss_mb']:.2f}"
                f"   RSS above empty-folder baseline x{grow:.2f}"
            )
    leaks = [(n, s) for n in sizes for s in stages if runs[n][s]["fds_end"] != runs[n][s]["fds_start"]]
    print("\nopen descriptors: " + ("unchanged after every stage" if not leaks else f"LEAK in {leaks}"))


if __name__ == "__main__":
    main()
