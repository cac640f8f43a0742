"""SIGKILL in the middle of rename, captions replace and tag: nothing lost, nothing half-written.

The kill lands at a known place: SDPREP_TEST_PAUSE (sdprep/faults.py) stops the CLI subprocess
before its N-th file change and the test then kills it with SIGKILL from outside. Afterwards every
file is whole (images decode, captions hold the old or the new text), `sdprep undo` restores the
dataset byte for byte, and finishing the job (undo + re-run, or a plain re-run) gives exactly what an
uninterrupted run gives on a copy.
"""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from pathlib import Path

import corpus
from crashkit import kill_at, sdprep
from PIL import Image

N_IMAGES = 300


def make_dataset(root: Path, n: int = N_IMAGES) -> Path:
    """n small distinct images with captions and sidecars, under unsorted, mixed-case names."""
    root.mkdir(parents=True)
    for i in range(n):
        name = hashlib.sha1(str(i).encode()).hexdigest()[:10] + (".JPEG" if i % 7 == 0 else ".png")
        im = Image.new("RGB", (32, 24), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
        im.putpixel((i % 32, i % 24), (255, 255, 255))
        im.save(root / name, "JPEG" if name.endswith(".JPEG") else "PNG")
        stem = Path(name).stem
        (root / f"{stem}.txt").write_text(f"1girl, smile, tag{i % 13}, solo\n", encoding="utf-8")
        (root / f"{name}.json").write_text(f'{{"id": {i}, "rating": "g"}}\n', encoding="utf-8")
    return root


def contents(root: Path) -> Counter[str]:
    """The multiset of file contents under root (hidden temporary names included, journal not)."""
    out: Counter[str] = Counter()
    for path in root.rglob("*"):
        if ".sdprep" not in path.relative_to(root).parts and path.is_file():
            out[hashlib.sha256(path.read_bytes()).hexdigest()] += 1
    return out


def assert_whole(root: Path, old_captions: set[str], new_captions: set[str]) -> None:
    """Every image decodes; every caption is exactly an old or a new caption text."""
    for path in root.rglob("*"):
        if ".sdprep" in path.relative_to(root).parts or not path.is_file():
            continue
        if path.suffix.lower() in (".png", ".jpeg", ".jpg"):
            with Image.open(path) as im:
                im.load()
        elif path.suffix == ".txt":
            text = path.read_text(encoding="utf-8")
            assert text in old_captions | new_captions, f"{path.name}: partial caption {text!r}"


def captions_of(root: Path) -> set[str]:
    return {p.read_text(encoding="utf-8") for p in root.glob("*.txt")}


def reference(tmp: Path, data: Path, args: list[str]) -> dict[str, str]:
    """The snapshot an uninterrupted run produces on a copy of `data`."""
    ref = tmp / "reference"
    shutil.copytree(data, ref)
    done = sdprep(*[str(ref) if a == str(data) else a for a in args])
    assert done.returncode == 0, done.stdout + done.stderr
    return corpus.snapshot(ref)


def test_rename_killed_midway_loses_nothing(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data")
    original, original_contents = corpus.snapshot(data), contents(data)
    expected = reference(tmp_path, data, ["rename", str(data)])

    # 900 files move twice (to temporary names, then to final names): kill during the second phase
    kill_at(["rename", str(data)], "change", 1200, tmp_path)
    assert contents(data) == original_contents, "a file was lost or changed"
    assert_whole(data, captions_of(tmp_path / "reference"), set())
    interrupted = tmp_path / "interrupted"
    shutil.copytree(data, interrupted, symlinks=True)

    done = sdprep("undo", str(data))
    assert done.returncode == 0 and "(interrupted)" in done.stdout, done.stdout + done.stderr
    assert corpus.snapshot(data) == original
    assert sdprep("rename", str(data)).returncode == 0
    assert corpus.snapshot(data) == expected

    # a plain re-run on the interrupted copy either finishes the job or says to undo first
    again = sdprep("rename", str(interrupted))
    if again.returncode == 0:
        assert corpus.snapshot(interrupted) == expected
    else:
        assert "sdprep undo" in again.stdout + again.stderr
        assert contents(interrupted) == original_contents


def test_captions_replace_killed_midway(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data")
    original = corpus.snapshot(data)
    old = captions_of(data)
    args = ["captions", "replace", "smile", "grin", str(data)]
    expected = reference(tmp_path, data, args)
    new = captions_of(tmp_path / "reference")

    kill_at(args, "change", 120, tmp_path)
    assert_whole(data, old, new)
    now = captions_of(data)
    assert now & old and now & new, "the kill did not land in the middle of the run"
    interrupted = tmp_path / "interrupted"
    shutil.copytree(data, interrupted)

    assert sdprep(*args[:-1], str(interrupted)).returncode == 0  # a plain re-run finishes the job
    assert corpus.snapshot(interrupted) == expected
    assert sdprep("undo", str(data)).returncode == 0
    assert corpus.snapshot(data) == original


def test_tag_killed_midway(tmp_path: Path, tiny_wd14: Path) -> None:
    data = make_dataset(tmp_path / "data", n=120)
    original = corpus.snapshot(data)
    old = captions_of(data)
    args = ["tag", str(data), "--model", str(tiny_wd14), "--workers", "1"]
    expected = reference(tmp_path, data, args)
    new = captions_of(tmp_path / "reference")

    kill_at(args, "change", 100, tmp_path)  # a caption or sidecar write
    assert_whole(data, old, new)
    interrupted = tmp_path / "interrupted"
    shutil.copytree(data, interrupted)

    assert sdprep(*args[:1], str(interrupted), *args[2:]).returncode == 0  # the re-run finishes
    assert corpus.snapshot(interrupted) == expected
    assert sdprep("undo", str(data)).returncode == 0
    assert corpus.snapshot(data) == original
