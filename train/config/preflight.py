"""`sdprep train --preflight`: the user's config, for a few steps, on a tiny SDXL-shaped model.

Everything except the model is the user's: data sources, captions, buckets, masks, caching,
optimizer, loss, samples, saving, reloading and resuming. Config and data mistakes show up in
about a minute on a CPU instead of after hours on a GPU. The model is a tiny random model with
SDXL's layout (cached under ~/.cache/sdprep), so nothing it writes is a usable result: outputs go
to a temporary folder, and images are scaled down so the run stays short.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from sdprep.errors import SdprepError
from sdprep.train.loop.callbacks import TrainResult
from sdprep.train.loop.trainer import TrainCallbacks, Trainer

if TYPE_CHECKING:
    from sdprep.progress import Reporter
    from sdprep.train.config.datasets import DatasetSpec
    from sdprep.train.config.schema import TrainConfig
    from sdprep.train.data.pipeline import TrainDataset
    from sdprep.train.data.scan import ImageRecord
    from sdprep.train.methods.base import Verification

T = TypeVar("T")

PREFLIGHT_AREA = 128 * 128  # max training area on the tiny model
SAMPLE_AREA = 64 * 64
MAX_IMAGES = 12  # images trained on (spread over the buckets); all are checked


@dataclass
class PreflightReport:
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append((name, ok, detail))

    def summary(self) -> str:
        lines = [f"{'ok  ' if ok else 'FAIL'} {name}: {detail}" for name, ok, detail in self.checks]
        verdict = "preflight passed" if self.ok else "preflight FAILED"
        lines.append(f"{verdict} in {self.seconds:.0f} s (tiny model; the real run uses your model)")
        return "\n".join(lines)


def tiny_model_dir() -> Path:
    """Where the tiny model is kept: $SDPREP_CACHE or ~/.cache/sdprep, else a temporary folder."""
    from sdprep.train.models.tiny import build_tiny_sdxl

    base = Path(os.environ.get("SDPREP_CACHE") or Path.home() / ".cache" / "sdprep")
    try:
        return build_tiny_sdxl(base / "tiny-sdxl")
    except OSError:
        return build_tiny_sdxl(Path(tempfile.mkdtemp(prefix="sdprep-tiny-")) / "tiny-sdxl")


SCALE_STEP = 32  # bucket step of the scaled-down datasets (SDXL's smallest)


def scale_dataset(spec: DatasetSpec, area: int = PREFLIGHT_AREA) -> DatasetSpec:
    """One resolved dataset (dataset TOML or folders) scaled down to `area`: its resolution and
    bucket limits by one factor, so every relation the real run checks (min <= resolution <= max)
    still holds, with the aspect and the bucket structure kept."""
    w, h = spec.resolution
    factor = min(1.0, math.sqrt(area / (w * h)))

    def scale(x: int) -> int:
        return max(SCALE_STEP, int(x * factor) // SCALE_STEP * SCALE_STEP)

    res = (scale(w), scale(h))
    return dataclasses.replace(
        spec,
        resolution=res,
        min_bucket_reso=min(scale(spec.min_bucket_reso), *res),
        max_bucket_reso=max(scale(spec.max_bucket_reso), *res),
        bucket_reso_steps=SCALE_STEP,
    )


def scale_datasets(specs: list[DatasetSpec]) -> list[DatasetSpec]:
    return [scale_dataset(spec) for spec in specs]


def _model_check(cfg: TrainConfig) -> tuple[bool, str]:
    """Check the real model without loading it: the path, SDXL-ness and tokenizer files."""
    source = cfg.pretrained_model_name_or_path
    if not source:
        return False, "pretrained_model_name_or_path is not set"
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        return _folder_check(path)
    if path.is_file():
        return _single_file_check(path, cfg.model_config)
    from sdprep.train.models.load import SINGLE_FILE_SUFFIXES

    if str(source).startswith((".", "/", "~")) or path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return False, f"{path}: no such file or folder"
    if str(source).count("/") != 1:
        return False, f"{source}: no such file or folder, and not a hub id (owner/name)"
    return True, f"hub id {source} (not downloaded: preflight trains the tiny model)"


def _folder_check(path: Path) -> tuple[bool, str]:
    import json

    index = path / "model_index.json"
    if not index.exists():
        return False, f"{path} has no model_index.json (not a diffusers folder)"
    try:
        kind = json.loads(index.read_text()).get("_class_name", "")
    except ValueError:
        return False, f"{index} is not valid JSON"
    if "XL" not in kind:
        return False, f"{path} is a {kind or 'non-SDXL'} model, not SDXL"
    for sub in ("tokenizer", "tokenizer_2"):
        folder = path / sub
        if not ((folder / "vocab.json").exists() or (folder / "tokenizer.json").exists()):
            return False, f"{folder} has no vocab.json / tokenizer.json: the tokenizer would be empty"
    return True, f"diffusers SDXL folder {path} (not loaded: preflight trains the tiny model)"


def _single_file_check(path: Path, model_config: Path | None) -> tuple[bool, str]:
    if path.suffix.lower() not in (".safetensors", ".sft"):
        return True, f"checkpoint {path} exists (not a .safetensors file: contents not checked)"
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        return False, f"{path} cannot be read as safetensors ({exc})"
    if any(k.startswith("cond_stage_model.") for k in keys):
        return False, f"{path} is an SD 1.x/2.x checkpoint, not SDXL"
    if not any(k.startswith("conditioner.embedders.1.") for k in keys):
        return False, f"{path} is not an SDXL checkpoint (no second text encoder)"
    detail = f"SDXL single file {path} ({len(keys)} tensors; not loaded: preflight trains the tiny model)"
    if model_config is None:
        from sdprep.train.models.sdxl_config import nonstandard_reason

        reason = nonstandard_reason(shapes)
        if reason:
            return False, (
                f"{path} is not SDXL 1.0's standard architecture ({reason}): it needs model_config = a "
                "local diffusers folder whose configs match it"
            )
        detail += "; standard SDXL architecture: sdprep's own SDXL config loads it offline"
    return True, detail


def _memory_check(cfg: TrainConfig, method: str | None) -> str:
    from sdprep.train.config.schema import detect_method
    from sdprep.train.memory.planner import plan_summary

    return plan_summary(cfg, method or detect_method(cfg))


def _preflight_cfg(cfg: TrainConfig, work: Path, steps: int) -> TrainConfig:
    return dataclasses.replace(
        cfg,
        pretrained_model_name_or_path=None,
        vae=None,
        model_config=None,
        output_dir=work / "out",
        logging_dir=work / "logs" if cfg.logging_dir else None,
        sample_dir=work / "sample",
        cache_dir=work / "cache",
        max_train_steps=steps,
        max_train_epochs=None,
        lr_warmup_steps=0,  # a warmup keeps the lr near 0 for these few steps: the trained-check would fail
        save_every_n_steps=1,
        save_every_n_epochs=None,
        save_last_n_steps=None,
        save_last_n_epochs=None,
        save_state=True,
        sample_every_n_steps=steps if cfg.sample_prompts else None,
        sample_every_n_epochs=None,
        sample_at_first=False,
        resume=None,
        network_weights=None,  # weights for the real model do not fit the tiny one
        weights=None,
    )


class _Quiet(TrainCallbacks):
    """Forwards notes to the user's callbacks only when verbose; counts what happened."""

    def __init__(self, outer: TrainCallbacks, verbose: bool) -> None:
        self.outer, self.verbose = outer, verbose
        self.losses: list[float] = []
        self.saves: list[Verification] = []
        self.samples: list[Path] = []

    def reporter(self) -> Reporter:
        return self.outer.reporter()

    def note(self, message: str) -> None:
        if self.verbose or message.startswith("warning"):
            self.outer.note(message)

    def step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        self.losses.append(loss)

    def saved(self, verification: Verification) -> None:
        self.saves.append(verification)

    def sampled(self, paths: list[Path]) -> None:
        self.samples += paths


