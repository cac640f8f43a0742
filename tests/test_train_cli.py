"""`sdprep train` through the CLI: seed configs as written, kohya flags, typos, notes, preflight."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from seed_configs import (
    SEED_000_TI,
    SEED_001_FINETUNE_DATASET,
    SEED_001_LORA,
    SEED_001_LORA_DATASET,
    SEED_003_LORA,
)
from train_support import make_dataset

from sdprep.cli import cli

torch.set_num_threads(1)


def test_help_has_an_example(cli_runner) -> None:
    result = cli_runner.invoke(cli, ["train", "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output and "sdprep train --config train.toml" in result.output


def test_a_typo_fails_with_a_suggestion(cli_runner, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('network_module = "networks.lora"\nlearning_rat = 1e-4\n')
    result = cli_runner.invoke(cli, ["train", "--config", str(config)])
    assert result.exit_code == 1
    assert 'Error: unknown key "learning_rat"' in result.output
    assert 'did you mean "learning_rate"?' in result.output
    config.write_text('network_module = "networks.lora"\n')
    result = cli_runner.invoke(cli, ["train", "--config", str(config), "--train_bach_size=2"])
    assert result.exit_code == 1
    assert 'did you mean "train_batch_size"?' in result.output
    result = cli_runner.invoke(cli, ["train", "--config", str(config), "--set", "network_dimm=8"])
    assert result.exit_code == 1 and 'did you mean "network_dim"?' in result.output


def test_seed_003_config_as_written(cli_runner, tiny_sdxl: Path, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data" / "images", repeats=1, token="nazuna")
    config = tmp_path / "config.toml"
    config.write_text(SEED_003_LORA)
    args = [
        "train",
        "--config",
        str(config),
        "--model",
        str(tiny_sdxl),
        "--steps",
        "2",
        "--resolution",
        "128",
    ]
    args += ["--set", f"train_data_dir={str(data)!r}", "--set", f"output_dir={str(tmp_path / 'output')!r}"]
    args += ["--set", f"logging_dir={str(tmp_path / 'logs')!r}", "--set", "min_bucket_reso=64"]
    result = cli_runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "output" / "nazuna.safetensors"
    assert f"output: {out}" in result.output
    assert '"xformers" accepted but not used' in result.output
    assert '"LoRA_type" accepted but not used' in result.output
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("lora_unet_middle_block_1_proj_in.lora_up.weight").dtype == torch.float16
    # kohya's command-line form (argparse float); kohya keeps a TOML integer as "32"
    assert meta["ss_network_dim"] == "32" and meta["ss_network_alpha"] == "32.0"


def test_seed_001_command_line_with_masks(cli_runner, tiny_sdxl: Path, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "img", images=["c_square.webp", "b_portrait.png"], repeats=1)
    image_dir = data / "1_mytoken"
    masks = image_dir / "masks"
    masks.mkdir(exist_ok=True)
    from train_support import make_mask

    from sdprep.images import image_size

    for name in ("c_square", "b_portrait"):
        make_mask(image_size(image_dir / f"{name}.png"), "left").save(masks / f"{name}.png")
    dataset = tmp_path / "yuzhaiaiXL_lora.toml"
    dataset.write_text(SEED_001_LORA_DATASET.format(image_dir=image_dir, mask_dir=masks))
    prompts = tmp_path / "prompt.txt"
    prompts.write_text("zhuoyue, a portrait --n ugly --w 64 --h 64 --d 1 --l 7 --s 2\n")
    args = ["train", "--model", str(tiny_sdxl), "--steps", "2", "--output-dir", str(tmp_path / "model")]
    args += [
        "--dataset-config",
        str(dataset),
        "--sample-prompts",
        str(prompts),
        "--logging-dir",
        str(tmp_path / "log"),
    ]
    args += ["--"] + shlex.split(SEED_001_LORA)
    result = cli_runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "masks: 2 of 2 images" in result.output
    assert "Adafactor with relative_step" in result.output
    assert (tmp_path / "model" / "yuzhaiaiXL_lora_upscale.safetensors").is_file()


def test_kohya_flags_directly_and_preflight(cli_runner, tiny_sdxl: Path, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", images=["c_square.webp", "h_wide.jpg"], repeats=1)
    config = tmp_path / "c.toml"
    config.write_text(
        f'pretrained_model_name_or_path = "{tiny_sdxl}"\ntrain_data_dir = "{data}"\n'
        f'output_dir = "{tmp_path / "out"}"\nnetwork_module = "networks.lora"\nresolution = 1024\n'
        "cache_latents = true\nsave_state = true\n"
    )
    args = [
        "train",
        "--config",
        str(config),
        "--learning_rate=5e-6",
        "--max_train_steps",
        "2",
        "--train_batch_size=2",
    ]
    result = cli_runner.invoke(cli, args + ["--preflight"])
    assert result.exit_code == 0, result.output
    for check in (
        "ok   model:",
        "ok   setup:",
        "ok   training: 2 steps",
        "ok   saving:",
        "ok   reload:",
        "ok   resume: continued from step 2 to 3",
    ):
        assert check in result.output
    assert "preflight passed" in result.output
    assert not (tmp_path / "out").exists()  # preflight writes nothing of the user's


def test_preflight_checks_the_real_model_without_loading_it(tiny_sdxl: Path, tmp_path: Path) -> None:
    import dataclasses
    import shutil

    from safetensors.torch import save_file

    from sdprep.train.config.preflight import _model_check
    from sdprep.train.config.schema import TrainConfig

    def check(source) -> tuple[bool, str]:
        return _model_check(dataclasses.replace(TrainConfig(), pretrained_model_name_or_path=str(source)))

    assert check(tiny_sdxl)[0]
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sdxl, broken)
    for f in (broken / "tokenizer").iterdir():
        f.unlink()
    ok, detail = check(broken)
    assert not ok and "the tokenizer would be empty" in detail
    sd15 = tmp_path / "sd15.safetensors"
    save_file(
        {"cond_stage_model.transformer.x": torch.zeros(1), "model.diffusion_model.y": torch.zeros(1)},
        str(sd15),
    )
    assert check(sd15) == (False, f"{sd15} is an SD 1.x/2.x checkpoint, not SDXL")
    xl = tmp_path / "xl.safetensors"
    save_file(
        {"conditioner.embedders.1.model.x": torch.zeros(1), "model.diffusion_model.y": torch.zeros(1)},
        str(xl),
    )
    # not SDXL's sizes: sdprep's own SDXL config cannot build it, so it needs model_config
    ok, detail = check(xl)
    assert not ok and "not SDXL 1.0's standard architecture" in detail
    assert _model_check(
        dataclasses.replace(TrainConfig(), pretrained_model_name_or_path=str(xl), model_config=tiny_sdxl)
    )[0]
    assert check(tmp_path / "missing.safetensors") == (
        False,
        f"{tmp_path / 'missing.safetensors'}: no such file or folder",
    )
    assert check("stabilityai/stable-diffusion-xl-base-1.0")[0]


def test_seed_000_textual_inversion_preflight_and_short_run(
    cli_runner, tiny_sdxl: Path, tmp_path: Path
) -> None:
    """Seed 000's TI TOML as written (500 warmup steps included): preflight passes, a short run saves a
    verified embedding with both tensors."""
    data = make_dataset(
        tmp_path / "images", repeats=1, token="yourtoken", images=["b_portrait.png", "c_square.webp"]
    )
    config = tmp_path / "config_textual_inversion.toml"
    config.write_text(SEED_000_TI)
    common = ["train", "--config", str(config), "--model", str(tiny_sdxl)]
    sets = [
        f"train_data_dir={str(data)!r}",
        f"output_dir={str(tmp_path / 'out')!r}",
        f"logging_dir={str(tmp_path / 'logs')!r}",
    ]
    prompts = tmp_path / "prompt.txt"
    prompts.write_text(
        "# seed 000's prompt file\nyourtoken, 1girl, portrait --n blurry --w 64 --h 64 --d 1 --l 7 --s 2\n"
    )
    sets += [f"sample_prompts={str(prompts)!r}", f"sample_dir={str(tmp_path / 'samples')!r}"]
    args = common + [a for s_ in sets for a in ("--set", s_)]
    pre = cli_runner.invoke(cli, [*args, "--preflight"])
    assert pre.exit_code == 0, pre.output
    run = cli_runner.invoke(
        cli,
        [
            *args,
            "--epochs",
            "1",
            "--resolution",
            "128",
            "--set",
            "min_bucket_reso=64",
            "--set",
            "lr_warmup_steps=0",
        ],
    )
    assert run.exit_code == 0, run.output
    out = tmp_path / "out" / "yourtoken_final.safetensors"
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == {"clip_l", "clip_g"}
        assert f.get_tensor("clip_l").shape[0] == 1 and torch.isfinite(f.get_tensor("clip_g")).all()


def test_output_config_writes_the_resolved_config_and_trains_nothing(cli_runner, tmp_path: Path) -> None:
    from sdprep.train.config.schema import load_train_config

    config = tmp_path / "config_textual_inversion.toml"
    config.write_text(SEED_000_TI)
    out = tmp_path / "resolved.toml"
    args = ["train", "--config", str(config), "--lr", "3e-5", "--output-config", str(out)]
    result = cli_runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (the resolved config; nothing trained)" in result.output
    assert not (tmp_path / "home").exists() and "training" not in result.output
    original, _ = load_train_config(config, overrides={"learning_rate": 3e-5})
    again, _ = load_train_config(out)
    assert again == original and again.learning_rate == 3e-5 and again.max_train_steps == 5200
    assert 'resolution = "1024,1536"' in out.read_text()  # kohya's form, which kohya reads back too
    result = cli_runner.invoke(cli, args)
    assert result.exit_code == 1 and "already exists: --output_config does not overwrite" in result.output
    # kohya's own form: --output_config writes to --config_file
    kohya_out = tmp_path / "kohya.toml"
    result = cli_runner.invoke(
        cli, ["train", "--", "--output_config", "--config_file", str(kohya_out), "--learning_rate=5e-6"]
    )
    assert result.exit_code == 0, result.output
    assert load_train_config(kohya_out)[0].learning_rate == 5e-6


def test_list_keys_lists_every_key_the_hints_point_at(cli_runner) -> None:
    from sdprep.train.config.io import undocumented_fields
    from sdprep.train.config.schema import known_keys

    result = cli_runner.invoke(cli, ["train", "--list-keys"])
    assert result.exit_code == 0
    listed = {line.split(":", 1)[0] for line in result.output.splitlines()}
    assert set(known_keys()) <= listed
    assert "learning_rate: base learning rate [default: 2e-06]" in result.output
    assert "xformers: accepted, not used: sdprep always uses PyTorch scaled-dot-product attention (SDPA)" in (
        result.output
    )
    assert undocumented_fields() == []
    bad = cli_runner.invoke(cli, ["train", "--set", "foo=1"])
    assert bad.exit_code == 1 and "`sdprep train --list-keys` lists every key" in bad.output
    empty = cli_runner.invoke(cli, ["train", "--set", "dataset_config="])
    assert empty.exit_code == 1 and "Error: dataset_config is empty" in empty.output, empty.output


@pytest.mark.parametrize("line", ["finetune", "lora"])
def test_seed_001_command_lines_pass_preflight(
    line: str, cli_runner, tiny_sdxl: Path, tmp_path: Path, monkeypatch
) -> None:
    """Both of seed 001's command lines, verbatim, with its dataset TOMLs' form (`[[datasets]]
    resolution = 1024`, no dataset-level max_bucket_reso): preflight scales every resolution by one
    factor, so the run's own checks (resolution <= max_bucket_reso) still hold. Only the model and
    the prompt file (paths on the user's disk) are given as plain options."""
    import json

    from seed_configs import SEED_001_FINETUNE

    from sdprep.images import image_size

    monkeypatch.chdir(tmp_path)
    data = make_dataset(tmp_path / "img", images=["c_square.webp", "b_portrait.png"], repeats=1, side=256)
    image_dir = data / "1_mytoken"
    if line == "lora":
        masks = image_dir / "conditioning"
        masks.mkdir()
        from train_support import make_mask

        for name in ("c_square", "b_portrait"):
            make_mask(image_size(image_dir / f"{name}.png"), "left").save(masks / f"{name}.png")
        (tmp_path / "yuzhaiaiXL_lora.toml").write_text(
            SEED_001_LORA_DATASET.format(image_dir=image_dir, mask_dir=masks)
        )
        command = SEED_001_LORA
    else:
        meta = tmp_path / "meta.json"
        meta.write_text(
            json.dumps({str(p): {"caption": "zhuoyue", "tags": "1boy"} for p in image_dir.glob("*.png")})
        )
        (tmp_path / "zhuoyueaiXL.toml").write_text(
            SEED_001_FINETUNE_DATASET.format(image_dir=image_dir, metadata=meta)
        )
        command = SEED_001_FINETUNE
    prompts = tmp_path / "prompt.txt"
    prompts.write_text("zhuoyue, a portrait --n ugly --w 832 --h 1216 --d 1 --l 7 --s 2\n")
    args = ["train", "--preflight", "--model", str(tiny_sdxl), "--sample-prompts", str(prompts)]
    result = cli_runner.invoke(cli, [*args, "--", *shlex.split(command)])
    assert result.exit_code == 0, result.output
    assert "preflight passed" in result.output
    assert "ok   setup:" in result.output and "at 128x128 max area" in result.output
    assert not (tmp_path / "mnt").exists()


def test_what_needs_no_model_fails_before_the_model_loads(cli_runner, tmp_path: Path) -> None:
    """Issue 17 item 9: the model path does not exist, so any error that is not about the model
    proves the check ran before loading it (which took ~20 s for a real model)."""
    data = make_dataset(tmp_path / "data", images=["c_square.webp"], repeats=1)
    config = tmp_path / "c.toml"
    config.write_text(
        f'pretrained_model_name_or_path = "{tmp_path / "no-model"}"\ntrain_data_dir = "{data}"\n'
        f'output_dir = "{tmp_path / "out"}"\nnetwork_module = "networks.lora"\n'
    )
    base = ["train", "--config", str(config)]
    cases = [
        (
            ["--resume", str(tmp_path / "nonexistent")],
            f"Error: --resume {tmp_path / 'nonexistent'}: no such folder",
        ),
        (["--resume", "latest"], "Error: --resume latest: no saved training state for output_name 'last'"),
        (
            ["--set", 'optimizer_type="nosuchpkg.Opt"'],
            'Error: optimizer_type "nosuchpkg.Opt": cannot import it',
        ),
        (["--set", 'lr_scheduler_type="NoSuchLR"'], 'Error: lr_scheduler_type "NoSuchLR": cannot import it'),
        (["--", "--lr_scheduler_args", "lr_end=1e-8"], "Error: lr_scheduler constant: "),  # polynomial's arg
        (["--sample-prompts", str(tmp_path / "none.txt")], "none.txt"),
        (["--set", f'network_weights="{tmp_path / "w.safetensors"}"'], "w.safetensors: no such file"),
        (["--set", f'dataset_config="{tmp_path / "ds.toml"}"'], "ds.toml: no such file"),
    ]
    for extra, message in cases:
        result = cli_runner.invoke(cli, [*base, *extra])
        assert result.exit_code == 1, (extra, result.output)
        assert message in result.output, (extra, result.output)
        assert "no-model" not in result.output, (extra, result.output)
    import importlib.util

    if importlib.util.find_spec("prodigyopt") is None:  # the one-line missing-package error, early too
        result = cli_runner.invoke(cli, [*base, "--set", 'optimizer_type="Prodigy"'])
        assert "needs the `prodigyopt` package" in result.output and "no-model" not in result.output
    from sdprep.train.config.precheck import check_optimizer

    check_optimizer("AdamW")
    check_optimizer("torch.optim.SGD")
