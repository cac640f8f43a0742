"""Training metadata as kohya sd-scripts writes it, so UIs and model sites read sdprep's files alike.

Every `ss_*` key kohya's `sdxl_train_network.py` writes, in its value forms (all strings: `str()` of
kohya's Python values, so "True", "None", "2.0", "(1024, 1024)", JSON for tables), the hashes
computed the way kohya computes them, sdprep's own keys (`ss_sdprep_version`, ...) and Stability
AI's `modelspec.*` keys. `tests/assets/kohya/` holds the key list and value forms recorded by
running kohya on the same configuration.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from sdprep.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from sdprep.train.config.datasets import SubsetSpec
    from sdprep.train.config.schema import TrainConfig
    from sdprep.train.data.pipeline import TrainDataset
    from sdprep.train.data.scan import ImageRecord
    from sdprep.train.methods.base import TrainMethod

SDXL_BASE_VERSION = "sdxl_base_v1-0"
LEGACY_OFFSET = 0x100000  # the old A1111 hash: sha256 of 64 KiB read at 1 MiB, first 8 hex digits
LEGACY_LENGTH = 0x10000
# kohya's keys for features sdprep does not have, with the value kohya writes when they are off
KOHYA_CONSTANTS = {
    "ss_v2": "False",
    "ss_lowram": "False",
    "ss_face_crop_aug_range": "None",
    "ss_resize_interpolation": "None",
}


def _s(value: Any) -> str:
    return "None" if value is None else str(value)


def _f(value: Any) -> str:
    """A float setting as kohya's argparse `type=float` leaves it ("1.0", not "1")."""
    return "None" if value is None else str(float(value))


# -- hashes --------------------------------------------------------------------------------------


def legacy_hash(stream: BinaryIO) -> str:
    """The old A1111 / additional-networks hash: 8 hex digits of sha256(64 KiB at offset 1 MiB)."""
    stream.seek(LEGACY_OFFSET)
    return hashlib.sha256(stream.read(LEGACY_LENGTH)).hexdigest()[:8]


def file_hashes(path: str | Path) -> tuple[str, str] | None:
    """kohya's (`ss_sd_model_hash`, `ss_new_sd_model_hash`) of a model path, or None if it does not exist.

    A file gives (legacy hash, sha256 of the whole file); a folder gives kohya's literal
    ("IsADirectory", "IsADirectory"), which is what kohya writes for a diffusers folder.
    """
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        return "IsADirectory", "IsADirectory"
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        legacy = legacy_hash(f)
        f.seek(0)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return legacy, digest.hexdigest()


def safetensors_hashes(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> tuple[str, str]:
    """kohya's (`sshs_model_hash`, `sshs_legacy_hash`) of a file about to be saved.

    As kohya's train_util.precalculate_safetensors_hashes: the tensors serialised with only the
    `ss_*` metadata; the model hash is the sha256 of everything after the header, the legacy hash
    the old 64 KiB-at-1-MiB hash of the whole serialisation.
    """
    import io

    from safetensors.torch import save

    blob = save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header :]).hexdigest(), legacy_hash(io.BytesIO(blob))


# -- values ---------------------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """Split "a=1, b=(2, 3)" on the commas that are not inside brackets or quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def kohya_optimizer_name(optimizer: torch.optim.Optimizer, description: str) -> str:
    """`ss_optimizer` as kohya writes it: module.Class plus "(k=v,k=v)" when it has arguments.

    `description` is sdprep's "Class(k=v, k=v)" from `build_optimizer` (the arguments after kohya's
    own defaults were added, as kohya records them).
    """
    cls = type(getattr(optimizer, "optimizer", optimizer))  # accelerate wraps the optimizer
    name = f"{cls.__module__}.{cls.__name__}"
    _, paren, rest = description.partition("(")
    args = _split_top_level(rest[:-1]) if paren and rest.endswith(")") else []
    return f"{name}({','.join(args)})" if args else name


def bucket_info(records: list[ImageRecord], enable_bucket: bool) -> dict[str, Any] | None:
    """kohya's `bucket_info`: used buckets sorted by (width, height) with their image counts
    (repeats included), and the mean |aspect-ratio error| over images; None without buckets."""
    if not enable_bucket:
        return None
    counts: dict[tuple[int, int], int] = {}
    for r in records:
        w, h = r.assignment.bucket
        bucket = (w, h)
        counts[bucket] = counts.get(bucket, 0) + r.num_repeats
    buckets = {
        str(i): {"resolution": list(reso), "count": counts[reso]} for i, reso in enumerate(sorted(counts))
    }
    errors = [abs(r.assignment.ar_error) for r in records]
    return {"buckets": buckets, "mean_img_ar_error": sum(errors) / len(errors) if errors else 0}


