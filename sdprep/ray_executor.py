"""`--executor ray`: a stage's per-item function over batches of items on a pool of Ray actors.

Imported only when Ray is installed and asked for (`executors.make_executor`). The driver (the
`sdprep` process) keeps everything that writes: it sends batches of items out, gets each batch's
results (or per-file errors) back, and yields them in the items' order to the stage, which writes
them through its journal as a local run does. So the workers only read the dataset (a path every
node sees, mounted at the same place), and a run is undone, resumed and checked exactly as a local
one.

Each actor receives the function once (`ray.put`) and keeps it: an object in it that holds a model
pickles as its recipe and loads on the actor's first item, once per actor. An actor whose process
dies (killed, out of memory, node lost) is restarted by Ray and its unfinished batches are run again,
up to `MAX_RESTARTS` times.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any, TypeVar

import ray
from ray import ObjectRef
from ray.exceptions import RayActorError, RayTaskError

from sdprep.errors import ClusterError, DatasetError, SdprepError
from sdprep.executors import auto_batch_size, run_batch, throughput

MAX_RESTARTS = 3  # per actor: a worker process killed this often means something is wrong with it
IN_FLIGHT = 2  # batches queued per actor: one running, one ready to start
UNCOUNTED = 1000  # what the batch size assumes of items that come as a stream

T = TypeVar("T")
R = TypeVar("R")


class _Worker:
    """One actor: the stage's function, fetched and unpickled once, run over the batches sent to it.

    The function comes as an object reference inside a list, which Ray leaves unresolved: the actor
    fetches it on its first batch, and again after a restart (constructor arguments held in the
    object store would make Ray warn that a restart may not find them)."""

    def __init__(self, cwd: str):
        self.fn: Callable[[Any], Any] | None = None
        self.problem: SdprepError | None = None
        try:
            os.chdir(cwd)  # relative paths of a local run mean the same here
        except OSError as exc:
            self.problem = DatasetError(
                f"{cwd}: not found on Ray node {socket.gethostname()} ({exc.strerror})",
                "keep the dataset on storage every node mounts at the same path (see docs/ray.md)",
            )

    def pid(self) -> int:
        return os.getpid()

    def run(self, fn: list[ObjectRef[Callable[[Any], Any]]], batch: list[Any]) -> list[Any]:
        if self.problem is not None:
            raise self.problem
        if self.fn is None:
            self.fn = ray.get(fn[0])
        return run_batch(self.fn, batch)


_RemoteWorker = ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)(_Worker)


def _share(cpus: float, n: int) -> float:
    """CPUs per actor when `n` actors share `cpus`: whole CPUs, or a fraction when fewer than one
    each (Ray takes fractions below 1 only)."""
    return float(int(cpus // n)) if cpus >= n else cpus / n


def connect(address: str) -> bool:
    """Connect this process to the cluster at `address` (`auto`, `HOST:PORT`, `ray://...`, or `local`
    to start one here for the run); returns False when it was connected already."""
    if ray.is_initialized():
        return False
    _check_reachable(os.environ.get("RAY_ADDRESS", "") if address == "auto" else address)
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    except ConnectionError as exc:
        where = "RAY_ADDRESS is not set and none was started on this machine" if address == "auto" else exc
        raise ClusterError(
            f"no Ray cluster at {address} ({str(where).strip().splitlines()[0]})",
            "start one with `ray start --head` (docs/ray.md), pass --ray-address HOST:PORT, "
            "or --ray-address local to start one on this machine for this run",
        ) from None
    return True


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail at once when a HOST:PORT address has nothing listening: Ray itself retries for minutes
    before it gives up. Other forms (`ray://`, `local`, none) are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ClusterError(
            f"no Ray cluster at {address} (nothing answers there: {exc.strerror or exc})",
            "start one with `ray start --head` on that machine (docs/ray.md), check the address "
            "`ray status` prints there, or --ray-address local to start one on this machine for this run",
        ) from None


class RayExecutor:
    """Batches of items to a pool of Ray actors (see the module docstring)."""

    name = "ray"
    local = False

    def __init__(self, address: str = "auto", *, workers: int | None = None):
        self.address = address
        self.workers = workers
        self._own = connect(address)
        self._last: tuple[int, float, int, bool] | None = None
        self.actors: list[Any] = []  # the pool of the running `map` (tests kill one)

    def pool(self, gpu: bool) -> tuple[int, dict[str, float]]:
        """How many actors, and what each asks for: for a model on a cluster with GPUs a GPU each
        (a share when there are more actors than GPUs) and the CPUs that go with it (its decoding
        threads use them); else a CPU each (or a share)."""
        # ray.cluster_resources() has no annotations (it returns {resource name: amount})
        res: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
        gpus, cpus = res.get("GPU", 0.0), res.get("CPU", 1.0)
        if gpu and gpus >= 1:
            n = self.workers or int(gpus)
            return n, {"num_gpus": min(1.0, gpus / n), "num_cpus": _share(cpus, n)}
        n = self.workers or max(1, int(cpus))
        return n, {"num_cpus": _share(cpus, n)}

    def map(
        self,
        fn: Callable[[T], R],
        items: Iterable[T],
        *,
        workers: int = 1,
        gpu: bool = False,
        batch_size: int | None = None,
    ) -> Iterator[tuple[T, R | SdprepError]]:
        """`fn` over `items` on the actor pool; (item, result or per-file error) in the items' order.

        `workers` (a local run's threads) is not used: the pool has `self.workers` actors."""
        self._last = None
        start, count = time.monotonic(), 0
        n, resources = self.pool(gpu)
        auto = auto_batch_size(len(items) if isinstance(items, Sized) else UNCOUNTED, n)
        size = auto if batch_size is None else batch_size * max(1, auto // batch_size)
        source = iter(items)
        batches = iter(lambda: list(itertools.islice(source, size)), [])  # read as it goes, like map_items
        first = next(batches, None)
        if first is None:
            return
        fn_ref = [ray.put(fn)]  # pickled once; each actor unpickles its own copy once
        self.actors = [_RemoteWorker.options(**resources).remote(os.getcwd()) for _ in range(n)]
        queued = [0] * n
        pending: deque[tuple[list[T], ObjectRef[list[R | SdprepError]], int]] = deque()
        try:
            for batch in itertools.chain([first], batches):
                while len(pending) >= IN_FLIGHT * n:
                    yield from self._take(pending.popleft(), queued)
                a = min(range(n), key=queued.__getitem__)
                pending.append((batch, self.actors[a].run.remote(fn_ref, batch), a))
                queued[a] += 1
                count += len(batch)
            while pending:
                yield from self._take(pending.popleft(), queued)
        finally:
            for actor in self.actors:
                ray.kill(actor, no_restart=True)
            self.actors = []
        self._last = (count, time.monotonic() - start, n, "num_gpus" in resources)

    def _take(
        self, entry: tuple[list[T], ObjectRef[list[R | SdprepError]], int], queued: list[int]
    ) -> Iterator[tuple[T, R | SdprepError]]:
        batch, ref, a = entry
        try:
            outs = ray.get(ref)
        except RayTaskError as exc:  # raised by the function itself: a bug, or a whole-run error
            cause = exc.cause
            if isinstance(cause, SdprepError | OSError):
                raise cause from None
            raise
        except RayActorError as exc:  # could not start, or died more than MAX_RESTARTS times
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise ClusterError(
                f"a Ray worker stopped on the batch from {getattr(batch[0], 'path', batch[0])}: {first}",
                "every node needs this sdprep version installed; the worker's log is on its node "
                "(/tmp/ray/session_latest/logs); finished items are kept: run again to resume",
            ) from None
        queued[a] -= 1
        yield from zip(batch, outs)

    def worker_pids(self) -> list[int]:
        """The process ids of the running pool's actors."""
        return ray.get([a.pid.remote() for a in self.actors])

    def summary(self) -> str | None:
        if self._last is None:
            return None
        n, seconds, workers, gpu = self._last
        where = "GPU workers" if gpu else "workers"
        return throughput(n, seconds, "ray") + f" on {workers} {where}"

    def close(self) -> None:
        """Disconnect, when this executor connected (a process that was connected stays so)."""
        if self._own and ray.is_initialized():
            ray.shutdown()
        self._own = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
