"""The Executor protocol, the capabilities an executor may declare, and the job record.

An executor runs *calls* (:class:`~cano_mp._wire.Call`): ``fn(control, deadline,
*blob objects, *args)``, where ``control()`` turns True once the caller asked the call to
stop. A call's future resolves to the function's return value, to ``CANCELLED`` once a
cancelled call has stopped (finished or been killed), or fails with ``WorkerDied``. An
executor knows nothing about workflows or stores.

A backend needs the four members of :class:`Executor`. What else the engine may use, it
learns from one record, :class:`Capabilities`, through :func:`capabilities`: an executor
that subclasses :class:`ExecutorBase` declares its own, any other gets the defaults. The
engine never probes an executor's attributes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .._errors import ConfigError
from .._public import public
from .._wire import Call

__all__ = [
    "Capabilities",
    "Executor",
    "ExecutorBase",
    "Job",
    "JobFuture",
    "capabilities",
    "progress_reader",
]


@runtime_checkable
class Executor(Protocol):
    """Where calls run. ``ProcessExecutor`` (loky processes), ``InlineExecutor`` and
    ``cano_mp.dask.DaskExecutor`` implement it; another backend needs these four members.

    A backend that wants to tell the engine more (how many calls to keep in flight, how to
    size BatchTask chunks, which item of a chunk runs) subclasses ``ExecutorBase`` and sets
    its ``capabilities``.
    """

    @property
    def max_workers(self) -> int:
        """How many calls may run at once."""
        ...

    def submit(self, call: Call) -> Future[Any]:
        """Start ``call``; never blocks on the call itself (InlineExecutor excepted)."""
        ...

    def cancel(self, future: Future[Any], grace: float) -> None:
        """Ask the call to stop: set its cooperative flag; after ``grace`` seconds stop it
        by force (kill its worker). Its future then resolves to ``CANCELLED``."""
        ...

    def close(self) -> None:
        """Release the executor's resources (a shared pool stays up)."""
        ...


