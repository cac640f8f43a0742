"""Every changing command, SIGKILLed at random points: nothing lost, nothing left over, re-runs converge.

For each command the test builds a small dataset, runs the command once to the end (the reference,
counting its pause points: every journalled change, every atomic write, the journal's start; see
sdprep/faults.py), then kills fresh copies at SDPREP_CRASH_KILLS points (default 20) spread over
that range. After each kill:
- a plain re-run exits as the reference did and leaves exactly the reference's files (byte for
  byte, hidden files included: no temporary file of the dead run survives);
- on the killed copy, `sdprep undo` (repeated until nothing is left) gives back the original
  dataset byte for byte: no file lost, no empty folder left.
Runs are forks of one warm interpreter (tests/zygote.py), so a kill costs tens of milliseconds.
SDPREP_CRASH_KILLS=200 SDPREP_CRASH_SEED=7 pytest tests/test_crash_random.py runs a longer attack.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import corpus
import pytest
from PIL import Image

KILLS = int(os.environ.get("SDPREP_CRASH_KILLS", "20"))
SEED = int(os.environ.get("SDPREP_CRASH_SEED", "18"))


def picture(i: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A distinct smooth picture per i (distinct perceptual hashes)."""
    import numpy as np

    rng = np.random.default_rng(i)
    small = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))
    return small.resize(size, Image.BICUBIC)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def add_image(folder: Path, name: str, im: Image.Image, caption: str | None = "1girl, smile, solo") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if name.lower().endswith((".jpg", ".jpeg")) else "PNG"
    (folder / name).write_bytes(encode(im.convert("RGB"), fmt, quality=92))
    if caption is not None:
        (folder / Path(name).with_suffix(".txt")).write_text(caption + "\n", encoding="utf-8")
    (folder / f"{name}.json").write_text(json.dumps({"id": name, "rating": "g"}) + "\n", encoding="utf-8")


