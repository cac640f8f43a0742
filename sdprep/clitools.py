"""Small helpers shared by the thin click commands: reporters, results, common options."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from sdprep.progress import NullReporter, Reporter, RichReporter
from sdprep.stage import WORKERS_HELP, StageResult

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from sdprep.executors import Executor, ExecutorSettings

D = TypeVar("D", bound="DataclassInstance")
F = TypeVar("F", bound=Callable[..., Any])  # a click command's function, before click.command


def reporter(ctx: click.Context | None = None) -> Reporter:
    """A rich progress reporter on stderr, or a silent one under `sdprep -q`."""
    ctx = ctx or click.get_current_context(silent=True)
    quiet = bool(ctx and ctx.obj is not None and getattr(ctx.obj, "quiet", False))
    return NullReporter() if quiet else RichReporter()


def verbosity(ctx: click.Context | None = None) -> int:
    ctx = ctx or click.get_current_context(silent=True)
    return int(getattr(ctx.obj, "verbose", 0)) if ctx and ctx.obj is not None else 0


def finish(result: StageResult) -> None:
    """Print a stage's summary to stdout and exit 1 when any file failed."""
    click.echo(result.summary())
    if result.failed:
        raise click.exceptions.Exit(1)


class FieldOption(click.Option):
    """An option whose default is a field's default in a stage's options class (see `field_option`)."""

    def __init__(self, *args: Any, options: str, field: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.options_class, self.field_name = options, field

    def get_default(self, ctx: click.Context, call: bool = True) -> Any:
        module, _, name = self.options_class.partition(":")
        cls = getattr(importlib.import_module(module), name)
        found = {f.name: f for f in dataclasses.fields(cls)}[self.field_name]
        if found.default is not dataclasses.MISSING:
            return found.default
        if found.default_factory is not dataclasses.MISSING:
            return found.default_factory()
        return None  # a field without a default: the option has none either


def field_option(options: str, field: str, *decls: str, **kwargs: Any) -> Callable[[F], F]:
    """A click option for `field` of the options class `options` ("module:Class"): its default is
    the class's (the module is imported only when the default is needed, so `sdprep --help` stays
    light), and its value is checked by the class when the command builds it, as `sdprep run`
    builds it from a project file, so both accept exactly the same values."""
    return click.option(*decls, cls=FieldOption, options=options, field=field, show_default=True, **kwargs)


def workers_option(options: str) -> Callable[[F], F]:
    """`-j/--workers N`, with the one meaning it has in every command (`sdprep.stage.WORKERS_HELP`)."""
    return field_option(options, "workers", "-j", "--workers", type=int, metavar="N", help=WORKERS_HELP)


def options_from(cls: type[D], values: dict[str, Any], **given: Any) -> D:
    """Build the options class `cls` from a command's parsed values, by name: each field the command
    has an option of the same name for, then `given` (values the command parses itself)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{**{k: v for k, v in values.items() if k in names}, **given})


def dataset_argument(recursive: str | None = None) -> Callable[[F], F]:
    """The DIRECTORY argument of a command over a dataset folder, and with `recursive` (its help:
    what subfolders mean for the command) the `-r/--recursive` flag."""

    def decorate(fn: F) -> F:
        if recursive is not None:
            fn = click.option("-r", "--recursive", is_flag=True, help=recursive)(fn)
        return click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))(fn)

    return decorate


_EXECUTOR_KEY = "sdprep.executor"


def _remember(ctx: click.Context, param: click.Parameter, value: object) -> None:
    ctx.meta.setdefault(_EXECUTOR_KEY, {})[param.name] = value


def executor_options(fn: F) -> F:
    """`--executor local|ray`, `--ray-address`, `--ray-workers` (read with `executor_from`)."""
    options = [
        click.option(
            "--executor",
            type=click.Choice(["local", "ray"]),
            default=None,
            expose_value=False,
            callback=_remember,
            help="Where the per-image work runs: here (threads), or on a Ray cluster (pip install 'sdprep[ray]'; docs/ray.md). Default: local.",
        ),
        click.option(
            "--ray-address",
            default=None,
            metavar="ADDR",
            expose_value=False,
            callback=_remember,
            help="With --executor ray: the cluster's head (HOST:PORT), or 'local' to start one here for the run. Default: auto (RAY_ADDRESS, or the cluster `ray start` began on this machine).",
        ),
        click.option(
            "--ray-workers",
            default=None,
            type=click.IntRange(min=1),
            metavar="N",
            expose_value=False,
            callback=_remember,
            help="With --executor ray: workers in the pool. Default: one per GPU for a model on a cluster with GPUs, else one per CPU.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def executor_settings(
    ctx: click.Context | None = None, base: ExecutorSettings | None = None
) -> ExecutorSettings:
    """The command line's executor settings over `base` (a project's; default: local)."""
    from sdprep.executors import ExecutorSettings, settings_over

    ctx = ctx or click.get_current_context()
    given: dict[str, Any] = ctx.meta.get(_EXECUTOR_KEY, {})
    return settings_over(base or ExecutorSettings(), given)


@contextmanager
def executor_from(ctx: click.Context | None = None) -> Iterator[Executor]:
    """The executor the command line asks for (`executor_options`), closed when the command ends."""
    from sdprep.executors import make_executor

    with make_executor(executor_settings(ctx)) as executor:
        yield executor


def parallel_options(options: str) -> Callable[[F], F]:
    """Where and how parallel a stage's per-image work runs: `-j/--workers` (threads here; a field
    of the options class `options`) and `--executor local|ray` with its Ray settings."""

    def decorate(fn: F) -> F:
        return workers_option(options)(executor_options(fn))

    return decorate


def run_stage(
    ctx: click.Context, run: Callable[..., StageResult], directory: Path, opts: Any, **extra: Any
) -> StageResult:
    """Run a stage function as every stage command does: with the command's progress reporter
    (`sdprep -q` silences it) and the executor its command line asks for (`parallel_options`)."""
    with executor_from(ctx) as executor:
        return run(directory, opts, report=reporter(ctx), executor=executor, **extra)
