"""A file name so long that its companions' names cannot exist (over NAME_MAX, 255 bytes).

`<name>.<ext>.json` (the sidecar) is 5 bytes longer than the image's name, so an image named with
251-255 bytes is valid while every look-up of its sidecar fails with ENAMETOOLONG. Every command
must treat that as one bad file: no traceback, the long name listed (or the image processed),
every other image processed, nothing changed outside what the command is for.
"""

from __future__ import annotations

import os
from pathlib import Path

import corpus
import pytest
from test_reliability_corpus import CASES, failure_paths, run_cli

LONG = "x" * 250 + ".png"  # 254 bytes: its sidecar name is 259


@pytest.fixture(scope="module")
def wd14(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdprep.taggers.tiny import build_tiny_wd14

    return build_tiny_wd14(tmp_path_factory.mktemp("wd14") / "wd14")


def build(root: Path) -> corpus.Corpus:
    root.mkdir(parents=True)
    c = corpus.Corpus(root=root, outside=root.parent / "outside")
    c.outside.mkdir()
    for name in corpus.SAMPLE_NAMES[:4]:
        (root / name).write_bytes(corpus.sample_bytes(name))
        (root / Path(name).with_suffix(".txt")).write_text("1girl, solo, smile\n")
        c.good.append(name)
    (root / LONG).write_bytes(corpus._encode(corpus.variant(corpus.SAMPLE_NAMES[5], 3), "PNG"))
    (root / (LONG[:-4] + ".txt")).write_text("1girl, smile\n")
    assert len(os.fsencode(LONG + ".json")) > 255
    return c


NAMES = [n for n in CASES if n not in ("mask-check", "bucket-mask")]


@pytest.mark.parametrize("name", NAMES)
def test_command_with_an_overlong_companion_name(
    name: str, tmp_path: Path, wd14: Path, tiny_sdxl: Path
) -> None:
    case = CASES[name]
    (tmp_path / "wd14").symlink_to(wd14, target_is_directory=True)
    (tmp_path / "tiny").symlink_to(tiny_sdxl, target_is_directory=True)
    c = build(tmp_path / "data")
    before = corpus.snapshot(c.root)
    done = run_cli(case.args(c, tmp_path), {"SDPREP_CACHE": str(tmp_path / "cache")}, quiet=case.quiet)
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    assert done.returncode in (0, 1), output
    aborted = [line for line in output.splitlines() if line.startswith("Error:") and "too long" in line]
    assert not aborted, output  # one file's name stops nothing: it is a per-file failure
    failed = {Path(p).name for p in failure_paths(output)}
    assert not failed & set(c.good), output  # every other image is processed
    if done.returncode == 1:
        assert LONG in output, output  # the one bad file is named
    if not case.changes:
        assert corpus.snapshot(c.root) == before
    else:
        assert (c.root / LONG).exists() or name == "rename"  # never lost (rename gives it a short name)
