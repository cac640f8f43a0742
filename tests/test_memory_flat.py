"""clean, captions, bucket and report keep (almost) nothing per image: memory is flat in the number of files.

Python allocations are measured with tracemalloc (repeatable, unlike RSS): the memory held halfway
through the run, above the memory before it, for two dataset sizes. The difference per extra image
is what a stage keeps per file: one folder's sorted file names (about 70 bytes each) and, in the
report, an 8-byte perceptual hash and an 8-byte offset; 75-140 bytes in all. A sorted list of
DirEntry objects, or lists of Items, CaptionFiles or report rows, cost 600-7,000 bytes per image.
benchmarks/bench_load.py measures the process RSS on 5,000 and 20,000 images.
"""

from __future__ import annotations

import gc
import shutil
import tracemalloc
from pathlib import Path

import corpus
import pytest

from sdprep.progress import NullReporter

SMALL, BIG = 100, 400
LIMIT = 250  # bytes held per extra image


class HeldMidway(NullReporter):
    """Records the traced memory held when the stage has done half of the files.

    Midway, both show: what the listing holds for the whole folder and what the loop has kept for
    the files done so far (at the end, a threaded stage has already dropped its listing).
    """

    def __init__(self, total: int):
        self.total, self.done, self.held = total, 0, None

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.done == self.total // 2:
            gc.collect()  # garbage awaiting the collector is not held
            self.held = tracemalloc.get_traced_memory()[0]


def run_stage(stage: str, data: Path, out: Path, reporter: HeldMidway) -> None:
    if stage == "clean":
        from sdprep.prep.clean import CleanOptions, run_clean
        from sdprep.prep.rules import CleanRules

        rules = CleanRules(trigger=("tok",), remove=("tag0*",))
        assert run_clean(data, CleanOptions(rules=rules), report=reporter).ok
    elif stage == "captions":
        from sdprep.prep.captions import CaptionsOptions, make_edit, run_edit

        assert run_edit(
            [data], make_edit("replace", ("smile", "grin")), CaptionsOptions(), report=reporter
        ).ok
    elif stage == "bucket":
        from sdprep.prep.bucket import BucketOptions, run_bucket

        assert run_bucket(
            data, BucketOptions(out=out / f"bucket-{data.name}", token="tok"), report=reporter
        ).ok
    else:
        from sdprep.prep.report import ReportOptions, run_report

        assert run_report(data, ReportOptions(out=out / "report.html"), report=reporter).ok


def held(stage: str, source: Path, n: int, work: Path) -> int:
    """Bytes held halfway through the run above the start, for the first `n` images of `source`."""
    data = work / f"data{n}"
    data.mkdir(parents=True)
    for image in sorted(source.glob("*.png"))[:n]:
        shutil.copy(image, data)
        shutil.copy(image.with_suffix(".txt"), data)
    reporter = HeldMidway(n)
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        run_stage(stage, data, work, reporter)
    finally:
        tracemalloc.stop()
    assert reporter.held is not None
    return reporter.held - start


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return corpus.small_dataset(tmp_path_factory.mktemp("source"), BIG)


@pytest.mark.parametrize("stage", ["clean", "captions", "bucket", "report"])
def test_memory_per_image_is_flat(stage: str, source: Path, tmp_path: Path, monkeypatch) -> None:
    from sdprep.prep import bucket
    from sdprep.prep.captions import CaptionWriter

    # pending writes are bounded by the batch, not per file
    monkeypatch.setattr(CaptionWriter, "BATCH", 8)
    monkeypatch.setattr(bucket, "WRITE_BATCH", 8)
    # A first run fills what is filled once (imports, caches, the interpreter's free lists)
    held(stage, source, BIG, tmp_path / "warm")
    small, big = held(stage, source, SMALL, tmp_path), held(stage, source, BIG, tmp_path)
    per_image = (big - small) / (BIG - SMALL)
    assert per_image < LIMIT, (
        f"{stage}: {per_image:.0f} bytes per image ({small} B at {SMALL}, {big} B at {BIG})"
    )
