"""Stage options are checked once, by their options classes: a command and a project file run by
`sdprep run` accept exactly the same values (same refusal, same message); the commands' option
defaults come from those classes; `--workers` means one thing in every command."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import click
import pytest

from sdprep import stage
from sdprep.cli import cli
from sdprep.clitools import FieldOption
from sdprep.stage import WORKERS_HELP, worker_count

# (stage, its table in a project file, the same value on its command line, the one message)
BAD = [
    ("bucket", "settings = { step = 48 }", ["--step", "48"], "--step 48 is not a multiple of 32"),
    ("bucket", "repeats = 0", ["--repeats", "0"], "--repeats must be at least 1, got 0"),
    ("bucket", "target_steps = -5", ["--target-steps", "-5"], "--target-steps must be at least 1, got -5"),
    ("bucket", "batch_size = 0", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ("bucket", "settings = { resolution = [32, 32] }", ["--resolution", "32"], "--resolution 32,32: each"),
    ("bucket", 'tiers = { "hq" = 0 }', ["--tier", "hq=0"], '--tier "hq=0": repeats must be at least 1'),
    ("convert", "quality = 0", ["--quality", "0"], "--quality must be 1-100, got 0"),
    ("convert", "workers = 65", ["--workers", "65"], "--workers must be 0-64, got 65"),
    ("dedup", "threshold = 33", ["--threshold", "33"], "--threshold must be 0-32, got 33"),
    ("upscale", "overlap = -1", ["--tile-overlap", "-1"], "--tile-overlap must be 0 or more, got -1"),
    ("upscale", "quality = 101", ["--quality", "101"], "--quality must be 1-100, got 101"),
    ("mask", 'method = "full"\npost = { grow = -1 }', ["-m", "full", "--grow", "-1"], "--grow must be 0 or"),
    ("mask", 'method = "full"\nworkers = -2', ["-m", "full", "-j", "-2"], "--workers must be 0-64, got -2"),
    ("tag", "batch_size = 0", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ("clean", "workers = -1", ["--workers", "-1"], "--workers must be 0-64, got -1"),
    ("rename", "start = -1", ["--start", "-1"], "--start must be 0 or more, got -1"),
    ("report", "max_thumbs = -1", ["--max-thumbs", "-1"], "--max-thumbs must be 0 or more, got -1"),
]


def project(tmp_path: Path, data: Path, name: str, table: str) -> Path:
    out = f'out = "{tmp_path / "out"}"\n' if name == "bucket" else ""
    path = tmp_path / "project.toml"
    path.write_text(f'[project]\ndataset = "{data}"\n[stages.{name}]\n{out}{table}\n')
    return path


def command(name: str, data: Path, tmp_path: Path, args: list[str]) -> list[str]:
    out = ["-o", str(tmp_path / "out")] if name == "bucket" else []
    return [name, str(data), *out, *args]


@pytest.mark.parametrize(("name", "table", "args", "message"), BAD, ids=[f"{b[0]}:{b[1]}" for b in BAD])
def test_run_and_the_command_refuse_the_same_values(
    name, table, args, message, sample_dataset, tmp_path, cli_runner
) -> None:
    before = {p: p.read_bytes() for p in sample_dataset.rglob("*")}
    direct = cli_runner.invoke(cli, command(name, sample_dataset, tmp_path, args))
    run = cli_runner.invoke(cli, ["run", str(project(tmp_path, sample_dataset, name, table))])
    for res in (direct, run):
        assert res.exit_code == 1, res.output
        assert res.output.startswith(f"Error: {message}"), res.output
    assert {p: p.read_bytes() for p in sample_dataset.rglob("*")} == before  # refused before any work
    assert not (tmp_path / "out").exists()


def test_run_and_the_command_accept_the_same_edge_values(sample_dataset, tmp_path, cli_runner) -> None:
    """The smallest values bucket accepts (step 32, 1 repeat, 64 px) pass both ways alike."""
    edge = ["--step", "32", "--repeats", "1", "--min-side", "64", "--token", "tok"]
    direct = cli_runner.invoke(cli, ["-q", *command("bucket", sample_dataset, tmp_path, edge)])
    assert direct.exit_code == 0, direct.output
    table = 'repeats = 1\ntoken = "tok"\nsettings = { step = 32, min_side = 64 }'
    run = cli_runner.invoke(cli, ["-q", "run", str(project(tmp_path, sample_dataset, "bucket", table))])
    assert run.exit_code == 0, run.output
    assert "bucket: 0 changed, 8 skipped, 0 failed" in run.output  # the same build: nothing to redo


def _field_options() -> list[tuple[str, FieldOption]]:
    found = []
    ctx = click.Context(cli)
    for name in cli.list_commands(ctx):
        for param in cli.get_command(ctx, name).params:
            if isinstance(param, FieldOption):
                found.append((name, param))
    return found


def test_option_defaults_come_from_the_options_classes() -> None:
    options = _field_options()
    assert {name for name, _ in options} >= {
        "bucket", "convert", "dedup", "upscale", "mask", "tag", "clean", "rename", "report", "scrape",
    }  # fmt: skip
    ctx = click.Context(cli)
    for name, param in options:
        module, _, cls_name = param.options_class.partition(":")
        cls = getattr(importlib.import_module(module), cls_name)
        field = {f.name: f for f in dataclasses.fields(cls)}[param.field_name]
        assert param.get_default(ctx) == field.default, (name, param.name)
        # ranges are the class's to check: a command that checked one itself could drift from it
        assert not isinstance(param.type, click.types._NumberRangeBase), (name, param.name)
        if "range" in field.metadata:
            assert field.metadata["range"] != (None, None)


def test_field_option_default_of_a_factory_field_and_of_a_field_without_one() -> None:
    ctx = click.Context(cli)
    made = FieldOption(["--failed"], options="sdprep.stage:StageResult", field="failed")
    assert made.get_default(ctx) == []  # default_factory=list
    required = FieldOption(["--reason"], options="sdprep.stage:Failure", field="reason")
    assert required.get_default(ctx) is None  # no default: none (was a TypeError calling MISSING)


def test_every_bounded_field_of_a_command_is_one_of_its_field_options() -> None:
    """A bounded value set from the command line goes through its FieldOption (no second default)."""
    by_command: dict[str, set[tuple[str, str]]] = {}
    for name, param in _field_options():
        by_command.setdefault(name, set()).add((param.options_class, param.field_name))
    classes = {name: {c for c, _ in fields} for name, fields in by_command.items()}
    for name, used in classes.items():
        for spec in used:
            module, _, cls_name = spec.partition(":")
            cls = getattr(importlib.import_module(module), cls_name)
            bounded = {f.name for f in dataclasses.fields(cls) if f.metadata.get("range")}
            exposed = {f for c, f in by_command[name] if c == spec}
            internal = {"thumb_size", "duplicate_distance", "min_area"}  # not on the command line
            assert bounded - internal <= exposed, (name, spec, bounded - exposed)


def test_workers_has_one_meaning_in_every_command(cli_runner) -> None:
    workers = [(name, p) for name, p in _field_options() if p.field_name == "workers"]
    assert sorted(name for name, _ in workers) == ["clean", "convert", "dedup", "mask", "tag", "upscale"]
    for name, param in workers:
        assert param.opts == ["-j", "--workers"] and param.help == WORKERS_HELP, name
        shown = " ".join(cli_runner.invoke(cli, [name, "--help"]).output.split())
        assert f"-j, --workers N {WORKERS_HELP}" in shown, name


def test_worker_count() -> None:
    assert worker_count(3) == 3 and worker_count(3, auto=1) == 3  # a number given is used as it is
    assert worker_count(0, auto=7) == 7  # 0: the stage's own choice
    assert 1 <= worker_count(0) <= 4
    assert stage.MAX_WORKERS == 64
