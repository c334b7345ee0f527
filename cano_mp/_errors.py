"""The ``CanoError`` tree: every error cano_mp raises on purpose.

::

    CanoError
    ├── ConfigError          invalid configuration, raised when building or validating
    ├── TransitionError      no task for a state, or a task returned an invalid next state
    ├── TaskError            a task failed for good (``__cause__`` is the original exception)
    │   ├── TaskTimeout      an attempt overran ``TaskConfig.timeout``
    │   ├── WorkerCrashed    the worker process running the task died
    │   └── CircuitOpen      a circuit breaker refused the call (it is open)
    ├── JoinError            a split's join strategy could not be satisfied (in ``_join``,
    │                        beside the ``SplitResult`` it carries)
    ├── WorkflowTimeout      ``Workflow(timeout=...)`` expired
    ├── Terminated           the process received SIGTERM during a run (cano_mp's handler)
    └── StoreError
        └── StoreKeyError    also a ``KeyError``
"""

from __future__ import annotations

from ._public import public

__all__ = [
    "CanoError",
    "CircuitOpen",
    "ConfigError",
    "StoreError",
    "StoreKeyError",
    "TaskCancelled",
    "TaskError",
    "TaskTimeout",
    "Terminated",
    "TransitionError",
    "WorkerCrashed",
    "WorkflowTimeout",
]


class CanoError(Exception):
    """Base class of every error raised by cano_mp."""


class ConfigError(CanoError):
    """Invalid configuration: raised when building, registering or validating."""


class TransitionError(CanoError):
    """No task for a state, or a task returned a state that is not valid.

    A programming error: never retried, never wrapped in ``TaskError``.
    """

    def __init__(self, message: str, *, state: object = None) -> None:
        super().__init__(message)
        self.state = state


class TaskError(CanoError):
    """A task failed for good, after its retries.

    Attributes:
        state: the state whose task failed.
        task_name: the task's name.
        attempts: how many attempts were made.
        remote_traceback: the formatted traceback from the process that ran the task
            (``None`` when the failure did not come from task code, e.g. a crash).
        item_index: for a ``BatchTask``, the index of the item that failed (``None``
            otherwise, and when ``load()`` or ``finish()`` failed).

    ``__cause__`` is the original exception (its type is kept across processes).
    """

    item_index: int | None = None

    def __init__(
        self,
        message: str,
        *,
        state: object = None,
        task_name: str = "",
        attempts: int = 0,
        remote_traceback: str | None = None,
    ) -> None:
        super().__init__(message)
        self.state = state
        self.task_name = task_name
        self.attempts = attempts
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_task_error,
            (
                type(self),
                self.args,
                self.state,
                self.task_name,
                self.attempts,
                self.remote_traceback,
                self.__dict__,
                self.__cause__,
            ),
        )


def _rebuild_task_error(
    cls: type[TaskError],
    args: tuple[object, ...],
    state: object,
    task_name: str,
    attempts: int,
    remote_traceback: str | None,
    extra: dict[str, object],
    cause: BaseException | None = None,
) -> TaskError:
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(extra)
    err.state = state
    err.task_name = task_name
    err.attempts = attempts
    err.remote_traceback = remote_traceback
    err.__cause__ = cause
    return err


class TaskTimeout(TaskError):
    """An attempt overran its ``TaskConfig.timeout`` and was stopped."""


class WorkerCrashed(TaskError):
    """The worker process running the task died (segfault, ``os._exit``, SIGKILL, OOM kill).

    ``exitcode`` is the process exit status, a negative signal number when it was killed
    by a signal (as in ``multiprocessing``), or ``None`` when it is unknown.
    """

    def __init__(
        self,
        message: str,
        *,
        exitcode: int | None = None,
        state: object = None,
        task_name: str = "",
        attempts: int = 0,
    ) -> None:
        super().__init__(message, state=state, task_name=task_name, attempts=attempts)
        self.exitcode = exitcode


class CircuitOpen(TaskError):
    """A :class:`CircuitBreaker` refused a call because it is open (or its half-open probes
    are all taken). Raised as is by ``with breaker:``; an attempt refused by
    ``TaskConfig(circuit_breaker=...)`` fails with it at once and the retry policy decides.

    ``breaker`` is the breaker's name; ``retry_after`` the seconds until it lets a probe
    through (0 when half-open).
    """

    breaker: str = ""
    retry_after: float = 0.0


class TaskCancelled(CanoError):
    """An attempt was stopped because it was no longer needed: its join resolved without
    it, its run was cancelled or timed out, or Ctrl-C. Observers see it as the attempt's
    ``error`` in ``on_task_end``; it is never raised by ``orchestrate()``."""


class WorkflowTimeout(CanoError):
    """The workflow's wall-clock ``timeout`` expired; ``.state`` is where it was."""

    def __init__(self, message: str, *, state: object = None) -> None:
        super().__init__(message)
        self.state = state


class Terminated(CanoError):
    """The process received SIGTERM while a run was going, and cano_mp's handler stopped it.

    Installed only where the process still had Python's default SIGTERM disposition (a
    handler of your own is left alone). Like Ctrl-C, it stops the run's work at once; it is
    never retried. Outside a run, the handler releases shared memory and stops the pool, then
    lets SIGTERM end the process as it would have.
    """


class RolledBack(CanoError):
    """A resumed run that had crashed while rolling back: the rest of its rollback ran.

    The run had failed (the message says with what) and its compensations were running when
    its process died; ``resume()`` ran the compensations that had not finished (the one cut
    short runs again: make compensations idempotent) and raises this, with
    ``.compensated`` (all the states rolled back, in rollback order) and
    ``.compensation_errors`` as the original error would have carried them. The run is then
    ``"failed"`` and cannot be resumed again.
    """


class StoreError(CanoError):
    """A store operation failed (a value that cannot be pickled, a closed store...)."""


class StoreKeyError(StoreError, KeyError):
    """A key is not in the store."""

    def __str__(self) -> str:
        # KeyError.__str__ repr()s its argument; keep the message readable.
        return str(self.args[0]) if self.args else ""


public(
    CanoError,
    CircuitOpen,
    ConfigError,
    RolledBack,
    StoreError,
    StoreKeyError,
    TaskCancelled,
    TaskError,
    TaskTimeout,
    Terminated,
    TransitionError,
    WorkerCrashed,
    WorkflowTimeout,
)