def _reg_images(dataset: TrainDataset, members: list[int]) -> int:
    """kohya's num_reg_images: each reg subset's declared repeats x its images, before reg balancing
    changes the repeats (images balancing left unused count too, as kohya counts the folder)."""
    by_subset = dataset.by_subset()
    unused = [p for p, why in dataset.findings.dropped if why.startswith("regularisation image")]
    total = 0
    for i in members:
        spec = dataset.subsets[i]
        if spec.is_reg:
            left = sum(1 for p in unused if spec.image_dir is not None and p.parent == spec.image_dir)
            total += spec.num_repeats * (len(by_subset[i]) + left)
    return total


def _dirs(
    subsets: list[SubsetSpec], by_subset: list[list[ImageRecord]], reg: bool
) -> dict[str, dict[str, int]]:
    return {
        spec.name: {"n_repeats": spec.num_repeats, "img_count": len(recs)}
        for spec, recs in zip(subsets, by_subset)
        if spec.is_reg == reg
    }


def _dataset_keys(cfg: TrainConfig, dataset: TrainDataset, run: Mapping[str, Any]) -> dict[str, str]:
    """The per-dataset keys kohya writes for a train_data_dir run (one dataset)."""
    spec = dataset.datasets[0] if dataset.datasets else None
    enable = spec.enable_bucket if spec is not None else cfg.enable_bucket
    res = spec.resolution if spec is not None else cfg.resolution
    by_subset = dataset.by_subset()
    return {
        "ss_batch_size_per_device": _s(cfg.train_batch_size),
        "ss_total_batch_size": _s(run.get("total_batch_size")),
        "ss_resolution": f"({res[0]}, {res[1]})",
        "ss_color_aug": _s(cfg.color_aug),
        "ss_flip_aug": _s(cfg.flip_aug),
        "ss_random_crop": _s(cfg.random_crop),
        "ss_shuffle_caption": _s(cfg.shuffle_caption),
        "ss_enable_bucket": _s(enable),
        "ss_bucket_no_upscale": _s(spec.bucket_no_upscale if spec is not None else cfg.bucket_no_upscale),
        "ss_min_bucket_reso": _s((spec.min_bucket_reso if spec else cfg.min_bucket_reso) if enable else None),
        "ss_max_bucket_reso": _s((spec.max_bucket_reso if spec else cfg.max_bucket_reso) if enable else None),
        "ss_keep_tokens": _s(cfg.keep_tokens),
        "ss_dataset_dirs": json.dumps(_dirs(dataset.subsets, by_subset, reg=False)),
        "ss_reg_dataset_dirs": json.dumps(_dirs(dataset.subsets, by_subset, reg=True)),
        "ss_tag_frequency": json.dumps(dataset.tag_frequency()),
        "ss_bucket_info": json.dumps(bucket_info(dataset.records, enable)),
    }


def _subset_entry(spec: SubsetSpec, recs: list[ImageRecord], dreambooth: bool) -> dict[str, Any]:
    cap = spec.captions
    entry: dict[str, Any] = {
        "img_count": len(recs),
        "num_repeats": spec.num_repeats,
        "color_aug": bool(spec.color_aug),
        "flip_aug": bool(spec.flip_aug),
        "random_crop": bool(spec.random_crop),
        "shuffle_caption": bool(cap.shuffle_caption),
        "keep_tokens": cap.keep_tokens,
        "keep_tokens_separator": cap.keep_tokens_separator,
        "secondary_separator": cap.secondary_separator,
        "enable_wildcard": bool(cap.enable_wildcard),
        "caption_prefix": cap.caption_prefix,
        "caption_suffix": cap.caption_suffix,
        "resize_interpolation": spec.resize_interpolation,
    }
    if spec.image_dir is not None:
        entry["image_dir"] = spec.image_dir.name
    if dreambooth:
        entry["class_tokens"] = spec.class_tokens
        entry["is_reg"] = spec.is_reg
    elif spec.metadata_file is not None:  # a fine-tuning dataset (a dataset does not mix kinds)
        entry["metadata_file"] = spec.metadata_file.name
    return entry


