"""Helpers shared by the trainer tests: small datasets made from sample_data, configs on the tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_data" / "images"
IMAGES = ["a_landscape.jpg", "b_portrait.png", "c_square.webp", "e_sepia.jpg"]


def make_dataset(
    root: Path,
    *,
    images: list[str] = IMAGES,
    repeats: int = 2,
    token: str = "mytoken",
    side: int = 128,
    masks: dict[str, str] | None = None,
) -> Path:
    """A kohya DreamBooth folder `root/<repeats>_<token>/` of sample images shrunk to about `side` px.

    `masks` maps an image name to "black", "white", "left" (left half white) or "grey"; masks are
    written to `masks/<stem>.png` with the image's size. Returns `root` (the train_data_dir).
    """
    folder = root / f"{repeats}_{token}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in images:
        im = Image.open(SAMPLES / name).convert("RGB")
        scale = side / max(im.size)
        im = im.resize((max(32, round(im.width * scale)), max(32, round(im.height * scale))), Image.LANCZOS)
        stem = Path(name).stem
        im.save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(f"{token}, 1girl, solo, {stem.split('_')[1]}\n")
        kind = (masks or {}).get(name)
        if kind:
            (folder / "masks").mkdir(exist_ok=True)
            make_mask(im.size, kind).save(folder / "masks" / f"{stem}.png")
    return root


def make_mask(size: tuple[int, int], kind: str) -> Image.Image:
    w, h = size
    if kind == "left":
        mask = Image.new("L", size, 0)
        mask.paste(255, (0, 0, w // 2, h))
        return mask
    return Image.new("L", size, {"black": 0, "white": 255, "grey": 128}[kind])


def lora_settings(model: Path, data: Path, out: Path, **over: Any) -> dict[str, Any]:
    """A short, fast LoRA run on the tiny model (128 px buckets, cached latents, 4 steps)."""
    settings: dict[str, Any] = {
        "pretrained_model_name_or_path": str(model),
        "train_data_dir": str(data),
        "output_dir": str(out),
        "output_name": "tiny",
        "network_module": "networks.lora",
        "network_dim": 4,
        "network_alpha": 2,
        "network_train_unet_only": True,  # fast; kohya's default (false) also trains text-encoder LoRA
        "resolution": "128",
        "min_bucket_reso": 64,
        "max_bucket_reso": 256,
        "bucket_reso_steps": 32,
        "learning_rate": 1e-3,
        "max_train_steps": 4,
        "train_batch_size": 1,
        "seed": 7,
        "cache_latents": True,
        "max_data_loader_n_workers": 0,
    }
    settings.update(over)
    return settings


def lora_cfg(model: Path, data: Path, out: Path, **over: Any):
    from sdprep.train.config import load_train_config

    cfg, _ = load_train_config(None, overrides=lora_settings(model, data, out, **over))
    return cfg


def unet_inputs(seed: int = 0, batch: int = 1, size: int = 16):
    """Fixed inputs for the tiny U-Net: (sample, timestep, encoder states, added conditioning)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, size, size, generator=g),
        torch.tensor([500] * batch),
        torch.randn(batch, 77, 96, generator=g),
        {
            "text_embeds": torch.randn(batch, 64, generator=g),
            "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * batch),
        },
    )
