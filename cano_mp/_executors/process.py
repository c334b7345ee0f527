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
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import replace
from typing import Any, Literal

from loky import cpu_count

from .._errors import CanoError, ConfigError
from .._public import public
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
            leaks memory or state); default: never. With it set, every split branch is a
            call of its own (quick branches are otherwise grouped several to a call). A
            worker is also replaced as soon as a task leaves it unusable (closed fd 0/1/2,
            changed resource limits).
        warm: start the workers now, in the background, instead of at the first call
            (:meth:`warm` does the same and waits for them).
        start_method: ``"loky"`` (default): each worker is a fresh interpreter (fork+exec)
            that imports what it needs. ``"forkserver"``: one fresh, single-threaded
            interpreter per pool imports cano_mp and ``preload`` once, and each worker is
            a fork of it: workers start in milliseconds (a replacement after a crash or
            ``max_tasks_per_worker`` too), but preloaded modules are as they were when the
            server started. See *Processes and failures* in the docs for the trade-offs.
        preload: module names the fork server imports before forking workers (``numpy``,
            your tasks' module); only with ``start_method="forkserver"``. A module that
            fails to import there with ``ImportError`` is skipped (workers import it
            themselves).

    A worker that dies fails only the call it was running; the pool starts a new worker.
    Workers start on demand; :meth:`warm` starts them ahead of time.
    """

    capabilities = Capabilities(reports_progress=True, direct=True, group_calls=True)

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        reuse: bool = True,
        max_tasks_per_worker: int | None = None,
        warm: bool = False,
        start_method: Literal["loky", "forkserver"] = "loky",
        preload: Sequence[str] = (),
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
        self._preload = _check_start(start_method, preload)
        self._start_method = start_method
        self._max_workers = max_workers or default_workers()
        self._reuse = reuse
        self._max_tasks = max_tasks_per_worker
        if max_tasks_per_worker is not None:  # a worker per so many branches, not groups
            self.capabilities = replace(ProcessExecutor.capabilities, group_calls=False)
        self._key = (
            self._max_workers,
            initializer,
            tuple(initargs),
            max_tasks_per_worker,
            start_method,
            self._preload,
        )
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._own: Pool | None = None
        self._closed = False
        if not reuse:
            self._own = self._new_pool()
            weakref.finalize(self, self._own.close)
        if warm:
            self._pool().warm(wait=False)

    def _new_pool(self) -> Pool:
        ctx = None
        if self._start_method == "forkserver":
            from .forkserver import ForkServerContext  # its imports: only when used

            ctx = ForkServerContext(self._preload)
            ctx.start()  # the server imports while the driver goes on
        args = (self._max_workers, self._initializer, self._initargs, self._max_tasks)
        return Pool(*args, ctx=ctx)

    def _pool(self) -> Pool:
        if self._closed:
            raise CanoError("this ProcessExecutor is closed")
        if self._own is not None:
            return self._own
        with _shared_lock:
            pool = _shared.get(self._key)
            if pool is None or pool.closed:
                pool = self._new_pool()
                _shared[self._key] = pool
            return pool

    @property
    def max_workers(self) -> int:
        """How many worker processes the pool runs at most."""
        return self._max_workers

    def submit(self, call: Call) -> Future[Any]:
        """Queue ``call``; it runs in the first free worker."""
        return self._pool().submit(call)

    def _existing_pool(self) -> Pool | None:
        """The pool behind this executor if there is one now (never starts one): what
        looks after a call already submitted."""
        if self._own is not None:
            return self._own
        with _shared_lock:
            return _shared.get(self._key)

    def cancel(self, future: Future[Any], grace: float) -> None:
        """Set the call's cooperative flag; kill its worker after ``grace`` seconds."""
        pool = self._existing_pool()
        if pool is not None:
            pool.cancel(future, grace)

    def wait_direct(self, future: Future[Any], timeout: float | None, wake_fd: int | None) -> bool:
        """Wait for a direct call in this thread, its worker's reply read here (see
        ``ExecutorBase.wait_direct``)."""
        pool = self._existing_pool()
        return pool.wait_direct(future, timeout, wake_fd) if pool is not None else False

    def progress(self, future: Future[Any]) -> tuple[int, float] | None:
        """Where a running call is: ``(position, started)`` of the item a batch chunk works
        on (``started`` in ``time.monotonic()`` seconds), or ``None`` (not started, done,
        or not a chunk). Read by the engine: ``capabilities.reports_progress``."""
        pool = self._existing_pool()
        return pool.progress(future) if pool is not None else None

    def warm(self, n: int | None = None, *, timeout: float | None = 60.0) -> ProcessExecutor:
        """Start ``n`` workers (default: all) now and wait until they are ready to run
        calls (started, imports done, initializer run); returns self.

        Idempotent: workers already running are counted, not started again. Raises
        :class:`CanoError` if they are not ready within ``timeout`` seconds (``None``: no
        limit) or the initializer fails."""
        self._pool().warm(n, timeout=timeout)
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
        start = f", start_method={self._start_method!r}" if self._start_method != "loky" else ""
        return f"ProcessExecutor(max_workers={self._max_workers}{start}, {kind} pool)"


def _check_start(start_method: str, preload: Sequence[str]) -> tuple[str, ...]:
    if start_method not in ("loky", "forkserver"):
        raise ConfigError(f"start_method must be 'loky' or 'forkserver', got {start_method!r}")
    if isinstance(preload, str) or not all(isinstance(m, str) and m for m in preload):
        raise ConfigError(f"preload must be a sequence of module names, got {preload!r}")
    if preload and start_method != "forkserver":
        raise ConfigError("preload needs start_method='forkserver' (loky workers import afresh)")
    return tuple(preload)


ProcessExecutor.__module__ = "cano_mp"


public(ProcessExecutor)
