"""Benchmark `sdprep tag` against onnxruntime alone on a realistic-size WD14-shaped model.

Baseline (a): onnxruntime on pre-made input tensors (the ceiling: no decoding, no files).
Measured (b): `sdprep tag` end to end (a fresh process: start-up, discovery, decoding, kohya
preprocessing, inference, sidecars, captions, journal) on 200 JPEGs of 1024x1536.
Both use the same session options (onnxruntime's default thread count) and the same batch size.
Also printed: peak RSS of (b), wall time for 1 and for 40 images including start-up, and the time to
re-derive captions from stored scores for 10,000 sidecars (a threshold change, no model).

The model is ConvNeXt-base (transformers config, random weights) at 448 px with 10,861 outputs,
exported with torch.onnx.export(dynamo=False) and cached in ~/.cache/sdprep-bench. Its classifier
bias is set so that, as with a real tagger, a few dozen tags per image score above the 0.05 floor.

Run: python benchmarks/bench_tag.py [--images 200] [--batch-size 4]
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

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CACHE = Path(os.environ.get("SDPREP_BENCH_CACHE", Path.home() / ".cache" / "sdprep-bench"))
MODEL_DIR = CACHE / "wd14-convnext-base-448"
N_TAGS = 10861
N_CHARACTERS = 2600
SIZE = 448


def build_model(folder: Path) -> Path:
    """Export a random-weight ConvNeXt-base WD14-shaped model once (NHWC BGR 0..255 in, sigmoid out)."""
    if (folder / "model.onnx").exists() and (folder / "selected_tags.csv").exists():
        return folder
    import torch
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    config = ConvNextConfig(
        hidden_sizes=[128, 256, 512, 1024], depths=[3, 3, 27, 3], image_size=SIZE, num_labels=N_TAGS
    )
    net = ConvNextForImageClassification(config).eval()
    with torch.no_grad():
        net.classifier.weight.mul_(0.5)
        net.classifier.bias.copy_(torch.randn(N_TAGS) * 2.0 - 8.0)

    class Wrapped(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.permute(0, 3, 1, 2).flip(1) / 255.0  # NHWC BGR -> NCHW RGB
            return torch.sigmoid(self.inner(pixel_values=x).logits)

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.onnx.part"
    torch.onnx.export(
        Wrapped(net),
        (torch.rand(2, SIZE, SIZE, 3) * 255,),
        str(tmp),
        dynamo=False,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        opset_version=17,
    )
    write_tags(folder / "selected_tags.csv")
    tmp.rename(folder / "model.onnx")
    return folder


def write_tags(path: Path) -> None:
    rows = ["tag_id,name,category,count"]
    rows += [f"{i},{name},9,0" for i, name in enumerate(["general", "sensitive", "questionable", "explicit"])]
    n_general = N_TAGS - 4 - N_CHARACTERS
    rows += [f"{i + 4},tag_{i:05d}_general,0,{n_general - i}" for i in range(n_general)]
    rows += [f"{i + 4 + n_general},char_{i:05d}_(series),4,{N_CHARACTERS - i}" for i in range(N_CHARACTERS)]
    path.write_text("\n".join(rows) + "\n")


def make_jpegs(folder: Path, n: int, width: int = 1024, height: int = 1536) -> Path:
    """n distinct smooth-plus-noise JPEGs (photo-like compressed size), cached."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(n):
        path = folder / f"{i:04d}.jpg"
        if path.exists():
            continue
        phase = rng.uniform(0, 6.28, 3)
        freq = rng.uniform(0.002, 0.02, 3)
        base = np.stack(
            [127 + 100 * np.sin(xx * freq[c] + yy * freq[(c + 1) % 3] + phase[c]) for c in range(3)], -1
        )
        noise = rng.normal(0, 12, (height, width, 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path, quality=90)
    return folder


def run_sdprep(args: list[str]) -> tuple[float, float, str]:
    """Run `sdprep ...` in a fresh process: (wall seconds, its peak RSS in MiB, stdout).

    Peak RSS is the child's own VmHWM, polled from /proc (rusage's maxrss of a child also counts
    the forking parent's memory at fork time, which would charge this script's memory to sdprep).
    """
    exe = shutil.which("sdprep") or str(Path(sys.executable).parent / "sdprep")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([exe, "-q", *args], stdout=out, stderr=err)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _vm_hwm_kib(proc.pid))
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"sdprep {' '.join(args)} failed ({proc.returncode}):\n{stdout}\n{stderr}")
    return wall, peak / 1024.0, stdout


