"""Weights files are never unpickled unless the user says they trust them.

A checkpoint that needs full unpickling can run code while it loads. sdprep reads safetensors, or
`torch.load(weights_only=True)`, and refuses anything else with a message naming the trust option;
with the option, the file loads (and, as this test shows with a harmless payload, its code runs).
The source is also grepped: no `pickle.load`, `weights_only=False` or `allow_pickle=True` anywhere
except behind a trust option.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_upscale import rrdb_state_dict

from sdprep.cli import cli

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)


class Payload:
    """Unpickling this creates a file: the stand-in for code a hostile checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickled_checkpoint(path: Path, marker: Path, weights: dict) -> Path:
    torch.save({"params_ema": weights, "callbacks": Payload(marker)}, path)
    return path


def test_upscale_refuses_a_pickle_unless_trusted(tmp_path: Path, cli_runner) -> None:
    marker = tmp_path / "code-ran"
    model = pickled_checkpoint(tmp_path / "4x.pth", marker, rrdb_state_dict(nb=1, n_up=2, seed=3))
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(
        data / "a.png"
    )
    before = (data / "a.png").read_bytes()
    args = ["-q", "upscale", str(data), "--min-side", "64", "--model", str(model), "--device", "cpu"]

    res = cli_runner.invoke(cli, args)
    assert res.exit_code == 1
    assert "holds pickled Python objects, not only weights" in res.output
    assert "pass --trust-pickle" in res.output
    assert not marker.exists(), "the checkpoint's code ran without --trust-pickle"
    assert (data / "a.png").read_bytes() == before

    res = cli_runner.invoke(cli, [*args, "--trust-pickle"])
    assert res.exit_code == 0, res.output
    assert marker.exists()  # trusted: fully unpickled, as the option's help warns
    with Image.open(data / "a.png") as im:
        assert im.size == (96, 64)


def test_training_refuses_a_pickled_checkpoint_unless_trusted(tiny_sdxl: Path, tmp_path: Path) -> None:
    from sdprep.errors import ModelError
    from sdprep.train.models.load import load_sdxl
    from sdprep.train.save.sgm import pipeline_to_sgm

    ref = load_sdxl(tiny_sdxl)
    weights = pipeline_to_sgm(ref.unet, ref.text_encoder, ref.text_encoder_2, ref.vae)
    marker = tmp_path / "code-ran"
    ckpt = tmp_path / "model.ckpt"  # as old checkpoints are: state_dict plus pickled trainer objects
    torch.save(
        {"state_dict": {k: v.contiguous() for k, v in weights.items()}, "callbacks": Payload(marker)}, ckpt
    )

    with pytest.raises(ModelError) as err:
        load_sdxl(ckpt, model_config=tiny_sdxl)
    assert "holds pickled Python objects, not only weights" in str(err.value)
    assert "trust_pickle = true" in str(err.value)
    assert not marker.exists()

    from train_support import lora_cfg

    cfg = lora_cfg(
        tiny_sdxl, tmp_path, tmp_path / "out", trust_pickle=True
    )  # the config key the trainer passes on
    assert cfg.trust_pickle is True and lora_cfg(tiny_sdxl, tmp_path, tmp_path / "out").trust_pickle is False
    model = load_sdxl(ckpt, model_config=tiny_sdxl, trust_pickle=True)
    assert marker.exists()
    for name, param in ref.unet.named_parameters():
        assert torch.equal(dict(model.unet.named_parameters())[name], param), name


UNSAFE = re.compile(r"pickle\.loads?\(|weights_only\s*=\s*False|allow_pickle\s*=\s*True|torch\.load\(")


@pytest.mark.parametrize("folder", ["sdprep", "prep", "train", "taggers"])
def test_no_unguarded_unpickling_in_the_source(folder: str) -> None:
    """Every torch.load passes weights_only=True, or unpickles only behind trust_pickle (marked
    `# trusted by the user`); nothing else unpickles."""
    offenders = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not UNSAFE.search(line):
                continue
            guarded = any(
                mark in line
                for mark in ("weights_only=True", "weights_only=not trust_pickle", "# trusted by the user")
            )
            if not guarded:
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