def _user_config_keys(dataset: TrainDataset) -> dict[str, str]:
    """What kohya writes for a `dataset_config` run: `ss_datasets` (one entry per dataset, its
    subsets and bucket table) instead of the flat per-dataset keys, and merged dirs and tags."""
    from sdprep.train.data.captions import tag_frequency

    by_subset = dataset.by_subset()
    datasets: list[dict[str, Any]] = []
    tags: dict[str, dict[str, int]] = {}
    dirs: dict[str, dict[str, int]] = {}
    for d, spec in enumerate(dataset.datasets):
        members = [i for i, sub in enumerate(dataset.subsets) if any(sub is s for s in spec.subsets)]
        recs = [r for r in dataset.records if r.dataset == d]
        dreambooth = not any(dataset.subsets[i].is_finetune for i in members)
        freq: dict[str, dict[str, int]] = {}
        for i in members:
            counts = freq.setdefault(dataset.subsets[i].name, {})
            for tag, n in tag_frequency([r.caption for r in by_subset[i]]).items():
                counts[tag] = counts.get(tag, 0) + n
        datasets.append(
            {
                "is_dreambooth": dreambooth,
                "batch_size_per_device": spec.batch_size,
                "num_train_images": sum(r.num_repeats for r in recs if not r.is_reg),
                "num_reg_images": _reg_images(dataset, members),
                "resolution": list(spec.resolution),
                "enable_bucket": bool(spec.enable_bucket),
                "min_bucket_reso": spec.min_bucket_reso if spec.enable_bucket else None,
                "max_bucket_reso": spec.max_bucket_reso if spec.enable_bucket else None,
                "tag_frequency": freq,
                "bucket_info": bucket_info(recs, spec.enable_bucket),
                "resize_interpolation": None,
                "subsets": [_subset_entry(dataset.subsets[i], by_subset[i], dreambooth) for i in members],
            }
        )
        for i in members:
            sub = dataset.subsets[i]
            if not sub.is_reg or not dreambooth:
                name, n = sub.name, 2
                while name in dirs:  # kohya numbers a folder used again: "dir (2)"
                    name, n = f"{sub.name} ({n})", n + 1
                dirs[name] = {"n_repeats": sub.num_repeats, "img_count": len(by_subset[i])}
        for folder, counts in freq.items():
            tags.setdefault(folder, counts)  # a folder in several datasets counts once
    return {
        "ss_datasets": json.dumps(datasets),
        "ss_tag_frequency": json.dumps(tags),
        "ss_dataset_dirs": json.dumps(dirs),
    }


def _model_keys(run: Mapping[str, Any], cfg: TrainConfig) -> dict[str, str]:
    """`ss_sd_model_name` / hashes and the VAE's, as kohya: hashes only for paths that exist."""
    meta: dict[str, str] = {}
    for prefix, source, hashes in (
        ("sd_model", run.get("model_source"), run.get("model_hashes")),
        ("vae", cfg.vae, run.get("vae_hashes")),
    ):
        if source is None:
            continue
        name = str(source)
        if hashes is not None:
            meta[f"ss_{prefix}_hash"], meta[f"ss_new_{prefix}_hash"] = hashes
            name = os.path.basename(name)
        meta[f"ss_{prefix}_name"] = name
    return meta


