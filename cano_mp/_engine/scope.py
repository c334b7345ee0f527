"""RunScope: what every state of one run shares — its store, executor, observers, quota,
deadline, cancellation and the one event its driver thread sleeps on."""

from __future__ import annotations

import itertools
import os
import threading
import time
import uuid
from typing import Any

from .._errors import CanoError, Terminated, TransitionError, WorkflowTimeout
from .._executors import Executor, capabilities, direct_waiter, progress_reader
from .._observe import Observers, RunInfo
from .._store import SharedStore, driver_store
from .plan import Frozen, Quota, UnitRef, describe

__all__ = ["CANCEL_GRACE", "RunCancelled", "RunScope"]

# Seconds a cancelled or timed-out call gets to notice task_context().cancelled() and
# return before its worker is killed. Longer lets more tasks stop cleanly (their worker
# survives, no respawn); shorter frees the slot sooner.
CANCEL_GRACE = 0.25

_tokens = itertools.count(1)


class RunCancelled(CanoError):
    """The run was cancelled from outside (ConcurrentWorkflow, asyncio cancellation)."""


class WakePipe:
    """A pipe that turns readable when the run is woken from outside (a cancel): what a
    thread blocked on a worker's pipe (a direct call) waits on besides. Its fds close with
    the object, never under a thread still holding it to write."""

    __slots__ = ("_w", "fd")

    def __init__(self) -> None:
        self.fd = self._w = -1  # what __del__ sees if os.pipe() fails (EMFILE)
        self.fd, self._w = os.pipe()
        os.set_blocking(self._w, False)

    def poke(self) -> None:
        try:
            os.write(self._w, b"x")
        except OSError:  # full: already woken
            pass

    def __del__(self) -> None:
        for fd in (self.fd, self._w):
            try:
                if fd >= 0:
                    os.close(fd)
            except OSError:  # pragma: no cover - closed at interpreter exit
                pass


class RunScope:
    """The context of one run, shared by the states it drives."""

    def __init__(
        self,
        frozen: Frozen,
        store: SharedStore,
        executor: Executor,
        *,
        observers: Observers,
        timeout: float | None,
        quota: Quota | None,
        cancel_grace: float = CANCEL_GRACE,
        run_id: str | None = None,
    ) -> None:
        self.plan = frozen.plan
        self.units = frozen.units  # every unit of the plan, as pickled for this run
        self.store = driver_store(store)  # a task's view cannot be a run's store
        self.executor = executor
        self.caps = capabilities(executor)
        self.progress = progress_reader(executor)  # which item a chunk is on, if it can tell
        self.wait_direct = direct_waiter(executor)  # a call waited for in this thread, if it can
        self._wake_pipe: WakePipe | None = None  # made by wake_fd() when first needed
        self.observers = observers
        self.timeout = timeout
        self.quota = quota
        self.cancel_grace = cancel_grace
        self.run_id = run_id if run_id is not None else uuid.uuid4().hex[:12]
        self.info = RunInfo(self.run_id, self.plan.name)
        self.wake = threading.Event()
        self.deadline: float | None = None
        self.cancelled = False
        self._cancel_error: type[CanoError] = RunCancelled
        self._grace_on_cancel = cancel_grace

    @property
    def remote(self) -> bool:
        return self.caps.remote

    def cancel(self, grace: float | None = None) -> None:
        """Stop the run from another thread: it raises :class:`RunCancelled`.

        In-flight calls get ``grace`` seconds (default: the run's ``cancel_grace``) to
        notice ``task_context().cancelled()`` before their workers are killed.
        """
        self._grace_on_cancel = self.cancel_grace if grace is None else max(0.0, grace)
        self.cancelled = True
        self.wake.set()
        pipe = self._wake_pipe
        if pipe is not None:
            pipe.poke()

    def wake_fd(self) -> int | None:
        """A file descriptor that turns readable when the run is cancelled (see
        :class:`WakePipe`), or None when no fd is to be had (EMFILE: wait the usual way)."""
        pipe = self._wake_pipe
        if pipe is None:
            try:
                pipe = self._wake_pipe = WakePipe()
            except OSError:
                return None
            if self.cancelled:  # a cancel that came before the pipe did
                pipe.poke()
        return pipe.fd

    def close(self) -> None:
        """Drop what the run held for waiting (its wake pipe closes once unused)."""
        self._wake_pipe = None

    def terminate(self) -> None:
        """Stop the run at once because the process got SIGTERM: it raises ``Terminated``."""
        self._cancel_error = Terminated
        self.cancel(0.0)

    def is_cancelled(self) -> bool:
        return self.cancelled

    def stop_grace(self, exc: BaseException) -> float:
        """How long in-flight calls get to stop when ``exc`` ends a state."""
        if isinstance(exc, (KeyboardInterrupt, Terminated)):
            return 0.0
        if isinstance(exc, RunCancelled):
            return self._grace_on_cancel
        return self.cancel_grace

    def check_stop(self, state: Any, now: float) -> None:
        """Raise when the run was cancelled or its wall-clock budget is spent."""
        if self.cancelled:
            if self._cancel_error is Terminated:
                raise Terminated(f"run {self.run_id} was stopped: the process received SIGTERM")
            raise RunCancelled(f"run {self.run_id} was cancelled")
        if self.deadline is not None and now >= self.deadline:
            raise WorkflowTimeout(
                f"workflow {self.plan.name!r} timed out after {self.timeout}s "
                f"in state {describe(state)}",
                state=state,
            )

    def check_known(self, state: Any, by: UnitRef | None) -> None:
        """Raise ``TransitionError`` unless ``state`` is registered or an exit state."""
        try:
            known = state in self.plan.entries or state in self.plan.exits
        except TypeError:
            known = False
        if not known:
            valid = ", ".join(describe(s) for s in self.plan.table) or "none"
            who = f"task {by.name!r} returned" if by is not None else "initial state"
            raise TransitionError(
                f"{who} {describe(state)}, which is neither a registered state nor an exit "
                f"state of workflow {self.plan.name!r} (valid: {valid})",
                state=state,
            )

    def new_token(self) -> str:
        """A name for one attempt's segments (found and discarded by it if it fails)."""
        return f"t{self.run_id}{next(_tokens)}"

    def wait_until(self, wake_at: list[float]) -> None:
        """Sleep until the nearest of ``wake_at`` (or the run's deadline), or a wake-up."""
        if self.deadline is not None:
            wake_at.append(self.deadline)
        timeout = max(0.0, min(wake_at) - time.monotonic()) if wake_at else None
        self.wake.wait(timeout)

    def log_extra(
        self, state: Any = None, task: str | None = None, attempt: int | None = None
    ) -> dict[str, Any]:
        """The tags every cano_mp log record of this run carries."""
        return {
            "run_id": self.run_id,
            "workflow": self.plan.name,
            "state": state,
            "task": task,
            "attempt": attempt,
        }
