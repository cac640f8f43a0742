"""Every command over the hostile corpus (tests/corpus.py), through the real CLI in a subprocess.

Each command must: never crash (no traceback; exit 0 or 1), process every good image, name every
bad file it reads in its output with a reason, exit 1 when anything failed, and leave every
original byte-for-byte as it was, or (when changing files is its purpose) let `sdprep undo` put
every byte back. Symlinks out of the dataset are refused and the files they point at never change.

Commands run as subprocesses through `corpus.reader_prefix()` (setpriv without the capabilities
that let root read a mode-000 file), so the unreadable file is unreadable even here as root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import corpus
import pytest
from PIL import Image

HEADER_BAD = ["zero.png", "text.png", "bomb.png", "noread.png", "loop.png", "outside.png"]
PIXEL_BAD = [*HEADER_BAD, "trunc_jpg.jpg", "trunc_png.png"]
CAPTION_BAD = ["a_landscape.txt", "leak.txt"]
SIDECAR_BAD = ["e_sepia.jpg", *corpus.BAD_SIDECARS]  # the image (or its sidecar) is named
MASK_BAD = ["f_transparent.png"]
CLASH = corpus.STEM_CLASH  # stages that go by stem (caption, mask) list both images
COMPANION_OF = {
    "a_landscape.txt": "a_landscape.jpg",
    "leak.txt": "leak.png",
    "e_sepia.jpg": "e_sepia.jpg.json",
    **{name: f"{name}.json" for name in corpus.BAD_SIDECARS},
}
# Good images whose companion is bad: they may fail in a stage that reads that companion.
TAINTED = {"a_landscape.jpg", "leak.png", "e_sepia.jpg", "f_transparent.png", *corpus.BAD_SIDECARS}

pytestmark = pytest.mark.skipif(
    not corpus.can_drop_read_permission(), reason="cannot make a file unreadable (setpriv missing)"
)


def run_cli(
    args: list[str], env_extra: dict[str, str] | None = None, *, quiet: bool = True, timeout: float = 300
):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", COLUMNS="400")
    env.update(env_extra or {})
    cmd = [*corpus.reader_prefix(), sys.executable, "-m", "sdprep.cli", *(["-q"] if quiet else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def run_case(
    case: Case, c: corpus.Corpus, work: Path, wd14: Path, sdxl: Path
) -> tuple[subprocess.CompletedProcess, str]:
    """Run one case's command on `c` with the tiny models linked into `work`: (process, all output)."""
    (work / "wd14").symlink_to(wd14, target_is_directory=True)
    (work / "tiny").symlink_to(sdxl, target_is_directory=True)
    done = run_cli(case.args(c, work), {"SDPREP_CACHE": str(work / "cache")}, quiet=case.quiet)
    return done, done.stdout + done.stderr


def assert_kept_or_undone(root: Path, before: dict, changes: bool) -> None:
    """A command that is not meant to change the dataset at `root` left every byte as it was (the
    `before` snapshot); one that is changed something, and `sdprep undo` puts every byte back."""
    after = corpus.snapshot(root)
    if not changes:
        assert after == before, "the dataset changed"
        return
    assert after != before, "nothing changed"
    undone = run_cli(["undo", str(root)])
    assert undone.returncode == 0, undone.stdout + undone.stderr
    assert corpus.snapshot(root) == before, "undo did not restore every byte"


def failure_paths(output: str) -> list[str]:
    """Paths named on `  failed: PATH: reason` lines (a path may hold a newline)."""
    blocks = output.split("\n  failed: ")[1:]
    return [block.split(": ", 1)[0] for block in blocks]


@dataclass
class Case:
    args: Callable[[corpus.Corpus, Path], list[str]]
    bad: list[str]  # names (relative to the dataset) that must be reported
    changes: bool  # changing the dataset is the command's purpose (then undo restores it)
    check: Callable[[corpus.Corpus, Path], None] | None = None
    may_fail: set[str] = field(default_factory=lambda: set(TAINTED))
    lines: str = "failed"  # "failed": StageResult lines; "any": names anywhere in the output
    exit_code: int | None = None  # default: 1 when `bad` is not empty
    prepare: Callable[[corpus.Corpus], None] | None = None  # change the corpus first
    quiet: bool = True


def _images(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.suffix in (".png", ".jpg", ".webp", ".gif") and p.is_file()]


