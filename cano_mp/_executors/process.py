"""ProcessExecutor: calls in a pool of loky worker processes, one pipe and one call per slot.

::

    ProcessExecutor (any number, cheap)      Pool (one per (max_workers, initializer,
    -------------------------------------       initargs) process-wide, or one private)
    submit(call) / cancel(fut, grace) ----->  pending queue -> a free slot's pipe -> worker
    progress(fut)                       ----->  the flags file: which item of a chunk runs
    close(): a private pool only              shut down at interpreter exit (atexit)

Why a pool of its own and not loky's ``ProcessPoolExecutor``: when one of its workers dies,
loky fails *every* pending and running future and restarts all workers, and it cannot cancel
one running call (loky#176). A pool of one-worker loky executors isolates deaths but pays
loky's queue threads and ~0.3-0.5 ms of dispatch per call. A raw pipe ping-pong to a loky
process costs ~16-30 µs; a whole workflow transition over these pipes (store snapshot,
task, commit) measures ~116 µs against loky's 276 µs ``submit().result()``
(``scripts/bench.py chain``), with per-call isolation kept. The manager loop is in
``pool``; what runs in a worker is in ``cano_mp._worker``.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from loky import cpu_count

from .._errors import CanoError, ConfigError
from .._wire import Call
from .base import Capabilities, ExecutorBase
from .pool import Pool

__all__ = ["ProcessExecutor", "default_workers", "shutdown_shared_pools"]


def default_workers() -> int:
    """Usable CPUs: loky's count honours affinity masks and cgroup CPU quotas."""
    return max(1, int(cpu_count()))


_shared_lock = threading.Lock()
_shared: dict[tuple[Any, ...], Pool] = {}


def shutdown_shared_pools() -> None:
    """Stop the process-wide pools (run at interpreter exit; tests use it too)."""
    with _shared_lock:
        pools = list(_shared.values())
        _shared.clear()
    for pool in pools:
        pool.close()


atexit.register(shutdown_shared_pools)


class ProcessExecutor(ExecutorBase):
    """Runs calls in a pool of loky worker processes.

    Args:
        max_workers: pool size; default: the usable CPUs (affinity and cgroup quotas
            honoured).
        initializer: called with ``initargs`` in each worker when it starts.
        reuse: ``True`` (default) shares one process-wide pool between every executor with
            the same arguments; ``False`` owns a private pool, shut down by :meth:`close`
            (or the ``with`` block).
        max_tasks_per_worker: replace a worker after it ran this many calls (a task that
            leaks memory or state); default: never. A worker is also replaced as soon as a
            task leaves it unusable (closed fd 0/1/2, changed resource limits).

    A worker that dies fails only the call it was running; the pool starts a new worker.
    Workers start on demand; :meth:`warm` starts them ahead of time.
    """

    capabilities = Capabilities(reports_progress=True)

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        reuse: bool = True,
        max_tasks_per_worker: int | None = None,
    ) -> None:
        if max_tasks_per_worker is not None and (
            isinstance(max_tasks_per_worker, bool)
            or not isinstance(max_tasks_per_worker, int)
            or max_tasks_per_worker < 1
        ):
            raise ConfigError(
                f"max_tasks_per_worker must be an int >= 1 or None, got {max_tasks_per_worker!r}"
            )
        if max_workers is not None and (
            isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1
        ):
            raise ConfigError(f"max_workers must be an int >= 1, got {max_workers!r}")
        if initializer is not None and not callable(initializer):
            raise ConfigError(f"initializer must be callable, got {initializer!r}")
        self._max_workers = max_workers or default_workers()
        self._reuse = reuse
        self._max_tasks = max_tasks_per_worker
        self._key = (self._max_workers, initializer, tuple(initargs), max_tasks_per_worker)
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._own: Pool | None = None
        self._closed = False
        if not reuse:
            self._own = Pool(self._max_workers, initializer, self._initargs, self._max_tasks)
            weakref.finalize(self, self._own.close)

    def _pool(self) -> Pool:
        if self._closed:
            raise CanoError("this ProcessExecutor is closed")
        if self._own is not None:
            return self._own
        with _shared_lock:
            pool = _shared.get(self._key)
            if pool is None or pool.closed:
                pool = Pool(self._max_workers, self._initializer, self._initargs, self._max_tasks)
                _shared[self._key] = pool
            return pool

    @property
    def max_workers(self) -> int:
        """How many worker processes the pool runs at most."""
        return self._max_workers

    def submit(self, call: Call) -> Future[Any]:
        """Queue ``call``; it runs in the first free worker."""
        return self._pool().submit(call)

    def cancel(self, future: Future[Any], grace: float) -> None:
        """Set the call's cooperative flag; kill its worker after ``grace`` seconds."""
        if self._own is not None:
            self._own.cancel(future, grace)
            return
        with _shared_lock:
            pool = _shared.get(self._key)
        if pool is not None:
            pool.cancel(future, grace)

    def progress(self, future: Future[Any]) -> tuple[int, float] | None:
        """Where a running call is: ``(position, started)`` of the item a batch chunk works
        on (``started`` in ``time.monotonic()`` seconds), or ``None`` (not started, done,
        or not a chunk). Read by the engine: ``capabilities.reports_progress``."""
        pool = self._own
        if pool is None:
            with _shared_lock:
                pool = _shared.get(self._key)
        return pool.progress(future) if pool is not None else None

    def warm(self) -> ProcessExecutor:
        """Start every worker now (they otherwise start on first use); returns self."""
        self._pool().warm()
        return self

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers."""
        return self._pool().pids()

    def close(self) -> None:
        """Shut down a private pool (``reuse=False``); a shared pool stays up."""
        if self._closed:
            return
        self._closed = True
        if self._own is not None:
            self._own.close()

    def __enter__(self) -> ProcessExecutor:
        return self

    def __repr__(self) -> str:
        kind = "shared" if self._reuse else "private"
        return f"ProcessExecutor(max_workers={self._max_workers}, {kind} pool)"


ProcessExecutor.__module__ = "cano_mp"
