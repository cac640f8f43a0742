"""Training metadata: kohya's `ss_*` keys in kohya's value forms, hashes as kohya computes them, times.

The reference is data: `assets/kohya/sdxl_network_metadata.json` holds the metadata of the files
kohya's sdxl_train_network.py wrote for two configurations (README.md there); sdprep trains the same
configurations on the tiny model and must write the same keys with the same values, except the
ones that name a moment or a file's bytes, which must have the same form.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from train_support import lora_settings, make_dataset

torch.set_num_threads(1)

KOHYA = json.loads((Path(__file__).parent / "assets" / "kohya" / "sdxl_network_metadata.json").read_text())
# kohya's runs (their `args` in the JSON) beyond what lora_cfg already sets the same way
RUN_SETTINGS = {
    "A": dict(
        output_name="kohyaA",
        max_train_epochs=2,
        save_every_n_epochs=1,
        optimizer_type="AdamW",
        optimizer_args=["weight_decay=0.01"],
        network_alpha=2,
        gradient_checkpointing=True,
        cache_text_encoder_outputs=True,
        mixed_precision="bf16",
        full_bf16=True,
        save_precision="float",
    ),
    "B": dict(
        output_name="kohyaB",
        network_alpha=1,
        network_args=["conv_dim=2", "conv_alpha=1"],
        enable_bucket=False,
        max_train_steps=2,
        save_every_n_steps=1,
        optimizer_type="SGDNesterov",
        cache_text_encoder_outputs=True,
        mixed_precision="bf16",
        full_bf16=True,
        training_comment="hello",
        noise_offset=0.05,
        min_snr_gamma=5,
        clip_skip=2,
        max_token_length=225,
    ),
    "C": dict(
        output_name="kohyaC",
        network_alpha=2,
        max_train_steps=1,
        cache_text_encoder_outputs=True,
        mixed_precision="bf16",
        full_bf16=True,
    ),
}
# values that name a moment, a random session or the bytes of a file: compared by form only
VOLATILE = {
    "ss_session_id",
    "ss_training_started_at",
    "ss_training_finished_at",
    "ss_sd_model_hash",
    "ss_new_sd_model_hash",
    "ss_vae_hash",
    "ss_new_vae_hash",
    "sshs_model_hash",
    "sshs_legacy_hash",
    "modelspec.date",
    "modelspec.implementation_version",
}
# deliberate differences: with a dataset TOML and no --resolution kohya's model spec states its
# default 1024x1024; sdprep states the resolution the TOML trained at
DIFFERENT = {"C": {"modelspec.resolution": "128x128"}}
# kohya's provenance key; sdprep records its own version instead
KOHYA_ONLY = {"ss_sd_scripts_commit_hash"}
SDPREP_ONLY = {
    "ss_sdprep_version",
    "ss_full_bf16",
    "ss_network_train_unet_only",
    "ss_network_train_text_encoder_only",
}


def value_form(key: str, value: str) -> str:
    """The shape of a metadata value: None, bool, int, float, hex8 / sha256, (w, h), json, text."""
    if "hash" in key and re.fullmatch(r"[0-9a-f]{8}", value):
        return "hex8"
    if re.fullmatch(r"[0-9a-f]{64}", value):
        return "sha256"
    if value in ("None", "True", "False"):
        return "None" if value == "None" else "bool"
    if re.fullmatch(r"-?\d+", value):
        return "int"
    if re.fullmatch(r"-?\d+\.\d+(e[-+]?\d+)?|-?\d+(\.\d+)?e[-+]?\d+", value):
        return "float"
    if re.fullmatch(r"\(\d+, \d+\)", value):
        return "(w, h)"
    if value[:1] in "{[" or value == "null":
        json.loads(value)
        return "json"
    return "text"


class TimedCallbacks:
    """Records the wall time when training starts and when each step ends."""

    def __init__(self) -> None:
        from sdprep.train.loop.callbacks import RecordingCallbacks

        self.inner = RecordingCallbacks()
        self.start_time: float | None = None
        self.step_times: list[float] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def start(self, total_steps: int, first_step: int, steps_per_epoch: int) -> None:
        self.start_time = time.time()
        self.inner.start(total_steps, first_step, steps_per_epoch)

    def step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        self.step_times.append(time.time())
        self.inner.step(step, epoch, loss, lr)


@pytest.fixture(scope="module")
def base_file(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a single .safetensors file named as kohya's base was (kohya hashes files)."""
    from safetensors.torch import save_file

    from sdprep.train.models.load import load_sdxl
    from sdprep.train.save.sgm import pipeline_to_sgm

    model = load_sdxl(tiny_sdxl)
    sd = pipeline_to_sgm(model.unet, model.text_encoder, model.text_encoder_2, model.vae)
    path = tmp_path_factory.mktemp("base") / "sdxl_random.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _train(name: str, base_file: Path, tiny_sdxl: Path, root: Path, drop: tuple[str, ...] = (), **extra):
    """sdprep on kohya's run `name`; `drop`: lora_settings keys the run does not set."""
    from sdprep.train.config.schema import load_train_config
    from sdprep.train.loop.trainer import Trainer

    data = make_dataset(root / "data", images=["c_square.webp", "e_sepia.jpg"], repeats=1)
    settings = lora_settings(
        base_file, data, root / "out", model_config=str(tiny_sdxl), **RUN_SETTINGS[name], **extra
    )
    cfg, _ = load_train_config(None, overrides={k: v for k, v in settings.items() if k not in drop})
    cb = TimedCallbacks()
    trainer = Trainer(cfg, callbacks=cb)
    trainer.setup()
    trainer.run()
    return trainer, cb


