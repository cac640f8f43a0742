"""Core commands that act on a dataset's journal: undo and gc."""

from __future__ import annotations

from pathlib import Path

import click

from sdprep import fileops
from sdprep.clitools import executor_options


@click.command("undo")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--list", "list_only", is_flag=True, help="List the undoable operations, newest last.")
@click.option(
    "--force",
    is_flag=True,
    help="Undo even over files changed since the operation; your versions are kept as <name>.sdprep-kept.",
)
def undo_command(directory: Path, list_only: bool, force: bool) -> None:
    """Undo the last sdprep operation on DIRECTORY, restoring every file it changed.

    Files you changed after the operation (a caption edited by hand) stop the undo, named, unless
    --force, which keeps your version beside as <name>.sdprep-kept.

    \b
    Example:
      sdprep rename data/ && sdprep undo data/
    """
    journal = fileops.Journal(directory)
    if list_only:
        ops = journal.operations()
        for folder in ops:
            click.echo(f"{folder.name}: {journal.describe(folder)}")
        if not ops:
            click.echo("nothing to undo")
        return
    description, count = fileops.undo(directory, force=force)
    click.echo(f"undone: {description} ({count} changes reversed)")


@click.command("gc")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--keep",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Keep the newest N operations undoable.",
)
def gc_command(directory: Path, keep: int) -> None:
    """Delete the undo journal of DIRECTORY and the original files it keeps (frees disk space).

    \b
    Example:
      sdprep gc data/ --keep 1
    """
    removed = fileops.gc(directory, keep=keep)
    click.echo(f"removed {removed} journalled operations")


@click.command("run")
@click.argument("project_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--only", multiple=True, help="Run only these stages (repeatable), e.g. --only tag --only clean."
)
@click.option("--no-train", is_flag=True, help="Run the prep stages but not the [train] section.")
@executor_options
@click.pass_context
def run_command(ctx: click.Context, project_file: Path, only: tuple[str, ...], no_train: bool) -> None:
    """Run the chain of stages (and training) described by a project file.

    Each stage skips work already done with the same options, so re-running after a change
    redoes only what it affects. Exits 1 if any file failed in any stage. With --executor ray
    (or executor = "ray" under [project]) convert, dedup, upscale, mask, tag and clean run their
    per-image work on a Ray cluster.

    \b
    Example:
      sdprep init myproject/ && sdprep run myproject/project.toml
      sdprep run sample_data/project.toml --only tag --only clean
      sdprep run myproject/project.toml --executor ray --ray-address 10.0.0.1:6379
    """
    from sdprep.clitools import executor_settings, reporter
    from sdprep.project import load_project, run_project, run_summary

    project = load_project(project_file)
    results = run_project(
        project,
        echo=click.echo,
        reporter=lambda: reporter(ctx),
        only=list(only),
        train=not no_train,
        executor=executor_settings(ctx, project.executor),
    )
    click.echo(run_summary(results))
    if any(r.failed for r in results):
        raise click.exceptions.Exit(1)


@click.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default="project.toml", show_default=True, help="File name of the project file.")
@click.option("--dataset", default="data", show_default=True, help="Dataset folder, relative to DIRECTORY.")
@click.option("--force", is_flag=True, help="Overwrite an existing project file.")
def init_command(directory: Path, name: str, dataset: str, force: bool) -> None:
    """Write a commented starting project file into DIRECTORY.

    \b
    Example:
      sdprep init myproject/ && $EDITOR myproject/project.toml && sdprep run myproject/project.toml
    """
    from sdprep.project import write_init

    path = write_init(directory, name=name, dataset=dataset, force=force)
    click.echo(f"wrote {path}: edit it, then run `sdprep run {path}`")


@click.command("doctor")
@click.argument("directory", required=False, default=".", type=click.Path(file_okay=False, path_type=Path))
def doctor_command(directory: Path) -> None:
    """Show what this machine gives sdprep: versions, GPU (CUDA / ROCm / MPS), ONNX providers, disk.

    Paste its output into a bug report. Exits 1 when a required package is missing or two installed
    packages are known not to work together; says which packages differ from the tested lock.

    \b
    Example:
      sdprep doctor
      sdprep doctor /data/datasets
    """
    from sdprep.doctor import collect

    facts = collect(directory)
    marks = {"ok": " ", "info": "-", "warn": "!", "missing": "x", "bad": "x"}
    for fact in facts:
        click.echo(f"{marks[fact.status]} {fact.name:<30} {fact.value}")
        if fact.hint and fact.status != "ok":
            click.echo(f"  {'':<30} hint: {fact.hint}")
    if any(f.status in ("missing", "bad") for f in facts):
        raise click.exceptions.Exit(1)