def kohya_metadata(
    run: Mapping[str, Any], method: TrainMethod, dataset: TrainDataset, cfg: TrainConfig
) -> dict[str, str]:
    """kohya's `ss_*` training metadata, sdprep's own keys and the `modelspec.*` keys.

    `run` holds the run facts: started (unix time), session_id, name, seed, steps, epoch,
    num_epochs, batches_per_epoch, total_steps, total_batch_size, optimizer (kohya's form),
    model_source and model_hashes / vae_hashes (`file_hashes` results, None when not a path).
    """
    meta: dict[str, str] = {
        "ss_session_id": _s(run.get("session_id")),
        "ss_training_started_at": _s(run.get("started")),
        "ss_output_name": _s(run.get("name")),
        "ss_learning_rate": _f(cfg.learning_rate),
        "ss_text_encoder_lr": _s(cfg.text_encoder_lr),
        "ss_unet_lr": _s(cfg.unet_lr),
        # as kohya counts them: images x repeats (DreamBoothDataset: num_repeats * len(img_paths))
        "ss_num_train_images": _s(sum(r.num_repeats for r in dataset.records if not r.is_reg)),
        "ss_num_reg_images": _s(_reg_images(dataset, list(range(len(dataset.subsets))))),
        "ss_num_batches_per_epoch": _s(run.get("batches_per_epoch")),
        "ss_num_epochs": _s(run.get("num_epochs")),
        "ss_gradient_checkpointing": _s(cfg.gradient_checkpointing),
        "ss_gradient_accumulation_steps": _s(cfg.gradient_accumulation_steps),
        "ss_max_train_steps": _s(run.get("total_steps")),
        "ss_lr_warmup_steps": _s(cfg.lr_warmup_steps),
        "ss_lr_scheduler": _s(cfg.lr_scheduler),
        "ss_mixed_precision": _s(cfg.mixed_precision),
        "ss_full_fp16": _s(cfg.full_fp16),
        "ss_base_model_version": SDXL_BASE_VERSION,
        "ss_clip_skip": _s(cfg.clip_skip),
        "ss_max_token_length": _s(cfg.max_token_length),
        "ss_cache_latents": _s(cfg.cache_latents or cfg.cache_latents_to_disk),
        "ss_seed": _s(run.get("seed")),
        "ss_noise_offset": _s(cfg.noise_offset),
        "ss_multires_noise_iterations": _s(cfg.multires_noise_iterations),
        "ss_multires_noise_discount": _f(cfg.multires_noise_discount),
        "ss_adaptive_noise_scale": _s(cfg.adaptive_noise_scale),
        "ss_zero_terminal_snr": _s(cfg.zero_terminal_snr),
        "ss_training_comment": _s(cfg.training_comment),
        "ss_optimizer": _s(run.get("optimizer")),
        "ss_max_grad_norm": _f(cfg.max_grad_norm),
        "ss_caption_dropout_rate": _f(cfg.caption_dropout_rate),
        "ss_caption_dropout_every_n_epochs": _s(cfg.caption_dropout_every_n_epochs),
        "ss_caption_tag_dropout_rate": _f(cfg.caption_tag_dropout_rate),
        "ss_prior_loss_weight": _f(cfg.prior_loss_weight),
        "ss_min_snr_gamma": _s(cfg.min_snr_gamma),
        "ss_ip_noise_gamma": _s(cfg.ip_noise_gamma),
        "ss_debiased_estimation": _s(cfg.debiased_estimation_loss),
        "ss_noise_offset_random_strength": _s(cfg.noise_offset_random_strength),
        "ss_ip_noise_gamma_random_strength": _s(cfg.ip_noise_gamma_random_strength),
        "ss_loss_type": _s(cfg.loss_type),
        "ss_huber_schedule": _s(cfg.huber_schedule),
        "ss_huber_scale": _f(cfg.huber_scale),
        "ss_huber_c": _f(cfg.huber_c),
        **KOHYA_CONSTANTS,
        "ss_fp8_base": _s(cfg.fp8_base),
        "ss_fp8_base_unet": _s(cfg.fp8_base_unet),
        "ss_num_validation_images": _s(len(dataset.validation.records) if dataset.validation else 0),
        "ss_validation_seed": _s(cfg.validation_seed),
        "ss_validation_split": _f(cfg.validation_split),
        "ss_max_validation_steps": _s(cfg.max_validation_steps),
        "ss_validate_every_n_epochs": _s(cfg.validate_every_n_epochs),
        "ss_validate_every_n_steps": _s(cfg.validate_every_n_steps),
        **(_user_config_keys(dataset) if cfg.dataset_config else _dataset_keys(cfg, dataset, run)),
        **_model_keys(run, cfg),
        # written at every save, as kohya's save_model does
        "ss_training_finished_at": _s(time.time()),
        "ss_steps": _s(run.get("steps")),
        "ss_epoch": _s(run.get("epoch")),
        # sdprep's own
        "ss_full_bf16": _s(cfg.full_bf16),
        "ss_sdprep_version": _sdprep_version(),
    }
    meta.update(method.metadata())
    meta.update(modelspec(cfg, method, run))
    return meta


MINIMUM_KEYS = (
    "ss_v2",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
)


def minimum_metadata(meta: Mapping[str, str]) -> dict[str, str]:
    """What kohya keeps with `no_metadata`: the keys a loader needs, plus the model spec."""
    return {k: v for k, v in meta.items() if k in MINIMUM_KEYS or k.startswith("modelspec.")}


def modelspec(cfg: TrainConfig, method: TrainMethod, run: Mapping[str, Any]) -> dict[str, str]:
    """Stability AI's model spec keys (what ComfyUI/A1111/Forge show and sort by)."""
    res = cfg.resolution
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": method.architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": cfg.metadata_title or _s(run.get("name")),  # kohya: output_name
        "modelspec.implementation_version": f"sdprep/{_sdprep_version()}",  # kohya: sd-scripts/<commit>
        "modelspec.resolution": f"{res[0]}x{res[1]}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": "v" if cfg.v_parameterization else "epsilon",
    }
    for key in (
        "author",
        "description",
        "license",
        "tags",
        "trigger_phrase",
        "usage_hint",
        "preprocessor",
        "merged_from",
        "is_negative_embedding",
    ):
        value = getattr(cfg, f"metadata_{key}")
        if value:
            spec[f"modelspec.{key}"] = str(value)
    if cfg.metadata_thumbnail:
        spec["modelspec.thumbnail"] = thumbnail_data_url(cfg.metadata_thumbnail)
    if cfg.clip_skip:
        spec["modelspec.encoder_layer"] = str(cfg.clip_skip)
    return spec


def thumbnail_data_url(value: str) -> str:
    """kohya's metadata_thumbnail: a data URL as given, or an image file read into one."""
    import base64
    import mimetypes

    if value.startswith("data:"):
        return value
    path = Path(value).expanduser()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"metadata_thumbnail {path}: cannot read ({exc.strerror})", "give an image file or a data: URL"
        ) from None
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _sdprep_version() -> str:
    from sdprep import __version__

    return __version__