@pytest.fixture(scope="module")
def run(base_file: Path, tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory):
    """kohya's run A: two epochs of two steps, saving every epoch; (trainer, callbacks)."""
    return _train("A", base_file, tiny_sdxl, tmp_path_factory.mktemp("runA"))


@pytest.fixture(scope="module")
def run_c(base_file: Path, tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory):
    """kohya's run C: its dataset TOML (a subset with repeats and keep_tokens, a reg subset)."""
    root = tmp_path_factory.mktemp("runC")
    make_dataset(root / "reg", images=["e_sepia.jpg"], repeats=1, token="person")
    (root / "reg" / "1_person" / "e_sepia.txt").write_text("person\n")
    toml = (
        KOHYA["runs"]["C"]["dataset_config"]
        .replace('"data/', f'"{root}/data/')
        .replace('"reg/', f'"{root}/reg/')
    )
    (root / "dataset.toml").write_text(toml)
    return _train(
        "C", base_file, tiny_sdxl, root, dataset_config=str(root / "dataset.toml"), train_data_dir=None
    )


@pytest.fixture(scope="module")
def run_b(base_file: Path, tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory):
    """kohya's run B: no buckets, a separate VAE file, conv LoRA, SGDNesterov, saves every step."""
    return _train("B", base_file, tiny_sdxl, tmp_path_factory.mktemp("runB"), vae=str(base_file))


def _meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_training_started_at_is_the_first_step_not_the_first_save(run) -> None:
    trainer, cb = run
    first = _meta(trainer.result.saved[0])
    started = float(first["ss_training_started_at"])
    assert cb.start_time <= started <= cb.step_times[0]  # set as step 1 began, before step 1 ended
    assert all(
        _meta(p)["ss_training_started_at"] == first["ss_training_started_at"] for p in trainer.result.saved
    )


def test_kohya_modelspec_options_reach_the_metadata(tmp_path: Path) -> None:
    """kohya's --metadata_* options (sai_model_spec): each is written as its modelspec key; a
    thumbnail file becomes a data URL as kohya's file_to_data_url makes it."""
    import base64
    import types

    from sdprep.errors import ConfigError
    from sdprep.train.config.schema import load_train_config
    from sdprep.train.save.metadata import modelspec

    thumb = tmp_path / "thumb.png"
    thumb.write_bytes(b"\x89PNG fake")
    values = {
        "trigger_phrase": "nzn",
        "usage_hint": "Use keyword nzn",
        "preprocessor": "none",
        "merged_from": "a, b",
        "is_negative_embedding": "False",
    }
    cfg, _ = load_train_config(
        None, overrides={**{f"metadata_{k}": v for k, v in values.items()}, "metadata_thumbnail": str(thumb)}
    )
    spec = modelspec(
        cfg, types.SimpleNamespace(architecture="stable-diffusion-xl-v1-base/lora"), {"name": "x"}
    )
    for key, value in values.items():
        assert spec[f"modelspec.{key}"] == value
    assert (
        spec["modelspec.thumbnail"] == "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()
    )
    missing, _ = load_train_config(None, overrides={"metadata_thumbnail": str(tmp_path / "none.png")})
    with pytest.raises(ConfigError, match="metadata_thumbnail .*none.png: cannot read"):
        modelspec(missing, types.SimpleNamespace(architecture="a"), {"name": "x"})


