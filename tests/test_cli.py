import subprocess
import sys
from pathlib import Path

import click
import pytest

from sdprep.cli import COMMANDS, cli
from sdprep.errors import DatasetError

README = Path(__file__).resolve().parent.parent / "README.md"


def test_root_help_lists_every_command(cli_runner):
    res = cli_runner.invoke(cli, ["--help"])
    assert res.exit_code == 0
    for name in COMMANDS:
        assert f"  {name} " in res.output
    assert cli_runner.invoke(cli, ["-h"]).output == res.output


def test_every_command_has_help_with_an_example_and_is_documented(cli_runner):
    readme = README.read_text()
    for name in COMMANDS:
        res = cli_runner.invoke(cli, [name, "--help"])
        assert res.exit_code == 0, (name, res.output)
        assert "Example" in res.output, name
        assert f"sdprep {name}" in res.output, name
        assert f"`sdprep {name}" in readme, f"README's command table lacks {name}"


def test_version(cli_runner):
    res = cli_runner.invoke(cli, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("sdprep, version ")


def test_help_imports_no_torch():
    code = (
        "import sys\n"
        "from sdprep.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'onnxruntime', 'cv2') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_library_error_becomes_error_and_exit_1(cli_runner, monkeypatch):
    @click.command("boom")
    def boom():
        """Fail. Example: sdprep boom"""
        raise DatasetError("data/x.png: broken", "delete it")

    import sdprep.cli as cli_module

    monkeypatch.setitem(cli_module.COMMANDS, "boom", ("tests_boom:boom", "fails"))
    monkeypatch.setitem(sys.modules, "tests_boom", type(sys)("tests_boom"))
    sys.modules["tests_boom"].boom = boom
    res = cli_runner.invoke(cli, ["boom"])
    assert res.exit_code == 1
    assert res.output == "Error: data/x.png: broken\nHint: delete it\n"


def test_file_system_error_becomes_error_with_a_hint(cli_runner, monkeypatch):
    import errno

    @click.command("full")
    def full():
        """Fail. Example: sdprep full"""
        raise OSError(errno.ENOSPC, "No space left on device", "data/001.txt")

    import sdprep.cli as cli_module

    monkeypatch.setitem(cli_module.COMMANDS, "full", ("tests_full:full", "fails"))
    monkeypatch.setitem(sys.modules, "tests_full", type(sys)("tests_full"))
    sys.modules["tests_full"].full = full
    res = cli_runner.invoke(cli, ["full"])
    assert res.exit_code == 1
    assert res.output == (
        "Error: data/001.txt: No space left on device\n"
        "Hint: free disk space and run the command again (it resumes; `sdprep undo` reverts)\n"
    )


def test_an_os_error_on_one_file_is_that_files_failure(tmp_path):
    import errno

    from sdprep.dataset import Item
    from sdprep.stage import map_items

    def read(item):
        return item.path.read_bytes()

    (tmp_path / "a.png").write_bytes(b"a")
    items = [Item(tmp_path / "a.png"), Item(tmp_path / "gone.png")]
    for workers in (1, 2):
        (a, ok), (gone, err) = map_items(read, items, workers)
        assert ok == b"a"
        assert isinstance(err, DatasetError) and err.path == gone.path
        assert err.reason == "No such file or directory"

    def full(item):
        raise OSError(errno.ENOSPC, "No space left on device", str(item.path))

    with pytest.raises(OSError):  # the disk, not the file: stop rather than fail every next file
        list(map_items(full, items))


def test_chunked_reads_lazily_and_keeps_a_short_last_chunk():
    import itertools

    from sdprep.stage import chunked

    assert list(chunked(range(5), 2)) == [[0, 1], [2, 3], [4]]
    assert list(chunked([], 3)) == []
    assert next(chunked(itertools.count(), 3)) == [0, 1, 2]  # an endless source: only what is needed


def test_usage_error_exit_2(cli_runner, tmp_path):
    assert cli_runner.invoke(cli, ["nosuchcommand"]).exit_code == 2
    typo = cli_runner.invoke(cli, ["tagg", "data/"])
    assert typo.exit_code == 2 and "Error: No such command 'tagg'. Did you mean \"tag\"?" in typo.output
    assert "Did you mean" not in cli_runner.invoke(cli, ["nosuchcommand"]).output
    assert cli_runner.invoke(cli, ["undo", str(tmp_path / "missing")]).exit_code == 2


def test_undo_command(cli_runner, tmp_path):
    res = cli_runner.invoke(cli, ["undo", str(tmp_path)])
    assert res.exit_code == 1 and "Error: nothing to undo" in res.output
    from sdprep import fileops

    (tmp_path / "a.txt").write_text("a\n")
    with fileops.Journal(tmp_path).begin("demo", ["x"]) as op:
        op.write_text(tmp_path / "a.txt", "b\n")
    assert "demo x" in cli_runner.invoke(cli, ["undo", "--list", str(tmp_path)]).output
    res = cli_runner.invoke(cli, ["undo", str(tmp_path)])
    assert res.exit_code == 0 and res.output == "undone: demo x (1 changes reversed)\n"
    assert (tmp_path / "a.txt").read_text() == "a\n"


def test_the_example_in_the_root_help_works(sample_dataset, tmp_path, tiny_wd14, cli_runner):
    """`sdprep --help`'s chain, as printed (tag gets a local model: tests are offline); bucket
    takes its token from the trigger clean recorded."""
    import os
    import shlex

    text = cli_runner.invoke(cli, ["--help"]).output
    example = " ".join(text.split("Example:", 1)[1].split())
    data, out = tmp_path / "data", tmp_path / "out"
    sample_dataset.rename(data)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for command in example.split("&&"):
            args = shlex.split(command)
            assert args[0] == "sdprep"
            if args[1] == "tag":
                args += ["--model", str(tiny_wd14)]
            res = cli_runner.invoke(cli, args[1:])
            assert res.exit_code == 0, (command, res.output)
    finally:
        os.chdir(cwd)
    assert "bucket data/ -o out/" in example and "--token" not in example
    assert "token: mytoken (the trigger `sdprep clean` recorded" in res.output
    folders = [p.name for p in (out / "img").iterdir()]
    assert len(folders) == 1 and folders[0].endswith("_mytoken")
    assert 'class_tokens = "mytoken"' in (out / "dataset.toml").read_text()
