"""metadata.json and buckets.json of `sdprep bucket`, streamed a batch at a time (memory flat in the
number of images) into temp files in OUT and installed through the journal; byte-identical to what
`json.dumps(..., indent=1)` writes for the whole document.

metadata.json is kohya's: {"<image path>": {caption, tags, image_size, train_resolution}}.
buckets.json is the preview: {"images": [one row per placed image], "dropped": [...]}.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import TextIO

from sdprep.dataset import dumps_json
from sdprep.fileops import Operation, naming
from sdprep.lock import temp_prefix


def _nested(value: object, level: int, ensure_ascii: bool) -> str:
    """`json.dumps(value, indent=1)` as it reads `level` containers deep in an indent=1 document."""
    text = json.dumps(value, indent=1) if ensure_ascii else dumps_json(value, indent=1)
    return text.replace("\n", "\n" + " " * level)


class _Members:
    """The members of one JSON container, written one at a time (byte-identical to json.dumps indent=1)."""

    def __init__(self, f: TextIO, level: int):
        self.f, self.level, self.n = f, level, 0

    def add(self, text: str) -> None:
        self.f.write(("," if self.n else "") + "\n" + " " * (self.level + 1) + text)
        self.n += 1

    def close(self, closer: str) -> None:
        self.f.write(("\n" + " " * self.level if self.n else "") + closer)


class BucketJson:
    """Context manager: `add(key, entry, row)` per image, `install(op, dropped)` at the end."""

    NAMES = ("metadata.json", "buckets.json")

    def __init__(self, out: Path):
        self.out = out
        self.tmp: dict[str, Path] = {}
        self.files: dict[str, TextIO] = {}

    def __enter__(self) -> BucketJson:
        try:
            for name in self.NAMES:
                fd, tmp = tempfile.mkstemp(prefix=temp_prefix(), suffix=f"-{name}", dir=self.out)
                self.tmp[name] = Path(tmp)
                self.files[name] = open(fd, "w", encoding="utf-8", newline="")  # noqa: SIM115
        except BaseException:
            self.__exit__()
            raise
        self.files["metadata.json"].write("{")
        self.meta = _Members(self.files["metadata.json"], 0)
        self.files["buckets.json"].write('{\n "images": [')
        self.rows = _Members(self.files["buckets.json"], 1)
        return self

    def add(self, key: str, entry: dict[str, object], row: dict[str, object]) -> None:
        """One image: its metadata.json entry under `key`, its buckets.json row."""
        with naming(self.out / "metadata.json"):  # a full disk fails the write with no file name
            self.meta.add(dumps_json(key) + ": " + _nested(entry, 1, False))
        with naming(self.out / "buckets.json"):
            self.rows.add(_nested(row, 2, True))

    def install(self, op: Operation, dropped: list[dict[str, str]]) -> None:
        """Finish both files (buckets.json lists `dropped`) and put them in place through `op`."""
        with naming(self.out / "metadata.json"):
            self.meta.close("}")
            self.files["metadata.json"].write("\n")
            self.files["metadata.json"].close()
        with naming(self.out / "buckets.json"):
            self.rows.close("]")
            self.files["buckets.json"].write(',\n "dropped": ' + _nested(dropped, 1, True) + "\n}\n")
            self.files["buckets.json"].close()
        for name in self.NAMES:
            op.install(self.tmp[name], self.out / name)

    def __exit__(self, *exc: object) -> None:
        for name, tmp in self.tmp.items():
            if name in self.files:
                self.files[name].close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
