"""The trainer's configuration: one flat schema whose names ARE kohya sd-scripts' argument names.

A kohya training TOML (`--config_file`), kohya-style flags (`--learning_rate=5e-6 --no_half_vae`)
and sdprep's own TOML all map onto `TrainConfig` by name. Layering: defaults < file < flags <
`--set key=value`. Keys kohya has but sdprep does not need are accepted with a note (see
`sdprep.train.config.kohya`); unknown keys are errors with a "did you mean".

    cfg, notes = load_train_config(Path("config.toml"), flags=["--train_batch_size=4"])
    method = detect_method(cfg)  # "lora" | "ti" | "finetune"
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sdprep.config import coerce, from_dict, load_toml
from sdprep.errors import ConfigError, did_you_mean, unknown_choice
from sdprep.train.config.datasets import INTERPOLATIONS, origin_of
from sdprep.train.config.kohya import (
    ACCEPTED_IGNORED,
    ALIASES,
    LIST_FLAGS,
    LR_SCHEDULERS,
    NETWORK_ARG_FIELDS,
    NETWORK_ARGS,
    NETWORK_MODULES,
    OPTIMIZERS,
    UNSUPPORTED,
    flatten_tables,
    parse_kv_args,
    parse_resolution,
    split_kv_args,
    strip_launcher,
)

Method = Literal["lora", "ti", "finetune"]
_METHOD: dict[str, Method] = {"lora": "lora", "ti": "ti", "finetune": "finetune"}  # a name -> its Literal
METHODS: tuple[str, ...] = tuple(_METHOD)


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting. Defaults are kohya's SDXL scripts' unless the comment says otherwise."""

    # -- model ---------------------------------------------------------------------------------
    pretrained_model_name_or_path: str | None = None  # diffusers folder, single .safetensors or hub id
    vae: str | None = None  # separate VAE (file, folder or hub id)
    model_config: Path | None = None  # sdprep: diffusers folder for a single file that is not standard SDXL
    trust_pickle: bool = False  # sdprep: unpickle a .ckpt/.pt/.bin in full (can run code from the file)
    method: Method | None = None  # sdprep: force lora / ti / finetune (default: from the keys, as kohya)
    v_parameterization: bool = False  # the model predicts v (v-pred SDXL finetunes)
    zero_terminal_snr: bool = False  # rescale the noise schedule to zero SNR at the last step (v-pred)
    no_half_vae: bool = False  # keep the VAE in fp32 under mixed precision
    # -- data ----------------------------------------------------------------------------------
    train_data_dir: Path | None = None  # folder of <repeats>_<class tokens> subfolders
    reg_data_dir: Path | None = None  # regularisation images, same layout
    dataset_config: Path | None = None  # kohya dataset TOML ([general], [[datasets]], [[datasets.subsets]])
    in_json: Path | None = None  # kohya fine-tune metadata JSON (with train_data_dir)
    dataset_repeats: int = 1  # repeats for an in_json dataset
    conditioning_data_dir: Path | None = None  # mask images for masked_loss (same stems as the images)
    resolution: tuple[int, int] = (1024, 1024)  # (width, height); accepts 1024, "1024,1536", [w, h]
    enable_bucket: bool = True  # sdprep default True (kohya: False): aspect-ratio buckets
    min_bucket_reso: int = 256  # smallest bucket side
    max_bucket_reso: int = 2048  # sdprep default 2048 (kohya: 1024, which gives SDXL only 1024-sided buckets)
    bucket_reso_steps: int = 64  # bucket side step; SDXL needs a multiple of 32
    bucket_no_upscale: bool = False  # never enlarge small images; buckets follow their size
    caption_extension: str = ".txt"  # sdprep default ".txt" (kohya: ".caption")
    caption_separator: str = ","  # tag separator in captions
    secondary_separator: str | None = None  # joins tags that shuffle/drop as one, replaced by the separator
    enable_wildcard: bool = False  # "{a|b|c}" in captions picks one at random
    shuffle_caption: bool = False  # shuffle tags each step
    keep_tokens: int = 0  # leading tags that are never shuffled or dropped
    keep_tokens_separator: str = ""  # tags before this separator are kept in place
    caption_prefix: str | None = None  # text added before every caption
    caption_suffix: str | None = None  # text added after every caption
    caption_dropout_rate: float = 0.0  # probability of training a sample with an empty caption
    caption_dropout_every_n_epochs: int = 0  # drop all captions every N epochs (0: never)
    caption_tag_dropout_rate: float = 0.0  # probability of dropping each tag
    flip_aug: bool = False  # random horizontal flips
    color_aug: bool = False  # weak hue/gamma augmentation (not with cached latents)
    random_crop: bool = False  # random instead of centre crop into the bucket (not with cached latents)
    alpha_mask: bool = (
        False  # use each image's alpha channel as its loss mask (with or without masked_loss, as kohya)
    )
    resize_interpolation: str | None = (
        None  # resize filter (lanczos, nearest, bilinear, bicubic, area...; None: sdprep's)
    )
    max_data_loader_n_workers: int = 8  # data loader processes
    cache_dir: Path | None = None  # sdprep: where disk caches go (None: next to each image, as kohya)
    # -- caching -------------------------------------------------------------------------------
    cache_latents: bool = False  # encode every image once and keep the latents in memory
    cache_latents_to_disk: bool = False  # ...and on disk (implies cache_latents)
    cache_text_encoder_outputs: bool = False  # encode captions once (frozen encoders, fixed captions)
    cache_text_encoder_outputs_to_disk: bool = False  # ...and on disk (implies cache_text_encoder_outputs)
    # -- text conditioning ---------------------------------------------------------------------
    max_token_length: int | None = None  # None/75, 150 or 225 tokens (chunks of 75, as kohya)
    weighted_captions: bool = False  # "(word:1.3)" / "[word]" attention syntax in captions weights tokens
    clip_skip: int | None = None  # None/1: SDXL's penultimate layer; n>=2: n-1 layers further back
    # -- schedule ------------------------------------------------------------------------------
    max_train_steps: int = 1600  # optimizer steps (max_train_epochs overrides it, as kohya)
    max_train_epochs: int | None = None  # epochs; wins over max_train_steps (a lone GUI epoch too)
    train_batch_size: int = 1  # samples per step per process
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    seed: int | None = None  # random seed (None: a random one, recorded in the outputs)
    # -- optimizer -----------------------------------------------------------------------------
    optimizer_type: str = "AdamW"  # AdamW, AdamW8bit, Adafactor, Prodigy, Lion, SGDNesterov, any torch.optim name or module.Class
    optimizer_args: tuple[str, ...] = ()  # "name=value" items (a list, or one "a=1 b=2" / "a=1,b=2" string)
    learning_rate: float = 2e-6  # base learning rate
    unet_lr: float | None = None  # LoRA: U-Net learning rate (None: learning_rate)
    text_encoder_lr: float | tuple[float, ...] | None = (
        None  # LoRA: text-encoder rate, or [te1, te2] as the kohya GUI writes it (None: learning_rate)
    )
    learning_rate_te1: float | None = None  # fine-tune: text encoder 1 learning rate (None: learning_rate)
    learning_rate_te2: float | None = None  # fine-tune: text encoder 2 learning rate (None: learning_rate)
    max_grad_norm: float = 1.0  # gradient clipping norm (0: off)
    lr_scheduler: str = "constant"  # linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, adafactor...
    lr_scheduler_args: tuple[str, ...] = ()  # extra "name=value" scheduler arguments
    lr_warmup_steps: int | float = 0  # warmup steps (a value below 1 is a fraction of the total, as kohya)
    lr_scheduler_num_cycles: int = 1  # cosine_with_restarts cycles
    lr_scheduler_power: float = 1.0  # polynomial power
    lr_scheduler_type: str | None = (
        None  # a scheduler class ("CosineAnnealingLR" or module.Class) with lr_scheduler_args
    )
    lr_scheduler_min_lr_ratio: float | None = None  # cosine_with_min_lr / warmup_stable_decay: lowest lr / lr
    lr_scheduler_timescale: int | None = None  # inverse_sqrt time scale (None: the warmup steps)
    lr_decay_steps: int | float = 0  # warmup_stable_decay: decay steps (a value below 1 is a fraction)
    # -- precision and memory ------------------------------------------------------------------
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # autocast dtype
    full_bf16: bool = False  # bf16 weights and gradients (needs mixed_precision bf16)
    full_fp16: bool = False  # fp16 weights and gradients (needs mixed_precision fp16)
    save_precision: Literal["float", "fp16", "bf16"] | None = (
        None  # dtype of saved weights (None: float for LoRA/TI)
    )
    gradient_checkpointing: bool = False  # recompute activations to save memory
    fp8_base: bool = False  # store the frozen U-Net and text encoders in float8 (CUDA, LoRA/LyCORIS)
    fp8_base_unet: bool = False  # ...the U-Net only
    # -- loss ----------------------------------------------------------------------------------
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = "l2"  # per-element loss
    huber_c: float = 0.1  # huber / smooth_l1 threshold parameter
    huber_schedule: Literal["constant", "exponential", "snr"] = "snr"  # how huber_c varies with the timestep
    huber_scale: float = 1.0  # multiplier of the constant / exponential huber threshold
    min_snr_gamma: float | None = None  # min-SNR weighting gamma (5 is usual)
    debiased_estimation_loss: bool = False  # weight the loss by 1/sqrt(SNR) (1/(SNR+1) for v-prediction)
    scale_v_pred_loss_like_noise_pred: bool = False  # weight the loss by SNR/(SNR+1) (v-prediction models)
    v_pred_like_loss: float | None = None  # add this share of a v-prediction-like loss (loss / (SNR/(SNR+1)))
    noise_offset: float | None = None  # noise offset strength (about 0.03-0.1)
    noise_offset_random_strength: bool = False  # draw the offset strength in [0, noise_offset]
    adaptive_noise_scale: float | None = None  # add |mean latent| * this to noise_offset (needs noise_offset)
    noise_offset_type: Literal["original", "multires"] | None = (
        None  # GUI key: which of the two noise tweaks applies
    )
    multires_noise_iterations: int | None = None  # pyramid ("multires") noise levels (6-10 usual)
    multires_noise_discount: float = 0.3  # weight decay per pyramid level
    ip_noise_gamma: float | None = None  # input perturbation noise strength (about 0.1)
    ip_noise_gamma_random_strength: bool = False  # draw it in [0, ip_noise_gamma]
    min_timestep: int | None = None  # smallest training timestep (default 0)
    max_timestep: int | None = None  # largest training timestep, exclusive (default 1000)
    prior_loss_weight: float = 1.0  # loss weight of regularisation images
    masked_loss: bool = False  # weight the loss by mask images (conditioning_data_dir) or alpha
    unmasked_weight: float = 0.0  # sdprep: loss weight under black mask pixels (OneTrainer-style clamp)
    masked_loss_normalize: bool = False  # sdprep: divide by the mask's area instead of a plain mean
    # -- LoRA (network) ------------------------------------------------------------------------
    network_module: str | None = None  # "networks.lora" selects LoRA training
    network_dim: int = 4  # LoRA rank (kohya's default when unset)
    network_alpha: float = 1.0  # LoRA alpha: effective scale alpha / rank
    network_dropout: float | None = None  # dropout on the LoRA down projection output
    scale_weight_norms: float | None = None  # max-norm regularisation of each LoRA module's change
    network_args: tuple[str, ...] = ()  # "name=value" items: conv_dim, block_dims, rank_dropout...
    conv_dim: int | None = None  # sdprep: rank of LoRA on 3x3 convs (also network_args conv_dim)
    conv_alpha: float | None = None  # sdprep: alpha of conv LoRA (also network_args conv_alpha)
    rank_dropout: float | None = None  # sdprep key (kohya: network_args): drop LoRA ranks per sample
    module_dropout: float | None = None  # sdprep key (kohya: network_args): skip a LoRA module per step
    loraplus_lr_ratio: float | None = None  # sdprep key (kohya: network_args): LoRA+ up-weight lr ratio
    loraplus_unet_lr_ratio: float | None = None  # ...for the U-Net only (overrides loraplus_lr_ratio)
    loraplus_text_encoder_lr_ratio: float | None = None  # ...for the text encoders only
    network_train_unet_only: bool = False  # kohya's default false: text-encoder LoRA trains too
    network_weights: Path | None = None  # LoRA file to continue training from
    dim_from_weights: bool = False  # take network_dim / alpha (and conv) from network_weights, as kohya
    # -- textual inversion ---------------------------------------------------------------------
    token_string: str | None = None  # the new token; selects textual-inversion training
    init_word: str | None = None  # word(s) whose embedding initialises the token
    num_vectors_per_token: int = 1  # vectors the token expands to
    weights: Path | None = None  # embedding file to continue training from
    use_object_template: bool = False  # ignore captions; use "a photo of a {}" style templates
    use_style_template: bool = False  # ignore captions; use "a painting in the style of {}" templates
    # -- fine-tune -----------------------------------------------------------------------------
    train_text_encoder: bool = False  # fine-tune: also train both text encoders
    ema: bool = False  # sdprep: keep an exponential moving average of the trained weights
    ema_decay: float = 0.9999  # sdprep: EMA decay per optimizer step
    fused_backward_pass: bool = False  # step each weight during backward, freeing its gradient (Adafactor)
    # -- output --------------------------------------------------------------------------------
    output_dir: Path | None = None  # where weights, states and samples go
    output_name: str | None = None  # file stem (None: "last" / "epoch-NNNNNN", as kohya)
    save_model_as: Literal["safetensors", "diffusers", "diffusers_safetensors", "ckpt", "pt"] | None = (
        None  # format
    )
    save_diffusers_copy: bool = False  # sdprep: also write a diffusers-format copy
    save_every_n_epochs: int | None = None  # save every N epochs
    save_every_n_steps: int | None = None  # save every N steps
    save_last_n_epochs: int | None = None  # keep only the last N epoch saves
    save_last_n_steps: int | None = None  # keep step saves only this many steps back
    save_last_n_epochs_state: int | None = (
        None  # keep only the last N epoch states (None: save_last_n_epochs)
    )
    save_last_n_steps_state: int | None = (
        None  # keep states only this many steps back (None: save_last_n_steps)
    )
    save_state: bool = False  # also save optimizer/scheduler/RNG state with each save
    save_state_on_train_end: bool = False  # save the state once at the end
    resume: str | None = None  # state folder to resume from, or "latest"
    initial_step: int | None = None  # start counting at this step (overrides a resumed state's count)
    initial_epoch: int | None = None  # start at this epoch (1-based; initial_step wins)
    skip_until_initial_step: bool = False  # ...and skip the data before it (as an uninterrupted run)
    no_metadata: bool = False  # write no ss_* metadata
    training_comment: str | None = None  # ss_training_comment metadata
    metadata_title: str | None = None  # modelspec.title (None: output_name)
    metadata_author: str | None = None  # modelspec.author
    metadata_description: str | None = None  # modelspec.description
    metadata_license: str | None = None  # modelspec.license
    metadata_tags: str | None = None  # modelspec.tags, comma-separated
    metadata_trigger_phrase: str | None = None  # modelspec.trigger_phrase
    metadata_usage_hint: str | None = None  # modelspec.usage_hint
    metadata_preprocessor: str | None = None  # modelspec.preprocessor
    metadata_merged_from: str | None = None  # modelspec.merged_from
    metadata_is_negative_embedding: str | None = None  # modelspec.is_negative_embedding
    metadata_thumbnail: str | None = (
        None  # modelspec.thumbnail: a data URL or an image file (made a data URL)
    )
    # -- logging -------------------------------------------------------------------------------
    logging_dir: Path | None = None  # TensorBoard logs go under this folder
    log_with: Literal["tensorboard", "wandb", "all"] | None = None  # logger (sdprep writes TensorBoard)
    log_prefix: str | None = None  # prefix of the run's log folder name
    # -- validation ----------------------------------------------------------------------------
    validation_split: float = 0.0  # share of each subset's images held out for the validation loss
    validation_seed: int | None = None  # seed of the split and the validation noise (None: seed)
    validate_every_n_steps: int | None = None  # validation loss every N steps (None: not by steps)
    validate_every_n_epochs: int | None = None  # ...every N epochs (None: every epoch)
    max_validation_steps: int | None = None  # at most this many validation batches (None: all)
    # -- samples -------------------------------------------------------------------------------
    sample_prompts: Path | None = None  # kohya prompt file (--n --w --h --d --l --s --ss)
    sample_sampler: str = "ddim"  # default sampler for samples
    sample_every_n_steps: int | None = None  # sample every N steps
    sample_every_n_epochs: int | None = None  # sample every N epochs (overrides steps, as kohya)
    sample_at_first: bool = False  # sample before training
    sample_dir: Path | None = None  # where samples go (None: output_dir/sample)
    # -- not a key: which layer set each key (the config file, the command line) ------------------
    origins: tuple[tuple[str, str], ...] = dataclasses.field(
        default=(), compare=False, repr=False, metadata={"internal": True}
    )

    @property
    def token_chunks(self) -> int:
        """Number of 75-token chunks per caption (1, 2 or 3)."""
        return 1 if self.max_token_length in (None, 75) else self.max_token_length // 75


