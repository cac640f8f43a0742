"""Everything a run needs that can be checked without the model, checked before the model loads.

A wrong `--resume` folder, a missing optimizer package or a missing prompt file used to show up
only after the model had loaded (20 s to minutes); `precheck` finds them in well under a second
(the dataset's folders and TOML are read, its images are not decoded).

    folder = precheck(cfg, method="lora", resume="latest", output_dir=out, name="last")
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sdprep.errors import ConfigError, TrainingError

if TYPE_CHECKING:
    from sdprep.train.config.schema import TrainConfig


def precheck(
    cfg: TrainConfig, *, method: str, resume: str | Path | None, output_dir: Path, name: str
) -> Path | None:
    """Raise the error the run would stop with later; returns the state folder to resume from."""
    folder = _resume_folder(resume, method, output_dir, name)
    check_optimizer(cfg.optimizer_type)
    check_scheduler(cfg)
    for key in ("network_weights", "weights"):
        value = getattr(cfg, key)
        if value and not Path(value).expanduser().is_file():
            raise ConfigError(f"{key} {value}: no such file", f"check the path, or remove {key}")
    if cfg.sample_prompts:
        from sdprep.train.sample.generate import read_prompts

        read_prompts(Path(cfg.sample_prompts), cfg.sample_sampler)
    if cfg.metadata_thumbnail:
        from sdprep.train.save.metadata import thumbnail_data_url

        thumbnail_data_url(cfg.metadata_thumbnail)
    from sdprep.train.config.datasets import Findings, load_sources

    load_sources(cfg, Findings())  # dataset TOML, folders, metadata JSON (images are read later)
    return folder


def check_optimizer(name: str | None) -> None:
    """The optimizer's package is installed (the one-line missing-extra error) and a module.Class
    path imports."""
    from sdprep.train.loop.optim import _torch_optimizer, require_optimizer

    require_optimizer(name)
    if "." in (name or ""):
        _torch_optimizer(str(name).strip())


def check_scheduler(cfg: TrainConfig, total_steps: int = 1000) -> None:
    """Build the lr schedule on a stand-in optimizer: a scheduler class that does not import or
    lr_scheduler_args it does not take (kohya's TypeError) fail now. Skipped where the optimizer
    sets its own schedule (Adafactor's relative step, schedule-free optimizers)."""
    import torch

    from sdprep.train.config.kohya import parse_kv_args
    from sdprep.train.loop.optim import build_scheduler, warmup_steps

    optimizer = (cfg.optimizer_type or "AdamW").strip().lower()
    relative = optimizer == "adafactor" and parse_kv_args(cfg.optimizer_args).get("relative_step", True)
    if cfg.lr_scheduler == "adafactor" or relative or "schedulefree" in optimizer:
        return
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.learning_rate)
    build_scheduler(
        cfg.lr_scheduler,
        stand_in,
        warmup_steps=warmup_steps(cfg.lr_warmup_steps, total_steps),
        total_steps=total_steps,
        num_cycles=cfg.lr_scheduler_num_cycles,
        power=cfg.lr_scheduler_power,
        args=parse_kv_args(cfg.lr_scheduler_args),
        min_lr_ratio=cfg.lr_scheduler_min_lr_ratio,
        timescale=cfg.lr_scheduler_timescale,
        decay_steps=cfg.lr_decay_steps,
        scheduler_type=cfg.lr_scheduler_type,
    )


def _resume_folder(resume: str | Path | None, method: str, output_dir: Path, name: str) -> Path | None:
    if not resume:
        return None
    from sdprep.train.save.weights import read_state_info, resolve_resume

    folder = resolve_resume(resume, output_dir, name)
    state = read_state_info(folder)
    if state.method != method:
        raise TrainingError(
            f"{folder} holds a {state.method} run, but this run trains {method}",
            "resume with the same method, or start a new run",
        )
    return folder