def run_preflight(
    cfg: TrainConfig,
    *,
    method: str | None = None,
    callbacks: TrainCallbacks | None = None,
    verbose: bool = False,
    steps: int = 2,
    work_dir: Path | None = None,
) -> PreflightReport:
    """Check `cfg` end to end on the tiny model; returns what passed and what failed."""
    started = time.perf_counter()
    report = PreflightReport()
    outer = callbacks or TrainCallbacks()
    ok, detail = _model_check(cfg)
    report.add("model", ok, detail)
    report.add("memory", True, _memory_check(cfg, method))
    own_dir = work_dir is None
    work = Path(work_dir or tempfile.mkdtemp(prefix="sdprep-preflight-"))
    try:
        _run(cfg, method, outer, verbose, steps, work, report)
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)
    report.seconds = time.perf_counter() - started
    return report


def _run(
    cfg: TrainConfig,
    method: str | None,
    outer: TrainCallbacks,
    verbose: bool,
    steps: int,
    work: Path,
    report: PreflightReport,
) -> None:
    from sdprep.train.data.pipeline import build_dataset
    from sdprep.train.models.load import load_sdxl

    built: dict[str, TrainDataset] = {}

    def read_data() -> TrainDataset:
        dataset = build_dataset(cfg, report=outer.reporter())
        for line in str(dataset.summary()).splitlines():
            outer.note(line)
        built["dataset"] = dataset
        return dataset

    if not _stage(
        report, "data", read_data, lambda d: f"{len(d)} images usable at your settings (see above)"
    ):
        return
    if not _stage(report, "images", lambda: decode_check(built["dataset"]), lambda n: n):
        return
    outer.note("preflight: training a tiny SDXL-shaped model on a sample of your images...")
    model_dir = tiny_model_dir()
    small = _preflight_cfg(cfg, work, steps)
    quiet = _Quiet(outer, verbose)
    trainer = Trainer(
        small, method=method, callbacks=quiet, model=load_sdxl(model_dir), sample_max_area=SAMPLE_AREA
    )
    trainer.record_filter = lambda records: spread(records, MAX_IMAGES)
    trainer.datasets_transform = scale_datasets
    if not _stage(report, "setup", lambda: trainer.setup(), lambda _: _setup_detail(trainer, small)):
        return
    if verbose:
        for line in trainer.banner():
            outer.note(line)
    if cfg.network_weights or cfg.weights:
        report.add("weights", True, "network_weights / weights not loaded (they belong to your model)")
    trainer.prompts = trainer.prompts[:1]
    if not _stage(report, "training", trainer.run, lambda r: f"{r.steps} steps, last loss {r.last_loss:.4f}"):
        return
    report.add("saving", True, "; ".join(v.summary() for v in quiet.saves))
    if cfg.sample_prompts:
        if trainer.prompts:
            report.add(
                "samples", bool(quiet.samples), f"{len(quiet.samples)} image(s) from {cfg.sample_prompts}"
            )
        else:  # kohya trains without samples too (the GUI writes its empty prompt box to this file)
            report.add("samples", True, f"{cfg.sample_prompts} has no prompts: no samples (as kohya)")
    out = trainer.result.output
    _stage(report, "reload", lambda: reload_check(trainer, out), lambda d: d)
    resumed = Trainer(
        dataclasses.replace(small, max_train_steps=steps + 1, sample_every_n_steps=None),
        method=method,
        callbacks=_Quiet(outer, verbose),
        model=load_sdxl(model_dir),
        resume="latest",
    )
    resumed.record_filter = lambda records: spread(records, MAX_IMAGES)
    resumed.datasets_transform = scale_datasets

    def resume_run() -> TrainResult:
        resumed.setup()
        return resumed.run()

    _stage(
        report,
        "resume",
        resume_run,
        lambda r: f"continued from step {r.first_step} to {r.steps} (state restored, step count kept)",
    )


