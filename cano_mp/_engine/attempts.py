"""The life of one attempt, written once for plain tasks, split branches and batch items.

::

    submit(call) --quota slot, done -> wake the run--> executor
        |                                                 |
        |   outcome ok ---------------------------------- +--> check_transition --> commit
        |   TaskFailure / WorkerDied / overran its timeout
        v
    crash_error / timeout_error / the task's own exception
        --> retry_or_fail --> Retry(at, delay)   (on_retry, one WARNING line)
                          \\-> Failed(TaskError)  (the task's exception as __cause__)

Decisions are functions of their arguments (and the clock for ``Retry.at``); the states'
drivers (``task_state``, ``batch_state``) only act on them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, NamedTuple

from .._errors import (
    CanoError,
    ConfigError,
    TaskError,
    TaskTimeout,
    Terminated,
    TransitionError,
    WorkerCrashed,
)
from .._executors import Executor
from .._log import get_logger
from .._retry import TaskConfig
from .._wire import Call, WorkerDied
from .plan import UnitRef, describe
from .scope import RunScope

__all__ = [
    "Failed",
    "Retry",
    "Subject",
    "check_transition",
    "crash_error",
    "retry_or_fail",
    "submit",
    "timeout_error",
]

log = get_logger("cano_mp.engine")


class Subject(NamedTuple):
    """Whose attempt it is: a task of a state, or one item of a batch task."""

    state: Any
    task: str
    config: TaskConfig
    item: int | None = None

    def where(self) -> str:
        if self.item is None:
            return f"task {self.task!r} of state {describe(self.state)}"
        return f"item {self.item} of batch task {self.task!r} of state {describe(self.state)}"

    def label(self) -> str:
        """How observers name it (``task[item]`` for a batch item)."""
        return self.task if self.item is None else f"{self.task}[{self.item}]"


@dataclass(frozen=True, slots=True)
class Retry:
    """Try again at ``at`` (``time.monotonic()``), ``delay`` seconds after the failure."""

    at: float
    delay: float


@dataclass(frozen=True, slots=True)
class Failed:
    """No attempts left: ``error`` is what the state fails with (a ``TaskError``), ``cause``
    the last attempt's own exception."""

    error: TaskError
    cause: BaseException


def submit(
    scope: RunScope,
    executor: Executor,
    call: Call,
    subject: Subject,
    *,
    holds_quota: bool,
    on_done: Callable[[Future[Any]], None],
    hint: str = "register it with inline=True to run it in the driver",
) -> Future[Any]:
    """Start ``call``; its future releases the quota slot the caller took (if any) and calls
    ``on_done`` when it resolves. A call that cannot be sent is a ``ConfigError``."""
    try:
        fut = executor.submit(call)
    except BaseException as exc:
        if holds_quota and scope.quota is not None:
            scope.quota.release()
        if isinstance(exc, Exception) and not isinstance(exc, CanoError):
            raise ConfigError(
                f"{subject.where()} cannot be sent to a worker process: "
                f"{type(exc).__name__}: {exc}. Make it picklable, or {hint}"
            ) from exc
        raise
    if holds_quota and scope.quota is not None:
        quota = scope.quota
        fut.add_done_callback(lambda _f: quota.release())
    fut.add_done_callback(on_done)
    return fut


def crash_error(subject: Subject, attempt: int, died: WorkerDied) -> WorkerCrashed:
    code = died.exitcode
    how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    verb = "running" if subject.item is None else "processing"
    return WorkerCrashed(
        f"the worker process (pid {died.pid}) {verb} {subject.where()} died ({how})",
        exitcode=code,
        state=subject.state,
        task_name=subject.task,
        attempts=attempt,
    )


def timeout_error(subject: Subject, attempt: int) -> TaskTimeout:
    return TaskTimeout(
        f"{subject.where()} timed out: attempt {attempt} ran past its "
        f"{subject.config.timeout}s timeout and was stopped",
        state=subject.state,
        task_name=subject.task,
        attempts=attempt,
    )


def retry_or_fail(
    scope: RunScope,
    subject: Subject,
    attempt: int,
    error: BaseException,
    remote_tb: str | None,
    *,
    level: int = logging.WARNING,
) -> Retry | Failed:
    """After attempt ``attempt`` failed with ``error``: retry (observers told, one log
    line at ``level``) or fail for good. Programming errors and SIGTERM are raised."""
    if isinstance(error, (TransitionError, Terminated)):
        raise error
    delay = subject.config.retry.delay_for_attempt(attempt - 1)
    if delay is None:
        return Failed(_final_error(subject, attempt, error, remote_tb), error)
    if scope.observers:
        scope.observers.emit(
            "on_retry", scope.info, subject.state, subject.label(), attempt, delay, error
        )
    if log.isEnabledFor(level):
        log.log(
            level,
            "%s run %s: %s failed (attempt %d: %s: %s); retrying in %.3fs",
            scope.plan.name,
            scope.run_id,
            subject.where(),
            attempt,
            type(error).__name__,
            error,
            delay,
            extra=scope.log_extra(subject.state, subject.task, attempt),
        )
    return Retry(time.monotonic() + delay, delay)


def _final_error(
    subject: Subject, attempt: int, error: BaseException, remote_tb: str | None
) -> TaskError:
    if isinstance(error, TaskError):  # a timeout or a crash: already says what happened
        error.attempts = attempt
        if subject.item is not None:
            error.item_index = subject.item
        return error
    if subject.item is None:
        what = f"{subject.where()} failed"
    else:
        what = (
            f"batch task {subject.task!r} of state {describe(subject.state)} failed at item "
            f"{subject.item}"
        )
    final = TaskError(
        f"{what} after {attempt} attempt(s): {type(error).__name__}: {error}",
        state=subject.state,
        task_name=subject.task,
        attempts=attempt,
        remote_traceback=remote_tb,
    )
    final.item_index = subject.item
    final.__cause__ = error
    return final


def check_transition(scope: RunScope, ref: UnitRef, nxt: Any, kind: str = "task") -> None:
    """A returned state must be known, and declared when the task declares its states."""
    scope.check_known(nxt, ref)
    if ref.declared is not None and nxt not in ref.declared:
        raise TransitionError(
            f"{kind} {ref.name!r} returned {describe(nxt)}, which it does not declare "
            f"(next states: {', '.join(describe(s) for s in ref.declared)})",
            state=nxt,
        )
