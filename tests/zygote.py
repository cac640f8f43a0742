"""A fork server for the random-kill crash tests: imports sdprep once, then forks one CLI run per request.

Started by tests/crashkit.py as `python tests/zygote.py`. Each request on stdin is one JSON line
{"args": [...], "env": {...}, "out": "file for stdout+stderr"}; the server forks, the child runs
`sdprep ARGS` with the extra environment (SDPREP_TEST_PAUSE, SDPREP_TEST_FAIL...) and writes how
many pause points of the kind SDPREP_TEST_PAUSE names it passed to "out" + ".count"; the server answers {"pid": N} at once and
{"status": exit code or -signal} when the child ends. A fork costs milliseconds where a new
interpreter with numpy, Pillow and onnxruntime costs most of a second, so a test can kill each
command at dozens of places. No thread runs in the server, so forking it is safe.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

PRELOAD = [
    "sdprep.cli",
    "sdprep.commands",
    "sdprep.undo",
    *[f"sdprep.prep.cli.{m}" for m in ("rename", "captions", "tag", "clean", "mask", "upscale", "convert")],
    *[f"sdprep.prep.cli.{m}" for m in ("dedup", "bucket", "scrape")],
    "imagehash",
    "scipy.sparse.csgraph",
    "onnxruntime",
]


def child(request: dict) -> None:
    """Run one CLI command in this (forked) process and leave with its exit code."""
    from sdprep import faults
    from sdprep.cli import main

    fd = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(request.get("env", {}))
    code = 0
    try:
        main(["-q", *request["args"]])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - a crash is a result the test reports
        import traceback

        traceback.print_exc()
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    with open(request["out"] + ".count", "w") as f:
        f.write(str(sum(faults._seen.values())))  # points of the kind SDPREP_TEST_PAUSE named
    os._exit(code)


def main() -> None:
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        print(json.dumps({"status": code}), flush=True)


if __name__ == "__main__":
    main()
