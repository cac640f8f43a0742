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
import math
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any, TypeVar

import ray
from ray import ObjectRef
from ray.exceptions import RayActorError, RayTaskError

from sdprep.errors import ClusterError, ConfigError, DatasetError, SdprepError
from sdprep.executors import auto_batch_size, check_results, fn_name, run_batch, throughput

MAX_RESTARTS = 3  # per actor: a worker process killed this often means something is wrong with it
IN_FLIGHT = 2  # batches queued per actor: one running, one ready to start
UNCOUNTED = 1000  # what the batch size assumes of items that come as a stream
START_TIMEOUT = 120.0  # seconds for the pool's actors to be placed and started (SDPREP_RAY_START_TIMEOUT)
UNIT = 10_000  # Ray counts resources in steps of 1/10000

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


def _split(amount: float, k: int) -> float:
    """`amount` of a resource split between `k` actors: whole units when each gets one or more, else
    a fraction rounded down to Ray's step (so `k` of them fit in `amount`)."""
    each = amount / k
    return float(int(each)) if each >= 1 else math.floor(each * UNIT) / UNIT


def _per_actor(capacities: list[float], n: int) -> float:
    """The largest amount that `n` actors can each ask for of a resource the nodes have `capacities`
    of, every actor on one node: whole units when there are enough, else 1/k of one."""
    whole = sum(int(c) for c in capacities)
    if whole == 0:
        return 0.0
    for each in range(int(sum(capacities) // n), 0, -1):
        if sum(int(c // each) for c in capacities) >= n:
            return float(each)
    return _split(1.0, -(-n // whole))


def plan_pool(nodes: list[dict[str, float]], gpu: bool, workers: int | None) -> tuple[int, dict[str, float]]:
    """How many actors, and what each asks for, on alive `nodes` ({resource: amount} each), so that
    every actor fits on one node. A model on a cluster with GPUs: a GPU each, or 1/k of one when
    there are more actors than GPUs (k to a GPU), and the CPUs per GPU of the GPU node that has
    fewest, split the same way. Else a CPU each, or what the nodes' CPUs pack."""
    gpu_nodes = [r for r in nodes if int(r.get("GPU", 0.0)) >= 1]
    if gpu and gpu_nodes:
        gpus = sum(int(r["GPU"]) for r in gpu_nodes)
        n = workers or gpus
        k = -(-n // gpus)  # actors to a GPU
        cpus = min(r.get("CPU", 0.0) / int(r["GPU"]) for r in gpu_nodes)
        return n, {"num_gpus": _split(1.0, k), "num_cpus": _split(cpus, k)}
    capacities = [r.get("CPU", 0.0) for r in nodes]
    n = workers or max(1, sum(int(c) for c in capacities))
    return n, {"num_cpus": _per_actor(capacities, n)}


def _alive_nodes() -> list[dict[str, float]]:
    """The resources of each alive node of the cluster."""
    # ray.nodes() has no annotations (a list of dicts with "Alive" and "Resources" among the keys)
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]  # type: ignore[no-untyped-call]


def _start_timeout() -> float:
    value = os.environ.get("SDPREP_RAY_START_TIMEOUT", "")
    try:
        return float(value) if value else START_TIMEOUT
    except ValueError:
        raise ConfigError(
            f"SDPREP_RAY_START_TIMEOUT must be a number of seconds, got {value!r}",
            f"unset it for the default ({START_TIMEOUT:.0f} s)",
        ) from None


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
        self._fn_name = ""  # the running `map`'s function, for errors
        self.actors: list[Any] = []  # the pool of the running `map` (tests kill one)

    def pool(self, gpu: bool) -> tuple[int, dict[str, float]]:
        """How many actors, and what each asks for (`plan_pool` on the cluster's alive nodes): for a
        model a GPU or a share of one, with the CPUs that go with it (its decoding threads use them)."""
        return plan_pool(_alive_nodes(), gpu, self.workers)

    def _wait_started(self, resources: dict[str, float]) -> None:
        """Every actor of the pool placed and started, or a ClusterError (Ray would keep the batches
        of an actor no node can take waiting for ever)."""
        timeout = _start_timeout()
        _, waiting = ray.wait(
            [a.pid.remote() for a in self.actors], num_returns=len(self.actors), timeout=timeout
        )
        if waiting:
            asked = ", ".join(f"{v:g} {'GPU' if k == 'num_gpus' else 'CPU'}" for k, v in resources.items())
            raise ClusterError(
                f"{len(waiting)} of {len(self.actors)} Ray workers did not start within {timeout:g} s "
                f"(each asks for {asked})",
                "`ray status` shows what the nodes have free; pass fewer --ray-workers, free the "
                "cluster's busy resources, or set SDPREP_RAY_START_TIMEOUT (seconds) when nodes are "
                "still being added",
            )

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
        self._fn_name = fn_name(fn)
        try:
            self._wait_started(resources)
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
        check_results(self._fn_name, batch, outs)
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