FIELDS: dict[str, dataclasses.Field[Any]] = {
    f.name: f for f in dataclasses.fields(TrainConfig) if not f.metadata.get("internal")
}
_HINTS = typing.get_type_hints(TrainConfig)
_LIST_FIELDS = {"optimizer_args", "network_args", "lr_scheduler_args"}
LIST_KEYS_HINT = "`sdprep train --list-keys` lists every key"
COMMAND_LINE = "the command line"


def known_keys() -> list[str]:
    """Every key a config may contain (fields, aliases, accepted and unsupported kohya keys)."""
    return [*FIELDS, *ALIASES, *ACCEPTED_IGNORED, *UNSUPPORTED, *_SPECIAL_KEYS, "use_8bit_adam"]


# Keys read here that are not fields: resume_from (a non-kohya key users write), epoch (the
# kohya GUI's epoch field, which kohya's scripts ignore).
_SPECIAL_KEYS = ("resume_from", "epoch")
# kohya flags with nargs="*" whose values are numbers (several values after one flag).
_NUMBER_LIST_FLAGS = {"text_encoder_lr"}


# -- reading ---------------------------------------------------------------------------------


def parse_kohya_flags(argv: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """kohya-style flags -> raw `{key: value}` (values are strings, True, or lists for nargs="*").

    Accepts `--key=value`, `--key value`, bare booleans (`--gradient_checkpointing`) and several
    values after a list flag (`--optimizer_args a=1 b=2`). A leading `accelerate launch ...
    sdxl_train_network.py` is skipped, so a whole kohya command line can be pasted.
    """
    argv = strip_launcher(list(argv))
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(
                f'unexpected argument "{tok}" in the kohya flags', "every value must follow a --name flag"
            )
        name, eq, value = tok[2:].partition("=")
        name = name.replace("-", "_")
        if name == "config":  # argparse abbreviation of --config_file that kohya users rely on
            name = "config_file"
        target = ALIASES.get(name, name)
        following: list[str] = []
        while i < len(argv) and not argv[i].startswith("--"):
            following.append(argv[i])
            i += 1
        if eq:
            values = [value, *following]
        else:
            values = following
        if target in LIST_FLAGS or target in _NUMBER_LIST_FLAGS:
            out[name] = values
            continue
        # A bare flag that is not a field (ignored, unsupported or unknown) reads as True; the key
        # check later notes or rejects it with a suggestion.
        is_bool = _HINTS.get(target) is bool or target not in FIELDS
        if len(values) > 1:
            raise ConfigError(f"--{name} takes one value, got {len(values)}: {' '.join(values)}")
        if not values:
            if not is_bool:
                raise ConfigError(f"--{name} needs a value", f"write --{name}=VALUE")
            out[name] = True
        else:
            out[name] = values[0]
    return out


def _apply_aliases(raw: dict[str, Any], source: str, notes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    written: dict[str, str] = {}  # target -> the name it was written as
    for key, value in raw.items():
        target = ALIASES.get(key, key)
        if target in out and out[target] != value:
            raise ConfigError(
                f'{source}: "{written[target]}" and "{key}" are both set, to different values',
                f'"{key}" is another name of "{target}"; keep one',
            )
        out[target], written[target] = value, key
    if "use_8bit_adam" in out and coerce(out.pop("use_8bit_adam"), bool, "use_8bit_adam"):
        if out.get("optimizer_type") not in (None, "", "AdamW8bit"):
            raise ConfigError(f"{source}: use_8bit_adam and optimizer_type are both set")
        out["optimizer_type"] = "AdamW8bit"
        notes.append('use_8bit_adam: read as optimizer_type = "AdamW8bit"')
    return out


def _check_keys(raw: dict[str, Any], source: str, notes: list[str]) -> dict[str, Any]:
    """Drop accepted-but-unused keys (with a note); reject unknown and unsupported-but-on keys."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in FIELDS or key in _SPECIAL_KEYS:
            out[key] = value
        elif key == "LoRA_type" and not _trained_lora_type(str(value)):
            raise ConfigError(
                f'{source}: LoRA_type = "{value}" is not supported',
                "sdprep trains Standard LoRA, Kohya LoCon (networks.lora) and LyCORIS (lycoris.kohya)",
            )
        elif key in ACCEPTED_IGNORED:
            notes.append(f'"{key}" accepted but not used: {ACCEPTED_IGNORED[key]}')
        elif key in UNSUPPORTED:
            off, hint = UNSUPPORTED[key]
            if value in off or (isinstance(value, str) and value.strip().lower() in ("false", "", "none")):
                notes.append(f'"{key}" accepted (off); sdprep does not implement it')
            else:
                raise ConfigError(f'{source}: "{key} = {value!r}" is not supported by sdprep', hint)
        else:
            guess = did_you_mean(key, known_keys())
            raise ConfigError(
                f'unknown key "{key}" in {source}', f"{guess} ({LIST_KEYS_HINT})" if guess else LIST_KEYS_HINT
            )
    return out


def _trained_lora_type(value: str) -> bool:
    """The GUI's LoRA_type values sdprep trains (network_module and network_args say how)."""
    value = value.strip().lower()
    return value in ("", "standard", "kohya locon") or value.startswith("lycoris/")


def _normalise(data: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Values kohya users write in several forms -> the one form TrainConfig holds."""
    data = dict(data)
    if "resolution" in data:
        data["resolution"] = parse_resolution(data["resolution"])
    for key in _LIST_FIELDS:
        if key in data:
            data[key] = split_kv_args(data[key], key)
    for key in ("learning_rate", "unet_lr", "text_encoder_lr"):
        value = data.get(key)
        if isinstance(value, (list, tuple)) and len(value) == 1:
            data[key] = value[0]
    data.update(_text_encoder_lr(data.get("text_encoder_lr"), notes))
    for key, value in list(data.items()):
        if value == "" and _HINTS.get(key) == (Path | None):
            if key == "dataset_config":
                raise ConfigError(
                    "dataset_config is empty",
                    "give the path of a kohya dataset TOML, or leave dataset_config out "
                    "(--data DIR trains from a folder of <repeats>_<token> subfolders)",
                )
            data[key] = None  # kohya reads an empty path as unset
    if isinstance(data.get("noise_offset_type"), str):
        data["noise_offset_type"] = data["noise_offset_type"].lower()
    if data.get("save_precision") in ("fp32", "float32", "no"):
        data["save_precision"] = "float"
    if data.get("optimizer_type") in (None, ""):
        data.pop("optimizer_type", None)
    name = data.get("output_name")
    if isinstance(name, str):
        for ext in (".safetensors", ".ckpt", ".pt", ".bin"):
            if name.lower().endswith(ext):
                data["output_name"] = name[: -len(ext)]
                notes.append(f'output_name "{name}": the extension is dropped (sdprep adds it)')
    for key in ("sample_every_n_steps", "sample_every_n_epochs"):
        value = data.get(key)
        if value is not None and coerce(value, int, key) <= 0:
            data[key] = None
            notes.append(f"{key} = {value}: sampling by {key.split('_n_')[1]} is off (as kohya)")
    return data


def _text_encoder_lr(value: Any, notes: list[str]) -> dict[str, Any]:
    """text_encoder_lr as kohya takes it: one rate, or a list (the GUI writes [te1, te2])."""
    if not isinstance(value, (list, tuple)):
        return {}
    if not value:
        return {"text_encoder_lr": None}  # kohya: an empty list is unset
    if len(value) > 2:
        raise ConfigError(
            f"text_encoder_lr: SDXL has two text encoders, got {len(value)} rates {list(value)}",
            "write one rate, or [rate_te1, rate_te2]",
        )
    rates = tuple(coerce(v, float, f"text_encoder_lr[{i}]") for i, v in enumerate(value))
    if rates[0] == rates[1]:
        return {"text_encoder_lr": rates[0]}
    notes.append(
        f"text_encoder_lr = [{rates[0]:g}, {rates[1]:g}]: sdprep trains text encoder 2 at {rates[1]:g}; "
        f"kohya's networks.lora uses the first rate ({rates[0]:g}) for both SDXL text encoders"
    )
    return {"text_encoder_lr": rates}


def _gui_epoch(data: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """The kohya GUI's `epoch` field. kohya's scripts have no such option and ignore it; the GUI
    has already turned it into max_train_steps. Alone (no max_train_steps / max_train_epochs), it
    is read as max_train_epochs, which is what the GUI computes its steps from."""
    if "epoch" not in data:
        return data
    data = dict(data)
    epoch = data.pop("epoch")
    length = [k for k in ("max_train_steps", "max_train_epochs") if data.get(k) not in (None, "", 0)]
    if length:
        shown = ", ".join(f"{k} = {data[k]}" for k in length)
        notes.append(
            f"epoch = {epoch} is the kohya GUI's field, which kohya's scripts ignore: the run's length "
            f"comes from {shown} (as kohya)"
        )
    else:
        data["max_train_epochs"] = epoch
        notes.append(
            f"epoch = {epoch} (kohya GUI field) read as max_train_epochs = {epoch}, as the GUI computes its "
            "steps; kohya's scripts alone would ignore it and train 1600 steps"
        )
    return data


def _resume_from(data: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """`resume_from` is not a kohya key (kohya silently ignores it): map it to what it must mean."""
    if "resume_from" not in data:
        return data
    data = dict(data)
    value = str(data.pop("resume_from"))
    path = Path(value).expanduser()
    if path.suffix.lower() in (".safetensors", ".pt", ".bin"):
        method = data.get("method") or _method_from_keys(data)
        target = {"ti": "weights", "lora": "network_weights"}.get(method or "")
        if target is None:
            raise ConfigError(
                f'resume_from = "{value}" is a weights file, but a full fine-tune cannot continue from one',
                "use pretrained_model_name_or_path for a checkpoint, or resume = STATE_DIR",
            )
        data.setdefault(target, value)
        notes.append(
            f'resume_from is not a kohya key (kohya ignores it): read as {target} = "{value}" '
            "(the weights continue training; use resume = STATE_DIR to also restore the step count)"
        )
    else:
        data.setdefault("resume", value)
        notes.append(f'resume_from is not a kohya key (kohya ignores it): read as resume = "{value}"')
    return data


def _method_from_keys(data: dict[str, Any]) -> str | None:
    if data.get("network_module"):
        return "lora"
    if data.get("token_string"):
        return "ti"
    return None


def _build(data: dict[str, Any]) -> TrainConfig:
    try:
        return from_dict(TrainConfig, data)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # pragma: no cover - from_dict wraps these
        raise ConfigError(str(exc)) from exc


def load_train_config(
    path: Path | str | None,
    *,
    overrides: dict[str, Any] | None = None,
    flags: list[str] | tuple[str, ...] | None = None,
    overrides_source: str = COMMAND_LINE,
) -> tuple[TrainConfig, list[str]]:
    """Read a training config: defaults < TOML file < kohya-style flags < `--set` overrides.

    Returns the validated config and notes for the user (keys accepted but unused, values
    normalised); raises ConfigError for unknown keys, bad values and contradictions.
    `overrides_source` names where the overrides come from in notes (the command line, or a
    project file's [train] table).
    """
    notes: list[str] = []
    raw_flags = parse_kohya_flags(flags or [])
    flag_file = raw_flags.pop("config_file", None)
    if flag_file is not None:
        flag_path = Path(flag_file if str(flag_file).endswith(".toml") else f"{flag_file}.toml")
        if path is not None and Path(path).resolve() != flag_path.resolve():
            raise ConfigError(f"two config files given: {path} and --config_file {flag_file}")
        path = flag_path
    layers: list[tuple[str, dict[str, Any]]] = []
    if path is not None:
        path = Path(path)
        layers.append((str(path), flatten_tables(load_toml(path), str(path))))
    layers.append((COMMAND_LINE, raw_flags))
    if overrides:
        layers.append((overrides_source, flatten_tables(overrides, overrides_source)))
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for source, raw in layers:
        raw = _check_keys(_apply_aliases(raw, source, notes), source, notes)
        _data_source_precedence(raw, merged, origins, source, notes)
        merged.update(raw)
        origins.update(dict.fromkeys(raw, source))
    merged = _resume_from(_gui_epoch(_normalise(merged, notes), notes), notes)
    derived = {"max_train_epochs": "epoch", "weights": "resume_from", "network_weights": "resume_from"}
    origins = {k: origins.get(k) or origins.get(derived.get(k, "resume_from"), COMMAND_LINE) for k in merged}
    cfg = dataclasses.replace(_build(merged), origins=tuple(origins.items()))
    cfg, more = validate(cfg)
    return _dims_from_weights(cfg, notes + more)


def _dims_from_weights(cfg: TrainConfig, notes: list[str]) -> tuple[TrainConfig, list[str]]:
    """kohya's dim_from_weights: the LoRA's ranks and alphas come from network_weights."""
    if not cfg.dim_from_weights or detect_method(cfg) != "lora":
        return cfg, notes
    if not cfg.network_weights:
        raise ConfigError(
            "dim_from_weights needs network_weights (the LoRA whose ranks the new run takes)",
            "set network_weights = PATH, or remove dim_from_weights",
        )
    from sdprep.train.methods.weights_dims import dims_from_weights

    changes, more = dims_from_weights(cfg.network_weights)
    return dataclasses.replace(cfg, **changes), notes + more


def _data_source_precedence(
    layer: dict[str, Any], merged: dict[str, Any], origins: dict[str, str], source: str, notes: list[str]
) -> None:
    """A later layer that names a folder (train_data_dir / in_json) replaces an earlier layer's
    dataset_config: the command line wins over the config file, for where the images come from
    as for every other key. (Within one layer, kohya's rule stands: dataset_config wins.)"""
    names_folder = any(layer.get(k) not in (None, "") for k in ("train_data_dir", "in_json"))
    if names_folder and "dataset_config" not in layer and merged.get("dataset_config") not in (None, ""):
        where = origins.get("dataset_config", "the config")
        notes.append(
            f'train_data_dir from {source} replaces dataset_config = "{merged.pop("dataset_config")}" '
            f"from {where} (command line > config > dataset TOML > defaults)"
        )


# -- method and validation -------------------------------------------------------------------


def detect_method(cfg: TrainConfig, override: str | None = None) -> Method:
    """Which of kohya's three scripts this config is for: network_module -> lora, token_string ->
    ti, neither -> finetune. `override` (or `cfg.method`) wins."""
    chosen = override or cfg.method
    if chosen is not None:
        if chosen not in _METHOD:
            raise unknown_choice("method", chosen, METHODS)
        return _METHOD[chosen]
    if cfg.network_module and cfg.token_string:
        raise ConfigError(
            "both network_module (LoRA) and token_string (textual inversion) are set",
            "remove one, or choose with --method lora|ti",
        )
    if cfg.network_module:
        return "lora"
    if cfg.token_string:
        return "ti"
    return "finetune"


def _err(message: str, hint: str | None = None) -> ConfigError:
    return ConfigError(message, hint)


def _check_ranges(cfg: TrainConfig) -> None:
    if cfg.learning_rate <= 0:
        raise _err(
            f"learning_rate must be > 0, got {cfg.learning_rate}", "typical: 1e-4 LoRA, 5e-6 fine-tune"
        )
    for key in ("unet_lr", "text_encoder_lr", "learning_rate_te1", "learning_rate_te2"):
        value = getattr(cfg, key)
        for rate in value if isinstance(value, tuple) else (value,):
            if rate is not None and rate < 0:
                raise _err(f"{key} must be >= 0 (0 freezes that part), got {rate}")
    positive = ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "dataset_repeats")
    for key in positive:
        if getattr(cfg, key) < 1:
            raise _err(f"{key} must be at least 1, got {getattr(cfg, key)}")
    optional_positive = (
        "max_train_epochs",
        "save_every_n_epochs",
        "save_every_n_steps",
        "save_last_n_epochs",
        "save_last_n_steps",
        "save_last_n_epochs_state",
        "save_last_n_steps_state",
        "initial_epoch",
        "multires_noise_iterations",
        "validate_every_n_steps",
        "validate_every_n_epochs",
        "max_validation_steps",
    )
    for key in optional_positive:
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise _err(f"{key} must be at least 1 (or unset), got {value}")
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate", "unmasked_weight", "network_dropout"):
        value = getattr(cfg, key)
        if value is not None and not 0.0 <= value <= 1.0:
            raise _err(f"{key} must be between 0 and 1, got {value}")
    if cfg.scale_weight_norms is not None and cfg.scale_weight_norms < 0:
        raise _err(f"scale_weight_norms must be > 0 (or unset / 0 for off), got {cfg.scale_weight_norms}")
    name = cfg.output_name
    if name is not None and (not name.strip() or "/" in name or "\\" in name or name.strip(".") == ""):
        raise _err(
            f"output_name must be a file name, got {name!r}",
            "put folders in output_dir; output_name is the file's stem (e.g. mytoken_v1)",
        )
    if cfg.max_grad_norm < 0:
        raise _err(f"max_grad_norm must be >= 0 (0 turns clipping off), got {cfg.max_grad_norm}")
    if cfg.initial_step is not None and cfg.initial_step < 0:
        raise _err(f"initial_step must be >= 0, got {cfg.initial_step}")
    if cfg.lr_warmup_steps < 0:
        raise _err(f"lr_warmup_steps must be >= 0, got {cfg.lr_warmup_steps}")
    if cfg.lr_decay_steps < 0:
        raise _err(f"lr_decay_steps must be >= 0, got {cfg.lr_decay_steps}")
    ratio = cfg.lr_scheduler_min_lr_ratio
    if ratio is not None and not 0.0 <= ratio <= 1.0:
        raise _err(
            f"lr_scheduler_min_lr_ratio must be between 0 and 1, got {ratio}", "e.g. 0.1: the lr ends at 10%"
        )
    if cfg.lr_scheduler_timescale is not None and cfg.lr_scheduler_timescale < 1:
        raise _err(f"lr_scheduler_timescale must be at least 1, got {cfg.lr_scheduler_timescale}")
    if cfg.lr_scheduler_type and cfg.lr_warmup_steps:
        raise _err(
            f"lr_scheduler_type {cfg.lr_scheduler_type} takes no warmup, but lr_warmup_steps = {cfg.lr_warmup_steps}",
            "set lr_warmup_steps = 0 (kohya stops here too), or use lr_scheduler with a warmup",
        )
    if cfg.huber_c <= 0 or (cfg.huber_schedule == "exponential" and cfg.huber_c > 1):
        raise _err(f"huber_c must be in (0, 1], got {cfg.huber_c}")
    if cfg.min_snr_gamma is not None and cfg.min_snr_gamma <= 0:
        raise _err(f"min_snr_gamma must be > 0 (or unset), got {cfg.min_snr_gamma}", "5 is the usual value")
    if not 0.0 < cfg.ema_decay < 1.0:
        raise _err(f"ema_decay must be between 0 and 1, got {cfg.ema_decay}")
    lo = 0 if cfg.min_timestep is None else cfg.min_timestep
    hi = 1000 if cfg.max_timestep is None else cfg.max_timestep
    if not 0 <= lo < hi <= 1000:
        raise _err(
            f"timesteps must satisfy 0 <= min_timestep < max_timestep <= 1000, got {lo} and {hi}",
            "max_timestep is exclusive; the defaults are 0 and 1000",
        )


def _check_sizes(cfg: TrainConfig, notes: list[str]) -> None:
    w, h = cfg.resolution
    if w % 8 or h % 8 or min(w, h) < 64:
        raise _err(
            f"resolution {w},{h}: both sides must be multiples of 8 and at least 64", 'e.g. "1024,1024"'
        )
    if (w % 32 or h % 32) and not cfg.enable_bucket:
        notes.append(f"resolution {w},{h} is not a multiple of 32; SDXL works best with multiples of 32")
    if cfg.bucket_reso_steps % 32:
        raise _err(
            f"bucket_reso_steps = {cfg.bucket_reso_steps}: SDXL needs a multiple of 32",
            "use 32 or 64 (the U-Net halves the latent twice)",
        )
    if cfg.enable_bucket:
        if cfg.min_bucket_reso % 8 or cfg.max_bucket_reso % 8:
            raise _err("min_bucket_reso and max_bucket_reso must be multiples of 8")
        if cfg.min_bucket_reso > cfg.max_bucket_reso:
            raise _err(
                f"min_bucket_reso {cfg.min_bucket_reso} is larger than max_bucket_reso {cfg.max_bucket_reso}"
            )
        # with a dataset TOML, an unset resolution is only a fallback: each dataset is checked itself
        fallback = cfg.dataset_config is not None and origin_of(cfg, "resolution") is None
        if max(w, h) > cfg.max_bucket_reso and not fallback:
            raise _err(
                f"max_bucket_reso {cfg.max_bucket_reso} is smaller than the resolution {w},{h}",
                f"set max_bucket_reso to at least {max(w, h)}",
            )
    if cfg.max_token_length not in (None, 75, 150, 225):
        raise _err(f"max_token_length must be 75, 150 or 225, got {cfg.max_token_length}")
    if cfg.clip_skip is not None:
        if cfg.clip_skip < 1:
            raise _err(f"clip_skip must be at least 1, got {cfg.clip_skip}")
        if cfg.clip_skip >= 2:
            notes.append(
                f"clip_skip = {cfg.clip_skip}: kohya's SDXL scripts ignore clip_skip; sdprep uses the layer "
                f"{cfg.clip_skip - 1} below SDXL's usual penultimate one (as diffusers clip_skip={cfg.clip_skip - 1})"
            )


def _check_choices(cfg: TrainConfig) -> None:
    from sdprep.train.sample.prompts import SAMPLERS

    if cfg.lr_scheduler not in LR_SCHEDULERS:
        raise unknown_choice("lr_scheduler", cfg.lr_scheduler, LR_SCHEDULERS)
    _check_adafactor_schedule(cfg)
    if cfg.resize_interpolation is not None and cfg.resize_interpolation not in INTERPOLATIONS:
        raise unknown_choice("resize_interpolation", cfg.resize_interpolation, INTERPOLATIONS)
    opt = cfg.optimizer_type
    if "." not in opt and opt.lower() not in {o.lower() for o in OPTIMIZERS}:
        err = unknown_choice("optimizer_type", opt, OPTIMIZERS)
        raise ConfigError(err.message, f"{err.hint} (or a module.Class path such as torch.optim.SGD)")
    if cfg.sample_sampler.lower() not in SAMPLERS:
        raise unknown_choice("sample_sampler", cfg.sample_sampler, SAMPLERS)
    if cfg.network_module is not None and cfg.network_module not in NETWORK_MODULES:
        raise ConfigError(
            f'network_module "{cfg.network_module}" is not supported',
            'sdprep trains LoRA (network_module = "networks.lora") and LyCORIS ("lycoris.kohya")',
        )
    if cfg.network_module == "lycoris.kohya":
        from sdprep.train.methods.lycoris import lycoris_args

        lycoris_args(cfg.network_args)  # LyCORIS's own options
        return
    for name, value in parse_kv_args(cfg.network_args).items():
        if name in ("algo", "preset"):
            raise ConfigError(
                f"network_args: {name}={value} is a LyCORIS option",
                'LyCORIS networks need network_module = "lycoris.kohya"; for networks.lora remove it',
            )
        if name not in NETWORK_ARGS:
            hint = did_you_mean(name, NETWORK_ARGS)
            raise ConfigError(
                f'network_args "{name}" is not supported',
                (hint + " " if hint else "") + "supported: " + ", ".join(NETWORK_ARGS),
            )


def _check_adafactor_schedule(cfg: TrainConfig) -> None:
    """kohya's `adafactor` schedule reads Adafactor's own relative-step lr: any other optimizer (or
    Adafactor with relative_step=False) fails there with an assertion or an IndexError."""
    if cfg.lr_scheduler != "adafactor" or cfg.lr_scheduler_type:
        return
    if cfg.optimizer_type.lower() != "adafactor":
        raise ConfigError(
            f'lr_scheduler = "adafactor" needs optimizer_type = "Adafactor", got "{cfg.optimizer_type}"',
            "the adafactor schedule is Adafactor's own learning rate; with this optimizer use e.g. "
            'lr_scheduler = "constant_with_warmup" (kohya stops with an assertion here)',
        )
    if parse_kv_args(cfg.optimizer_args).get("relative_step", True) is False:
        raise ConfigError(
            'lr_scheduler = "adafactor" needs Adafactor\'s relative_step, but optimizer_args sets relative_step=False',
            'use lr_scheduler = "constant_with_warmup" for a fixed lr, or drop relative_step=False',
        )


def _notes_on_silent_settings(cfg: TrainConfig, notes: list[str]) -> None:
    """Settings that would otherwise change the result without a word."""
    if cfg.alpha_mask and not cfg.masked_loss:
        notes.append(
            "alpha_mask without masked_loss: each image's alpha channel weights its loss (as kohya, "
            "which applies alpha masks whether or not masked_loss is set)"
        )
    if cfg.log_with in ("wandb", "all") and not cfg.logging_dir:
        notes.append(
            f'log_with = "{cfg.log_with}" without logging_dir: nothing is logged (sdprep writes TensorBoard '
            "logs, not wandb; set logging_dir = FOLDER to get them)"
        )


def _check_combinations(cfg: TrainConfig, method: str, notes: list[str]) -> TrainConfig:
    changes: dict[str, Any] = {}
    if cfg.full_bf16 and cfg.mixed_precision != "bf16":
        raise _err('full_bf16 needs mixed_precision = "bf16"')
    if cfg.full_fp16 and cfg.mixed_precision != "fp16":
        raise _err('full_fp16 needs mixed_precision = "fp16"')
    if cfg.full_bf16 and cfg.full_fp16:
        raise _err("full_bf16 and full_fp16 are both set; choose one")
    if cfg.adaptive_noise_scale is not None and cfg.noise_offset is None:
        raise _err("adaptive_noise_scale needs noise_offset", "set noise_offset (e.g. 0.0357) or remove it")
    if cfg.cache_latents_to_disk and not cfg.cache_latents:
        changes["cache_latents"] = True
    if cfg.cache_text_encoder_outputs_to_disk and not cfg.cache_text_encoder_outputs:
        changes["cache_text_encoder_outputs"] = True
    caching = cfg.cache_latents or cfg.cache_latents_to_disk
    if caching and (cfg.color_aug or cfg.random_crop):
        raise _err(
            "cached latents cannot use color_aug or random_crop (the cache holds one version per image)",
            "turn off cache_latents, or the augmentation (flip_aug works with caching)",
        )
    if cfg.cache_text_encoder_outputs or cfg.cache_text_encoder_outputs_to_disk:
        if (
            method == "ti"
            or (method == "lora" and not cfg.network_train_unet_only)
            or (method == "finetune" and cfg.train_text_encoder)
        ):
            raise _err(
                "cache_text_encoder_outputs needs frozen text encoders, but this run trains them",
                "turn off cache_text_encoder_outputs, or train the U-Net only",
            )
        moving = [
            k
            for k in (
                "shuffle_caption",
                "caption_dropout_rate",
                "caption_tag_dropout_rate",
                "caption_dropout_every_n_epochs",
            )
            if getattr(cfg, k)
        ]
        if moving or cfg.enable_wildcard:
            raise _err(
                f"cache_text_encoder_outputs needs fixed captions, but {', '.join(moving) or 'enable_wildcard'} changes them",
                "turn off cache_text_encoder_outputs or the caption augmentation",
            )
    if method == "ti":
        if not cfg.token_string:
            raise _err("textual inversion needs token_string", 'e.g. token_string = "mytoken"')
        if cfg.num_vectors_per_token < 1:
            raise _err(f"num_vectors_per_token must be at least 1, got {cfg.num_vectors_per_token}")
    if method == "lora":
        if cfg.network_dim < 1 or cfg.network_alpha <= 0:
            raise _err(
                f"network_dim must be >= 1 and network_alpha > 0, got {cfg.network_dim} and {cfg.network_alpha}"
            )
        net = parse_kv_args(cfg.network_args)
        for key in NETWORK_ARG_FIELDS:
            if key in net:
                value = coerce(net[key], int if key == "conv_dim" else float, f"network_args {key}")
                if getattr(cfg, key) is not None and getattr(cfg, key) != value:
                    raise _err(f"{key} is set twice (network_args and {key}) with different values")
                changes[key] = value
        _check_network_args(cfg, changes)
    if cfg.fused_backward_pass:
        from sdprep.train.loop.fused import check_fused

        check_fused(cfg.optimizer_type, cfg.gradient_accumulation_steps, method, cfg.mixed_precision, 1)
    if cfg.noise_offset_type == "original" and cfg.multires_noise_iterations:
        notes.append('noise_offset_type = "original": multires noise is off (as the kohya GUI)')
        changes["multires_noise_iterations"] = None
    if cfg.noise_offset_type == "multires" and cfg.noise_offset:
        notes.append('noise_offset_type = "multires": noise_offset is off (as the kohya GUI)')
        changes["noise_offset"] = None
        changes["adaptive_noise_scale"] = None
    if cfg.save_model_as in ("ckpt", "pt"):
        notes.append(
            f'save_model_as = "{cfg.save_model_as}": sdprep writes safetensors instead (no pickle files)'
        )
        changes["save_model_as"] = "safetensors"
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _check_network_args(cfg: TrainConfig, changes: dict[str, Any]) -> None:
    """networks.lora's dropouts, LoRA+ ratios and block settings, checked before any model loads."""
    from sdprep.train.methods.lora_args import parse_blocks

    def final(key: str) -> Any:
        return changes.get(key, getattr(cfg, key))

    for key in ("rank_dropout", "module_dropout"):
        if final(key) is not None and not 0.0 <= final(key) < 1.0:
            raise _err(f"{key} must be at least 0 and below 1, got {final(key)}")
    for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        if final(key) is not None and final(key) < 0:
            raise _err(f"{key} must be > 0 (or 0 / unset for no LoRA+), got {final(key)}", "16 is usual")
    raw = dict(item.split("=", 1) for item in cfg.network_args)
    parse_blocks(raw, cfg.network_dim, cfg.network_alpha, final("conv_dim"), final("conv_alpha"))


def validate(cfg: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """Check values and combinations; returns the config with implied settings applied and notes."""
    notes: list[str] = []
    method = detect_method(cfg)
    _check_ranges(cfg)
    _check_sizes(cfg, notes)
    _check_choices(cfg)
    cfg = _check_combinations(cfg, method, notes)
    _notes_on_silent_settings(cfg, notes)
    if cfg.max_train_epochs and cfg.max_train_steps != TrainConfig.max_train_steps:
        notes.append(
            f"max_train_epochs = {cfg.max_train_epochs} overrides max_train_steps = {cfg.max_train_steps}"
            " (as in kohya); unset max_train_epochs / epoch to train by steps"
        )
    return cfg, notes


# -- helpers for the trainer -----------------------------------------------------------------


def optimizer_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """optimizer_args as typed keyword arguments (`betas=0.9,0.99` -> (0.9, 0.99))."""
    return parse_kv_args(cfg.optimizer_args)
