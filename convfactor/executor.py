"""Where independent tasks run: here, on a local process pool, or on a Dask cluster.

Candidate scoring (one task per layer), sensitivity probes (one per probed layer) and a sweep's points
(one per target) are independent, so ``factorize(..., executor=...)`` and ``sweep(..., executor=...)``
submit them to anything shaped like ``concurrent.futures.Executor``: ``submit(fn, *args)`` returning a
future. The results are always taken in submission order (``ordered_results``), never in completion
order, so the allocation is the serial one whatever ran where.

- ``None`` / ``SerialExecutor``: every task runs at once in this process (the default: the memory of one
  layer's fit, as without an executor);
- ``ThreadPoolExecutor``: tasks share this process's memory (the model is copied per sensitivity probe:
  probes hook its layers);
- ``ProcessPoolExecutor`` (``local_pool``: ``--workers N``) or Dask distributed (``client.get_executor()``,
  ``--scheduler tcp://host:8786``): tasks and their arguments are pickled to the workers.

Why Dask rather than Ray: Dask's ``Client.get_executor()`` *is* a ``concurrent.futures.Executor``, so the
seam stays the standard-library one with no Dask import in the library; a worker is one ``dask worker
tcp://host:8786`` command on any machine with convfactor installed, with per-worker resources (a
deployment machine tagged for timing) and no cluster runtime to keep; and it installs without pulling
another torch. Ray's actor model and object store would serve large shared arrays better, but its futures
are not ``concurrent.futures`` ones and it brings its own runtime.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from .errors import ConvfactorError
from .progress import track

__all__ = ["SerialExecutor", "ordered_results", "in_this_process", "local_pool", "open_executor",
           "pool_size", "PROCESS_MEMORY", "IN_FLIGHT"]

# What one worker process may hold at most (the real-scale ceiling: 2 GB + 3x the model).
PROCESS_MEMORY = 2 << 30
# Tasks submitted ahead of the one being collected: enough to keep a few workers busy, few enough that their
# pickled arguments stay a few layers' worth.
IN_FLIGHT = 4


class SerialExecutor(Executor):
    """Runs each task when it is submitted, in this process: the executor of a serial run."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # noqa: BLE001 - handed back through the future, as a pool would
            future.set_exception(error)
        return future


def in_this_process(executor: Any) -> bool:
    """True when tasks share this process's objects (serial or threads), False when they are pickled."""
    return executor is None or isinstance(executor, (SerialExecutor, ThreadPoolExecutor))


def ordered_results(executor: Any, fn: Callable[..., Any], calls: Sequence[tuple], progress: bool | str = False,
                    name: str = "tasks", unit: str = "task", in_flight: int | None = None) -> list[Any]:
    """``fn(*args)`` for each ``args`` in ``calls``, submitted to ``executor`` (None: serially), the results in
    the order of ``calls`` (a deterministic reduction whatever finished first).

    At most ``in_flight`` tasks (default ``IN_FLIGHT``) are submitted and not yet collected: a pool or a
    Dask client holds each submitted task's pickled arguments (a layer's statistics: up to hundreds of MB)
    until it is done, so submitting every layer at once held them all (on ResNet-18 with two Dask workers
    the caller peaked at 2.75 GB, 1.80 GB with this window and the probes grouped: docs/scale-out.md)."""
    pool = executor if executor is not None else SerialExecutor()
    window = max(1, in_flight or IN_FLIGHT)
    pending: deque[Future] = deque()
    results: list[Any] = []
    for index in track(range(len(calls)), progress, name, unit=unit):
        while len(pending) < window and index + len(pending) < len(calls):
            pending.append(pool.submit(fn, *calls[index + len(pending)]))
        results.append(pending.popleft().result())
    return results


def pool_size(requested: int | None, model_bytes: int = 0) -> int:
    """Worker processes for ``requested`` (None: the cores), at most the cores and what the free memory
    holds at ``PROCESS_MEMORY`` + 3x the model each; at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = cores if requested is None else requested
    try:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        free = None
    fits = wanted if free is None else max(1, int(free // (PROCESS_MEMORY + 3 * model_bytes)))
    return max(1, min(wanted, cores, fits))


def local_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` fresh processes (spawned: no fork of a process that already runs torch threads)."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


@contextlib.contextmanager
def open_executor(workers: int | None = None, scheduler: str | None = None, model_bytes: int = 0,
                  *, flag: str = "--scheduler") -> Iterator[Any]:
    """The executor the command line asks for: a Dask cluster's (``scheduler``: its address), a local pool of
    ``pool_size(workers)`` processes, or None (serial); closed on exit.

    Raises:
        ConvfactorError: Dask distributed is not installed, or the scheduler cannot be reached.
    """
    if scheduler is not None:
        try:
            from distributed import Client
        except ImportError:
            raise ConvfactorError(f"{flag} needs Dask distributed: pip install 'convfactor[distributed]'") from None
        try:
            client = Client(scheduler, timeout="10s")
        except OSError as error:
            raise ConvfactorError(f"{flag} {scheduler}: cannot reach the Dask scheduler ({error})") from None
        try:
            yield client.get_executor()
        finally:
            client.close()
        return
    if workers is None or workers <= 1:
        yield None
        return
    pool = local_pool(pool_size(workers, model_bytes))
    try:
        yield pool
    finally:
        pool.shutdown()

