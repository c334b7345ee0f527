"""InlineExecutor: every call at once, in the calling thread."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

from .._public import public
from .._wire import Call
from .base import Capabilities, ExecutorBase

__all__ = ["InlineExecutor"]


class InlineExecutor(ExecutorBase):
    """Runs each call at once, in the calling thread: for debugging and tests.

    Nothing is pickled, so breakpoints and prints work. Timeouts and cancellation are
    cooperative only (``task_context().cancelled()``): running code cannot be stopped.
    """

    capabilities = Capabilities(remote=False)

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

    def __repr__(self) -> str:
        return "InlineExecutor()"


InlineExecutor.__module__ = "cano_mp"


public(InlineExecutor)