def test_precheck_reads_the_thumbnail_before_the_model_loads(tmp_path: Path) -> None:
    """A missing metadata_thumbnail is found by precheck, as the other files are (it imported the
    reader from the wrong module: every run with a thumbnail stopped with an ImportError)."""
    from sdprep.errors import ConfigError
    from sdprep.train.config.precheck import precheck
    from sdprep.train.config.schema import load_train_config

    missing, _ = load_train_config(None, overrides={"metadata_thumbnail": str(tmp_path / "none.png")})
    with pytest.raises(ConfigError, match="metadata_thumbnail .*none.png: cannot read"):
        precheck(missing, method="lora", resume=None, output_dir=tmp_path, name="x")


@pytest.mark.parametrize("name", ["A", "B", "C"])
def test_same_keys_values_and_forms_as_kohya(name: str, request) -> None:
    trainer, _ = request.getfixturevalue({"A": "run", "B": "run_b", "C": "run_c"}[name])
    kohya_files = KOHYA["runs"][name]["files"]
    ours = {p.name: _meta(p) for p in trainer.result.saved}
    assert sorted(ours) == sorted(kohya_files)  # the same file names, too
    for fname, theirs in kohya_files.items():
        mine = ours[fname]
        assert set(mine) == (set(theirs) - KOHYA_ONLY) | SDPREP_ONLY, fname
        forms = {k: (value_form(k, theirs[k]), value_form(k, mine[k])) for k in set(theirs) - KOHYA_ONLY}
        assert {k: f for k, f in forms.items() if f[0] != f[1]} == {}, fname
        different = DIFFERENT.get(name, {})
        same = set(theirs) - KOHYA_ONLY - VOLATILE - set(different)
        assert {k: mine[k] for k in same} == {k: theirs[k] for k in same}, fname
        assert {k: mine[k] for k in different} == different


def test_base_model_and_vae_hashes_are_kohyas(run_b, base_file: Path) -> None:
    """ss_sd_model_hash: the old A1111 hash (sha256 of 64 KiB at 1 MiB, 8 digits); ss_new_sd_model_hash:
    sha256 of the whole file; the same for the VAE file."""
    trainer, _ = run_b
    data = base_file.read_bytes()
    legacy, full = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8], hashlib.sha256(data).hexdigest()
    for path in trainer.result.saved:
        meta = _meta(path)
        assert (meta["ss_sd_model_hash"], meta["ss_new_sd_model_hash"]) == (legacy, full)
        assert (meta["ss_vae_hash"], meta["ss_new_vae_hash"]) == (legacy, full)


def test_lora_hashes_are_kohyas(run) -> None:
    """sshs_model_hash: sha256 of the file after its header; sshs_legacy_hash: the old hash of the
    tensors serialised with only the ss_* metadata (kohya's precalculate_safetensors_hashes)."""
    from safetensors.torch import load_file, save

    trainer, _ = run
    for path in trainer.result.saved:
        meta = _meta(path)
        data = path.read_bytes()
        assert (
            meta["sshs_model_hash"]
            == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()
        )
        blob = save(load_file(str(path)), {k: v for k, v in meta.items() if k.startswith("ss_")})
        assert meta["sshs_legacy_hash"] == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


# kohya's train_util.model_hash / calculate_sha256 / precalculate_safetensors_hashes, run on these
# inputs (tests/assets/kohya/README.md): the recipes above must give kohya's values
ORACLE = {
    "big": ("510b126e", "9cda7fe3149118d7b16ac3cc7e5f599176fde5e8e9e2f01b99e3fd8aa5adb258"),
    "small": ("e3b0c442", "cb08520755fc5fb7c6be854b616644e581c125051ceb9420451174d085bdd76f"),
    "folder": ("IsADirectory", "IsADirectory"),
    "lora": ("c171982b0f48d9446af650baccdc3bec0167f91f89554e3e83db952aa1109727", "1dc85ef8"),
}