def check_renamed(c: corpus.Corpus, out: Path) -> None:
    names = {p.name for p in c.root.iterdir()}
    assert not set(c.good) & names, "good images keep their old names"


def check_upscaled(c: corpus.Corpus, out: Path) -> None:
    for name in c.good:
        if name in TAINTED or name.endswith(".gif") or name == corpus.STRIP:
            continue
        with Image.open(c.path(name)) as im:
            assert min(im.size) >= 200, (name, im.size)


def check_masks(c: corpus.Corpus, out: Path) -> None:
    for name in c.good:
        if name not in TAINTED:
            assert (c.root / "masks" / (Path(name).stem + ".png")).is_file(), name


def check_tagged(c: corpus.Corpus, out: Path) -> None:
    for name in c.good:
        if name not in TAINTED:
            assert c.path(name).with_suffix(".txt").read_text(encoding="utf-8").strip(), name
    assert (c.root / "clash.txt").read_text() == "1girl, solo, smile\n"  # shared: left alone


def check_cleaned(c: corpus.Corpus, out: Path) -> None:
    for name in c.good:
        if name not in TAINTED:
            assert c.path(name).with_suffix(".txt").read_text(encoding="utf-8").startswith("tok"), name
    hidden = c.path(corpus.HIDDEN_CAPTION[0]).with_suffix(".txt").read_text(encoding="utf-8")
    assert {"1girl", "smile", "solo", "outdoors"} <= set(hidden.strip().split(", ")), hidden
    assert (c.root / "clash.txt").read_text() == "1girl, solo, smile\n"  # shared: left alone


def check_replaced(c: corpus.Corpus, out: Path) -> None:
    assert (c.root / "my photo 01.txt").read_bytes() == b"1girl, solo, grin\n"
    # invisible characters and fullwidth letters normalised, CRLF a separator: the tag is found
    hidden = c.path(corpus.HIDDEN_CAPTION[0]).with_suffix(".txt")
    assert hidden.read_bytes() == b"1girl, grin, solo, outdoors\n"
    # a caption without the word is not rewritten: its BOM stays, byte for byte
    assert (c.root / "b_portrait.txt").read_bytes() == b"\xef\xbb\xbf1girl, solo, long hair\n"


def check_bucketed(c: corpus.Corpus, out: Path) -> None:
    placed = {p.name for p in (out / "out" / "img" / "1_tok").iterdir()}
    for name in c.good:
        if name not in TAINTED and name != "one_px.png":
            assert name in placed or any(Path(p).stem == Path(name).stem for p in placed), name


def _assert_not_placed(folder: Path, name: str) -> None:
    placed = {p.name for p in folder.iterdir()}
    assert name not in placed and len([p for p in placed if p.endswith((".png", ".jpg", ".webp"))]) > 3


def check_report(c: corpus.Corpus, out: Path) -> None:
    doc = json.loads((out / "report.json").read_text(encoding="utf-8"))
    listed = {Path(r["path"]).name: r for r in doc["images"]}
    for name in c.good:
        assert name in listed, name
        if name not in TAINTED:
            assert listed[name]["size"], name
    for name in PIXEL_BAD:
        assert listed[name]["problems"], name


def preflight_args(c: corpus.Corpus, work: Path) -> list[str]:
    """`sdprep train --preflight` on the corpus (a kohya dataset config pointing at it)."""
    (work / "dataset.toml").write_text(
        f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{c.root}"\nclass_tokens = "tok"\n'
    )
    (work / "train.toml").write_text(
        f'pretrained_model_name_or_path = "{work / "tiny"}"\ndataset_config = "{work / "dataset.toml"}"\n'
        f'output_dir = "{work / "out"}"\nnetwork_module = "networks.lora"\nresolution = 512\n'
        "max_train_steps = 2\ncache_latents = true\n"
    )
    return ["train", "--config", str(work / "train.toml"), "--preflight"]


