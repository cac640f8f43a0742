"""Hostile paths: symlinks out of a dataset, symlinked folders, FIFOs, archives from scrapes.

The rule (sdprep/dataset.py `unsafe_reason`): sdprep follows a symlink only when its target lies in
the link's own folder or below it, or anywhere in the dataset sdprep was pointed at. Links out of it, loops, dangling links and special files are
listed by discovery and refused by the readers (a per-file failure naming the link), and no
journalled write goes through a symlinked folder that leads out of the dataset. Path traversal from
scraped metadata is covered in test_scrape.py; sdprep extracts no archives (a downloaded .zip is
rejected, and a user's gallery-dl config cannot add post-processors such as ugoira or zip).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path

import corpus
import pytest
from PIL import Image
from test_scrape import FakeBooru

from sdprep import fileops
from sdprep.cli import cli
from sdprep.dataset import Item, discover, read_caption, unsafe_reason
from sdprep.errors import CaptionError, ImageError, JournalError
from sdprep.images import load_image


def image(path: Path, colour=(200, 30, 30)) -> Path:
    Image.new("RGB", (40, 30), colour).save(path)
    return path


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "sub").mkdir(parents=True)
    outside.mkdir()
    image(outside / "elsewhere.png")
    (outside / "secret.txt").write_text(corpus.SECRET_TEXT)
    image(data / "real.png")
    (data / "inside.png").symlink_to("real.png")  # same folder: followed
    image(data / "sub" / "deep.png")
    (data / "down.png").symlink_to("sub/deep.png")  # below the link's folder: followed
    (data / "sub" / "up.png").symlink_to("../real.png")  # up out of its folder, inside the dataset
    (data / "out.png").symlink_to(outside / "elsewhere.png")
    (data / "real.txt").symlink_to(outside / "secret.txt")
    (data / "loop.png").symlink_to("loop.png")
    (data / "gone.png").symlink_to("nothing-here.png")
    os.mkfifo(data / "fifo.png")
    return data, outside


def test_the_symlink_rule(layout, monkeypatch) -> None:
    data, outside = layout
    with pytest.raises(ImageError, match="outside the dataset"):
        load_image(data / "sub" / "up.png")  # given on its own: only its folder and below count
    items = {i.path.relative_to(data).as_posix(): i for i in discover(data, recursive=True)}
    assert set(items) == {
        "real.png", "inside.png", "down.png", "out.png", "loop.png", "gone.png", "fifo.png",
        "sub/deep.png", "sub/up.png",
    }  # fmt: skip
    assert {i.root for i in items.values()} == {os.path.realpath(data)}
    for ok in ("real.png", "inside.png", "down.png", "sub/deep.png", "sub/up.png"):
        assert unsafe_reason(data / ok, data) is None, ok
        assert load_image(data / ok, root=items[ok].root).size == (40, 30)
    # the dataset root is passed, never remembered: listing folders changes no later answer
    discover(outside)
    with pytest.raises(ImageError, match="outside the dataset"):
        load_image(data / "sub" / "up.png")
    assert "outside the dataset" in unsafe_reason(data / "sub" / "up.png", data / "sub")
    assert "outside the dataset" in unsafe_reason(data / "out.png", outside)  # a root not holding the link
    reasons = {
        "out.png": "outside the dataset",
        "loop.png": "symlink loop",
        "gone.png": "broken symlink (to nothing-here.png)",
        "fifo.png": "not a regular file",  # reading it would block forever
    }
    for name, reason in reasons.items():
        with pytest.raises(ImageError, match=re.escape(reason)) as err:
            load_image(data / name, root=data)
        assert "SDPREP_FOLLOW_SYMLINKS" in str(err.value) or name in ("fifo.png",)
    with pytest.raises(CaptionError, match="outside the dataset"):
        read_caption(items["real.png"])

    monkeypatch.setenv("SDPREP_FOLLOW_SYMLINKS", "1")  # the user trusts the links
    assert load_image(data / "out.png").size == (40, 30)
    assert read_caption(Item(data / "real.png")) == corpus.SECRET_TEXT


def test_a_recursive_run_follows_links_within_the_dataset_it_was_given(layout, cli_runner) -> None:
    """`sub/up.png -> ../real.png` stays inside DIR: a recursive command over DIR reads it; links
    out of DIR, loops and dangling links are that file's failure."""
    data, _ = layout
    (data / "fifo.png").unlink()
    (data / "real.txt").unlink()
    res = cli_runner.invoke(cli, ["-q", "mask", str(data), "-r", "--method", "full"])
    assert res.exit_code == 1, res.output
    lines = [line.removeprefix("  failed: ") for line in res.output.splitlines() if "  failed: " in line]
    failed = {Path(line.split(": ")[0]).name for line in lines}
    assert failed == {"out.png", "loop.png", "gone.png"}, res.output
    assert (data / "sub" / "masks" / "up.png").is_file()


