"""SIGKILL inside a training save: the previous checkpoint survives and `--resume latest` skips the partial one.

`sdprep train` runs as a subprocess with SDPREP_TEST_PAUSE=save:2:MARKER, so it stops inside its
second state save (weights written, optimizer written, state.json not yet) and is killed there with
SIGKILL. The step-1 weights and state must load, the half-written step-2 state must be invisible to
`--resume latest`, and resuming must continue from step 1 to the end. (That a resumed run equals an
uninterrupted one is tested in test_train_resume.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_support import lora_settings, make_dataset

from sdprep.train.save.weights import find_states, read_state_info, resolve_resume

torch.set_num_threads(1)


def write_config(path: Path, settings: dict) -> Path:
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    return path


def train(config: Path, *extra: str, pause: str | None = None, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    if pause:
        env["SDPREP_TEST_PAUSE"] = pause
    cmd = [sys.executable, "-m", "sdprep.cli", "-q", "train", "--config", str(config), *extra]
    return subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def test_kill_during_a_save_keeps_the_previous_state(tiny_sdxl: Path, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", images=["c_square.webp", "h_wide.jpg"], repeats=1, side=64)

    def config(out: Path) -> Path:
        settings = lora_settings(
            tiny_sdxl, data, out, max_train_steps=3, save_every_n_steps=1, save_state=True
        )
        return write_config(tmp_path / f"{out.name}.toml", settings)

    out = tmp_path / "out"
    cfg = config(out)
    marker = tmp_path / "paused"
    proc = train(cfg, pause=f"save:2:{marker}", cwd=tmp_path)
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"training ended before the second save:\n{proc.stdout.read()}")
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()

    step1 = out / "tiny-step00000001-state"
    assert read_state_info(step1).step == 1
    assert load_file(str(step1 / "trainable.safetensors"))  # the previous state is intact
    assert load_file(str(out / "tiny-step00000001.safetensors"))
    partial = [p for p in out.iterdir() if p.name.startswith(".tiny-step00000002-state")]
    assert partial, "the kill did not land inside the second save"
    assert not (partial[0] / "state.json").exists()
    assert [s.step for s in find_states(out)] == [1]
    assert resolve_resume("latest", out, "tiny") == step1

    finish(train(cfg, "--resume", "latest", cwd=tmp_path))
    assert load_file(str(out / "tiny.safetensors"))
    assert [s.step for s in find_states(out)] == [1, 2, 3]  # the step-2 state rewritten whole
    assert not partial[0].exists(), "the killed run's partial state was left behind"
    assert read_state_info(out / "tiny-state").step == 3