Executor.__module__ = "cano_mp"


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an executor tells the engine beyond the :class:`Executor` protocol.

    Every field's default is what the engine assumes of an executor that says nothing.

    Attributes:
        remote: calls run in another process (or machine), so everything they take is
            pickled; False for :class:`InlineExecutor`, where the engine runs the work in
            the driver and checks timeouts itself after the call.
        in_flight_per_worker: calls the engine keeps in flight per worker. Calls beyond what
            can run only wait in the executor's queue, where they cannot be cancelled
            cheaply and where their timeouts already tick; two per worker hide the local
            pool's dispatch round trip. A backend with milliseconds of latency per call
            wants more.
        chunk_seconds: the work an automatically sized BatchTask chunk aims at, so that the
            per-call cost stays a small share.
        eager_chunks: with a known item count, start BatchTask chunks at their balanced
            size instead of growing them from one item (each growth step costs a round
            trip: worth it only where a round trip is expensive).
        reports_progress: ``ExecutorBase.progress`` says which item of a running chunk works
            and since when (per-item timeouts, crash blame); otherwise the engine times a
            chunk as a whole.
        direct: ``ExecutorBase.wait_direct`` can wait for a call marked ``Call.direct`` in
            the caller's thread, reading the worker's reply there: no hand-over from a
            manager thread (a plain task's state waits for its one call this way).
        group_calls: several quick split branches may share one call
            (``_calls.run_unit_group``; needs ``reports_progress``, which blames a crash on
            its branch); the local pool does unless ``max_tasks_per_worker`` counts calls.
    """

    remote: bool = True
    in_flight_per_worker: int = 2
    chunk_seconds: float = 0.1
    eager_chunks: bool = False
    reports_progress: bool = False
    direct: bool = False
    group_calls: bool = False

    def __post_init__(self) -> None:
        n = self.in_flight_per_worker
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"in_flight_per_worker must be an int >= 1, got {n!r}")
        s = self.chunk_seconds
        if isinstance(s, bool) or not isinstance(s, int | float) or not s > 0:
            raise ConfigError(f"chunk_seconds must be a number > 0, got {s!r}")


_DEFAULTS = Capabilities()


class ExecutorBase:
    """A base class for executors that declare :class:`Capabilities`.

    Subclasses implement the :class:`Executor` protocol's ``max_workers``, ``submit`` and
    ``cancel`` (and ``close`` when they hold resources) and set ``capabilities``, on the
    class or per instance. They are context managers that close on exit.
    """

    capabilities: Capabilities = _DEFAULTS

    def progress(self, future: Future[Any]) -> tuple[int, float] | None:
        """Where a running call is: ``(position, started)`` of the item a batch chunk works
        on (``started`` in ``time.monotonic()`` seconds), or ``None`` (not started, done,
        not a chunk, or not known). Read only when ``capabilities.reports_progress``."""
        return None

    def wait_direct(self, future: Future[Any], timeout: float | None, wake_fd: int | None) -> bool:
        """Wait up to ``timeout`` seconds, in this thread, for the call behind ``future``
        (submitted with ``Call.direct``), or until ``wake_fd`` turns readable; the future
        may resolve in this thread. ``False``: not waited (not such a call now, or not
        supported), so the caller waits its usual way. ``wake_fd=None``: the caller will
        not wait for it this way; the executor must resolve the future itself. Called only
        when ``capabilities.direct``."""
        return False

    def close(self) -> None:
        """Release the executor's resources (nothing, unless a subclass holds some)."""

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def capabilities(executor: object) -> Capabilities:
    """What ``executor`` declares, or the defaults: the engine's only way to ask."""
    if isinstance(executor, ExecutorBase):
        return executor.capabilities
    return _DEFAULTS


def progress_reader(
    executor: object,
) -> Callable[[Future[Any]], tuple[int, float] | None] | None:
    """``executor.progress`` if the executor reports progress, else ``None``."""
    if isinstance(executor, ExecutorBase) and executor.capabilities.reports_progress:
        return executor.progress
    return None


def direct_waiter(
    executor: object,
) -> Callable[[Future[Any], float | None, int | None], bool] | None:
    """``executor.wait_direct`` if the executor can wait for a call in the caller's thread,
    else ``None``."""
    if isinstance(executor, ExecutorBase) and executor.capabilities.direct:
        return executor.wait_direct
    return None


# -- the job record -----------------------------------------------------------------------------
# How cancel(future) and progress(future) find the call behind a future: the future *is* a
# JobFuture, which names its job while the call is pending. Not a table from futures to
# jobs: every way a call can end (its reply, its worker's death, a cancel before it started,
# close()) would have to remove its entry, and one forgotten path would keep a store
# snapshot alive. Not a strong link for good either: the engine keeps a future after it
# resolved, and the job holds the call (its task, its snapshot), so the link is cut when the
# future resolves, whoever resolves it. Until then the job and its future refer to each
# other, and the executor holds the job anyway.


class JobFuture(Future[Any]):
    """The future of a call on an executor that keeps a :class:`Job` for it."""

    job: Job | None = None

    # Two threads may both conclude a call (the manager reaping a dead worker, a run
    # thread cut off in its reply): the first outcome stands, the second is dropped — a
    # raise here would take down the thread that resolves every other call.
    def set_result(self, result: Any) -> None:
        self.job = None
        with contextlib.suppress(InvalidStateError):
            super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        self.job = None
        with contextlib.suppress(InvalidStateError):
            super().set_exception(exception)


@dataclass(eq=False, slots=True)
class Job:
    """One call an executor has accepted and not yet resolved.

    ``seq`` numbers the executor's calls; ``cancelled`` is set once the caller asked the
    call to stop, and ``stop_at`` (``time.monotonic()``) is when its grace period ends and
    it is stopped by force. Backends subclass it with what they track besides.
    """

    call: Call
    future: JobFuture
    seq: int
    cancelled: bool = False
    stop_at: float | None = None

    def __post_init__(self) -> None:
        self.future.job = self

    @staticmethod
    def of(future: Future[Any]) -> Job | None:
        """The job of a pending call's future; ``None`` once it resolved (or not ours)."""
        return future.job if isinstance(future, JobFuture) else None


public(Executor)
