"""Benchmark: LoRA training steps on the REAL full-size SDXL architecture, on the CPU.

The full-size SDXL 1.0 (U-Net 2.57 B parameters, CLIP-L, OpenCLIP bigG, VAE; configs in
sdprep.train.models.fullsize.FULL) is built with random weights directly in bf16 (about 7 GB: the fp32
model would need 14 GB), with CLIP's real tokenizer, and trained by sdprep's own Trainer for a
few steps: LoRA rank 8 on kohya's 722 U-Net modules, bf16 mixed precision, gradient
checkpointing, cached latents and text-encoder outputs, batch 1, 128x128 px, AdamW.

It records the median time per step (one torch thread), the peak of live tensor bytes while
stepping (sdprep.train.memory.memtrack) and the process's peak RSS, and prints two ratios against
baselines measured or computed in the same run:
- memory: the measured peak over the memory planner's prediction for the same config
  (`sdprep train --plan`'s maths for a CPU run, where nothing moves off the device);
- time: a full-size step over a step of the tiny SDXL-shaped test model with the same config.

Needs about 8 GB of free RAM; run it alone (`flock` on shared machines).
Usage: python benchmarks/bench_fullsize.py [--steps 4] [--side 128]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchutil import peak_rss_mb

REPO = Path(__file__).resolve().parent.parent


def make_data(root: Path, side: int) -> Path:
    from PIL import Image

    folder = root / "2_mytoken"
    folder.mkdir(parents=True)
    for name in ("c_square.webp", "e_sepia.jpg"):
        im = Image.open(REPO / "sample_data" / "images" / name).convert("RGB").resize((side, side))
        im.save(folder / f"{Path(name).stem}.png")
        (folder / f"{Path(name).stem}.txt").write_text("mytoken, 1girl, solo, looking at viewer")
    return root


def random_bf16(module, seed: int):
    """Give a meta-built module real bf16 storage with PyTorch-default-like random values."""
    import torch

    module.to(dtype=torch.bfloat16)
    module.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                bound = p[0].numel() ** -0.5  # 1 / sqrt(fan_in)
                p.uniform_(-bound, bound, generator=g)
            elif name.endswith("weight"):
                p.fill_(1.0)  # norms
            else:
                p.zero_()
        for name, b in module.named_buffers():
            if not name.endswith("position_ids"):
                raise ValueError(f"no initial value for buffer {name}")
            b.copy_(torch.arange(b.shape[-1]).expand_as(b))
    return module


def full_size_model(work: Path):
    import torch
    from transformers import CLIPTokenizer

    from sdprep.train.models.clip_vocab import write_real_clip_tokenizer
    from sdprep.train.models.fullsize import FULL, SCHEDULER, build_components
    from sdprep.train.models.load import SDXLModel, quiet_libraries

    quiet_libraries()
    write_real_clip_tokenizer(work / "tok1")
    write_real_clip_tokenizer(work / "tok2", pad_token="!")
    with torch.device("meta"):
        unet, vae, te1, te2 = build_components(FULL)
    for i, m in enumerate((unet, vae, te1, te2)):
        random_bf16(m, i)
    return SDXLModel(
        unet=unet,
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=CLIPTokenizer.from_pretrained(work / "tok1"),
        tokenizer_2=CLIPTokenizer.from_pretrained(work / "tok2"),
        scheduler_config=dict(SCHEDULER),
        source="SDXL 1.0 architecture, random bf16 weights",
    )


def run(model, data: Path, out: Path, side: int, steps: int, measure: bool) -> dict:
    """Train `steps` LoRA steps; returns step times, the measured peak of live tensors and the config."""
    from sdprep.train.config.schema import load_train_config
    from sdprep.train.loop.trainer import RecordingCallbacks, Trainer
    from sdprep.train.memory.memtrack import peak_during_steps

    cfg, _ = load_train_config(
        None,
        overrides={
            "pretrained_model_name_or_path": "unused",
            "train_data_dir": str(data),
            "output_dir": str(out),
            "output_name": "bench",
            "network_module": "networks.lora",
            "network_dim": 8,
            "network_train_unet_only": True,
            "network_alpha": 8,
            "resolution": f"{side},{side}",
            "enable_bucket": False,
            "mixed_precision": "bf16",
            "gradient_checkpointing": True,
            "cache_latents": True,
            "cache_text_encoder_outputs": True,
            "train_batch_size": 1,
            "max_train_steps": steps,
            "learning_rate": 1e-4,
            "seed": 1,
            "max_data_loader_n_workers": 0,
            "save_precision": "bf16",
        },
    )
    times: list[float] = []

    class Timed(RecordingCallbacks):
        last = time.perf_counter()

        def step(self, step: int, epoch: int, loss: float, lr: float) -> None:
            now = time.perf_counter()
            times.append(now - Timed.last)
            Timed.last = now
            super().step(step, epoch, loss, lr)

    trainer = Trainer(cfg, callbacks=Timed(), model=model)
    trainer.setup()
    Timed.last = time.perf_counter()
    peak = peak_during_steps(trainer) if measure else None
    if not measure:
        trainer.run()
    return {"times": times[1:] or times, "peak": peak, "cfg": cfg}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--side", type=int, default=128)
    args = parser.parse_args()

    import torch

    from sdprep.train.memory.planner import predict, settings_from_config
    from sdprep.train.memory.profile import full_size_profile
    from sdprep.train.models.load import load_sdxl
    from sdprep.train.models.tiny import build_tiny_sdxl

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="sdprep-bench-full-") as tmp:
        work = Path(tmp)
        data = make_data(work / "data", args.side)
        tiny = run(
            load_sdxl(build_tiny_sdxl(work / "tiny")), data, work / "out-tiny", args.side, args.steps, False
        )
        started = time.perf_counter()
        model = full_size_model(work)
        built = time.perf_counter() - started
        full = run(model, data, work / "out-full", args.side, args.steps, True)
    plan = predict(settings_from_config(full["cfg"], "lora", device="cpu"), full_size_profile())
    step, tiny_step = statistics.median(full["times"]), statistics.median(tiny["times"])
    print(
        f"full-size SDXL LoRA on the CPU, {args.side}x{args.side} px, batch 1, bf16, checkpointing, 1 thread"
    )
    print(f"  model built with random weights in {built:.0f} s")
    print(
        f"  time per step: median {step:.1f} s over {len(full['times'])} steps (tiny model: {tiny_step:.2f} s)"
    )
    print(
        f"  peak of live tensors while stepping: {full['peak'] / 2**30:.2f} GiB; peak RSS {peak_rss_mb() / 1024:.2f} GiB"
    )
    print(f"  planner's prediction for this config on a CPU: {plan.tensors / 2**30:.2f} GiB")
    print(f"ratio measured / planned peak: {full['peak'] / plan.tensors:.3f}")
    print(f"ratio full-size / tiny step time: {step / tiny_step:.0f}x")


if __name__ == "__main__":
    main()
