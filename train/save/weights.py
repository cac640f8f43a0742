"""Saving what training produces, so that a run can never end with a missing, empty or NaN file.

- Weights: written to a temporary file beside the target, reloaded and verified (expected keys,
  shapes, finite, non-empty, trained), and only then moved into place with `os.replace`. A failed
  check raises TrainingError and leaves the previous good file untouched.
- Training state (for `--resume`): a folder with the trainable tensors (safetensors), optimizer and
  scheduler state (torch.save, read back with `weights_only=True`), RNG states and a `state.json`
  written last; the folder is built under a temporary name and renamed, so a partial state is never
  picked up by `--resume latest`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sdprep.dataset import loads_json
from sdprep.errors import TrainingError
from sdprep.faults import pause_point
from sdprep.fileops import atomic_write_dir, give_new_file_mode, recover_dir
from sdprep.train.methods.base import Verification

if TYPE_CHECKING:
    import torch

    from sdprep.train.config.schema import TrainConfig
    from sdprep.train.methods.base import TrainMethod


class Resumable(Protocol):
    """What a training state saves and restores of a learning-rate scheduler (any torch
    LRScheduler, or a `lr_scheduler_type` class with the same two methods)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


STATE_FILE = "state.json"
STATE_SUFFIX = "-state"
STATE_FORMAT = 1
HASH_LIMIT = 1 << 30  # `sshs_*` hashes (kohya: LoRA files) only below 1 GB: LoRA, TI, not a fine-tune

