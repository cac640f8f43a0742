"""Benchmark `sdprep tag` against onnxruntime alone on a realistic-size WD14-shaped model.

Baseline (a): onnxruntime on pre-made input tensors (the ceiling: no decoding, no files).
Measured (b): `sdprep tag` end to end (a fresh process: start-up, model load, discovery, decoding,
kohya preprocessing, inference, sidecars, captions, journal) on 200 JPEGs of 1024x1536; (a) runs
half before and half after (b). CPU seconds per image are printed too: on a shared machine they
do not depend on what else runs, wall times do. Both use the same session options
(`sdprep.taggers.wd14.session_options`, onnxruntime's default thread count) and batch size.
Also printed: peak RSS of (b), wall time for 40 images and for 1 image including start-up, and the
time to re-derive captions from stored scores for 10,000 sidecars (a threshold change, no model).

The model is ConvNeXt-base (transformers config, random weights) at 448 px with 10,861 outputs,
exported with torch.onnx.export(dynamo=False) and cached in ~/.cache/sdprep-bench. Its classifier
bias is set so that, as with a real tagger, a few dozen tags per image score above the 0.05 floor.

Run: python benchmarks/bench_tag.py [--images 200] [--ort-images 80] [--batch-size 4] [--rederive 10000]
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


def run_sdprep(args: list[str]) -> dict:
    """Run `sdprep ...` in a fresh process: wall and CPU seconds, peak RSS (MiB), stdout.

    Peak RSS is the child's own VmHWM, polled from /proc (rusage's maxrss of a child also counts
    the forking parent's memory at fork time, which would charge this script's memory to sdprep).
    """
    exe = shutil.which("sdprep") or str(Path(sys.executable).parent / "sdprep")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([exe, "-q", *args], stdout=out, stderr=err)
        peak = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, _vm_hwm_kib(proc.pid))
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"sdprep {' '.join(args)} failed ({proc.returncode}):\n{stdout}\n{stderr}")
    cpu = usage.ru_utime + usage.ru_stime
    return {"wall": wall, "cpu": cpu, "rss": peak / 1024.0, "out": stdout}


def _vm_hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class OrtBaseline:
    """(a) onnxruntime alone on pre-made tensors, with the session options `sdprep tag` uses."""

    def __init__(self, model: Path, batch: int):
        import onnxruntime as ort

        from sdprep.taggers.wd14 import session_options

        t0 = time.perf_counter()
        self.sess = ort.InferenceSession(
            str(model / "model.onnx"), session_options(), providers=["CPUExecutionProvider"]
        )
        self.load_seconds = time.perf_counter() - t0
        self.name = self.sess.get_inputs()[0].name
        rng = np.random.default_rng(1)
        self.inputs = [rng.uniform(0, 255, (batch, SIZE, SIZE, 3)).astype(np.float32) for _ in range(4)]
        self.batch = batch
        self.sess.run(None, {self.name: self.inputs[0]})  # warm-up

    def run(self, n: int) -> dict:
        """Wall and CPU seconds for n images."""
        import resource

        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for i in range(-(-n // self.batch)):
            self.sess.run(None, {self.name: self.inputs[i % 4]})
        r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
        cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
        return {"wall": wall, "cpu": cpu, "n": -(-n // self.batch) * self.batch}


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
    ap.add_argument("--images", type=int, default=200, help="JPEGs for (b)")
    ap.add_argument("--ort-images", type=int, default=80, help="images for (a), half before (b), half after")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rederive", type=int, default=10000)
    args = ap.parse_args()
    B = args.batch_size

    t0 = time.perf_counter()
    model = build_model(MODEL_DIR)
    size_mib = (model / "model.onnx").stat().st_size / 2**20
    print(f"model: {model} ({size_mib:.0f} MiB, {N_TAGS} tags), ready in {time.perf_counter() - t0:.1f}s")
    jpegs = sorted(make_jpegs(CACHE / "jpegs-1024x1536", args.images).iterdir())[: args.images]
    print(f"cpu cores: {os.cpu_count()}, onnxruntime threads: default, batch size: {B}")

    work = Path(tempfile.mkdtemp(prefix="sdprep-bench-tag-"))
    try:
        base = OrtBaseline(model, B)
        load_s = base.load_seconds
        a1 = base.run(args.ort_images // 2)
        print(f"(a) onnxruntime alone: {a1['n'] / a1['wall']:.3f} images/s (load {os.getloadavg()[0]:.1f})")
        data = work / "data"
        data.mkdir()
        for p in jpegs:
            shutil.copy(p, data / p.name)
        b = run_sdprep(["tag", str(data), "--model", str(model), "--batch-size", str(B)])
        b_rate = args.images / b["wall"]
        print(f"(b) sdprep tag end to end: {args.images} images in {b['wall']:.1f}s = {b_rate:.3f} images/s "
              f"(load {os.getloadavg()[0]:.1f})")  # fmt: skip
        a2 = base.run(args.ort_images // 2)
        print(f"(a) again: {a2['n'] / a2['wall']:.3f} images/s (load {os.getloadavg()[0]:.1f})")
        a_rate = (a1["n"] + a2["n"]) / (a1["wall"] + a2["wall"])
        a_cpu = (a1["cpu"] + a2["cpu"]) / (a1["n"] + a2["n"])
        b_cpu = b["cpu"] / args.images
        print(f"ratio (b)/(a) images/s: {b_rate / a_rate:.3f}  (target >= 0.95)")
        print(f"CPU seconds per image: (a) {a_cpu:.3f}, (b) {b_cpu:.3f} -> (a)/(b) {a_cpu / b_cpu:.3f} "
              "(the ratio on an otherwise idle machine, all cores busy)")  # fmt: skip
        print(f"peak RSS of sdprep tag: {b['rss']:.0f} MiB")
        del base

        for n in (40, 1):
            small = work / f"small{n}"
            small.mkdir()
            for p in jpegs[:n]:
                shutil.copy(p, small / p.name)
            wn = run_sdprep(["tag", str(small), "--model", str(model), "--batch-size", str(B)])["wall"]
            print(f"sdprep tag on {n} image(s), wall time including start-up and model load: {wn:.2f}s")
        from sdprep.taggers.tiny import build_tiny_wd14

        tiny = build_tiny_wd14(work / "tiny")
        wt = run_sdprep(["tag", str(work / "small1"), "--model", str(tiny), "--force"])["wall"]
        print(f"launch to first inference: {wt:.2f}s with a tiny model (start-up, decode, one ~5 ms inference) "
              f"+ {load_s:.2f}s to open this model's session = {wt + load_s:.2f}s")  # fmt: skip
        again = run_sdprep(["tag", str(work / "small40"), "--model", str(model)])
        print(f"sdprep tag on the 40 images again (nothing to do): {again['wall']:.2f}s")

        record = json.loads((data / f"{jpegs[0].name}.json").read_text())["sdprep"]["wd14"]
        print(f"tags stored per image (floor 0.05): {len(record['scores'])} (first image)")
        scored = work / "scored"
        make_scored_dataset(scored, args.rederive, str(model.absolute().as_posix()), record)
        cmd = ["tag", str(scored), "--model", str(model), "--general-threshold", "0.5"]
        r = run_sdprep(cmd)
        print(f"re-derive captions for {args.rederive} sidecars (threshold change, no model): {r['wall']:.1f}s "
              f"({1000 * r['wall'] / args.rederive:.2f} ms/image), peak RSS {r['rss']:.0f} MiB "
              f"-> {r['out'].strip().splitlines()[0]}")  # fmt: skip
        print(f"same again, nothing to do: {run_sdprep(cmd)['wall']:.1f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
