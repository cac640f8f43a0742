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
A second test fills the disk instead (every write from the N-th on fails with ENOSPC) at
SDPREP_CRASH_FULL_DISKS points (default 4): the error must name the file, and the same recovery holds.
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
FULL_DISKS = int(os.environ.get("SDPREP_CRASH_FULL_DISKS", "4"))
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


EACH = list(COMMANDS)


class Attack:
    """One command on a fresh copy of its dataset, and the checks after each interruption."""

    def __init__(self, command: str, zygote, folder: Path, request) -> None:
        build, make_args = COMMANDS[command]
        fixtures: dict = {}
        if command == "tag":
            fixtures["tiny_wd14"] = request.getfixturevalue("tiny_wd14")
        if command == "scrape":
            from test_scrape import FakeBooru  # a loopback Danbooru: no network

            fixtures["booru"] = FakeBooru()
            request.addfinalizer(fixtures["booru"].close)
        self.zygote, self.folder = zygote, folder
        self.pristine, self.data, self.out, self.aside = (
            folder / n for n in ("pristine", "data", "out", "aside")
        )
        build(self.pristine)
        self.args = make_args(self.data, self.out, fixtures)
        self.target = self.out if command == "bucket" else self.data  # the folder the command changes
        self.fresh()
        self.original = view(self.target)
        code, output, self.total = zygote.run(self.args)
        assert code == 0, output
        self.expected = view(self.target)
        assert self.expected != self.original and self.total > 0
        self.problems: list[str] = []

    def fresh(self) -> None:
        for folder in (self.data, self.out, self.aside):
            shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(self.pristine, self.data, symlinks=True)

    def recovers(self, label: str) -> None:
        """After an interruption: a re-run gives the uninterrupted result; undo gives the original."""
        z, target = self.zygote, self.target
        shutil.copytree(target, self.aside, symlinks=True)
        code, output, _ = z.run(self.args)
        if code != 0:
            self.problems.append(f"{label}: re-run exit {code}: {output.strip()[-300:]}")
        elif view(target) != self.expected:
            self.problems.append(f"{label}: re-run differs: {diff(view(target), self.expected)}")
        shutil.rmtree(target)
        os.rename(self.aside, target)
        for _ in range(3):  # the interrupted operation, then nothing
            code, output, _ = z.run(["undo", target])
            if code != 0:
                break
        if "nothing to undo" not in output:
            self.problems.append(f"{label}: undo failed: {output.strip()[-300:]}")
        elif view(target) != self.original:
            self.problems.append(
                f"{label}: undo differs from the original: {diff(view(target), self.original)}"
            )

    def verdict(self, what: str, tries: int) -> None:
        assert not self.problems, f"{len(self.problems)} of {tries} {what} went wrong:\n" + "\n".join(
            self.problems
        )


@pytest.mark.parametrize("command", EACH)
def test_random_kills_lose_nothing_and_reruns_converge(command, zygote, fast_tmp, request):
    attack = Attack(command, zygote, fast_tmp, request)
    points = kill_points(attack.total, KILLS, random.Random(f"{SEED}-{command}"))
    for n in points:
        attack.fresh()
        if not zygote.kill_at(attack.args, n):
            attack.problems.append(f"kill {n}/{attack.total}: the run ended before the point")
            continue
        attack.recovers(f"kill {n}/{attack.total}")
    attack.verdict("kills", len(points))


@pytest.mark.parametrize("command", EACH)
def test_a_full_disk_names_the_file_and_loses_nothing(command, zygote, fast_tmp, request):
    """From the N-th write on, every write fails with a bare ENOSPC (SDPREP_TEST_FAIL), as a disk
    that fills up mid-run: the error names a file, and the run recovers like a killed one."""
    attack = Attack(command, zygote, fast_tmp, request)
    _, _, writes = zygote.run(attack.args, {"SDPREP_TEST_PAUSE": f"write:{10**9}:{fast_tmp / 'never'}"})
    attack.fresh()
    points = kill_points(writes, FULL_DISKS, random.Random(f"{SEED}-{command}-enospc"))
    for n in points:
        attack.fresh()
        code, output, _ = zygote.run(attack.args, {"SDPREP_TEST_FAIL": f"write:{n}:ENOSPC"})
        full = [line for line in output.splitlines() if "No space left on device" in line]
        if code == 0 or not full:
            attack.problems.append(f"disk full at write {n}/{writes}: exit {code}: {output.strip()[-300:]}")
        elif any(str(fast_tmp) not in line or "?:" in line for line in full):
            attack.problems.append(f"disk full at write {n}/{writes}: a file is not named: {full[0]}")
        attack.recovers(f"disk full at write {n}/{writes}")
    attack.verdict("full disks", len(points))


@pytest.mark.parametrize("command", EACH)
def test_a_killed_undo_is_finished_by_the_next_undo(command, zygote, fast_tmp, request):
    """`sdprep undo` is a command that changes the dataset too: killed anywhere, the next undo
    ends exactly where an uninterrupted undo does (the original dataset), nothing left over."""
    attack = Attack(command, zygote, fast_tmp, request)
    done = fast_tmp / "done"
    shutil.copytree(attack.target, done, symlinks=True)  # after the command, journal included
    code, output, total = zygote.run(["undo", attack.target])
    assert code == 0 and view(attack.target) == attack.original, output
    points = kill_points(total, max(1, KILLS // 2), random.Random(f"{SEED}-{command}-undo"))
    for n in points:
        shutil.rmtree(attack.target)
        shutil.copytree(done, attack.target, symlinks=True)
        if not zygote.kill_at(["undo", attack.target], n):
            attack.problems.append(f"undo killed at {n}/{total}: it ended before the point")
            continue
        code, output, _ = zygote.run(["undo", attack.target])
        again, _, _ = zygote.run(["undo", attack.target])
        if code != 0 or again == 0:
            attack.problems.append(f"undo killed at {n}/{total}: the next undo: exit {code}: {output[-300:]}")
        elif view(attack.target) != attack.original:
            attack.problems.append(
                f"undo killed at {n}/{total}: differs from the original: {diff(view(attack.target), attack.original)}"
            )
    attack.verdict("killed undos", len(points))
