"""scrape runs the real gallery-dl against a loopback HTTP server started by each test (no network)."""

import hashlib
import io
import json
import re
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from loopback import Loopback, Request, Response
from PIL import Image

from sdprep import fileops
from sdprep.cli import cli
from sdprep.errors import ConfigError
from sdprep.prep.scrape import ScrapeOptions, booru_metadata, normalise_rating, run_scrape, safe_name

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "images"
SAFE = re.compile(r"^[A-Za-z0-9_-]+\.[a-z0-9]+(\.json)?$")


def image_bytes(seed: str, size=(120, 90), fmt="PNG") -> bytes:
    colour = tuple(hashlib.md5(seed.encode()).digest()[:3])
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


def post(port: int, pid: int, file_path: str, rating="g", general="1girl solo smile", **extra) -> dict:
    """A Danbooru API post as /posts/N.json returns it (the fields gallery-dl's extractor reads)."""
    return {
        "id": pid,
        "md5": hashlib.md5(str(pid).encode()).hexdigest(),
        "rating": rating,
        "image_width": 120,
        "image_height": 90,
        "file_ext": "png",
        "file_url": f"http://127.0.0.1:{port}{file_path}",
        "created_at": "2024-05-01T12:00:00.000-04:00",
        "tag_string": f"{general} nazuna_(yofukashi_no_uta) yofukashi_no_uta artist_one",
        "tag_string_general": general,
        "tag_string_character": "nazuna_(yofukashi_no_uta)",
        "tag_string_copyright": "yofukashi_no_uta",
        "tag_string_artist": "artist_one",
        "tag_string_meta": "",
        **extra,
    }


