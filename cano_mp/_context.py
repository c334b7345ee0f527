"""``task_context()``: what a running task may ask about its own call."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["TaskContext", "task_context"]


def _never() -> bool:
    return False


@dataclass(frozen=True, slots=True)
class TaskContext:
    """The call a task is running in.

    Attributes:
        run_id: id of the workflow run.
        state: the state whose task (or split branch, or batch item) is running.
        attempt: 1-based attempt number.
        deadline: ``time.monotonic()`` value at which the attempt times out, or ``None``.
    """

    run_id: str
    state: object
    attempt: int
    deadline: float | None
    _flag: Callable[[], bool] = field(default=_never, repr=False, compare=False)

    def cancelled(self) -> bool:
        """True once the engine wants this attempt to stop (timeout, cancellation).

        Long CPU loops should poll it and return early; a task that does not stop is
        terminated after a short grace period.
        """
        if self._flag():
            return True
        return self.deadline is not None and time.monotonic() >= self.deadline

    def remaining(self) -> float | None:
        """Seconds left before the deadline, or ``None`` without one."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())


_local = threading.local()


def task_context() -> TaskContext:
    """Return the :class:`TaskContext` of the task running in this thread.

    Raises ``RuntimeError`` outside a running task.
    """
    ctx: TaskContext | None = getattr(_local, "ctx", None)
    if ctx is None:
        raise RuntimeError("task_context() is only available inside a running task")
    return ctx


def _set_context(ctx: TaskContext | None) -> TaskContext | None:
    previous: TaskContext | None = getattr(_local, "ctx", None)
    _local.ctx = ctx
    return previous