def test_no_command_reads_or_writes_through_links_out_of_the_dataset(layout, cli_runner) -> None:
    data, outside = layout
    (data / "fifo.png").unlink()  # CliRunner runs in this process: keep the test itself safe
    before = corpus.snapshot(outside)
    for args in (["clean", str(data), "--trigger", "tok"], ["mask", str(data), "--method", "full"]):
        res = cli_runner.invoke(cli, ["-q", *args])
        assert res.exit_code == 1, res.output
        assert (
            f"failed: {data / 'out.png'}: symlink to {outside / 'elsewhere.png'}, outside the dataset"
            in res.output
        )
        assert corpus.SECRET_TEXT not in res.output
    assert corpus.snapshot(outside) == before
    assert corpus.SECRET_TEXT not in "".join(p.read_text() for p in data.glob("*.txt") if not p.is_symlink())


def test_writes_never_go_through_a_symlinked_folder(tmp_path: Path, cli_runner) -> None:
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    image(data / "a.png")
    (data / "masks").symlink_to(outside, target_is_directory=True)
    res = cli_runner.invoke(cli, ["-q", "mask", str(data), "--method", "full"])
    assert res.exit_code == 1, res.output
    # the mask stage refuses the linked folder before writing (naming it); the journal refuses too
    assert (
        f"failed: {data / 'a.png'}: masks: a symlink named masks is where sdprep keeps its masks folder"
        in res.output
    )
    assert list(outside.iterdir()) == []
    with fileops.Journal(data).begin("test") as op, pytest.raises(JournalError, match="symlinked folder"):
        op.write_text(data / "masks" / "x.txt", "x")
    assert list(outside.iterdir()) == []


def test_a_fifo_caption_does_not_hang(tmp_path: Path) -> None:
    image(tmp_path / "a.png")
    os.mkfifo(tmp_path / "a.txt")
    done = threading.Event()
    errors: list[Exception] = []

    def read() -> None:
        try:
            read_caption(Item(tmp_path / "a.png"))
        except CaptionError as exc:
            errors.append(exc)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(10), "reading a FIFO caption blocked"
    assert errors and "not a regular file" in str(errors[0])


class ZipServer(FakeBooru):
    """Serves a zip archive (as pixiv ugoira frames come) whose members try to escape."""

    def answer(self, raw: str):
        if raw.endswith(".zip"):
            import io
            import zipfile

            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as zf:
                zf.writestr("../../escaped.png", b"not really")
                zf.writestr("/abs/escaped.png", b"not really")
            return 200, buf.getvalue(), "application/zip"
        return super().answer(raw)


def test_archives_are_never_extracted(tmp_path: Path, monkeypatch) -> None:
    from sdprep.prep.scrape import ScrapeOptions, _strip_forced, run_scrape

    user = {
        "extractor": {
            "postprocessors": [{"name": "zip"}],
            "pixiv": {
                "ugoira": True,
                "postprocessors": [{"name": "ugoira"}, {"name": "exec", "command": "x"}],
            },
        }
    }
    assert "postprocessors" not in str(_strip_forced(user))  # at every level of a user's config

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = ZipServer()
    try:
        data = tmp_path / "a" / "data"
        result = run_scrape(data, ScrapeOptions(urls=(server.url("/img/frames.zip"),), sleep_request=0))
    finally:
        server.close()
    assert result.failed == []
    files = [p for p in tmp_path.rglob("*") if p.is_file() and ".sdprep" not in p.parts]
    assert [p.relative_to(data).as_posix() for p in files if p.suffix == ".zip"] == [
        "rejected/directlink_frames.zip"
    ]
    assert not any("escaped" in p.name for p in files), files


def test_a_folder_linked_out_of_the_dataset_is_outside_it(tmp_path, monkeypatch) -> None:
    """Only the last component used to be checked: `masks -> /elsewhere` served /elsewhere/a.png as
    a.png's mask. The real location decides; a linked folder that stays inside the dataset is fine."""
    from sdprep.prep.bucket import BucketOptions, run_bucket

    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "store").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (512, 512), (200, 30, 30)).save(data / "a.png")
    Image.new("L", (512, 512), 255).save(outside / "a.png")
    image(data / "store" / "b.png")
    (data / "masks").symlink_to(outside)  # a mask folder leading out of the dataset
    (data / "linked").symlink_to("store")  # a folder link that stays inside
    root = os.path.realpath(data)
    assert unsafe_reason(data / "linked" / "b.png", root) is None
    assert load_image(data / "linked" / "b.png", root=root).size == (40, 30)
    reason = unsafe_reason(data / "masks" / "a.png", root)
    assert reason is not None and f"{outside / 'a.png'}, outside the dataset" in reason
    with pytest.raises(ImageError, match="outside the dataset"):
        load_image(data / "masks" / "a.png", root=root)
    # a stage reading the mask drops the image with the reason, and copies nothing from outside
    (data / "linked").unlink()
    shutil.rmtree(data / "store")  # (a subfolder would be a concept of its own)
    res = run_bucket(data, BucketOptions(out=tmp_path / "o", token="t"))
    assert [f.path.name for f in res.failed] == ["a.png"]
    assert "outside the dataset" in res.failed[0].reason
    assert not [p for p in (tmp_path / "o").rglob("a.png")]
    # the user who trusts the links gets the old behaviour
    monkeypatch.setenv("SDPREP_FOLLOW_SYMLINKS", "1")
    assert unsafe_reason(data / "masks" / "a.png", root) is None