def test_hash_functions_give_kohyas_values(tmp_path: Path) -> None:
    from sdprep.train.save.metadata import file_hashes, safetensors_hashes

    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    big.write_bytes(bytes((i * 7 + 3) % 256 for i in range(0x120000)))
    small.write_bytes(b"sdprep" * 100)
    assert file_hashes(big) == ORACLE["big"]
    assert file_hashes(small) == ORACLE["small"]  # under 1 MiB: the hash of nothing, as kohya
    assert file_hashes(tmp_path) == ORACLE["folder"]  # kohya's literal for a diffusers folder
    assert file_hashes(tmp_path / "nope") is None  # a hub id: kohya writes no hash keys
    tensors = {
        "b.weight": torch.arange(300000, dtype=torch.float32).reshape(600, 500) / 7,
        "a.alpha": torch.tensor(2.0),
    }
    meta = {"ss_network_dim": "4", "ss_epoch": "1", "modelspec.title": "t"}
    assert safetensors_hashes(tensors, meta) == ORACLE["lora"]


def test_optimizer_name_as_kohya_writes_it() -> None:
    from sdprep.train.loop.optim import build_optimizer
    from sdprep.train.save.metadata import kohya_optimizer_name

    params = [torch.nn.Parameter(torch.zeros(2))]
    opt, desc = build_optimizer(
        "AdamW", [{"params": params}], 1e-3, {"betas": (0.9, 0.99), "weight_decay": 0.01}
    )
    assert kohya_optimizer_name(opt, desc) == "torch.optim.adamw.AdamW(betas=(0.9, 0.99),weight_decay=0.01)"
    opt, desc = build_optimizer("AdamW", [{"params": params}], 1e-3, {})
    assert kohya_optimizer_name(opt, desc) == "torch.optim.adamw.AdamW"


def test_no_metadata_keeps_kohyas_minimum() -> None:
    from sdprep.train.save.metadata import MINIMUM_KEYS, minimum_metadata

    full = {
        "ss_v2": "False",
        "ss_network_dim": "4",
        "ss_seed": "7",
        "modelspec.title": "x",
        "sshs_model_hash": "h",
    }
    assert minimum_metadata(full) == {"ss_v2": "False", "ss_network_dim": "4", "modelspec.title": "x"}
    assert "ss_network_args" in MINIMUM_KEYS and "ss_base_model_version" in MINIMUM_KEYS


def test_run_facts_hash_the_base_once_and_say_so_for_a_big_file(base_file: Path, monkeypatch) -> None:
    """The base model is hashed once per run (at the first save); a big file gets a note first."""
    import types

    from sdprep.train.config.schema import TrainConfig
    from sdprep.train.loop.callbacks import RecordingCallbacks
    from sdprep.train.save import saver
    from sdprep.train.save.metadata import file_hashes

    calls = []
    monkeypatch.setattr("sdprep.train.save.metadata.file_hashes", lambda p: calls.append(p) or file_hashes(p))
    monkeypatch.setattr(saver, "HASH_NOTE_BYTES", base_file.stat().st_size - 1)
    cb = RecordingCallbacks()
    facts = saver.RunFacts(
        seed=1, num_epochs=1, batches_per_epoch=1, total_steps=1, num_processes=1, optimizer_desc="SGD"
    )
    run_saver = saver.Saver(
        TrainConfig(),
        accelerator=None,
        method=None,
        method_name="lora",
        model_source=str(base_file),
        dataset=None,
        output_dir=base_file.parent,
        name="x",
        result=None,
        callbacks=cb,
        facts=facts,
        optimizer=(sgd := torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)),
        lr_scheduler=torch.optim.lr_scheduler.ConstantLR(sgd),
        noise_generator=torch.Generator(),
    )
    pos = types.SimpleNamespace(step=1, epoch=0)
    first, second = run_saver.run_facts(pos, "step 1"), run_saver.run_facts(pos, None)
    assert first["model_hashes"] == second["model_hashes"] == file_hashes(base_file)
    assert calls == [str(base_file)]
    assert cb.notes == ["hashing sdxl_random.safetensors for ss_sd_model_hash (as kohya)"]
    assert (first["epoch"], second["epoch"]) == (0, 1)  # a step save: kohya's 0-based epoch; the end: epochs