def _vm_hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def bench_ort(model: Path, n: int, batch: int) -> tuple[float, float]:
    """(a) images/s of onnxruntime alone on pre-made tensors (same options as WD14Tagger), and the
    latency of one single-image call."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 0
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(model / "model.onnx"), options, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (batch, SIZE, SIZE, 3)).astype(np.float32)
    sess.run(None, {name: x})  # warm-up
    batches = -(-n // batch)
    inputs = [rng.uniform(0, 255, (batch, SIZE, SIZE, 3)).astype(np.float32) for _ in range(min(batches, 4))]
    t0 = time.perf_counter()
    for i in range(batches):
        sess.run(None, {name: inputs[i % len(inputs)]})
    rate = batches * batch / (time.perf_counter() - t0)
    t1 = time.perf_counter()
    sess.run(None, {name: x[:1]})
    return rate, time.perf_counter() - t1


def make_scored_dataset(folder: Path, n: int, model_id: str, template: dict) -> None:
    """n images whose sidecars already hold WD14 records (a stored-score dataset)."""
    from PIL import Image

    folder.mkdir(parents=True)
    png = folder / "_.png"
    Image.new("RGB", (8, 8), "white").save(png)
    data = png.read_bytes()
    png.unlink()
    rng = np.random.default_rng(2)
    names = list(template["scores"])
    for i in range(n):
        (folder / f"{i:05d}.png").write_bytes(data)
        scores = {t: float(np.float32(rng.uniform(0.05, 1.0))) for t in names}
        record = {**template, "scores": scores, "model": model_id}
        sidecar = {"sdprep": {"wd14": record}}
        (folder / f"{i:05d}.png.json").write_text(json.dumps(sidecar, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--ort-images", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rederive", type=int, default=10000)
    args = ap.parse_args()
    B = args.batch_size

    t0 = time.perf_counter()
    model = build_model(MODEL_DIR)
    print(f"model: {model} ({(model / 'model.onnx').stat().st_size / 2**20:.0f} MiB, {N_TAGS} tags), "
          f"ready in {time.perf_counter() - t0:.1f}s")  # fmt: skip
    jpegs = make_jpegs(CACHE / "jpegs-1024x1536", args.images)
    print(f"cpu cores: {os.cpu_count()}, onnxruntime threads: default, batch size: {B}")

    work = Path(tempfile.mkdtemp(prefix="sdprep-bench-tag-"))
    try:
        # (a) before and after (b): the machine may be shared, so (a) is the mean of the two
        a1, latency = bench_ort(model, args.ort_images, B)
        print(f"(a) onnxruntime alone: {a1:.3f} images/s (load average {os.getloadavg()[0]:.1f})")
        data = work / "data"
        shutil.copytree(jpegs, data)
        wall, rss, _ = run_sdprep(["tag", str(data), "--model", str(model), "--batch-size", str(B)])
        b = args.images / wall
        print(f"(b) sdprep tag end to end: {args.images} images in {wall:.1f}s = {b:.3f} images/s, "
              f"peak RSS {rss:.0f} MiB (load average {os.getloadavg()[0]:.1f})")  # fmt: skip
        a2, _ = bench_ort(model, args.ort_images, B)
        a = (a1 + a2) / 2
        print(f"(a) again: {a2:.3f} images/s")
        print(f"ratio (b)/(a) = {b / a:.3f}  (target >= 0.95; against the faster (a): {b / max(a1, a2):.3f})")

        for n in (1, 40):
            small = work / f"small{n}"
            small.mkdir()
            for p in sorted(jpegs.iterdir())[:n]:
                shutil.copy(p, small / p.name)
            wall_n, _, _ = run_sdprep(["tag", str(small), "--model", str(model), "--batch-size", str(B)])
            print(f"sdprep tag on {n} image(s), wall time including start-up and model load: {wall_n:.2f}s")
            if n == 1:
                print(
                    f"  -> launch to first inference ~ {wall_n - latency:.2f}s (minus one inference, {latency:.2f}s)"
                )
        wall_0, _, _ = run_sdprep(["tag", str(work / "small40"), "--model", str(model)])
        print(f"sdprep tag on the same 40 images again (nothing to do): {wall_0:.2f}s")

        record = json.loads((data / "0000.jpg.json").read_text())["sdprep"]["wd14"]
        print(f"tags stored per image (floor 0.05): {len(record['scores'])} (first image)")
        scored = work / "scored"
        make_scored_dataset(scored, args.rederive, str(model.absolute().as_posix()), record)
        wall_r, rss_r, out = run_sdprep(
            ["tag", str(scored), "--model", str(model), "--general-threshold", "0.5"]
        )
        print(f"re-derive captions for {args.rederive} sidecars (threshold change, no model): {wall_r:.1f}s "
              f"({1000 * wall_r / args.rederive:.2f} ms/image), peak RSS {rss_r:.0f} MiB")  # fmt: skip
        print("   " + out.strip().splitlines()[0])
        wall_s, _, _ = run_sdprep(["tag", str(scored), "--model", str(model), "--general-threshold", "0.5"])
        print(f"same again, nothing to do: {wall_s:.1f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
