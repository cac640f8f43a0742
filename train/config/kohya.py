"""kohya sd-scripts argument tables and string helpers used by `sdprep.train.config.schema`.

kohya's training scripts take a flat TOML (`--config_file`) or argparse flags. sdprep accepts both
unchanged. This module lists the kohya (and bmaltais GUI) keys that sdprep reads under another
name, accepts without using (with the reason printed), or knows but does not implement (an error
unless the value is the harmless default), plus the parsing of kohya's `k=v` argument lists.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from sdprep.errors import ConfigError

# Another name for a TrainConfig field (kohya renames, GUI names, historical typos).
ALIASES: dict[str, str] = {
    "caption_extention": "caption_extension",  # kohya keeps this misspelling for compatibility
}

# Keys kohya (or its GUI) accepts that change nothing in sdprep's result: accepted with a note.
ACCEPTED_IGNORED: dict[str, str] = {
    "xformers": "sdprep always uses PyTorch scaled-dot-product attention (SDPA)",
    "sdpa": "sdprep always uses PyTorch scaled-dot-product attention (SDPA)",
    "mem_eff_attn": "sdprep always uses PyTorch scaled-dot-product attention (SDPA)",
    "diffusers_xformers": "sdprep always uses PyTorch scaled-dot-product attention (SDPA)",
    "lowram": "model placement is automatic",
    "lowvram": "model placement is automatic (bmaltais GUI key)",
    "highvram": "model placement is automatic",
    "dynamo_backend": "torch.compile is not used",
    "torch_compile": "torch.compile is not used",
    "persistent_data_loader_workers": "sdprep manages its data loader workers itself",
    "max_resolution": "bmaltais GUI key; sdprep uses `resolution`",
    "LoRA_type": "bmaltais GUI key; network_module and network_args say what trains",
    "sample_batch_size": "samples are generated one prompt at a time",
    "vae_batch_size": "latents are cached in batches sdprep chooses",
    "cache_info": "sdprep caches image sizes itself",
    "use_safetensors": "sdprep always writes safetensors",
    "tokenizer_cache_dir": "tokenizers are loaded from the model folder or checkpoint",
    "disable_mmap_load_safetensors": "safetensors loading is handled by diffusers",
    "ddp_timeout": "data-parallel settings come from accelerate",
    "ddp_gradient_as_bucket_view": "data-parallel settings come from accelerate",
    "ddp_static_graph": "data-parallel settings come from accelerate",
    "huggingface_repo_id": "sdprep does not upload; upload the output yourself",
    "huggingface_repo_type": "sdprep does not upload; upload the output yourself",
    "huggingface_path_in_repo": "sdprep does not upload; upload the output yourself",
    "huggingface_token": "sdprep does not upload; upload the output yourself",
    "huggingface_repo_visibility": "sdprep does not upload; upload the output yourself",
    "save_state_to_huggingface": "sdprep does not upload; upload the output yourself",
    "async_upload": "sdprep does not upload; upload the output yourself",
    "log_config": "the resolved config is always written next to the outputs",
    "log_tracker_name": "sdprep logs to TensorBoard under logging_dir",
    "log_tracker_config": "sdprep logs to TensorBoard under logging_dir",
    "wandb_run_name": "sdprep logs to TensorBoard under logging_dir",
    "wandb_api_key": "sdprep logs to TensorBoard under logging_dir",
    "console_log_level": "sdprep's verbosity comes from -q / -v",
    "console_log_file": "sdprep's verbosity comes from -q / -v",
    "console_log_simple": "sdprep's verbosity comes from -q / -v",
    "output_config": "a command-line flag: `sdprep train --output-config FILE` (or --output_config --config_file FILE)",
    "skip_cache_check": "sdprep checks its caches by a fingerprint of each file (no slow check to skip)",
    "zero_stage": "a DeepSpeed setting (DeepSpeed is not supported; accelerate runs multi-GPU)",
    "offload_optimizer_device": "a DeepSpeed setting (DeepSpeed is not supported; accelerate runs multi-GPU)",
    "offload_optimizer_nvme_path": "a DeepSpeed setting (DeepSpeed is not supported; accelerate runs multi-GPU)",
    "offload_param_device": "a DeepSpeed setting (DeepSpeed is not supported; accelerate runs multi-GPU)",
    "offload_param_nvme_path": "a DeepSpeed setting (DeepSpeed is not supported; accelerate runs multi-GPU)",
    "zero3_init_flag": "a DeepSpeed setting (DeepSpeed is not supported; accelerate runs multi-GPU)",
    "zero3_save_16bit_model": "a DeepSpeed setting (DeepSpeed is not supported; accelerate runs multi-GPU)",
    "num_cpu_threads_per_process": "an accelerate launcher option",
}

# Keys kohya implements that sdprep does not: accepted only at the value that turns them off.
# key -> (values that mean "off", hint)
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "v2": ((False,), "sdprep trains SDXL only"),
    "fused_optimizer_groups": ((None, 0), "not supported"),
    "block_lr": ((None, "", []), "per-block learning rates are not supported"),
    "face_crop_aug_range": ((None, ""), "face-crop augmentation is not supported"),
    "token_warmup_min": ((1,), "token warmup is not supported"),
    "token_warmup_step": ((0, 0.0), "token warmup is not supported"),
    "debug_dataset": ((False,), "use `sdprep report` to inspect a dataset"),
    "dataset_class": ((None, ""), "custom dataset classes are not supported"),
    "base_weights": ((None, "", []), "merging base LoRA weights is not supported"),
    "base_weights_multiplier": ((None, []), "merging base LoRA weights is not supported"),
    "network_train_text_encoder_only": ((False,), "not supported; train U-Net and text encoders"),
    "save_n_epoch_ratio": ((None, 0), "use save_every_n_epochs"),
    "resume_from_huggingface": ((False,), "resume from a local state folder"),
    "deepspeed": ((False,), "DeepSpeed is not supported; multi-GPU runs through `accelerate launch`"),
    "cpu_offload_checkpointing": (
        (False,),
        "not supported for SDXL (a FLUX option); use gradient_checkpointing",
    ),
    "fp16_master_weights_and_gradients": (
        (False,),
        "not supported; use full_fp16 or full_bf16 with mixed_precision",
    ),
    "use_lion_optimizer": ((False,), 'use optimizer_type = "Lion" (needs lion-pytorch)'),
}

# kohya flags whose argparse type is nargs="*" (several values after one flag).
LIST_FLAGS = {"optimizer_args", "network_args", "lr_scheduler_args"}

# Sections a dataset TOML has: a clear error if they appear in a training config.
DATASET_SECTIONS = {"datasets", "subsets"}

LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
    "adafactor",
    "cosine_with_min_lr",
    "warmup_stable_decay",
    "inverse_sqrt",
)
OPTIMIZERS = (
    "AdamW",
    "AdamW8bit",
    "PagedAdamW",
    "PagedAdamW8bit",
    "PagedAdamW32bit",
    "Lion",
    "Lion8bit",
    "PagedLion8bit",
    "SGDNesterov",
    "SGDNesterov8bit",
    "AdEMAMix8bit",
    "PagedAdEMAMix8bit",
    "Adafactor",
    "Prodigy",
    "DAdaptation",
    "DAdaptAdamPreprint",
    "DAdaptAdam",
    "DAdaptAdaGrad",
    "DAdaptAdan",
    "DAdaptAdanIP",
    "DAdaptLion",
    "DAdaptSGD",
    "AdamWScheduleFree",
    "RAdamScheduleFree",
    "SGDScheduleFree",
    "CAME",
    # plain torch.optim classes
    "Adam",
    "SGD",
    "RMSprop",
    "Adagrad",
    "Adadelta",
    "Adamax",
    "NAdam",
    "RAdam",
)
NETWORK_MODULES = ("networks.lora", "lycoris.kohya")
# networks.lora's network_args; those also settable as top-level keys (TrainConfig fields, as the
# kohya_ss GUI writes them) come first
NETWORK_ARG_FIELDS = (
    "conv_dim",
    "conv_alpha",
    "rank_dropout",
    "module_dropout",
    "loraplus_lr_ratio",
    "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio",
)
NETWORK_ARGS = (
    *NETWORK_ARG_FIELDS,
    "block_dims",
    "block_alphas",
    "conv_block_dims",
    "conv_block_alphas",
    "down_lr_weight",
    "mid_lr_weight",
    "up_lr_weight",
    "block_lr_zero_threshold",
)


_KV_SPLIT = re.compile(r"[,\s]+(?=[A-Za-z_][\w.]*\s*=)")


def split_kv_args(value: Any, key: str) -> list[str]:
    """kohya's `k=v` argument list from a list, or one string "a=1 b=2" / "a=1,b=2".

    A comma only separates items when the next item has its own `=`, so `betas=0.9,0.99`
    stays one item (kohya parses its value as the tuple (0.9, 0.99)).
    """
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f'{key}: expected "name=value" strings, got {item!r}')
        for part in _KV_SPLIT.split(item.strip()):
            part = part.strip().strip(",").strip()
            if not part:
                continue
            if "=" not in part:
                raise ConfigError(
                    f'{key}: "{part}" is not of the form name=value',
                    f'write e.g. {key} = ["weight_decay=0.01", "betas=0.9,0.99"]',
                )
            name, val = part.split("=", 1)
            out.append(f"{name.strip()}={val.strip()}")
    return out


def parse_kv_args(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["weight_decay=0.01", "betas=0.9,0.99", "relative_step=False"]` -> typed kwargs.

    Values are Python literals as in kohya (`ast.literal_eval`); a value that is not a literal
    stays a string (kohya would crash on it).
    """
    out: dict[str, Any] = {}
    for item in items:
        name, _, raw = item.partition("=")
        try:
            out[name.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            lowered = raw.strip().lower()
            out[name.strip()] = {"true": True, "false": False, "none": None}.get(lowered, raw.strip())
    return out


def parse_resolution(value: Any, key: str = "resolution") -> tuple[int, int] | None:
    """kohya's resolution: 1024, "1024", "1024,1536", "1024x1536" or [1024, 1536] -> (w, h)."""
    if value is None:
        return None
    parts: list[Any]
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size, got {value!r}")
    if isinstance(value, (int, float)):
        parts = [value, value]
    elif isinstance(value, str):
        parts = [p for p in re.split(r"[,x\s]+", value.strip().lower()) if p]
        if len(parts) == 1:
            parts = parts * 2
    elif isinstance(value, (list, tuple)):
        parts = list(value)
        if len(parts) == 1:
            parts = parts * 2
    else:
        raise ConfigError(f'{key}: expected a size like 1024 or "1024,1536", got {value!r}')
    if len(parts) != 2:
        raise ConfigError(
            f"{key}: expected one size or width,height, got {value!r}", 'write e.g. "1024,1536"'
        )
    try:
        nums = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected numbers, got {value!r}", 'write e.g. "1024,1536"') from None
    if any(not n.is_integer() or n <= 0 for n in nums):
        raise ConfigError(f"{key}: sizes must be positive whole numbers, got {value!r}")
    return int(nums[0]), int(nums[1])


def strip_launcher(argv: list[str]) -> list[str]:
    """Drop `accelerate launch ... sdxl_train.py` (anything up to the first *.py) from a command."""
    if not argv or argv[0].startswith("-"):
        return list(argv)
    for i, tok in enumerate(argv):
        if tok.endswith(".py") and not tok.startswith("--"):
            return argv[i + 1 :]
    return list(argv)


def flatten_tables(data: dict[str, Any], source: str) -> dict[str, Any]:
    """kohya's flattening: top-level tables are merged into one flat dict (one level only)."""
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in data.items():
        if key in DATASET_SECTIONS:
            raise ConfigError(
                f'{source}: "[[{key}]]" belongs in a dataset TOML, not in the training config',
                "move the [general] / [[datasets]] tables to their own file and set dataset_config to it",
            )
        if not isinstance(value, dict):
            items, where = {key: value}, "top level"
        else:
            items, where = value, f"[{key}]"
        for name, item in items.items():
            if isinstance(item, dict):
                raise ConfigError(
                    f'{source}: "{key}.{name}" is nested two tables deep',
                    "a training config is flat: write key = value at the top level or in one [section]",
                )
            if name in out and out[name] != item:
                raise ConfigError(
                    f'{source}: "{name}" is set twice ({origin[name]} and {where}) with different values'
                )
            out[name], origin[name] = item, where
    return out