def add_mask(folder: Path, name: str, size: tuple[int, int]) -> None:
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    mask = Image.new("L", size, 0)
    mask.paste(255, (size[0] // 4, size[1] // 4, size[0] * 3 // 4, size[1] * 3 // 4))
    mask.save(folder / "masks" / f"{Path(name).stem}.png")


# -- the datasets, one per command ----------------------------------------------------------------


def plain(root: Path, n: int = 8) -> None:
    for i in range(n):
        add_image(root, f"img{i:02d}.{'jpg' if i % 3 == 0 else 'png'}", picture(i), f"1girl, smile, tag{i}")


def for_rename(root: Path) -> None:
    raw = root / "raw"
    for i in range(7):
        name = hashlib.sha1(str(i).encode()).hexdigest()[:8] + (".JPEG" if i % 3 == 0 else ".png")
        add_image(raw, name, picture(i), f"tag{i}")
        if i % 2 == 0:
            add_mask(raw, name, (48, 40))
    picked = sorted(p.name for p in raw.iterdir() if p.suffix in (".png", ".JPEG"))[:3]
    concept = root / "10_tok"
    concept.mkdir()
    for name in picked:  # the README's layout: a repeat folder of links into raw/
        (concept / name).symlink_to(Path("..") / "raw" / name)
    add_image(concept, "Zed.png", picture(40))


def for_upscale(root: Path) -> None:
    for i in range(5):
        name = f"small{i}.{'jpg' if i == 2 else 'png'}"
        add_image(root, name, picture(i, (40 + 4 * i, 32)))
        add_mask(root, name, (40 + 4 * i, 32))
    add_image(root, "big.png", picture(9, (96, 80)))


def for_convert(root: Path) -> None:
    for i in range(6):
        add_image(root, f"c{i}.{'jpg' if i % 2 else 'png'}", picture(i))
        if i % 3 == 0:
            add_mask(root, f"c{i}.png", (48, 40))


def for_dedup(root: Path) -> None:
    for i in range(4):
        im = picture(i, (64, 56))
        add_image(root, f"orig{i}.png", im)
        add_image(root, f"copy{i}.jpg", im.resize((48, 42), Image.LANCZOS))  # smaller: moved aside
        add_mask(root, f"copy{i}.jpg", (48, 42))
    add_image(root / "sub", "again.png", picture(1, (40, 35)))
    add_image(root, "unique.png", picture(30, (64, 56)))


def for_mask(root: Path) -> None:
    for i in range(6):
        im = Image.new("RGB", (48, 40), (255, 255, 255))
        im.paste(picture(i, (20, 16)), (10 + i, 8))
        add_image(root, f"m{i}.png", im)


# -- the commands ---------------------------------------------------------------------------------


COMMANDS: dict[str, tuple[Callable[[Path], None], Callable[[Path, Path, dict], list[str]]]] = {
    "rename": (for_rename, lambda d, o, fx: ["rename", d, "-r"]),
    "captions": (plain, lambda d, o, fx: ["captions", "replace", "smile", "grin", d]),
    "clean": (plain, lambda d, o, fx: ["clean", d, "--trigger", "tok", "--remove", "solo"]),
    "tag": (plain, lambda d, o, fx: ["tag", d, "--model", fx["tiny_wd14"], "--workers", "1"]),
    "mask": (for_mask, lambda d, o, fx: ["mask", d, "--method", "color", "--fallback", "full"]),
    "upscale": (for_upscale, lambda d, o, fx: ["upscale", d, "--min-side", "64"]),
    "convert": (for_convert, lambda d, o, fx: ["convert", d, "--format", "png"]),
    "dedup": (for_dedup, lambda d, o, fx: ["dedup", d, "-r"]),
    "bucket": (plain, lambda d, o, fx: ["bucket", d, "-o", o, "--token", "tok", "--min-side", "32"]),
    "scrape": (
        lambda root: add_image(root, "own.png", picture(50)),
        lambda d, o, fx: [
            *("scrape", fx["booru"].booru("/posts?tags=nazuna"), fx["booru"].booru("/posts/43")),
            *(fx["booru"].url("/img/b.png"), "-o", d, "--sleep-request", "0", "--rating", "g"),
        ],
    ),
}


def kill_points(total: int, kills: int, rng: random.Random) -> list[int]:
    """`kills` points in 1..total, one at random in each of `kills` equal spans (all when fewer)."""
    if total <= kills:
        return list(range(1, total + 1))
    return sorted({1 + int((i + rng.random()) * total / kills) for i in range(kills)})


def view(folder: Path) -> dict[str, str]:
    return corpus.snapshot(folder) if folder.exists() else {}


def diff(a: dict[str, str], b: dict[str, str]) -> str:
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return ", ".join(
        f"{k} ({'missing' if k not in a else 'extra' if k not in b else 'differs'})" for k in keys[:6]
    )


BATCH_SCORES = pytest.mark.xfail(
    reason="tag scores depend on the batch size (issue 18 item 27): a re-run tags a smaller batch",
    strict=False,
)


@pytest.mark.parametrize(
    "command", [pytest.param(c, marks=BATCH_SCORES) if c == "tag" else c for c in COMMANDS]
)
def test_random_kills_lose_nothing_and_reruns_converge(command, zygote, fast_tmp, request):
    build, make_args = COMMANDS[command]
    fixtures = {}
    if command == "tag":
        fixtures["tiny_wd14"] = request.getfixturevalue("tiny_wd14")
    if command == "scrape":
        from test_scrape import FakeBooru  # a loopback Danbooru: no network

        fixtures["booru"] = FakeBooru()
        request.addfinalizer(fixtures["booru"].close)
    pristine, data, out, aside = (fast_tmp / n for n in ("pristine", "data", "out", "aside"))
    build(pristine)
    args = make_args(data, out, fixtures)
    target = out if command == "bucket" else data  # the folder the command changes

    def fresh() -> None:
        for folder in (data, out, aside):
            shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(pristine, data, symlinks=True)

    fresh()
    original = view(target)
    code, output, total = zygote.run(args)
    assert code == 0, output
    expected = view(target)
    assert expected != original and total > 0

    problems: list[str] = []
    rng = random.Random(f"{SEED}-{command}")
    points = kill_points(total, KILLS, rng)
    for n in points:
        fresh()
        if not zygote.kill_at(args, n):
            problems.append(f"kill {n}/{total}: the run ended before the point")
            continue
        shutil.copytree(target, aside, symlinks=True)
        code, output, _ = zygote.run(args)
        if code != 0:
            problems.append(f"kill {n}/{total}: re-run exit {code}: {output.strip()[-300:]}")
        elif view(target) != expected:
            problems.append(f"kill {n}/{total}: re-run differs: {diff(view(target), expected)}")
        shutil.rmtree(target)
        os.rename(aside, target)
        for _ in range(3):  # the killed operation, then nothing
            code, output, _ = zygote.run(["undo", target])
            if code != 0:
                break
        if "nothing to undo" not in output:
            problems.append(f"kill {n}/{total}: undo failed: {output.strip()[-300:]}")
        elif view(target) != original:
            problems.append(
                f"kill {n}/{total}: undo differs from the original: {diff(view(target), original)}"
            )
    assert not problems, f"{command}: {len(problems)} of {len(points)} kills went wrong:\n" + "\n".join(
        problems
    )