SAVE_DTYPES = {None: "float32", "float": "float32", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def save_dtype(precision: str | None) -> torch.dtype:
    """torch dtype for kohya's `save_precision` (float / fp16 / bf16; None = float32)."""
    import torch

    key = precision.lower() if isinstance(precision, str) else precision
    if key not in SAVE_DTYPES:
        from sdprep.errors import unknown_choice

        raise unknown_choice("save_precision", str(precision), [k for k in SAVE_DTYPES if k])
    dtype: torch.dtype = getattr(torch, SAVE_DTYPES[key])
    return dtype


def clean_output_name(name: str | None) -> str:
    """kohya's `output_name`, without a trailing `.safetensors` some configs include; "last" if unset."""
    name = (name or "last").strip()
    for suffix in (".safetensors", ".ckpt", ".pt"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name or "last"


def weights_name(
    name: str, *, epoch: int | None = None, step: int | None = None, suffix: str = ".safetensors"
) -> str:
    """`<name>.safetensors`, `<name>-000003.safetensors` (epoch) or `<name>-step00000500.safetensors`."""
    if epoch is not None:
        return f"{name}-{epoch:06d}{suffix}"
    if step is not None:
        return f"{name}-step{step:08d}{suffix}"
    return f"{name}{suffix}"


def state_dir_name(name: str, *, epoch: int | None = None, step: int | None = None) -> str:
    return weights_name(name, epoch=epoch, step=step, suffix="") + STATE_SUFFIX


# -- weights -------------------------------------------------------------------------------


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def verify_file(path: Path, method: TrainMethod, trained: bool) -> Verification:
    """Reload a saved safetensors file from disk and check it with the method's rules."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    report = Verification(path)
    try:
        report.bytes = path.stat().st_size
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            handle.metadata()
    except Exception as exc:  # a truncated or corrupt file: safetensors raises its own types
        report.problems.append(f"cannot be read back ({exc})")
        return report
    report.tensors = len(tensors)
    if report.bytes == 0:
        report.problems.append("the file is empty")
    report.problems += method.verify_tensors(tensors, trained)
    return report


def save_weights(
    method: TrainMethod, path: Path, metadata: dict[str, str], dtype: torch.dtype, trained: bool
) -> Verification:
    """Write the method's output file atomically, verified BEFORE it replaces anything."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = method.export_tensors(dtype)
    if not tensors:
        raise TrainingError(f"nothing to save for {path.name}: the method produced no tensors")
    metadata = {k: str(v) for k, v in metadata.items()}
    if metadata and sum(t.numel() * t.element_size() for t in tensors.values()) < HASH_LIMIT:
        from sdprep.train.save.metadata import safetensors_hashes

        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = safetensors_hashes(tensors, metadata)
    tmp = _tmp_path(path)
    try:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
            give_new_file_mode(tmp)  # save_file makes 0600 files
        except OSError as exc:
            raise TrainingError(
                f"cannot write {path.name}: {exc}",
                "free disk space or fix permissions; earlier files are kept",
            ) from exc
        report = verify_file(tmp, method, trained)
        report.path = path
        if not report.ok:
            raise TrainingError(
                f"the saved file {path.name} failed its check: " + "; ".join(report.problems[:5]),
                "the previous saved file (if any) was kept; see the messages above for the cause",
            )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return report


# -- training state ------------------------------------------------------------------------

# Settings whose change between a run and its resume is harmless (not part of the config hash).
RESUME_NEUTRAL = {
    "max_train_steps",
    "max_train_epochs",
    "resume",
    "output_dir",
    "logging_dir",
    "log_prefix",
    "log_with",
    "sample_prompts",
    "sample_sampler",
    "sample_every_n_steps",
    "sample_every_n_epochs",
    "sample_at_first",
    "sample_dir",
    "save_every_n_epochs",
    "save_every_n_steps",
    "save_last_n_epochs",
    "save_last_n_steps",
    "save_last_n_epochs_state",
    "save_last_n_steps_state",
    "initial_step",
    "initial_epoch",
    "skip_until_initial_step",
    "save_state",
    "save_state_on_train_end",
    "max_data_loader_n_workers",
    "training_comment",
    "metadata_title",
    "metadata_author",
    "metadata_description",
    "metadata_license",
    "metadata_tags",
    "save_diffusers_copy",
    "no_metadata",
    "pretrained_model_name_or_path",
    "cache_dir",
}


def config_hash(cfg_dict: dict[str, Any]) -> str:
    """A hash of the settings that shape the training trajectory (for resume checks)."""
    relevant = {k: v for k, v in sorted(cfg_dict.items()) if k not in RESUME_NEUTRAL}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted((set(old) | set(new)) - RESUME_NEUTRAL)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


@dataclass
class TrainState:
    """Where a run is: `step` optimizer steps done, in `epoch` (0-based), `epoch_step` steps into it."""

    step: int
    epoch: int
    epoch_step: int
    method: str
    config: dict[str, Any]
    config_hash: str
    dataset_batches: int
    path: Path | None = None


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors/lists (loadable with weights_only=True)."""
    import numpy as np
    import torch

    legacy = np.random.get_state(legacy=True)
    assert isinstance(legacy, tuple)  # legacy=True: the ("MT19937", keys, pos, has_gauss, cached) form
    name, keys, pos, has_gauss, cached = legacy
    state = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(
    folder: Path,
    state: TrainState,
    method: TrainMethod,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Resumable,
    extra_rng: dict[str, Any] | None = None,
) -> Path:
    """Write everything needed to continue the run exactly: tensors, optimizer, scheduler, RNG, counters."""
    import torch
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in method.trainable_state().items()}
        save_file(tensors, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        pause_point("save")  # crash tests stop here: a state half written
        torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"global": rng_state(), **(extra_rng or {})}, tmp / "rng.pt")
        info = {
            "format": STATE_FORMAT,
            "step": state.step,
            "epoch": state.epoch,
            "epoch_step": state.epoch_step,
            "method": state.method,
            "config_hash": state.config_hash,
            "dataset_batches": state.dataset_batches,
            "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "config": state.config,
        }
        (tmp / STATE_FILE).write_text(json.dumps(info, indent=1, default=str))  # written last

    try:
        atomic_write_dir(folder, write)
    except OSError as exc:
        raise TrainingError(
            f"cannot write the training state {folder.name}: {exc}",
            "free disk space or fix permissions; earlier states are kept",
        ) from exc
    return folder


def read_state_info(folder: Path) -> TrainState:
    """Read a state folder's `state.json`; a folder without one is not a (complete) sdprep state."""
    info_path = folder / STATE_FILE
    if not info_path.is_file():
        hint = "pass a folder written by sdprep with save_state = true, or --resume latest"
        if (folder / "train_state.json").exists() or any(folder.glob("random_states_*.pkl")):
            hint = (
                "this is a kohya/accelerate state folder; sdprep does not unpickle those. Start from "
                "the weights instead: network_weights = <the LoRA file>"
            )
        raise TrainingError(f"{folder} is not a complete sdprep training state (no {STATE_FILE})", hint)
    try:
        info = loads_json(info_path.read_text())  # a JSON bomb is damage too (ValueError)
        return TrainState(
            step=int(info["step"]),
            epoch=int(info["epoch"]),
            epoch_step=int(info["epoch_step"]),
            method=str(info["method"]),
            config=dict(info.get("config", {})),
            config_hash=str(info.get("config_hash", "")),
            dataset_batches=int(info.get("dataset_batches", 0)),
            path=folder,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise TrainingError(f"{info_path} is damaged ({exc})", "resume from another state folder") from exc


def load_state(
    folder: Path, method: TrainMethod, optimizer: torch.optim.Optimizer, lr_scheduler: Resumable
) -> tuple[TrainState, dict[str, Any]]:
    """Restore tensors, optimizer and scheduler from a state folder; returns (state, rng states)."""
    from sdprep.train.save.state_files import load_tensors, load_torch

    state = read_state_info(folder)
    # each file read (and checked: complete, plain data, finite) on its own, so an error names it
    trainable = load_tensors(folder / "trainable.safetensors")
    optimizer_state = load_torch(folder / "optimizer.pt", finite=True)
    scheduler_state = load_torch(folder / "scheduler.pt")
    rng = load_torch(folder / "rng.pt")
    try:
        method.load_trainable_state(trainable)
        optimizer.load_state_dict(optimizer_state)
        lr_scheduler.load_state_dict(scheduler_state)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise TrainingError(
            f"cannot restore the training state in {folder}: {exc}",
            "resume with the same method and optimizer settings, or start again from the weights",
        ) from exc
    return state, rng


def find_states(output_dir: Path) -> list[TrainState]:
    """Complete state folders under `output_dir`, oldest step first."""
    found: list[TrainState] = []
    if not output_dir.is_dir():
        return found
    for old in output_dir.glob(f".*{STATE_SUFFIX}.old-*"):  # a save killed while swapping folders
        recover_dir(output_dir / old.name[1:].rsplit(".old-", 1)[0])
    for folder in output_dir.iterdir():
        if folder.is_dir() and folder.name.endswith(STATE_SUFFIX) and not folder.name.startswith("."):
            try:
                found.append(read_state_info(folder))
            except TrainingError:
                continue
    return sorted(found, key=lambda s: (s.step, s.path.stat().st_mtime if s.path else 0))


def stale_saves(
    cfg: TrainConfig, *, step: int | None, epoch: int | None, states: bool = False
) -> list[dict[str, int]]:
    """Periodic saves that kohya's save_last_n_epochs / save_last_n_steps say to remove now; with
    `states`, the training states that save_last_n_epochs_state / save_last_n_steps_state (each
    falling back to the weights' value, as kohya) say to remove."""
    keep_epochs = (cfg.save_last_n_epochs_state if states else None) or cfg.save_last_n_epochs
    keep_steps = (cfg.save_last_n_steps_state if states else None) or cfg.save_last_n_steps
    old: list[dict[str, int]] = []
    if epoch is not None and keep_epochs and cfg.save_every_n_epochs:
        gone = epoch - keep_epochs * cfg.save_every_n_epochs
        if gone > 0:
            old.append({"epoch": gone})
    if step is not None and keep_steps and cfg.save_every_n_steps:
        gone = step - keep_steps - 1
        gone -= gone % cfg.save_every_n_steps
        if gone > 0:
            old.append({"step": gone})
    return old


def remove_saves(
    output_dir: Path,
    name: str,
    suffix: str,
    which: list[dict[str, int]],
    parts: tuple[str, ...] = ("weights", "state"),
) -> None:
    """Delete the weights and / or state folders (`parts`) of the given periodic saves (missing ones
    are fine)."""
    for kw in which:
        if "weights" in parts:
            (output_dir / weights_name(name, suffix=suffix, **kw)).unlink(missing_ok=True)
        if "state" in parts:
            shutil.rmtree(output_dir / state_dir_name(name, **kw), ignore_errors=True)


def _state_owner(folder_name: str) -> str:
    """The output_name a state folder belongs to: `x-000003-state`, `x-step00000500-state`, `x-state` -> x."""
    import re

    stem = folder_name[: -len(STATE_SUFFIX)]
    return re.sub(r"-(\d{6}|step\d{8})$", "", stem)


def resolve_resume(resume: str | Path, output_dir: Path, name: str) -> Path:
    """`latest` -> the newest complete state for `name` in output_dir; a path must be a state folder."""
    if str(resume) == "latest":
        states = find_states(output_dir)
        mine = [s.path for s in states if s.path and _state_owner(s.path.name) == name]
        if not mine:
            others = sorted({_state_owner(s.path.name) for s in states if s.path})
            raise TrainingError(
                f"--resume latest: no saved training state for output_name {name!r} in {output_dir}",
                f"states found for: {', '.join(others)}; set output_name or pass --resume DIR"
                if others
                else "a run saves its state when save_state = true (every save, and at the end)",
            )
        return mine[-1]
    folder = Path(resume).expanduser()
    if not folder.is_dir():
        raise TrainingError(f"--resume {folder}: no such folder", "pass a *-state folder or `latest`")
    read_state_info(folder)
    return folder
