"""``task_context()``: what a running task may ask about its own call."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ._public import public

if TYPE_CHECKING:
    from ._store import SharedStore

__all__ = ["NO_RESOURCES", "TaskContext", "task_context"]

NO_RESOURCES: Mapping[str, Any] = MappingProxyType({})


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
        index: the item's index inside ``BatchTask.process``, else ``None``.
        store: inside ``BatchTask.process``, a read-only view of the store as the batch
            started (read large inputs here, zero-copy); else ``None``.
        resources: the workflow's resources (``Workflow(resources=...)``) by name; each is
            set up in this process the first time it is asked for, then kept.
    """

    run_id: str
    state: object
    attempt: int
    deadline: float | None
    _flag: Callable[[], bool] = field(default=_never, repr=False, compare=False)
    index: int | None = None
    store: SharedStore | None = field(default=None, repr=False, compare=False)
    resources: Mapping[str, Any] = field(
        default_factory=lambda: NO_RESOURCES, repr=False, compare=False
    )

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


class _LazyContext:
    """The context of a batch chunk: one object per chunk, a :class:`TaskContext` built
    only when an item asks for it (most never do, and items may take a microsecond)."""

    __slots__ = (
        "_flag",
        "_pos",
        "at",
        "attempt",
        "deadline",
        "indices",
        "resources",
        "run_id",
        "state",
        "store",
    )

    def __init__(
        self,
        run_id: str,
        state: object,
        attempt: int,
        flag: Callable[[], bool],
        store: SharedStore,
        indices: Sequence[int],
        pos: memoryview,
    ) -> None:
        self.run_id = run_id
        self.state = state
        self.attempt = attempt
        self._flag = flag
        self.store = store
        self.indices = indices
        self._pos = pos  # pos[0]: the position in the chunk of the item running now
        self.at: Callable[[], int] | None = None  # or this says it (items run in blocks)
        self.deadline: float | None = None
        self.resources: Mapping[str, Any] = NO_RESOURCES

    def build(self) -> TaskContext:
        return TaskContext(
            self.run_id,
            self.state,
            self.attempt,
            self.deadline,
            self._flag,
            self.indices[self._pos[0] if self.at is None else self.at()],
            self.store,
            self.resources,
        )


_local = threading.local()

# In a pool worker, while a call runs: the tags its log records are forwarded with.
log_tags: dict[str, object] | None = None


def task_context() -> TaskContext:
    """Return the :class:`TaskContext` of the task running in this thread.

    Raises ``RuntimeError`` outside a running task.
    """
    ctx: TaskContext | _LazyContext | None = getattr(_local, "ctx", None)
    if ctx is None:
        raise RuntimeError("task_context() is only available inside a running task")
    if isinstance(ctx, _LazyContext):
        return ctx.build()
    return ctx


def _set_context(
    ctx: TaskContext | _LazyContext | None,
) -> TaskContext | _LazyContext | None:
    previous: TaskContext | _LazyContext | None = getattr(_local, "ctx", None)
    _local.ctx = ctx
    return previous


public(TaskContext)
