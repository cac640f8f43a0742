"""Benchmark: the trainer's data pipeline against a plain kohya-style loader, measured in one run.

Data: N generated JPEGs at SDXL sizes (1216x832, 832x1216, 1024x1024, 1100x900 with noise), trained
at resolution 1024 with aspect-ratio buckets, batch size 4.

Compared, per epoch of batches:
- baseline "kohya loader": what sd-scripts' uncached `__getitem__` does per sample (PIL decode ->
  numpy -> `resize_image`: cv2 INTER_AREA when shrinking, PIL Lanczos when enlarging -> centre crop
  -> tensor in [-1, 1]) and stacks a batch, with the batches taken from sdprep's plan so both load
  exactly the same samples;
- sdprep `batches()` without prefetch (same work plus captions, size conditioning, seeded RNG);
- sdprep `batches(prefetch=2)` (decode/resize in two threads);
- sdprep `batches()` from a disk latent cache (written once with the tiny SDXL VAE before timing).
Also the time to build the dataset (scan headers, captions, buckets) for M small images against a
plain loop reading each header with PIL.

Ratios are sdprep's time over the baseline's (below 1 = sdprep faster). Medians of 3 runs; threads
as set by OMP_NUM_THREADS (1 by default here). Prefetch only pays when a spare core is free (on a
GPU machine it overlaps loading with the step); on a busy 2-core box it can be slower. Peak RSS of the whole process is printed at the end.

Usage: python benchmarks/bench_train_data.py [--images 32] [--scan 2000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchutil import peak_rss_mb

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZES = [(1216, 832), (832, 1216), (1024, 1024), (1100, 900)]


def generate(folder: Path, n: int, sizes: list[tuple[int, int]], seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        small = rng.integers(0, 256, (h // 32, w // 32, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        im.save(folder / f"img_{i:05d}.jpg", quality=90)
        (folder / f"img_{i:05d}.txt").write_text("tok, 1girl, solo, smile")


def kohya_batch(ds, slots) -> object:
    """The baseline: kohya's uncached per-sample loading for the same samples."""
    import cv2
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for i, _ in slots:
        rec = ds.records[i]
        img = np.array(Image.open(rec.path).convert("RGB"), np.uint8)  # a writable copy
        a = rec.assignment
        h, w = img.shape[:2]
        if (w, h) != a.resized:
            if w >= a.resized[0] and h >= a.resized[1]:
                img = cv2.resize(img, a.resized, interpolation=cv2.INTER_AREA)
            else:
                img = np.asarray(Image.fromarray(img).resize(a.resized, Image.LANCZOS))
        left, top = (a.resized[0] - a.bucket[0]) // 2, (a.resized[1] - a.bucket[1]) // 2
        img = np.array(img[top : top + a.bucket[1], left : left + a.bucket[0]])
        out.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 127.5 - 1.0)
    return torch.stack(out)


def consume(batches) -> int:
    """Iterate without keeping the batches (a training loop holds one at a time)."""
    n = 0
    for _ in batches:
        n += 1
    return n


def timed(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--scan", type=int, default=2000)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from PIL import Image

    from sdprep.train.config.schema import TrainConfig
    from sdprep.train.data.cache import cache_latents
    from sdprep.train.data.pipeline import build_dataset
    from sdprep.train.models.tiny import build_tiny_sdxl_components

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(root / "train" / "1_tok", args.images, SIZES)
        cfg = TrainConfig(train_data_dir=root / "train", train_batch_size=4, seed=0, max_bucket_reso=2048)
        ds = build_dataset(cfg)
        plan = ds.plan(0)

        base = timed(lambda: consume(kohya_batch(ds, slots) for slots in plan))
        plain = timed(lambda: consume(ds.batches(0)))
        pref = timed(lambda: consume(ds.batches(0, prefetch=2)))
        vae = build_tiny_sdxl_components()[1].eval()
        cached = build_dataset(cfg)
        cache_latents(cached, vae, to_disk=True)
        from_cache = timed(lambda: consume(cached.batches(0)))

        small = root / "scan" / "1_tok"
        small.mkdir(parents=True)
        for i in range(args.scan):
            Image.new("RGB", (64 + i % 7 * 8, 64), (i % 255, 0, 0)).save(small / f"s{i:05d}.png")
        scan_cfg = TrainConfig(
            train_data_dir=root / "scan",
            resolution=(64, 64),
            min_bucket_reso=32,
            max_bucket_reso=128,
            bucket_reso_steps=32,
            seed=0,
        )
        scan_base = timed(lambda: [Image.open(p).size for p in sorted(small.iterdir())])
        scan_sdprep = timed(lambda: build_dataset(scan_cfg))

    n = len(plan)
    print(
        f"data pipeline, {args.images} images at 1024, {n} batches of 4, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    )
    print(f"  baseline kohya-style loader: {base:.2f} s/epoch ({base / n * 1000:.0f} ms/batch)")
    print(f"  sdprep batches():            {plain:.2f} s/epoch  ratio {plain / base:.2f}")
    print(f"  sdprep batches(prefetch=2):  {pref:.2f} s/epoch  ratio {pref / base:.2f}")
    print(f"  sdprep from latent cache:    {from_cache:.2f} s/epoch  ratio {from_cache / base:.3f}")
    print(
        f"dataset build, {args.scan} images: baseline PIL header loop {scan_base:.2f} s, "
        f"sdprep build_dataset {scan_sdprep:.2f} s  ratio {scan_sdprep / scan_base:.2f}"
    )
    peak = peak_rss_mb()
    print(f"peak RSS: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
