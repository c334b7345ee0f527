"""The Executor protocol, and InlineExecutor.

An executor runs *calls*. A :class:`Call` names a module-level function and its arguments;
some arguments are :class:`Blob` objects — a task, a snapshot index — that a process
executor ships to each worker once and caches there by key, so the per-call message stays a
few hundred bytes whatever the task or the store holds.

The function is called as ``fn(cancelled, *blob_objects, *args)`` where ``cancelled()``
turns True once the caller asked to cancel the call. The executor knows nothing about
workflows or stores.

A call's future resolves to the function's return value, to :data:`CANCELLED` once a
cancelled call has stopped (finished or been killed), or fails with :class:`WorkerDied`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["CANCELLED", "Blob", "Call", "Executor", "InlineExecutor", "WorkerDied"]


class _Cancelled:
    __slots__ = ()

    def __repr__(self) -> str:
        return "CANCELLED"


CANCELLED: Any = _Cancelled()
"""What the future of a cancelled call resolves to once the call has stopped."""


class WorkerDied(Exception):
    """The process running a call died; ``exitcode`` is negative for a signal.

    ``position`` is the item the call last reported working on (see
    :class:`CallControl`), or ``None``.
    """

    def __init__(self, exitcode: int | None, pid: int | None) -> None:
        super().__init__(f"worker process {pid} died with exit code {exitcode}")
        self.exitcode = exitcode
        self.pid = pid
        self.position: int | None = None


@dataclass(eq=False, slots=True)
class Blob:
    """An object shipped to a worker once and cached there under ``key``.

    ``category`` selects the worker-side cache (``"unit"``: tasks, ``"snapshot"``: store
    indexes), each with its own size bound. ``serialise`` returns the bytes sent to a worker
    (computed once, on first need).
    """

    key: str
    obj: Any
    category: str
    serialise: Callable[[], bytes]
    _data: bytes | None = field(default=None, repr=False)

    def data(self) -> bytes:
        if self._data is None:
            self._data = self.serialise()
        return self._data


@dataclass(eq=False, slots=True)
class Call:
    """One call: ``fn(cancelled, *[b.obj for b in blobs], *args)``."""

    fn: Callable[..., Any]
    blobs: tuple[Blob, ...]
    args: tuple[Any, ...]


@runtime_checkable
class Executor(Protocol):
    """Where calls run. ``ProcessExecutor`` (loky processes), ``InlineExecutor`` and
    ``cano_mp.dask.DaskExecutor`` implement it; another backend needs these four members.

    Optional extras the engine uses when present: ``progress(future) -> (position,
    started) | None`` (which item of a BatchTask chunk runs: per-item timeouts and crash
    blame), ``in_flight_per_worker: int`` (calls kept in flight per worker; default 2) and
    ``chunk_seconds: float`` (the work an automatic BatchTask chunk aims at; default 0.1) and
    ``eager_chunks: bool`` (start BatchTask chunks at their balanced size when the item
    count is known, instead of growing them from one item; default False).
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


class InlineExecutor:
    """Runs each call at once, in the calling thread: for debugging and tests.

    Nothing is pickled, so breakpoints and prints work. Timeouts and cancellation are
    cooperative only (``task_context().cancelled()``): running code cannot be stopped.
    """

    def __init__(self) -> None:
        self._flags: dict[int, threading.Event] = {}

    @property
    def max_workers(self) -> int:
        return 1

    def submit(self, call: Call) -> Future[Any]:
        fut: Future[Any] = Future()
        flag = threading.Event()
        self._flags[id(fut)] = flag
        try:
            result = call.fn(flag.is_set, *[b.obj for b in call.blobs], *call.args)
        except BaseException as exc:
            self._flags.pop(id(fut), None)
            if not isinstance(exc, Exception):
                raise
            fut.set_exception(exc)
            return fut
        self._flags.pop(id(fut), None)
        fut.set_result(result)
        return fut

    def cancel(self, future: Future[Any], grace: float) -> None:
        flag = self._flags.get(id(future))
        if flag is not None:
            flag.set()

    def close(self) -> None:
        pass

    def __enter__(self) -> InlineExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return "InlineExecutor()"