CASES: dict[str, Case] = {
    "rename": Case(lambda c, o: ["rename", str(c.root)], [], True, check_renamed),
    # images kept as they are are decoded to the end too: the truncated ones are listed
    "convert": Case(lambda c, o: ["convert", str(c.root)], PIXEL_BAD, True),
    "dedup": Case(lambda c, o: ["dedup", str(c.root)], PIXEL_BAD + SIDECAR_BAD, True),
    "upscale": Case(
        lambda c, o: ["upscale", str(c.root), "--min-side", "200"],
        PIXEL_BAD + SIDECAR_BAD + [corpus.STRIP],  # 200x4,000,000: more than sdprep reads back
        True,
        check_upscaled,
        # upscale writes no GIF: it asks for `sdprep convert`
        may_fail=TAINTED | {"anim_gif.gif", corpus.STRIP},
    ),
    "mask": Case(
        lambda c, o: ["mask", str(c.root), "--method", "alpha", "--fallback", "full", "--force"],
        PIXEL_BAD + SIDECAR_BAD + CLASH,
        True,
        check_masks,
    ),
    "mask-check": Case(lambda c, o: ["mask", "--check", str(c.root)], MASK_BAD, False, lines="any"),
    "tag": Case(
        lambda c, o: ["tag", str(c.root), "--model", str(o / "wd14")],
        PIXEL_BAD + SIDECAR_BAD + CAPTION_BAD + CLASH,
        True,
        check_tagged,
    ),
    "clean": Case(
        lambda c, o: ["clean", str(c.root), "--trigger", "tok"],
        PIXEL_BAD + SIDECAR_BAD + CAPTION_BAD + CLASH,
        True,
        check_cleaned,
    ),
    "captions-replace": Case(
        lambda c, o: ["captions", "replace", "smile", "grin", str(c.root)], CAPTION_BAD, True, check_replaced
    ),
    "captions-stats": Case(lambda c, o: ["captions", "stats", str(c.root)], CAPTION_BAD, False),
    "bucket": Case(
        lambda c, o: ["bucket", str(c.root), "-o", str(o / "out"), "--token", "tok", "--repeats", "1"],
        HEADER_BAD + CAPTION_BAD + CLASH,
        False,
        check_bucketed,
        prepare=lambda c: (c.root / "masks" / "f_transparent.png").unlink(),
    ),
    # a mask of the wrong size drops its image (listed with the mask's name); the rest is built
    "bucket-mask": Case(
        lambda c, o: ["bucket", str(c.root), "-o", str(o / "out"), "--token", "tok", "--repeats", "1"],
        MASK_BAD,
        False,
        lambda c, o: _assert_not_placed(o / "out" / "img" / "1_tok", "f_transparent.png"),
        lines="any",
    ),
    "report": Case(
        lambda c, o: ["report", str(c.root), "--format", "json", "-o", str(o / "report.json")],
        PIXEL_BAD + CAPTION_BAD + [f"{name}.json" for name in SIDECAR_BAD] + MASK_BAD,
        False,
        check_report,
        lines="any",  # the report is written; unreadable files are listed and make the exit code 1
    ),
    # headers and captions are checked first, then every image is decoded (all named at once)
    "train-preflight": Case(
        preflight_args,
        [*HEADER_BAD, "a_landscape.jpg", "leak.png", "trunc_jpg.jpg", "trunc_png.png"],
        False,
        lines="any",
        quiet=False,
    ),
}


def assert_reported(case: Case, c: corpus.Corpus, output: str) -> None:
    assert "Traceback" not in output, output
    if case.lines == "any":
        for name in case.bad:
            assert name in output, f"{name} not reported:\n{output}"
        return
    failed = {Path(p).name for p in failure_paths(output)}
    for name in case.bad:
        # a bad companion may be listed under its own name or its image's (the reason names it)
        aliases = {name, COMPANION_OF.get(name, name)}
        assert aliases & failed, f"{name} not listed as failed:\n{output}"
    wrongly = failed & (set(c.good) - case.may_fail)
    assert not wrongly, f"good images listed as failed: {wrongly}\n{output}"


@pytest.mark.parametrize("name", list(CASES))
def test_command_over_hostile_corpus(name: str, tmp_path: Path, tiny_wd14: Path, tiny_sdxl: Path) -> None:
    case = CASES[name]
    c = corpus.build(tmp_path / "data")
    if case.prepare:
        case.prepare(c)
    before, outside_before = corpus.snapshot(c.root), corpus.snapshot(c.outside)

    done, output = run_case(case, c, tmp_path, tiny_wd14, tiny_sdxl)
    expected_exit = case.exit_code if case.exit_code is not None else (1 if case.bad else 0)
    assert done.returncode == expected_exit, output
    assert_reported(case, c, output)
    if case.check:
        case.check(c, tmp_path)
    assert corpus.SECRET_TEXT not in output
    assert corpus.snapshot(c.outside) == outside_before, "a file outside the dataset changed"
    assert_kept_or_undone(c.root, before, case.changes)
