"""2,000 small images through clean, captions, bucket and report: every stage completes, no handle leaks.

The short version of benchmarks/bench_load.py (20,000 images, memory at 5,000 vs 20,000): here
only completion, counts and open file descriptors are checked, never time.
"""

from __future__ import annotations

from pathlib import Path

import corpus

from sdprep.cli import cli

N = 2000


def test_two_thousand_images_through_four_stages(tmp_path: Path, cli_runner) -> None:
    data = corpus.small_dataset(tmp_path / "data", N)
    out = tmp_path / "out"
    start = corpus.open_fds()

    steps = [
        (
            ["clean", str(data), "--trigger", "tok", "--remove", "tag0*"],
            f"clean: {N} changed, 0 skipped, 0 failed",
        ),
        (["captions", "replace", "smile", "grin", str(data)], "captions: "),
        (["bucket", str(data), "-o", str(out), "--token", "tok", "--repeats", "2"], f"bucket: {N} changed"),
        (["report", str(data), "-o", str(tmp_path / "report.html")], f"({N} images,"),
    ]
    for args, expected in steps:
        res = cli_runner.invoke(cli, ["-q", *args])
        assert res.exit_code == 0, (args, res.output)
        assert expected in res.output, (args, res.output)
    assert corpus.open_fds() == start, "a stage left files open"

    assert len(list((out / "img" / "2_tok").glob("*.png"))) == N
    caption = (data / "img_000003.txt").read_text(encoding="utf-8")
    assert caption.startswith("tok, ") and "grin" in caption and "smile" not in caption
    assert "tag0" not in caption
    assert (tmp_path / "report.html").stat().st_size > 0