class FakeBooru:
    """Direct image links under /img/, a Danbooru API under /posts, files under /data/."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.server = Loopback(self.serve)
        self.port = self.server.port
        self.posts = {
            42: post(self.port, 42, "/data/42.png"),
            43: post(self.port, 43, "/data/43.png", rating="e"),
            44: post(self.port, 44, "/data/..%2F..%2F..%2Fescape%00me.png"),
            45: post(self.port, 45, "/data/45.png", general="1girl comic"),
            46: post(self.port, 46, "/data/46.png"),
            47: post(self.port, 47, "/data/" + "x" * 300 + ".png"),
        }

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def booru(self, path: str) -> str:
        return f"Danbooru:http://127.0.0.1:{self.port}{path}"

    def serve(self, request: Request) -> Response:
        self.requests.append(request.path)
        status, body, ctype = self.answer(request.path)
        return Response(status, body, ctype)

    def answer(self, raw: str) -> tuple[int, bytes, str]:
        u = urlparse(raw)
        if m := re.fullmatch(r"/posts/(\d+)\.json", u.path):
            found = self.posts.get(int(m[1]))
            return (
                (200, json.dumps(found).encode(), "application/json") if found else (404, b"{}", "text/plain")
            )
        if u.path == "/posts.json":
            tags = parse_qs(u.query).get("tags", [""])[0]
            hits = [p for p in self.posts.values() if tags in p["tag_string"] and p["id"] in (42, 45, 46)]
            return 200, json.dumps(hits).encode(), "application/json"
        if u.path.startswith("/data/") or (u.path.startswith("/img/") and "missing" not in u.path):
            small = "small" in u.path
            return 200, image_bytes(u.path, (60, 40) if small else (120, 90)), "image/png"
        return 404, b"not found", "text/plain"

    def image_gets(self) -> list[str]:
        return [r for r in self.requests if r.startswith(("/data/", "/img/"))]

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def booru(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    server = FakeBooru()
    yield server
    server.close()


def opts(*urls: str, **kw) -> ScrapeOptions:
    return ScrapeOptions(urls=urls, sleep_request=0, **kw)


def files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_file())


# -- pure parts -------------------------------------------------------------------------------------


def test_booru_metadata_from_danbooru_gelbooru_e621():
    danbooru = json.loads((SAMPLE / "a_landscape.jpg.json").read_text())
    meta = booru_metadata(danbooru)
    assert meta["rating"] == "g"
    assert meta["tags"]["character"] == ["nazuna_(yofukashi_no_uta)"]
    assert meta["tags"]["artist"] == ["artist_one"] and meta["tags"]["meta"] == []
    assert meta["tags"]["general"][:3] == ["1girl", "solo", "pink_hair"]
    gelbooru = booru_metadata({"tags": "1girl  solo", "rating": "explicit"})
    assert gelbooru == {
        "tags": {"general": ["1girl", "solo"], "character": [], "copyright": [], "artist": [], "meta": []},
        "rating": "e",
    }
    e621 = booru_metadata({"tags": {"general": ["a"], "species": ["fox"], "artist": ["b"]}, "rating": "s"})
    assert e621["tags"]["general"] == ["a", "fox"] and e621["tags"]["artist"] == ["b"]
    assert booru_metadata({"url": "x"}) is None
    assert normalise_rating("Sensitive") == "s" and normalise_rating("") is None


def test_safe_names_cannot_escape_or_hide():
    assert safe_name("../../etc/passwd.png") == "etc_passwd.png"
    assert safe_name(".hidden.PNG") == "hidden.png"
    assert safe_name("a\0b.png") == "ab.png"
    assert safe_name("/abs/path.jpg") == "abs_path.jpg"
    assert len(safe_name("x" * 300 + ".png")) == 124
    assert safe_name("..") == "file" and safe_name("") == "file"
    with pytest.raises(ConfigError, match='unknown rating "x"'):
        ScrapeOptions(urls=("u",), ratings=("x",))


# -- real gallery-dl ---------------------------------------------------------------------------------


def test_direct_links_and_danbooru_post_resume_and_undo(booru, tmp_path):
    data = tmp_path / "data"
    o = opts(booru.url("/img/a.png"), booru.booru("/posts/42"))
    result = run_scrape(data, o)
    assert (result.changed, result.skipped, result.failed) == (2, 0, [])
    port = booru.port
    md5 = hashlib.md5(b"42").hexdigest()
    name = f"127_0_0_1_{port}_42_42.png"
    assert files(data) == sorted(["directlink_a.png", "directlink_a.png.json", name, name + ".json"])
    assert "/posts/42.json" in booru.requests
    side = json.loads((data / (name + ".json")).read_text())
    assert side["id"] == 42 and side["md5"] == md5 and side["tags_general"] == ["1girl", "solo", "smile"]
    assert side["sdprep"]["booru"] == {
        "tags": {
            "general": ["1girl", "solo", "smile"],
            "character": ["nazuna_(yofukashi_no_uta)"],
            "copyright": ["yofukashi_no_uta"],
            "artist": ["artist_one"],
            "meta": [],
        },
        "rating": "g",
    }
    assert side["sdprep"]["scrape"] == {"url": booru.booru("/posts/42")}
    assert "booru" not in json.loads((data / "directlink_a.png.json").read_text())["sdprep"]

    gets = len(booru.image_gets())
    again = run_scrape(data, o)
    assert (again.changed, again.skipped, again.failed) == (0, 2, [])
    assert len(booru.image_gets()) == gets  # nothing downloaded again

    fileops.undo(data)
    assert files(data) == []
    assert run_scrape(data, o).changed == 2  # undo also forgot the archive entries


def test_search_limit_and_filters_move_rejects_aside(booru, tmp_path):
    data = tmp_path / "data"
    search = booru.booru("/posts?tags=nazuna")
    result = run_scrape(data, opts(search, limit=2))
    assert result.changed == 2
    assert any(r.startswith("/posts.json?tags=nazuna&limit=200") for r in booru.requests)

    data2 = tmp_path / "filtered"
    urls = (search, booru.booru("/posts/43"), booru.url("/img/small.png"))
    result = run_scrape(data2, opts(*urls, ratings=("g", "s"), exclude_tags=("comic",), min_side=50))
    assert result.changed == 2  # posts 42 and 46
    assert "  rejected 3 (kept in rejected/): 1 excluded tag, 1 rating, 1 too small" in result.summary()
    reasons = {
        p.name: json.loads(p.read_text())["sdprep"]["rejected"] for p in (data2 / "rejected").glob("*.json")
    }
    assert sorted(reasons.values()) == [
        "60x40 is below --min-side 50",
        "excluded tag comic",
        "rating e not allowed",
    ]


def test_hostile_file_names_stay_inside_the_dataset(booru, tmp_path):
    data = tmp_path / "a" / "b" / "data"
    urls = (booru.booru("/posts/44"), booru.booru("/posts/47"), booru.url("/img/%2Fetc%2Fpasswd.png"))
    result = run_scrape(data, opts(*urls))
    assert (result.changed, result.failed) == (3, [])
    written = [p for p in tmp_path.rglob("*") if p.is_file() and ".sdprep" not in p.parts]
    assert all(p.parent == data for p in written), written
    assert all(SAFE.match(p.name) and len(p.name) <= 140 for p in written), [p.name for p in written]
    assert any("escape_me" in p.name for p in written)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_cli_failures_and_config_files(booru, tmp_path, cli_runner):
    data = tmp_path / "data"
    args = ["-q", "scrape", booru.url("/img/missing.png"), "ftp://nowhere/x", "-o", str(data)]
    res = cli_runner.invoke(cli, [*args, "--sleep-request", "0"])
    assert res.exit_code == 1
    assert res.output.startswith("scrape: 0 changed, 0 skipped, 2 failed\n")
    assert f"failed: {data}: {booru.url('/img/missing.png')}: " in res.output
    assert "404" in res.output
    assert f"failed: {data}: ftp://nowhere/x: no gallery-dl extractor supports this URL" in res.output

    secret = tmp_path / "gallery-dl.conf"
    secret.write_text('{"extractor": {"password": "hunter2", ')
    res = cli_runner.invoke(
        cli, ["scrape", booru.url("/img/a.png"), "-o", str(data), "--config", str(secret)]
    )
    assert res.exit_code == 1
    assert f"Error: --config {secret}: not a valid JSON gallery-dl config (line 1)" in res.output
    assert "hunter2" not in res.output

    # a user config cannot move downloads elsewhere or change their names
    secret.write_text(
        json.dumps({"base-directory": str(tmp_path / "elsewhere"), "extractor": {"directory": ["x"]}})
    )
    cookies = tmp_path / "cookies.txt"
    cookies.write_text("# Netscape HTTP Cookie File\n")
    argv = ["-q", "scrape", booru.url("/img/a.png"), "-o", str(data), "--config", str(secret)]
    res = cli_runner.invoke(cli, [*argv, "--cookies", str(cookies), "--sleep-request", "0"])
    assert res.exit_code == 0, res.output
    assert res.output == "scrape: 1 changed, 0 skipped, 0 failed\n"
    assert files(data) == ["directlink_a.png", "directlink_a.png.json"]
    assert not (tmp_path / "elsewhere").exists()