def decode_check(dataset: TrainDataset, listed: int = 50) -> str:
    """Decode every image and mask of the dataset (JPEGs at reduced scale), so that every truncated
    or corrupt file is named now, all at once, not one per run when training reaches it."""
    from sdprep.errors import DatasetError
    from sdprep.images import load_image
    from sdprep.stage import map_items

    def decode(rec: ImageRecord) -> None:
        load_image(rec.path, "RGB", draft=(64, 64))
        if rec.mask_path is not None:
            load_image(rec.mask_path, "L")

    bad = [
        f"{rec.path}: {getattr(out, 'reason', out)}"
        for rec, out in map_items(decode, dataset.records, workers=2)
        if isinstance(out, SdprepError)
    ]
    if bad:
        more = f"\n  ... and {len(bad) - listed} more" if len(bad) > listed else ""
        raise DatasetError(
            f"{len(bad)} of {len(dataset.records)} images cannot be decoded:\n  "
            + "\n  ".join(bad[:listed])
            + more,
            "re-download, convert or delete them (`sdprep report` lists every problem)",
        )
    return f"all {len(dataset.records)} images (and their masks) decode"


def spread(records: list[ImageRecord], limit: int) -> list[ImageRecord]:
    """Up to `limit` records taken round-robin over buckets (masked images first), in dataset order."""
    by_bucket: dict[tuple[int, int], list[ImageRecord]] = {}
    for rec in sorted(records, key=lambda r: not r.has_mask):
        by_bucket.setdefault(rec.assignment.bucket, []).append(rec)
    picked: list[ImageRecord] = []
    while len(picked) < limit and any(by_bucket.values()):
        for queue in by_bucket.values():
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    keep = {id(r) for r in picked}
    return [r for r in records if id(r) in keep]


def _stage(report: PreflightReport, name: str, fn: Callable[[], T], describe: Callable[[T], str]) -> bool:
    try:
        value = fn()
    except SdprepError as exc:
        report.add(name, False, str(exc))
        return False
    report.add(name, True, describe(value))
    return True


def _setup_detail(trainer: Trainer, small: TrainConfig) -> str:
    sizes = sorted({"{}x{}".format(*d.resolution) for d in trainer.dataset.datasets})
    return (
        f"{trainer.method.title} on {len(trainer.dataset)} images at {', '.join(sizes)} max area "
        f"(your buckets scaled down), {trainer.optimizer_desc}, caches built"
    )


def reload_check(trainer: Trainer, path: Path | None) -> str:
    """Load the written file the way users' tools do (diffusers for LoRA) into a fresh pipeline."""
    if path is None:
        raise SdprepError("no final file was written")
    if trainer.method_name != "lora":
        return f"{path.name} reloaded and verified"
    from sdprep.train.models.load import load_sdxl

    fresh = load_sdxl(trainer.model.source if trainer.model.source else path)
    from sdprep.train.methods.lycoris import LycorisMethod

    if isinstance(trainer.method, LycorisMethod):  # diffusers loads no LoHa / LoKr: LyCORIS's loader
        modules = trainer.method.load_with_lycoris(path, fresh)
        return f"{path.name} loads with LyCORIS's own loader ({modules} modules)"
    pipe = fresh.pipeline()
    try:
        pipe.load_lora_weights(str(path))
    except Exception as exc:  # diffusers raises assorted errors for unloadable files
        raise SdprepError(f"diffusers cannot load {path.name}: {exc}") from exc
    return f"{path.name} loads in diffusers (load_lora_weights)"
