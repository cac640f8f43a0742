"""Data-parallel training: two CPU processes (gloo, launched by torchrun) compute what one process
computes with the same global batch; only the main process writes; resume works across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import torch
from safetensors.torch import load_file
from train_support import lora_settings, make_dataset

torch.set_num_threads(1)
IMAGES = ["c_square.webp", "a_landscape.jpg", "b_portrait.png", "e_sepia.jpg"]
TIMEOUT = 300


def settings(model: Path, data: Path, out: Path, batch: int) -> dict:
    return lora_settings(
        model,
        data,
        out,
        logging_dir=str(out / "logs"),
        resolution="64",
        enable_bucket=False,
        train_batch_size=batch,
        max_train_steps=4,
        save_every_n_steps=2,
        save_state=True,
        # SGD, not Adam: Adam divides by sqrt(v), so on elements whose gradient is near zero the
        # rounding of a sum in another order (all-reduce vs one batch) flips the update's sign and
        # the two runs drift by up to lr per step (1.45% seen); with SGD they agree to ~1e-6
        optimizer_type="SGDNesterov",
        learning_rate=1.0,
    )


def torchrun(config: Path, *extra: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 sdprep train ...` (Accelerator(cpu=True) inside)."""
    sdprep = Path(sys.executable).parent / "sdprep"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(sdprep), "train", "--config", str(config), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)


def write_config(path: Path, values: dict) -> Path:
    path.write_text(tomli_w.dumps(values))
    return path


@pytest.fixture(scope="module")
def two_processes(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ddp")
    data = make_dataset(root / "data", images=IMAGES, repeats=1, side=64)
    config = write_config(root / "two.toml", settings(tiny_sdxl, data, root / "two", batch=1))
    proc = torchrun(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, data, proc


def test_two_processes_equal_one_process_with_the_same_global_batch(two_processes, tiny_sdxl: Path) -> None:
    from sdprep.train.config.schema import load_train_config
    from sdprep.train.loop.trainer import train

    root, data, _ = two_processes
    cfg, _ = load_train_config(None, overrides=settings(tiny_sdxl, data, root / "one", batch=2))
    one = load_file(train(cfg).output)
    two = load_file(root / "two" / "tiny.safetensors")
    assert one.keys() == two.keys()
    ups = [k for k in one if k.endswith("lora_up.weight")]
    moved = max(float(one[k].abs().max()) for k in ups)  # lora_up starts at zero: this is the update
    assert moved > 1e-4
    # float sums in another order differ by ~1e-6 of the update (measured); different noise or a
    # wrong batch split would differ by about the whole update (lora_up) or 5 % (lora_down)
    worst_up = max(float((one[k] - two[k]).abs().max()) for k in ups)
    assert worst_up < 1e-4 * moved, (worst_up, moved)
    for key in one:
        assert float((one[key] - two[key]).abs().max()) <= 1e-4 * float(one[key].abs().max()) + 1e-7, key


def test_only_the_main_process_writes_and_reports(two_processes) -> None:
    root, _, proc = two_processes
    out = root / "two"
    assert sorted(p.name for p in out.iterdir()) == [
        "logs",
        "tiny-state",
        "tiny-step00000002-state",
        "tiny-step00000002.safetensors",
        "tiny.safetensors",
    ]
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert len(events) == 1  # one TensorBoard writer, not one per process
    assert proc.stderr.count("(verified:") == 2  # the two weight files, reported once each
    assert proc.stderr.count("method: LoRA") == 1


def test_resume_with_two_processes_continues_to_the_same_weights(two_processes, tiny_sdxl: Path) -> None:
    root, data, _ = two_processes
    config = write_config(root / "resume.toml", settings(tiny_sdxl, data, root / "resumed", batch=1))
    proc = torchrun(config, "--resume", str(root / "two" / "tiny-step00000002-state"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr
    state = json.loads((root / "resumed" / "tiny-state" / "state.json").read_text())
    assert state["step"] == 4
    assert not (root / "resumed" / "tiny-step00000002.safetensors").exists()  # started after step 2
    again = load_file(root / "resumed" / "tiny.safetensors")
    full = load_file(root / "two" / "tiny.safetensors")
    assert all(torch.equal(again[k], full[k]) for k in full)


def test_textual_inversion_gradients_are_averaged_across_processes(two_processes, tiny_sdxl: Path) -> None:
    """TI trains text-encoder rows outside DDP: its own gradient averaging must match one process."""
    from sdprep.train.config.schema import load_train_config
    from sdprep.train.loop.trainer import train

    root, data, _ = two_processes

    def ti(out: Path, batch: int) -> dict:
        values = settings(tiny_sdxl, data, out, batch=batch)
        for key in ("network_module", "network_dim", "network_alpha", "save_every_n_steps", "save_state"):
            values.pop(key)
        values.update(token_string="mytoken", init_word="woman", num_vectors_per_token=2, max_train_steps=2)
        values.update(optimizer_type="AdamW", learning_rate=1e-3)  # as users train TI
        return values

    proc = torchrun(write_config(root / "ti.toml", ti(root / "ti2", batch=1)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg, _ = load_train_config(None, overrides=ti(root / "ti1", batch=2))
    one = load_file(train(cfg).output)
    two = load_file(root / "ti2" / "tiny.safetensors")
    for key in ("clip_l", "clip_g"):
        assert torch.allclose(one[key], two[key], rtol=0, atol=1e-6), (one[key] - two[key]).abs().max()
