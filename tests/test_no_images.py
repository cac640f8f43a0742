"""Every stage on a folder without images: exit 1 "no images found in DIR", and the -r hint when the
images are in subfolders (an empty or wrong folder used to be a silent success)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sdprep.cli import cli

REPO = Path(__file__).resolve().parent.parent
STAGES = {
    "bucket": ["-o", "{out}", "--token", "tok"],
    "clean": ["--trigger", "tok"],
    "rename": [],
    "mask": ["--method", "full"],
    "upscale": [],
    "convert": [],
    "dedup": [],
    "report": ["-o", "{out}/report.html"],
    "tag": ["--model", "{model}"],
}
RECURSIVE_BY_DEFAULT = {"bucket", "report"}


def _args(stage: str, folder: Path, out: Path, model: Path) -> list[str]:
    extra = [a.format(out=out, model=model) for a in STAGES[stage]]
    return [stage, str(folder), *extra]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_an_empty_folder_is_an_error(stage, tmp_path, cli_runner, tiny_wd14):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image\n")
    res = cli_runner.invoke(cli, _args(stage, empty, tmp_path / "out", tiny_wd14))
    assert res.exit_code == 1, res.output
    assert f"Error: no images found in {empty}\nHint: put images (" in res.output
    assert not (tmp_path / "out").exists() and sorted(p.name for p in empty.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("stage", sorted(set(STAGES) - RECURSIVE_BY_DEFAULT))
def test_images_only_in_subfolders_get_the_recursive_hint(stage, tmp_path, cli_runner, tiny_wd14):
    root = tmp_path / "out"
    (root / "img" / "2_tok").mkdir(parents=True)
    shutil.copy(REPO / "sample_data" / "images" / "b_portrait.png", root / "img" / "2_tok" / "a.png")
    res = cli_runner.invoke(cli, _args(stage, root, tmp_path / "elsewhere", tiny_wd14))
    assert res.exit_code == 1, res.output
    assert (
        f"Error: no images found in {root}\nHint: the images are in subfolders (e.g. img/2_tok/): "
        "add -r / --recursive" in res.output
    )
