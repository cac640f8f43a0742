"""TrainConfig: kohya TOMLs and flags from the user seeds load as written; errors name the fix."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from seed_configs import SEED_000_TI, SEED_000_TI_RESUME, SEED_001_FINETUNE, SEED_001_LORA, SEED_003_LORA

from sdprep.errors import ConfigError
from sdprep.train.config.kohya import ACCEPTED_IGNORED, parse_kv_args, split_kv_args
from sdprep.train.config.schema import (
    FIELDS,
    TrainConfig,
    detect_method,
    known_keys,
    load_train_config,
    optimizer_kwargs,
    origin_of,
    parse_kohya_flags,
)

MODEL = {"pretrained_model_name_or_path": "/models/tiny"}

# Every key kohya-formats.md lists for the training TOML (reference/kohya-formats.md).
DOCUMENTED_KEYS = """
pretrained_model_name_or_path train_data_dir reg_data_dir dataset_config output_dir output_name logging_dir
resolution enable_bucket min_bucket_reso max_bucket_reso bucket_reso_steps bucket_no_upscale caption_extension
shuffle_caption keep_tokens max_token_length clip_skip flip_aug cache_latents cache_latents_to_disk
cache_text_encoder_outputs cache_text_encoder_outputs_to_disk train_batch_size gradient_accumulation_steps
gradient_checkpointing mixed_precision full_bf16 save_precision no_half_vae learning_rate unet_lr text_encoder_lr
optimizer_type optimizer_args lr_scheduler lr_warmup_steps max_train_steps max_train_epochs epoch seed
min_snr_gamma noise_offset noise_offset_type multires_noise_iterations multires_noise_discount loss_type huber_c
huber_schedule min_timestep max_timestep prior_loss_weight masked_loss alpha_mask network_module network_dim
network_alpha network_args network_train_unet_only network_weights token_string init_word num_vectors_per_token
weights save_every_n_epochs save_every_n_steps save_state resume save_model_as sample_prompts sample_sampler
sample_every_n_steps sample_every_n_epochs sample_at_first log_with sdpa xformers mem_eff_attn lowram
dynamo_backend max_data_loader_n_workers
""".split()  # noqa: SIM905


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str, **set_values) -> tuple[TrainConfig, list[str]]:
    return load_train_config(write(tmp_path, text), overrides={**MODEL, **set_values})


# -- the seeds -------------------------------------------------------------------------------


def test_seed_000_textual_inversion_config_loads(tmp_path):
    cfg, notes = load(tmp_path, SEED_000_TI)
    assert detect_method(cfg) == "ti"
    assert cfg.pretrained_model_name_or_path == "/models/tiny"
    assert cfg.resolution == (1024, 1536)
    # kohya has no `epoch` option (a kohya GUI field): it trains max_train_steps = 5200, and so does sdprep
    assert cfg.max_train_epochs is None and cfg.max_train_steps == 5200
    assert (
        "epoch = 5 is the kohya GUI's field, which kohya's scripts ignore: the run's length comes from "
        "max_train_steps = 5200 (as kohya)" in notes
    )
    assert cfg.token_string == "yourtoken" and cfg.init_word == "woman"
    assert cfg.output_name == "yourtoken_final"
    assert cfg.sample_sampler == "k_dpm_2" and cfg.noise_offset_type == "original"
    assert cfg.prior_loss_weight == 0.0 and cfg.max_token_length == 75
    assert cfg.train_data_dir == Path("kohya_ss/dataset/images")
    assert (
        '"mem_eff_attn" accepted but not used: sdprep always uses PyTorch scaled-dot-product attention (SDPA)'
        in notes
    )
    assert any(n.startswith('"sdpa" accepted') for n in notes)
    assert any(n.startswith('"dynamo_backend" accepted') for n in notes)
    assert any(n.startswith('"sample_batch_size" accepted') for n in notes)
    assert 'output_name "yourtoken_final.safetensors": the extension is dropped (sdprep adds it)' in notes


def test_seed_000_resume_from_becomes_the_starting_embedding(tmp_path):
    cfg, notes = load(tmp_path, SEED_000_TI_RESUME)
    assert detect_method(cfg) == "ti"
    assert cfg.weights == Path("/home/user/kohya_ss/dataset/outputs/yourtoken_final-000002.safetensors")
    assert cfg.resume is None
    assert any(
        n.startswith("resume_from is not a kohya key (kohya ignores it): read as weights") for n in notes
    )


def test_resume_from_a_folder_is_resume(tmp_path):
    cfg, notes = load(tmp_path, 'resume_from = "out/last-state"\n')
    assert cfg.resume == "out/last-state"
    assert notes == ['resume_from is not a kohya key (kohya ignores it): read as resume = "out/last-state"']


def test_seed_003_lora_config_loads_through_its_train_script_flags(tmp_path):
    path = write(tmp_path, SEED_003_LORA)
    # train.sh: sdxl_train_network.py --config "$SCRIPT_DIR/config.toml" --save_state --network_weights "$latest_ckpt"
    argv = shlex.split(f'python sd-scripts/sdxl_train_network.py --config "{path}" --save_state')
    cfg, notes = load_train_config(None, flags=argv, overrides=MODEL)
    assert detect_method(cfg) == "lora"
    assert (cfg.network_dim, cfg.network_alpha, cfg.network_train_unet_only) == (32, 32.0, True)
    assert cfg.save_state is True
    assert cfg.resolution == (1024, 1024) and cfg.max_token_length == 225
    assert cfg.cache_text_encoder_outputs and cfg.cache_latents_to_disk and cfg.flip_aug
    assert cfg.mixed_precision == "fp16" and cfg.save_precision == "fp16"
    for key in ("LoRA_type", "max_resolution", "lowvram", "xformers"):
        assert any(n.startswith(f'"{key}" accepted but not used') for n in notes), key

    cfg2, _ = load_train_config(
        path, flags=["--network_weights", "data/output/nazuna.safetensors"], overrides=MODEL
    )
    assert cfg2.network_weights == Path("data/output/nazuna.safetensors")


def test_seed_001_finetune_command_line_loads():
    cfg, notes = load_train_config(None, flags=shlex.split(SEED_001_FINETUNE), overrides=MODEL)
    assert detect_method(cfg) == "finetune"
    assert cfg.optimizer_type == "Adafactor"
    assert cfg.optimizer_args == ("scale_parameter=False", "relative_step=False", "warmup_init=False")
    assert optimizer_kwargs(cfg) == {"scale_parameter": False, "relative_step": False, "warmup_init": False}
    assert cfg.learning_rate == 5e-6 and cfg.train_batch_size == 4
    assert cfg.gradient_checkpointing and cfg.no_half_vae and cfg.save_state and cfg.full_bf16
    assert cfg.cache_text_encoder_outputs and cfg.cache_latents  # implied by the *_to_disk flags, as kohya
    assert (cfg.noise_offset, cfg.adaptive_noise_scale, cfg.min_snr_gamma) == (0.0357, 0.00357, 5.0)
    assert cfg.max_token_length == 225 and cfg.bucket_reso_steps == 32 and cfg.max_bucket_reso == 4096
    assert cfg.dataset_config == Path("zhuoyueaiXL.toml")
    assert notes == [
        '"xformers" accepted but not used: sdprep always uses PyTorch scaled-dot-product attention (SDPA)'
    ]


def test_seed_001_lora_command_line_loads():
    cfg, notes = load_train_config(None, flags=shlex.split(SEED_001_LORA), overrides=MODEL)
    assert detect_method(cfg) == "lora"
    assert cfg.masked_loss and cfg.network_module == "networks.lora" and cfg.train_batch_size == 3
    assert cfg.learning_rate == 1e-6 and cfg.sample_every_n_steps == 400
    assert notes == []


def test_every_documented_kohya_key_is_implemented_or_accepted():
    known = set(known_keys())
    missing = [k for k in DOCUMENTED_KEYS if k not in known]
    assert missing == []
    for key in ("xformers", "sdpa", "mem_eff_attn", "lowram", "lowvram", "dynamo_backend", "LoRA_type"):
        assert key in ACCEPTED_IGNORED and key not in FIELDS


# -- errors ----------------------------------------------------------------------------------


def test_typo_in_file_fails_with_suggestion(tmp_path):
    path = write(tmp_path, "learning_rat = 1e-4\n")
    with pytest.raises(ConfigError) as exc:
        load_train_config(path)
    assert exc.value.message == f'unknown key "learning_rat" in {path}'
    assert exc.value.hint == 'did you mean "learning_rate"? (`sdprep train --list-keys` lists every key)'


def test_typo_in_flags_fails_with_suggestion():
    with pytest.raises(ConfigError) as exc:
        load_train_config(None, flags=["--gradient_checkpoint"])
    assert exc.value.message == 'unknown key "gradient_checkpoint" in the command line'
    assert (
        exc.value.hint
        == 'did you mean "gradient_checkpointing"? (`sdprep train --list-keys` lists every key)'
    )


def test_typo_in_set_fails_with_suggestion():
    with pytest.raises(ConfigError) as exc:
        load_train_config(None, overrides={"netwrok_dim": 8})
    assert 'did you mean "network_dim"?' in str(exc.value)


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train_batch_size: expected an integer, got 'four'"):
        load(tmp_path, 'train_batch_size = "four"\n')


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("learning_rate = 0\n", "learning_rate must be > 0, got 0.0"),
        ("bucket_reso_steps = 48\n", "bucket_reso_steps = 48: SDXL needs a multiple of 32"),
        (
            'resolution = "1020,1024"\n',
            "resolution 1020,1024: both sides must be multiples of 8 and at least 64",
        ),
        ("max_token_length = 100\n", "max_token_length must be 75, 150 or 225, got 100"),
        ('sample_sampler = "eulr_a"\n', 'unknown sample_sampler "eulr_a"'),
        ('lr_scheduler = "cosine_restarts"\n', 'unknown lr_scheduler "cosine_restarts"'),
        ('optimizer_type = "AdamW9bit"\n', 'unknown optimizer_type "AdamW9bit"'),
        ("full_bf16 = true\n", 'full_bf16 needs mixed_precision = "bf16"'),
        ("adaptive_noise_scale = 0.01\n", "adaptive_noise_scale needs noise_offset"),
        ('network_module = "networks.dylora"\n', 'network_module "networks.dylora" is not supported'),
        (
            'network_module = "networks.lora"\nnetwork_args = ["rank_dropot=0.1"]\n',
            'network_args "rank_dropot" is not supported',
        ),
        (
            'network_module = "networks.lora"\nnetwork_args = ["rank_dropout=1"]\n',
            "rank_dropout must be at least 0 and below 1, got 1.0",
        ),
        (
            'network_module = "networks.lora"\nnetwork_args = ["block_dims=4,4,4"]\n',
            "network_args block_dims has 3 values, SDXL needs 23",
        ),
        (
            'network_module = "networks.lora"\nnetwork_args = ["down_lr_weight=cosin"]\n',
            'unknown lr weight preset "cosin"',
        ),
        (
            'network_module = "networks.lora"\nnetwork_args = ["algo=locon"]\n',
            "network_args: algo=locon is a LyCORIS option",
        ),
        ("v2 = true\n", '"v2 = True" is not supported by sdprep'),
        ('LoRA_type = "Kohya DyLoRA"\n', 'LoRA_type = "Kohya DyLoRA" is not supported'),
        (
            "max_bucket_reso = 1024\nresolution = 1536\n",
            "max_bucket_reso 1024 is smaller than the resolution 1536,1536",
        ),
        (
            "min_timestep = 500\nmax_timestep = 400\n",
            "timesteps must satisfy 0 <= min_timestep < max_timestep <= 1000",
        ),
        ("cache_latents = true\nrandom_crop = true\n", "cached latents cannot use color_aug or random_crop"),
        (
            'token_string = "tok"\ncache_text_encoder_outputs = true\n',
            "cache_text_encoder_outputs needs frozen text encoders",
        ),
        (
            "cache_text_encoder_outputs = true\nshuffle_caption = true\n",
            "cache_text_encoder_outputs needs fixed captions",
        ),
        (
            'network_module = "networks.lora"\ntoken_string = "tok"\n',
            "both network_module (LoRA) and token_string",
        ),
        ("[[datasets]]\nresolution = 1024\n", '"[[datasets]]" belongs in a dataset TOML'),
        ("[a]\n[a.b]\nc = 1\n", '"a.b" is nested two tables deep'),
    ],
)
def test_bad_values_fail_with_clear_messages(tmp_path, text, message):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, text)
    assert message in exc.value.message


def test_unknown_choice_lists_valid_values(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, 'sample_sampler = "eulr_a"\n')
    assert exc.value.hint.startswith('did you mean "euler_a"? valid: ddim, dpm_2, dpm_2_a')


def test_unsupported_key_at_its_off_value_is_accepted(tmp_path):
    cfg, notes = load(tmp_path, "v2 = false\nfused_optimizer_groups = 0\n")
    assert notes == [
        '"v2" accepted (off); sdprep does not implement it',
        '"fused_optimizer_groups" accepted (off); sdprep does not implement it',
    ]


# -- forms users write -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1024", (1024, 1024)),
        ('"1024,1536"', (1024, 1536)),
        ("[832, 1216]", (832, 1216)),
        ('"896x1152"', (896, 1152)),
    ],
)
def test_resolution_forms(tmp_path, value, expected):
    cfg, _ = load(tmp_path, f"resolution = {value}\n")
    assert cfg.resolution == expected


def test_resolution_from_flag_and_set():
    cfg, _ = load_train_config(None, flags=["--resolution", "768,1024"])
    assert cfg.resolution == (768, 1024)
    cfg, _ = load_train_config(None, overrides={"resolution": 1024})
    assert cfg.resolution == (1024, 1024)


@pytest.mark.parametrize(
    "value",
    [
        '["scale_parameter=False", "relative_step=False", "warmup_init=False"]',
        '"scale_parameter=False relative_step=False warmup_init=False"',
        '"scale_parameter=False,relative_step=False,warmup_init=False"',
        '"scale_parameter=False, relative_step=False, warmup_init=False"',
    ],
)
def test_optimizer_args_as_list_or_one_string(tmp_path, value):
    cfg, _ = load(tmp_path, f'optimizer_type = "Adafactor"\noptimizer_args = {value}\n')
    assert cfg.optimizer_args == ("scale_parameter=False", "relative_step=False", "warmup_init=False")


def test_optimizer_args_comma_inside_a_value_stays_together(tmp_path):
    cfg, _ = load(tmp_path, 'optimizer_args = "betas=0.9,0.99 weight_decay=0.01"\n')
    assert cfg.optimizer_args == ("betas=0.9,0.99", "weight_decay=0.01")
    assert optimizer_kwargs(cfg) == {"betas": (0.9, 0.99), "weight_decay": 0.01}
    cfg, _ = load(tmp_path, 'optimizer_args = ["betas=0.9,0.99", "weight_decay=0.01"]\n')
    assert optimizer_kwargs(cfg) == {"betas": (0.9, 0.99), "weight_decay": 0.01}


def test_optimizer_args_item_without_equals_fails(tmp_path):
    with pytest.raises(ConfigError, match='optimizer_args: "relative_step" is not of the form name=value'):
        load(tmp_path, 'optimizer_args = ["relative_step"]\n')


def test_parse_kv_args_types():
    assert parse_kv_args(["d_coef=1", "decouple=True", "eps=1e-8", "mode=fast", "x=None"]) == {
        "d_coef": 1,
        "decouple": True,
        "eps": 1e-8,
        "mode": "fast",
        "x": None,
    }
    assert split_kv_args("a=1, b=(1,2) c=x", "k") == ["a=1", "b=(1,2)", "c=x"]


def test_parse_kohya_flags_forms():
    flags = parse_kohya_flags(
        [
            "--learning_rate=5e-6",
            "--train_batch_size",
            "4",
            "--gradient_checkpointing",
            "--optimizer_args",
            "a=1",
            "b=2",
            "--no_half_vae",
            "--xformers",
            "--cache_latents=false",
        ]
    )
    assert flags == {
        "learning_rate": "5e-6",
        "train_batch_size": "4",
        "gradient_checkpointing": True,
        "optimizer_args": ["a=1", "b=2"],
        "no_half_vae": True,
        "xformers": True,
        "cache_latents": "false",
    }


def test_flag_errors():
    with pytest.raises(ConfigError, match="--learning_rate needs a value"):
        parse_kohya_flags(["--learning_rate", "--seed=1"])
    with pytest.raises(ConfigError, match="--seed takes one value, got 3: 1 2 stray"):
        parse_kohya_flags(["--seed=1", "2", "stray"])
    with pytest.raises(ConfigError, match='unexpected argument "stray"'):
        parse_kohya_flags(["stray", "--seed=1"])


def test_layering_defaults_file_flags_set(tmp_path):
    path = write(tmp_path, "learning_rate = 1e-4\ntrain_batch_size = 2\nseed = 1\n")
    cfg, _ = load_train_config(path, flags=["--train_batch_size=4", "--seed=2"], overrides={"seed": 3})
    assert (cfg.learning_rate, cfg.train_batch_size, cfg.seed) == (1e-4, 4, 3)
    assert cfg.max_train_steps == 1600  # kohya default


def test_one_level_of_tables_is_flattened(tmp_path):
    cfg, _ = load(tmp_path, '[model]\nnetwork_module = "networks.lora"\n[training]\nlearning_rate = 1e-4\n')
    assert detect_method(cfg) == "lora" and cfg.learning_rate == 1e-4


def test_method_detection_and_override(tmp_path):
    assert detect_method(TrainConfig()) == "finetune"
    assert detect_method(TrainConfig(network_module="networks.lora")) == "lora"
    assert detect_method(TrainConfig(token_string="tok")) == "ti"
    assert detect_method(TrainConfig(network_module="networks.lora"), override="finetune") == "finetune"
    cfg, _ = load(tmp_path, 'network_module = "networks.lora"\ntoken_string = "tok"\nmethod = "ti"\n')
    assert detect_method(cfg) == "ti"
    with pytest.raises(ConfigError, match='unknown method "lorra"'):
        detect_method(TrainConfig(), override="lorra")


def test_network_args_conv_dim_fill_the_fields(tmp_path):
    cfg, _ = load(tmp_path, 'network_module = "networks.lora"\nnetwork_args = "conv_dim=4 conv_alpha=2"\n')
    assert (cfg.conv_dim, cfg.conv_alpha) == (4, 2.0)


def test_noise_offset_type_picks_one(tmp_path):
    cfg, notes = load(
        tmp_path, 'noise_offset_type = "Original"\nnoise_offset = 0.05\nmultires_noise_iterations = 6\n'
    )
    assert cfg.noise_offset == 0.05 and cfg.multires_noise_iterations is None
    assert notes == ['noise_offset_type = "original": multires noise is off (as the kohya GUI)']


def test_use_8bit_adam_and_epoch_aliases(tmp_path):
    cfg, notes = load(tmp_path, 'use_8bit_adam = true\nepoch = 3\ncaption_extention = ".cap"\n')
    assert cfg.optimizer_type == "AdamW8bit" and cfg.max_train_epochs == 3 and cfg.caption_extension == ".cap"
    assert notes == [
        'use_8bit_adam: read as optimizer_type = "AdamW8bit"',
        "epoch = 3 (kohya GUI field) read as max_train_epochs = 3, as the GUI computes its steps; kohya's "
        "scripts alone would ignore it and train 1600 steps",
    ]
    with pytest.raises(ConfigError) as exc:  # both spellings, different values: named as written
        load(tmp_path, 'caption_extension = ".txt"\ncaption_extention = ".cap"\n')
    assert exc.value.message.endswith(
        '"caption_extension" and "caption_extention" are both set, to different values'
    )


def test_sampling_off_values_and_clip_skip_note(tmp_path):
    cfg, notes = load(tmp_path, "sample_every_n_steps = 0\nclip_skip = 2\n")
    assert cfg.sample_every_n_steps is None
    assert notes[0] == "sample_every_n_steps = 0: sampling by steps is off (as kohya)"
    assert notes[1].startswith("clip_skip = 2: kohya's SDXL scripts ignore clip_skip")


def test_warmup_steps_fraction_or_count(tmp_path):
    cfg, _ = load(tmp_path, "lr_warmup_steps = 0.1\n")
    assert cfg.lr_warmup_steps == 0.1 and isinstance(cfg.lr_warmup_steps, float)
    cfg, _ = load_train_config(None, flags=["--lr_warmup_steps=50"])
    assert cfg.lr_warmup_steps == 50 and isinstance(cfg.lr_warmup_steps, int)


def test_config_file_flag_appends_toml_like_kohya(tmp_path):
    write(tmp_path, "learning_rate = 3e-4\n", "run.toml")
    cfg, _ = load_train_config(None, flags=["--config_file", str(tmp_path / "run")])
    assert cfg.learning_rate == 3e-4


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_train_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("name", ["../escape", "sub/name", "..", " "])
def test_output_name_is_a_file_name_not_a_path(name: str) -> None:
    from sdprep.train.config.schema import load_train_config

    with pytest.raises(ConfigError, match="output_name must be a file name"):
        load_train_config(None, overrides={"output_name": name})


# -- kohya GUI forms and kohya's defaults (issue 16) -------------------------------------------


def test_text_encoder_lr_list_as_the_gui_writes_it(tmp_path):
    cfg, notes = load(tmp_path, 'network_module = "networks.lora"\ntext_encoder_lr = [ 0.001, 0.001,]\n')
    assert cfg.text_encoder_lr == 0.001 and not notes  # the GUI's [te1, te2] with one rate
    cfg, notes = load(tmp_path, 'network_module = "networks.lora"\ntext_encoder_lr = [1e-4, 5e-5]\n')
    assert cfg.text_encoder_lr == (1e-4, 5e-5)
    assert notes == [
        "text_encoder_lr = [0.0001, 5e-05]: sdprep trains text encoder 2 at 5e-05; kohya's networks.lora "
        "uses the first rate (0.0001) for both SDXL text encoders"
    ]
    flags, _ = load_train_config(None, flags=["--text_encoder_lr", "1e-4", "5e-5"], overrides=MODEL)
    assert flags.text_encoder_lr == (1e-4, 5e-5)
    assert load_train_config(None, flags=["--text_encoder_lr"], overrides=MODEL)[0].text_encoder_lr is None
    with pytest.raises(ConfigError, match="SDXL has two text encoders, got 3 rates"):
        load(tmp_path, "text_encoder_lr = [1e-4, 1e-4, 1e-4]\n")
    with pytest.raises(ConfigError, match=r"text_encoder_lr must be >= 0 \(0 freezes that part\), got -1"):
        load(tmp_path, "text_encoder_lr = [1e-4, -1]\n")


def test_lora_trains_text_encoders_by_default_as_kohya(tmp_path):
    cfg, _ = load(tmp_path, 'network_module = "networks.lora"\n')
    assert cfg.network_train_unet_only is False
    with pytest.raises(ConfigError, match="cache_text_encoder_outputs needs frozen text encoders"):
        load(tmp_path, 'network_module = "networks.lora"\ncache_text_encoder_outputs = true\n')


def test_settings_that_changed_results_silently_now_say_so(tmp_path):
    _, notes = load(tmp_path, "alpha_mask = true\n")
    assert (
        "alpha_mask without masked_loss: each image's alpha channel weights its loss (as kohya, which "
        "applies alpha masks whether or not masked_loss is set)" in notes
    )
    _, notes = load(tmp_path, 'log_with = "wandb"\n')
    assert (
        'log_with = "wandb" without logging_dir: nothing is logged (sdprep writes TensorBoard logs, not '
        "wandb; set logging_dir = FOLDER to get them)" in notes
    )
    _, notes = load(tmp_path, 'log_with = "wandb"\nlogging_dir = "logs"\n')
    assert not any("nothing is logged" in n for n in notes)


def test_adafactor_schedule_needs_adafactor(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, 'lr_scheduler = "adafactor"\noptimizer_type = "AdamW"\n')
    assert exc.value.message == 'lr_scheduler = "adafactor" needs optimizer_type = "Adafactor", got "AdamW"'
    assert "constant_with_warmup" in exc.value.hint
    with pytest.raises(ConfigError, match="relative_step=False"):
        load(
            tmp_path,
            'lr_scheduler = "adafactor"\noptimizer_type = "Adafactor"\noptimizer_args = ["relative_step=False"]\n',
        )
    cfg, _ = load(tmp_path, 'lr_scheduler = "adafactor"\noptimizer_type = "Adafactor"\n')
    assert cfg.lr_scheduler == "adafactor"


def test_scheduler_type_args_and_ratios_load(tmp_path):
    cfg, _ = load(
        tmp_path,
        'lr_scheduler = "polynomial"\nlr_scheduler_args = ["lr_end=1e-8"]\nlr_scheduler_min_lr_ratio = 0.1\n'
        "lr_decay_steps = 0.2\nlr_scheduler_timescale = 100\n",
    )
    assert cfg.lr_scheduler_args == ("lr_end=1e-8",) and cfg.lr_scheduler_min_lr_ratio == 0.1
    assert cfg.lr_decay_steps == 0.2 and cfg.lr_scheduler_timescale == 100
    cfg, _ = load_train_config(
        None, flags=["--lr_scheduler_type", "CosineAnnealingLR", "--lr_scheduler_args", "T_max=10"]
    )
    assert cfg.lr_scheduler_type == "CosineAnnealingLR" and cfg.lr_scheduler_args == ("T_max=10",)
    with pytest.raises(ConfigError, match="takes no warmup"):
        load(tmp_path, 'lr_scheduler_type = "CosineAnnealingLR"\nlr_warmup_steps = 10\n')
    with pytest.raises(ConfigError, match="lr_scheduler_min_lr_ratio must be between 0 and 1"):
        load(tmp_path, "lr_scheduler_min_lr_ratio = 2\n")


def test_empty_paths(tmp_path):
    cfg, _ = load(tmp_path, 'reg_data_dir = ""\nlogging_dir = ""\n')
    assert cfg.reg_data_dir is None and cfg.logging_dir is None  # kohya reads an empty path as unset
    with pytest.raises(ConfigError) as exc:
        load_train_config(None, overrides={"dataset_config": ""})
    assert exc.value.message == "dataset_config is empty" and "--data DIR" in exc.value.hint


def test_command_line_folder_replaces_the_configs_dataset_config(tmp_path):
    path = write(tmp_path, 'dataset_config = "ds.toml"\nresolution = 768\n')
    cfg, notes = load_train_config(path, overrides={"train_data_dir": "imgs"})
    assert cfg.dataset_config is None and cfg.train_data_dir == Path("imgs")
    assert notes == [
        f'train_data_dir from the command line replaces dataset_config = "ds.toml" from {path} '
        "(command line > config > dataset TOML > defaults)"
    ]
    assert (
        origin_of(cfg, "resolution") == str(path) and origin_of(cfg, "train_data_dir") == "the command line"
    )
    assert origin_of(cfg, "max_train_steps") is None  # a default
    # in one file both: kohya's rule (dataset_config wins, train_data_dir is ignored with a note later)
    both, _ = load(tmp_path, 'dataset_config = "ds.toml"\ntrain_data_dir = "imgs"\n')
    assert both.dataset_config == Path("ds.toml")


def test_dim_from_weights_reads_the_lora_file(tmp_path):
    """kohya's dim_from_weights (the GUI's "LoRA finetuning phase 2" preset): ranks and alphas of
    network_weights, linear and 3x3 conv apart; a file without text-encoder modules trains the U-Net."""
    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "phase1.safetensors"
    save_file(
        {
            "lora_unet_a_proj.lora_down.weight": torch.zeros(8, 32),
            "lora_unet_a_proj.lora_up.weight": torch.zeros(32, 8),
            "lora_unet_a_proj.alpha": torch.tensor(4.0),
            "lora_unet_b_conv.lora_down.weight": torch.zeros(2, 32, 3, 3),
            "lora_unet_b_conv.alpha": torch.tensor(1.0),
            "lora_unet_c_skip.lora_down.weight": torch.zeros(8, 32, 1, 1),
            "lora_unet_c_skip.alpha": torch.tensor(4.0),
        },
        str(lora),
    )
    text = f'network_module = "networks.lora"\ndim_from_weights = true\nnetwork_weights = "{lora}"\nnetwork_dim = 32\n'
    cfg, notes = load(tmp_path, text)
    assert (cfg.network_dim, cfg.network_alpha, cfg.conv_dim, cfg.conv_alpha) == (8, 4.0, 2, 1.0)
    assert cfg.network_train_unet_only
    assert (
        "dim_from_weights: phase1.safetensors gives network_dim = 8, network_alpha = 4, conv_dim = 2, conv_alpha = 1"
        in notes
    )
    with pytest.raises(ConfigError, match="dim_from_weights needs network_weights"):
        load(tmp_path, 'network_module = "networks.lora"\ndim_from_weights = true\n')
    save_file(
        {
            "lora_unet_a.lora_down.weight": torch.zeros(8, 4),
            "lora_unet_b.lora_down.weight": torch.zeros(4, 4),
        },
        str(lora),
    )
    with pytest.raises(ConfigError, match=r"linear modules of different ranks or alphas \(ranks \[4, 8\]"):
        load(tmp_path, text)


def test_overrides_are_named_by_where_they_come_from(tmp_path):
    """`sdprep run`'s [train] table is named as the project file, not as the command line."""
    with pytest.raises(ConfigError) as exc:
        load_train_config(None, overrides={"network_dimm": 4}, overrides_source="p.toml [train]")
    assert exc.value.message == 'unknown key "network_dimm" in p.toml [train]'
    cfg, _ = load_train_config(None, overrides={"network_dim": 4}, overrides_source="p.toml [train]")
    assert origin_of(cfg, "network_dim") == "p.toml [train]"
