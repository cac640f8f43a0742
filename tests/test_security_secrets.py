"""Planted secrets never reach logs, reports, sidecars, journals, TensorBoard or safetensors metadata.

One test plants secrets where a user keeps them (a gallery-dl config with a password and an API key,
a cookies file, OPENAI_API_KEY, HF_TOKEN, another environment variable, and kohya's
`wandb_api_key` / `huggingface_token` keys in a training config), runs scrape (loopback fake
Danbooru), tag with an OpenAI-compatible captioner (loopback server that even echoes the key back
in an error), report and a short training run with TensorBoard through the real CLI, then greps the
stdout/stderr of every command and every byte of every file they wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from loopback import Loopback, Request, Response
from test_scrape import FakeBooru
from train_support import lora_settings, make_dataset

SECRETS = {
    "password": "gdl-pass-7d1c9e0b",
    "api_key": "gdl-apikey-55aa31f2",
    "cookie": "cookie-session-9f8e7d6c",
    "openai": "sk-openai-0c0ffee0c0ffee",
    "hf": "hf_token_deadbeef1234",
    "env": "env-secret-a1b2c3d4",
    "wandb": "wandb-key-77665544",
    "hub": "hub-token-11223344",
}


def leaks(blob: bytes | str) -> list[str]:
    data = blob.encode() if isinstance(blob, str) else blob
    return [name for name, value in SECRETS.items() if value.encode() in data]


def file_leaks(root: Path) -> dict[str, list[str]]:
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            hit = leaks(path.read_bytes())
            if hit:
                found[str(path)] = hit
    return found


class ChatServer:
    """An OpenAI-compatible chat endpoint that refuses the key and echoes it back in its error."""

    def __init__(self) -> None:
        self.auth: list[str] = []
        self.server = Loopback(self.refuse)
        self.url = self.server.url + "/v1"

    def refuse(self, request: Request) -> Response:
        key = request.headers.get("Authorization")
        self.auth.append(key or "")
        return Response.json(401, {"error": {"message": f"invalid key {key}"}})

    def close(self) -> None:
        self.server.close()


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sdprep.cli", "-v", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        OPENAI_API_KEY=SECRETS["openai"],
        HF_TOKEN=SECRETS["hf"],
        SDPREP_TEST_SECRET=SECRETS["env"],
        SDPREP_CACHE=str(tmp_path / "cache"),
    )


def test_planted_secrets_never_leave_their_files(tmp_path: Path, env, tiny_wd14: Path, tiny_sdxl: Path):
    home = tmp_path / "home"  # where the user keeps the secrets: never grepped
    home.mkdir()
    config = home / "gallery-dl.conf"
    extractor = {"username": "me", "password": SECRETS["password"], "api-key": SECRETS["api_key"]}
    config.write_text(json.dumps({"extractor": {"danbooru": extractor, "password": SECRETS["password"]}}))
    cookies = home / "cookies.txt"
    cookies.write_text(
        f"# Netscape HTTP Cookie File\n127.0.0.1\tFALSE\t/\tFALSE\t0\tsession\t{SECRETS['cookie']}\n"
    )
    data, work = tmp_path / "data", tmp_path / "work"
    work.mkdir()
    outputs: list[subprocess.CompletedProcess] = []

    booru, chat = FakeBooru(), ChatServer()
    try:
        urls = [booru.booru("/posts/42"), booru.booru("/posts/46"), booru.url("/img/missing.png")]
        secrets = ["--config", str(config), "--cookies", str(cookies)]
        scrape = run(env, "scrape", *urls, "-o", str(data), *secrets, "--sleep-request", "0")
        outputs.append(scrape)
        assert scrape.returncode == 1, scrape.stdout + scrape.stderr  # the missing image fails
        assert len(list(data.glob("*.png"))) == 2, scrape.stdout + scrape.stderr

        tag = run(env, "tag", str(data), "--model", str(tiny_wd14), "--captioner", f"openai:{chat.url}#m")
        outputs.append(tag)
        assert chat.auth and chat.auth[0] == f"Bearer {SECRETS['openai']}"  # the key was really used
        assert tag.returncode == 1, tag.stdout + tag.stderr  # the captioner failed every image
    finally:
        booru.close()
        chat.close()

    outputs.append(run(env, "report", str(data), "-o", str(work / "report.html")))
    outputs.append(run(env, "report", str(data), "--format", "json", "-o", str(work / "report.json")))
    assert all(o.returncode in (0, 1) and "Traceback" not in o.stderr for o in outputs), outputs

    train_data = make_dataset(work / "train_data", images=["c_square.webp"], repeats=1, side=64)
    settings = lora_settings(tiny_sdxl, train_data, work / "out", max_train_steps=2, save_every_n_steps=1)
    settings.update(
        logging_dir=str(work / "logs"),
        save_state=True,
        wandb_api_key=SECRETS["wandb"],
        huggingface_token=SECRETS["hub"],
    )
    toml = home / "train.toml"  # holds two secrets itself
    toml.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    train = run(env, "train", "--config", str(toml))
    outputs.append(train)
    assert train.returncode == 0, train.stdout + train.stderr
    assert list((work / "out").glob("*.safetensors")) and list((work / "logs").rglob("events.out.*"))

    for done in outputs:
        assert not leaks(done.stdout + done.stderr), (done.args, done.stdout, done.stderr)
    assert not file_leaks(data), "a secret is in the dataset (sidecars, captions, journal)"
    assert not file_leaks(work), "a secret is in a report, log, TensorBoard file or safetensors"
    assert "***" in tag.stdout + tag.stderr  # the server's echo of the key reached the output, masked
