"""What the review page's tests, its screenshot script and its benchmark share: a dataset to
review, the real `sdprep review` command as a server, and Debian's chromium driven by Playwright.

Chromium: the system's (`apt-get install chromium`, done here when missing and possible), launched
headless with the flags that keep it off the network; Playwright never downloads a browser.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
SDPREP = Path(sys.executable).with_name("sdprep")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]


# -- a dataset to review -------------------------------------------------------------------------


def _extra_image(i: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(i)
    w, h = size
    top, bottom = rng.integers(30, 230, 3), rng.integers(30, 230, 3)
    t = np.linspace(0, 1, h)[:, None, None]
    arr = (top[None, None, :] * (1 - t) + bottom[None, None, :] * t).repeat(w, axis=1)
    im = Image.fromarray(arr.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    cx, cy, r = w // 2, h // 2, min(w, h) // 5
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return im


def make_review_dataset(root: Path, wd14_model: Path) -> Path:
    """12 images: the 8 samples and 4 more, captioned from booru tags by clean, WD14 scores stored
    by tag (merged into the captions), two with masks, one with a `light blue eyes` tag."""
    from sdprep.prep.clean import CleanOptions, run_clean
    from sdprep.prep.rules import CleanRules
    from sdprep.prep.tag import TagOptions, run_tag

    shutil.copytree(REPO / "sample_data" / "images", root)
    for i, size in enumerate([(640, 832), (832, 640), (1024, 1024), (600, 900)]):
        _extra_image(i, size).save(root / f"extra_{i:02d}.png")
        (root / f"extra_{i:02d}.txt").write_text("1girl, solo, light blue eyes, outdoors\n")
    assert not run_clean(root, CleanOptions(CleanRules(trigger=("nazuna",), underscores="space"))).failed
    assert not run_tag(root, TagOptions(model=str(wd14_model), merge="append")).failed
    (root / "masks").mkdir()
    for name in ("b_portrait.png", "extra_01.png"):
        w, h = Image.open(root / name).size
        m = Image.new("L", (w, h), 0)
        ImageDraw.Draw(m).rectangle([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=255)
        m.save(root / "masks" / (Path(name).stem + ".png"))
    shutil.rmtree(root / ".sdprep")  # a dataset as a user hands it over: no journal yet
    return root


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root except sdprep's own state, by relative path, with its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and ".sdprep" not in rel.parts:
            out[rel.as_posix()] = p.read_bytes()
    return out


def digest(files: dict[str, bytes]) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest()[:16] for k, v in files.items()}


# -- the server ----------------------------------------------------------------------------------


class Server:
    """`sdprep review DIR` in a subprocess; `url` is the page with its token."""

    def __init__(self, root: Path, *args: str, browser: str | None = None):
        """`browser`: a command the server opens the page with (as $BROWSER); None: --no-browser."""
        self.root = root
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if browser is not None:
            env["BROWSER"] = browser
        flags = [] if browser is not None else ["--no-browser"]
        self.proc = subprocess.Popen(
            [str(SDPREP), "review", str(root), *flags, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.output: list[str] = []
        self.url = ""
        for line in self.proc.stdout:
            self.output.append(line)
            m = re.search(r"open (http\S+)", line)
            if m:
                self.url = m.group(1)
                break
        if not self.url:
            self.proc.wait(10)
            raise RuntimeError("sdprep review did not start:\n" + "".join(self.output))
        m = re.match(r"http://(.+):(\d+)/\?token=(.+)", self.url)
        self.host, self.port, self.token = m.group(1), int(m.group(2)), m.group(3)

    def api(self, path: str, body: dict | None = None, *, token: bool = True) -> tuple[int, dict | str]:
        """(status, JSON or text) of a request to the page's server."""
        import urllib.error
        import urllib.request

        sep = "&" if "?" in path else "?"
        full = f"http://127.0.0.1:{self.port}{path}" + (f"{sep}token={self.token}" if token else "")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(full, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as res:
                status, raw = res.status, res.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    def stop(self) -> tuple[int, str]:
        """Ctrl-C, as a user stops it; returns (exit code, the rest of its output)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            rest = self.proc.communicate(timeout=20)[0] or ""
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest = self.proc.communicate()[0] or ""
        return self.proc.returncode, "".join(self.output) + rest

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# -- the browser ---------------------------------------------------------------------------------


def chromium_path() -> str | None:
    """Debian's chromium; installed with apt-get when missing and this process may (root)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found or not shutil.which("apt-get") or os.geteuid() != 0:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    if subprocess.run(install, capture_output=True, timeout=900, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=900, env=env)
        subprocess.run(install, capture_output=True, timeout=900, env=env)
    return shutil.which("chromium")


def browser_problem() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (it is in sdprep's dev extra: make setup)"
    if chromium_path() is None:
        return "no chromium and it cannot be installed here (Debian: apt-get install chromium)"
    return None


@contextlib.contextmanager
def chromium() -> Iterator:
    """A headless chromium browser (Playwright Browser) that makes no connection of its own."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
