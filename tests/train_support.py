"""Helpers shared by the trainer tests: small datasets made from sample_data, configs on the tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_data" / "images"
IMAGES = ["a_landscape.jpg", "b_portrait.png", "c_square.webp", "e_sepia.jpg"]
PAIR = ["c_square.webp", "e_sepia.jpg"]  # the two images of the short module-wide runs


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
    from sdprep.train.config.schema import load_train_config

    cfg, _ = load_train_config(None, overrides=lora_settings(model, data, out, **over))
    return cfg


def run_trainer(cfg, resume: Path | None = None):
    """Set up and run a Trainer on `cfg` (callbacks recorded, optionally resumed); returns it."""
    from sdprep.train.loop.trainer import RecordingCallbacks, Trainer

    trainer = Trainer(cfg, callbacks=RecordingCallbacks(), resume=resume)
    trainer.setup()
    trainer.run()
    return trainer


def set_up_method(method_cls, cfg, model: Path):
    """A training method (`method_cls(cfg)`) set up in float32 on the model at `model`, untrained."""
    import torch

    from sdprep.train.models.load import load_sdxl

    method = method_cls(cfg)
    method.setup(load_sdxl(model), torch.float32)
    return method


def assert_untrained_save_refused(method, path: Path, match: str) -> None:
    """Saving `method` as trained while its weights are still their starting values raises a
    TrainingError matching `match`, and no file is written."""
    import pytest
    import torch

    from sdprep.errors import TrainingError
    from sdprep.train.save.weights import save_weights

    with pytest.raises(TrainingError, match=match):
        save_weights(method, path, {}, torch.float32, trained=True)
    assert not path.exists()


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


def merge_kohya_file(unet, tensors: dict) -> None:
    """Add each module's delta up @ down * alpha / rank from a kohya LoRA file into `unet` (the merge
    A1111 / ComfyUI do, with each module's own alpha)."""
    import torch

    from sdprep.train.save.sgm import UnetLayout, kohya_lora_names

    layers = {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    names = kohya_lora_names(layers, "lora_unet", UnetLayout.from_config(unet.config))
    with torch.no_grad():
        for key, down in tensors.items():
            if not (key.startswith("lora_unet_") and key.endswith(".lora_down.weight")):
                continue
            module = key[: -len(".lora_down.weight")]
            up, alpha = tensors[f"{module}.lora_up.weight"], float(tensors[f"{module}.alpha"])
            weight = layers[names[module]].weight
            scale = alpha / down.shape[0]
            if down.dim() == 4 and down.shape[2:] != (1, 1):  # 3x3 conv: up (1x1) after down
                delta = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
            else:
                delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
            weight += delta * scale


def errors_without(cli_runner, tmp_path: Path, monkeypatch, module: str | None, settings: str) -> list[str]:
    """`sdprep train` on a config (`settings` TOML lines) whose model does not exist, with `module`
    (if any) made unimportable: the run's `Error:` lines (a missing package or an impossible setting
    must be reported before the model would fail to load)."""
    import sys

    from sdprep.cli import cli

    if module is not None:
        monkeypatch.setitem(sys.modules, module, None)
    config = tmp_path / "c.toml"
    config.write_text(
        settings + f'pretrained_model_name_or_path = "{tmp_path / "no-such-model"}"\n'
        f'train_data_dir = "{tmp_path}"\noutput_dir = "{tmp_path / "out"}"\n'
    )
    result = cli_runner.invoke(cli, ["train", "--config", str(config)])
    assert result.exit_code == 1 and "no-such-model" not in result.output
    return [line for line in result.output.splitlines() if line.startswith("Error:")]
