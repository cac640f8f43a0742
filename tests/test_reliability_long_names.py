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
from test_reliability_corpus import CASES, failure_paths, run_case

LONG = "x" * 250 + ".png"  # 254 bytes: its sidecar name is 259


def build(root: Path) -> corpus.Corpus:
    c = corpus.plain(root)
    (root / LONG).write_bytes(corpus._encode(corpus.variant(corpus.SAMPLE_NAMES[5], 3), "PNG"))
    (root / (LONG[:-4] + ".txt")).write_text("1girl, smile\n")
    assert len(os.fsencode(LONG + ".json")) > 255
    return c


NAMES = [n for n in CASES if n not in ("mask-check", "bucket-mask")]


@pytest.mark.parametrize("name", NAMES)
def test_command_with_an_overlong_companion_name(
    name: str, tmp_path: Path, tiny_wd14: Path, tiny_sdxl: Path
) -> None:
    case = CASES[name]
    c = build(tmp_path / "data")
    before = corpus.snapshot(c.root)
    done, output = run_case(case, c, tmp_path, tiny_wd14, tiny_sdxl)
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
