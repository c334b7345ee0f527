"""The Executor protocol, and InlineExecutor.

An executor runs *calls*. A :class:`Call` names a module-level function and its arguments;
some arguments are :class:`Blob` objects — a task, a snapshot index — that a process
executor ships to each worker once and caches there by key, so the per-call message stays a
few hundred bytes whatever the task or the store holds.

The function is called as ``fn(cancelled, deadline, *blob_objects, *args)`` where ``cancelled()``
turns True once the caller asked to cancel the call. The executor knows nothing about
workflows or stores.

A call's future resolves to the function's return value, to :data:`CANCELLED` once a
cancelled call has stopped (finished or been killed), or fails with :class:`WorkerDied`.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any, Protocol, runtime_checkable

from ._wire import CANCELLED, Blob, Call, WorkerDied

__all__ = ["CANCELLED", "Blob", "Call", "Executor", "InlineExecutor", "WorkerDied"]


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
            result = call.fn(flag.is_set, call.deadline, *[b.obj for b in call.blobs], *call.args)
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
