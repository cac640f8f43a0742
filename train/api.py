"""Training as a step of a project (`sdprep run`): the `[train]` table, defaults from the bucket stage,
and a skip when the same config already trained on the same data.

    [train]
    config = "train.toml"        # optional: a kohya/sdprep training TOML; keys below override it
    pretrained_model_name_or_path = "models/sdxl"
    network_module = "networks.lora"
    max_train_steps = 1500
    output_dir = "output"        # paths are relative to the project file

Without `train_data_dir` / `dataset_config`, the dataset TOML written by the project's bucket stage
is used. A finished run records a fingerprint of its config and of the dataset files in
`output_dir/.sdprep-train.json`; re-running the project with nothing changed does not train again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdprep.config import to_dict
from sdprep.errors import ConfigError
from sdprep.fileops import atomic_write_text
from sdprep.progress import NullReporter, Reporter
from sdprep.stage import StageResult
from sdprep.train.loop.callbacks import TrainCallbacks

if TYPE_CHECKING:
    from sdprep.project import Project
    from sdprep.train.config.schema import TrainConfig
    from sdprep.train.methods.base import Verification

PATH_KEYS = (
    "train_data_dir",
    "reg_data_dir",
    "dataset_config",
    "in_json",
    "output_dir",
    "logging_dir",
    "sample_prompts",
    "sample_dir",
    "vae",
    "network_weights",
    "weights",
    "resume",
    "cache_dir",
)
MAYBE_PATH_KEYS = ("pretrained_model_name_or_path",)  # a hub id, or a local path relative to the project
FINGERPRINT = ".sdprep-train.json"


class EchoCallbacks(TrainCallbacks):
    """Reports the loop's notes and saves through `echo` (the project runner's printer), the data
    scan's and the caches' progress through the runner's reporters."""

    def __init__(self, echo: Callable[[str], None], reporter: Callable[[], Reporter] = NullReporter) -> None:
        self.echo = echo
        self.make_reporter = reporter
        self.last: tuple[int, float] | None = None

    def reporter(self) -> Reporter:
        return self.make_reporter()

    def note(self, message: str) -> None:
        self.echo(message)

    def step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        self.last = (step, loss)

    def saved(self, verification: Verification) -> None:
        self.echo(f"saved {verification.path} ({verification.summary().split(': ', 1)[1]})")


def project_train_table(project: Project) -> tuple[Path | None, dict[str, Any]]:
    """The `[train]` table with paths resolved against the project file and bucket defaults filled in."""
    table = dict(project.train or {})
    base: Path = project.base
    config = table.pop("config", None)
    config_path = (base / config).resolve() if config else None
    for key in PATH_KEYS:
        if isinstance(table.get(key), str) and table[key]:
            table[key] = str((base / table[key]).resolve())
    for key in MAYBE_PATH_KEYS:
        value = table.get(key)
        if isinstance(value, str) and (base / value).exists():
            table[key] = str((base / value).resolve())
    if not any(k in table for k in ("train_data_dir", "dataset_config")):
        bucket = dict(project.stages).get("bucket")
        if bucket is None or "out" not in bucket:
            raise ConfigError(
                f"{project.path}: [train] has no train_data_dir or dataset_config and no bucket stage to take it from",
                'add train_data_dir = "FOLDER" to [train], or a [stages.bucket] with out = "FOLDER"',
            )
        table["dataset_config"] = str((base / bucket["out"] / "dataset.toml").resolve())
    return config_path, table


def check_train(project: Project) -> None:
    """Read and validate the project's training settings without loading a model (ConfigError)."""
    from sdprep.train.config.schema import detect_method, load_train_config

    config_path, table = project_train_table(project)
    cfg, _ = load_train_config(config_path, overrides=table, overrides_source=train_table_source(project))
    detect_method(cfg)


def train_table_source(project: Project) -> str:
    """How notes and errors name the project's [train] table."""
    return f"{project.path} [train]"


def dataset_fingerprint(paths: list[Path]) -> str:
    """A hash of the names, sizes and modification times of every file under the given folders."""
    h = hashlib.sha256()
    for root in paths:
        if root.is_file():
            st = root.stat()
            h.update(f"{root}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                p = Path(dirpath) / name
                try:
                    st = p.stat()
                except OSError:
                    continue
                h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _data_roots(cfg: TrainConfig) -> list[Path]:
    roots = []
    for key in ("train_data_dir", "reg_data_dir", "dataset_config", "in_json"):
        value = getattr(cfg, key)
        if value:
            roots.append(Path(value))
    if cfg.dataset_config:
        roots.append(Path(cfg.dataset_config).parent)
    return roots


def train_from_project(
    project: Project, *, echo: Callable[[str], None] = print, reporter: Callable[[], Reporter] = NullReporter
) -> StageResult:
    """Train with the project's `[train]` settings unless this exact config already trained on this data."""
    from sdprep.train.config.schema import detect_method, load_train_config
    from sdprep.train.loop.trainer import train

    config_path, table = project_train_table(project)
    cfg, notes = load_train_config(config_path, overrides=table, overrides_source=train_table_source(project))
    method = detect_method(cfg)
    for note in notes:
        echo(f"note: {note}")
    out_dir = Path(cfg.output_dir) if cfg.output_dir else project.base / "output"
    stamp = {
        "config": json.loads(json.dumps(to_dict(cfg), default=str)),
        "method": method,
        "data": dataset_fingerprint(_data_roots(cfg)),
    }
    digest = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()
    record = out_dir / FINGERPRINT
    result = StageResult("train")
    if record.exists():
        try:
            previous = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            previous = {}
        output = Path(previous.get("output", ""))
        if previous.get("digest") == digest and output.is_file():
            result.skipped = 1
            result.notes.append(f"  up to date: {output} (same config, same data)")
            return result
    callbacks = EchoCallbacks(echo, reporter)
    trained = train(cfg, method=method, callbacks=callbacks)
    result.changed = 1
    result.notes.append("  " + trained.summary().replace("\n", "\n  "))
    if trained.output is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            record, json.dumps({"digest": digest, "output": str(trained.output)}, indent=1) + "\n"
        )
    return result
