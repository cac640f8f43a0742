"""Benchmark `sdprep tag --executor ray` against a local run: 2,000 images, the tiny WD14 tagger.

Baseline: `run_tag` with the local executor (decoding threads ahead of WD14 on the driver), run
once before and once after the Ray runs (the mean is the baseline: the machine is shared).
Measured: the same `run_tag` through a Ray cluster started here on the loopback address (as many
CPUs as the machine has), with 1 and with 2 workers; each run starts its actors and loads the model
in each, as a real stage run does (the cluster's own start-up is printed apart). Every run writes
the same files; the script checks the captions against the first local run's. Also printed: how
fast the driver writes results alone (a threshold change: captions re-derived, no model), the
ceiling of any cluster's throughput for tag.

The tiny tagger (taggers/tiny.py) is cheap, so this measures what Ray adds around each image
(shipping items and results, writing on the driver) more than it measures a model: with a real
WD14 model (~0.3 s per image on a CPU core) the per-image work dominates and a run scales with the
workers until the driver's writing or the shared storage is the limit (see the README).

Run: python benchmarks/bench_ray.py [--images 2000] [--size 512]
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every socket on 127.0.0.1 (see tests/conftest.py)
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


def make_images(folder: Path, n: int, size: int) -> None:
    """`n` JPEGs of size x size*3/4 with different colour layouts (the tiny tagger reads colours)."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    h = size * 3 // 4
    for i in range(n):
        blocks = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        im = Image.fromarray(blocks).resize((size, h), Image.BILINEAR)
        im.save(folder / f"{i:05d}.jpg", quality=90)


def timed_tag(source: Path, work: Path, model: Path, executor) -> tuple[float, dict[str, bytes]]:
    """Seconds for one `run_tag` over a fresh copy of `source`, and the captions it wrote."""
    from sdprep.prep.tag import TagOptions, run_tag

    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(source, work)
    start = time.perf_counter()
    result = run_tag(work, TagOptions(model=str(model)), executor=executor)
    seconds = time.perf_counter() - start
    assert result.ok and result.changed == len(list(source.glob("*.jpg"))), result.summary()
    return seconds, {p.name: p.read_bytes() for p in sorted(work.glob("*.txt"))}


def rewrite_rate(work: Path, model: Path) -> float:
    """Images/s of the part every executor leaves on the driver: a threshold change re-derives every
    caption from the stored scores and writes it (sidecar and caption, journalled), no model runs."""
    from sdprep.prep.tag import TagOptions, run_tag
    from sdprep.taggers.rules import CaptionRules

    start = time.perf_counter()
    result = run_tag(work, TagOptions(model=str(model), rules=CaptionRules(general_threshold=0.5)))
    assert result.details["inferred"] == 0
    return result.changed / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()

    import ray

    from sdprep.ray_executor import RayExecutor
    from sdprep.taggers.tiny import build_tiny_wd14

    scratch = Path(tempfile.mkdtemp(prefix="sdprep-bench-ray-"))
    temp = Path(tempfile.mkdtemp(prefix="sdprep-ray-"))
    try:
        model = build_tiny_wd14(scratch / "wd14")
        source = scratch / "images"
        make_images(source, args.images, args.size)
        cpus = os.cpu_count() or 1
        print(f"{args.images} JPEGs {args.size}x{args.size * 3 // 4}, tiny WD14 tagger, {cpus} CPUs")

        local1, want = timed_tag(source, scratch / "work", model, None)
        start = time.perf_counter()
        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            _temp_dir=str(temp),
            _node_ip_address="127.0.0.1",
        )
        print(f"ray cluster start (once per cluster, not per run): {time.perf_counter() - start:.1f} s")
        ray_times = {}
        for workers in (1, 2):
            seconds, got = timed_tag(source, scratch / "work", model, RayExecutor("local", workers=workers))
            assert got == want, f"ray with {workers} workers wrote other captions"
            ray_times[workers] = seconds
        ray.shutdown()
        local2, got = timed_tag(source, scratch / "work", model, None)
        assert got == want
        rewrite = rewrite_rate(scratch / "work", model)
        local = (local1 + local2) / 2
        n = args.images
        print(
            f"local:            {local:6.1f} s  {n / local:6.1f} images/s  (runs {local1:.1f} s, {local2:.1f} s)"
        )
        for workers, seconds in ray_times.items():
            print(
                f"ray, {workers} worker{'s' if workers > 1 else ' '}:   {seconds:6.1f} s  {n / seconds:6.1f} images/s"
                f"  {local / seconds:.2f}x local's speed"
            )
        print(f"ray 2 workers vs 1: {ray_times[1] / ray_times[2]:.2f}x")
        print(
            f"driver's writing alone (captions re-derived from stored scores, no model): {rewrite:.0f} images/s"
        )
        print("captions: identical in all four runs")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
