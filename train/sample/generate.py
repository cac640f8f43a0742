"""Sample images during training from a kohya prompt file, with the modules being trained.

A StableDiffusionXLPipeline is assembled around the live modules (no copies), so the samples show
exactly what the current weights do. Images go to `sample_dir` (default `<output_dir>/sample/`)
with kohya's names: `<output_name>_<step:06d>_<i:02d>_<timestamp>_<seed>.png` (epochs:
`e<epoch:06d>`). Sampling runs under a forked RNG, so it never changes the training trajectory.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sdprep.train.sample.prompts import SamplePrompt, load_prompts, make_scheduler

if TYPE_CHECKING:
    import torch

    from sdprep.train.loop.logs import NullLog
    from sdprep.train.models.load import SDXLModel


def sample_name(name: str | None, i: int, seed: int, *, step: int, epoch: int | None) -> str:
    """kohya's sample file name (epoch-based when sampling at the end of an epoch)."""
    num = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    stamp = time.strftime("%Y%m%d%H%M%S")
    return f"{name + '_' if name else ''}{num}_{i:02d}_{stamp}_{seed}.png"


def fit_size(width: int, height: int, max_area: int | None, multiple: int = 32) -> tuple[int, int]:
    """Shrink (width, height) to at most `max_area` pixels keeping the aspect, in `multiple` steps."""
    if not max_area or width * height <= max_area:
        return width - width % 8, height - height % 8
    scale = math.sqrt(max_area / (width * height))
    w = max(multiple, int(width * scale) // multiple * multiple)
    h = max(multiple, int(height * scale) // multiple * multiple)
    return w, h


def read_prompts(path: Path, default_sampler: str) -> list[SamplePrompt]:
    return load_prompts(path, defaults=SamplePrompt(prompt="", sampler=default_sampler))


def generate_samples(
    model: SDXLModel,
    unet: torch.nn.Module,
    prompts: list[SamplePrompt],
    out_dir: Path,
    *,
    name: str | None,
    step: int,
    epoch: int | None,
    base_seed: int,
    autocast: contextlib.AbstractContextManager[object] | None = None,
    log: NullLog | None = None,
    max_area: int | None = None,
) -> list[Path]:
    """Generate one image per prompt with the current weights; returns the written paths."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = model.pipeline(unet=unet)
    pipe.set_progress_bar_config(disable=True)
    modules: list[torch.nn.Module] = [unet, model.text_encoder, model.text_encoder_2, model.vae]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    written: list[Path] = []
    device = next(unet.parameters()).device
    try:
        with (
            on_device([model.text_encoder, model.text_encoder_2, model.vae], device),
            torch.random.fork_rng(devices=[]),
            torch.no_grad(),
            autocast or contextlib.nullcontext(),
        ):
            for i, prompt in enumerate(prompts):
                seed = prompt.seed if prompt.seed is not None else base_seed + i
                pipe.scheduler = make_scheduler(prompt.sampler or "ddim", model.scheduler_config)
                width, height = fit_size(prompt.width, prompt.height, max_area)
                image = pipe(
                    prompt=prompt.prompt,
                    negative_prompt=prompt.negative_prompt or None,
                    width=width,
                    height=height,
                    num_inference_steps=prompt.steps,
                    guidance_scale=prompt.scale,
                    generator=torch.Generator(device=device).manual_seed(seed),
                ).images[0]
                path = out_dir / sample_name(name, i, seed, step=step, epoch=epoch)
                image.save(path)
                written.append(path)
                if log is not None:
                    log.image(f"sample/{i:02d}", image, step)
                    log.text(f"sample_prompt/{i:02d}", prompt.prompt, step)
    finally:
        for m, was in zip(modules, was_training):
            m.train(was)
    return written


@contextlib.contextmanager
def on_device(modules: list[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """Move modules to `device` for the block and back where they were (the trainer keeps cached
    text encoders and the VAE on the CPU; samples need them on the accelerator)."""
    places = [(m, next(m.parameters()).device) for m in modules]
    for m, _ in places:
        m.to(device)
    try:
        yield
    finally:
        for m, where in places:
            m.to(where)
