"""Where a stage's per-item work runs: in this process (`local`) or on a Ray cluster (`ray`).

A stage hands its per-item function to `stage.each_item`, which maps it over the items through an
executor and gets (item, result or per-file error) back in the items' order. The stage then writes
what it got (journal, sidecars, captions, masks) in this process, so a run through any executor is
undone by `sdprep undo` exactly as a local run, and writes the same bytes.

- `LocalExecutor`: `map_items`, serial or in threads (what every stage did before executors).
- `RayExecutor` (sdprep/ray_executor.py, imported only when asked for): batches of items go to a
  pool of Ray actors. Each actor receives the function once; objects holding a model (a tagger, a
  mask method, an upscaler) pickle as the recipe that builds them, so each actor loads its own copy
  once, on its first item.

A function may offer `batch(items) -> list[result | SdprepError]` to handle a whole batch at once
(tag: one model call per batch); `run_batch` uses it when it exists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, Self, TypeVar

from sdprep.errors import BatchError, ConfigError, InstallError, SdprepError, unknown_choice

T = TypeVar("T")
R = TypeVar("R")

EXECUTORS = ("local", "ray")
RAY_MISSING = "--executor ray needs Ray, which is not installed: pip install 'sdprep[ray]'"


class Executor(Protocol):
    """Maps a stage's per-item function over its items; results come back in the items' order."""

    name: str
    local: bool  # True: the function runs in this process (models loaded here, threads share them)

    def map(
        self,
        fn: Callable[[T], R],
        items: Iterable[T],
        *,
        workers: int = 1,
        gpu: bool = False,
        batch_size: int | None = None,
    ) -> Iterator[tuple[T, R | SdprepError]]:
        """`workers`: threads of a local run (remote executors size their own pool); `gpu`: the
        function runs a model that wants a GPU; `batch_size`: a remote call carries a multiple of
        this many items (a model's batch; None: any number)."""
        ...

    def summary(self) -> str | None:
        """One line about the last `map` (throughput), or None."""
        ...

    def close(self) -> None:
        """Let go of what the executor holds (a cluster connection it made)."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class LocalExecutor:
    """Today's behaviour: `map_items` in this process, serially or in a thread pool."""

    name = "local"
    local = True

    def map(
        self,
        fn: Callable[[T], R],
        items: Iterable[T],
        *,
        workers: int = 1,
        gpu: bool = False,
        batch_size: int | None = None,
    ) -> Iterator[tuple[T, R | SdprepError]]:
        from sdprep.stage import map_items

        return map_items(fn, items, workers)

    def summary(self) -> str | None:
        return None

    def close(self) -> None:
        pass

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


LOCAL = LocalExecutor()


@dataclass(frozen=True)
class ExecutorSettings:
    """`--executor`, `--ray-address`, `--ray-workers` (or `[project] executor`, ...), checked."""

    executor: str = "local"
    ray_address: str = "auto"
    ray_workers: int | None = None  # None: one actor per GPU when the cluster has GPUs, else per CPU

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise unknown_choice("executor", self.executor, EXECUTORS)
        if self.ray_workers is not None and self.ray_workers < 1:
            raise ConfigError(f"ray workers must be at least 1, got {self.ray_workers}")
        if self.executor == "local" and (self.ray_address != "auto" or self.ray_workers is not None):
            raise ConfigError(
                "a Ray address or worker count is set, but the executor is local",
                'add --executor ray (executor = "ray" in a project file), or leave the Ray settings out',
            )


def settings_over(base: ExecutorSettings, given: dict[str, Any]) -> ExecutorSettings:
    """`base` (a project's settings) with the command line's values that were `given` (not None);
    `--executor local` runs locally whatever the project says about Ray."""
    given = {k: v for k, v in given.items() if v is not None}
    if given.get("executor") == "local":
        return ExecutorSettings(**given)
    return dataclasses.replace(base, **given)


def require_ray() -> Any:
    """The `ray` module, or one InstallError line naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise InstallError(RAY_MISSING) from None
    return ray


def make_executor(settings: ExecutorSettings | None = None) -> Executor:
    """The executor `settings` name: `LOCAL`, or a `RayExecutor` connected to its cluster."""
    settings = settings or ExecutorSettings()
    if settings.executor == "local":
        return LOCAL
    require_ray()
    from sdprep.ray_executor import RayExecutor

    return RayExecutor(settings.ray_address, workers=settings.ray_workers)


def run_batch(fn: Callable[[T], R], batch: list[T]) -> list[R | SdprepError]:
    """`fn` over one batch, per-file errors as values (as `map_items`): what a remote worker runs."""
    from sdprep.stage import call_item

    many = getattr(fn, "batch", None)
    if many is not None:
        results: list[R | SdprepError] = many(batch)
        check_results(fn_name(fn), batch, results)
        return results
    return [call_item(fn, item) for item in batch]


def fn_name(fn: Callable[..., Any]) -> str:
    """What errors call a stage's function: `module.name`, or `module.Class.batch` for an object
    that handles whole batches."""
    if getattr(fn, "batch", None) is not None:
        return f"{type(fn).__module__}.{type(fn).__qualname__}.batch"
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', None) or type(fn).__module__}.{name}"


def check_results(name: str, batch: list[Any], results: list[Any]) -> None:
    """A BatchError unless there is one result per item (pairing them up would lose items silently)."""
    if len(results) != len(batch):
        raise BatchError(
            f"{name} gave {len(results)} results for a batch of {len(batch)} items",
            "a bug in that function: it must return one result (or per-file error) per item, in order; "
            "nothing of this batch was written",
        )


def auto_batch_size(n_items: int, workers: int) -> int:
    """Items per remote call: about 8 calls per worker over the run (progress moves, each call's
    overhead is spread), between 1 and 32 (a killed worker redoes at most 32 items)."""
    return max(1, min(32, n_items // max(1, workers * 8)))


def throughput(n_items: int, seconds: float, what: str) -> str:
    """`  ray: 500 items in 12.3 s (40.6 items/s) on 2 workers`."""
    rate = n_items / seconds if seconds > 0 else float("inf")
    return f"  {what}: {n_items} items in {seconds:.1f} s ({rate:.1f} items/s)"
