"""The review server's answers to hostile or malformed requests, through its ASGI app in-process:
a mask folder linked out of the dataset, rules naming files on the server, bodies of the wrong shape."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("starlette")

from sdprep.prep.review.edits import Editor
from sdprep.prep.review.index import Index
from sdprep.prep.review.server import create_app

TOKEN = "tok123"
HOST = "127.0.0.1:1"


class Client:
    def __init__(self, root: Path) -> None:
        self.index = Index(root, False)
        self.index.scan()
        self.app = create_app(self.index, Editor(self.index), TOKEN, {HOST})

    def call(self, method: str, path: str, query: str = "", body: bytes = b"") -> tuple[int, bytes]:
        scope = {
            "type": "http", "method": method, "path": path, "raw_path": path.encode(),
            "query_string": f"token={TOKEN}&{query}".encode(), "headers": [(b"host", HOST.encode())],
            "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 1),
            "client": ("127.0.0.1", 2), "root_path": "",
        }  # fmt: skip
        pending = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[dict] = []

        async def receive() -> dict:
            return pending.pop(0) if pending else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        asyncio.run(self.app(scope, receive, send))
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")

    def post(self, path: str, body: object, query: str = "") -> tuple[int, dict]:
        status, raw = self.call("POST", path, query, json.dumps(body).encode())
        return status, json.loads(raw)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    Image.new("RGB", (64, 48), (255, 0, 0)).save(root / "a.png")
    (root / "a.txt").write_text("1girl, solo\n")
    return root


def test_a_mask_folder_linked_out_of_the_dataset_is_neither_marked_nor_served(data, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("L", (64, 48), 200).save(outside / "a.png")
    (data / "masks").symlink_to(outside)
    client = Client(data)
    entry = client.index.entries["a.png"]
    assert not entry.mask
    assert any("outside the dataset" in p for p in entry.problems)
    status, body = client.call("GET", "/mask", "path=a.png")
    assert status == 404 and b"no mask" in body


def test_a_mask_folder_linked_inside_the_dataset_is_served(data):
    (data / "mask_store").mkdir()
    Image.new("L", (64, 48), 200).save(data / "mask_store" / "a.png")
    (data / "masks").symlink_to("mask_store")
    client = Client(data)
    assert client.index.entries["a.png"].mask
    status, body = client.call("GET", "/mask", "path=a.png")
    assert status == 200 and body.startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "toml",
    [
        'remove_files = ["/etc/passwd"]\n',
        'max_tokens = 75\ntokenizer = "/etc"\n',
        '[project]\ndataset = "x"\n[stages.clean.rules]\nremove_files = ["/etc/hostname"]\n',
    ],
)
def test_the_pages_rules_cannot_name_files_on_the_server(data, toml):
    status, err = Client(data).post("/api/rules", {"toml": toml})
    assert status == 400
    assert "cannot name files on the server" in err["error"] and "sdprep clean" in err["hint"]
    assert "root:" not in json.dumps(err)


def test_rules_without_files_still_preview(data):
    status, out = Client(data).post("/api/rules", {"toml": 'remove = ["solo"]\n'})
    assert status == 200 and out["count"] == 1


@pytest.mark.parametrize(
    ("path", "body", "error"),
    [
        ("/api/caption", [1], "the request body must be a JSON object, got list"),
        ("/api/caption", "x", "the request body must be a JSON object, got str"),
        ("/api/caption", {"path": "a.png", "caption": 5}, "caption: expected a string, got 5"),
        ("/api/caption", {"path": ["a.png"]}, 'path: expected a string, got ["a.png"]'),
        ("/api/tags", {"action": "add", "tag": "x", "paths": [{}]}, "paths: expected a list of paths or null, got [{}]"),
        ("/api/tags", {"action": "add", "tag": 5}, "tag: expected a string, got 5"),
        ("/api/exclude", {"paths": "a.png"}, 'paths: expected a list of paths or null, got "a.png"'),
        ("/api/recaption", {"apply": "yes"}, 'apply: expected true or false, got "yes"'),
        ("/api/rules", {"toml": {"remove": []}}, 'toml: expected a string, got {"remove": []}'),
        ("/api/undo", [], "the request body must be a JSON object, got list"),
    ],
)  # fmt: skip
def test_a_body_of_the_wrong_shape_is_a_400_naming_the_field(data, path, body, error):
    before = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}
    status, err = Client(data).post(path, body)
    assert (status, err["error"]) == (400, error)
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()} == before


def test_a_mask_sent_as_json_is_a_400(data):
    status, err = Client(data).post("/api/mask", {"x": 1}, "path=a.png")
    assert status == 400 and "image/png" in err["error"]
    assert not os.path.exists(data / "masks")
