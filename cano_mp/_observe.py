"""Observers: hooks the engine calls, in the driver process, as a run progresses."""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._log import get_logger
from ._public import public

if TYPE_CHECKING:
    from ._join import SplitResult

__all__ = ["AttemptObserver", "Observer", "Observers", "RunInfo", "raised"]

log = get_logger("cano_mp.observe")


@dataclass(frozen=True, slots=True)
class RunInfo:
    """Identifies one run of a workflow.

    Attributes:
        run_id: Unique for each run (a uuid4 hex unless given to ``orchestrate``).
        workflow: The workflow's name.
    """

    run_id: str
    workflow: str

    def _repr_html_(self) -> str:
        return (
            "<table><caption>RunInfo</caption>"
            f"<tr><th>run_id</th><td>{html.escape(self.run_id)}</td></tr>"
            f"<tr><th>workflow</th><td>{html.escape(self.workflow)}</td></tr></table>"
        )


class Observer:
    """Subclass and override the hooks you need; every hook is a no-op by default.

    Hooks run in the driver process, on the thread running the workflow. An observer that
    raises is logged and never breaks the run.
    """

    def on_workflow_start(self, run: RunInfo) -> None:
        """A run starts."""

    def on_state_enter(self, run: RunInfo, state: Any) -> None:
        """The run enters ``state`` (the exit state included)."""

    def on_task_start(self, run: RunInfo, state: Any, task_name: str, attempt: int) -> None:
        """An attempt (1-based) of a task starts."""

    def on_task_end(
        self,
        run: RunInfo,
        state: Any,
        task_name: str,
        attempt: int,
        *,
        error: BaseException | None,
        duration: float,
    ) -> None:
        """An attempt ended; ``error`` is the attempt's own exception, or None."""

    def on_task_timing(
        self,
        run: RunInfo,
        state: Any,
        task_name: str,
        attempt: int,
        *,
        pid: int,
        started: float,
        ended: float,
    ) -> None:
        """Where and when an attempt really ran: the process id and the wall-clock
        (``time.time()``) start and end measured in that process. Called just before
        ``on_task_end`` when the attempt returned (not for crashes or kills), and once per
        chunk of a BatchTask (``task_name`` is then ``"Name[first..last]"``)."""

    def on_retry(
        self,
        run: RunInfo,
        state: Any,
        task_name: str,
        attempt: int,
        delay: float,
        error: BaseException,
    ) -> None:
        """Attempt ``attempt`` failed with ``error``; the next starts after ``delay`` s."""

    def on_circuit_open(self, run: RunInfo, state: Any, task_name: str, breaker: str) -> None:
        """An attempt of ``task_name`` was refused because circuit breaker ``breaker`` is
        open: it fails with ``CircuitOpen`` without being sent."""

    def on_rate_wait(
        self, run: RunInfo, state: Any, task_name: str, limiter: str, delay: float
    ) -> None:
        """An attempt (or a batch chunk) of ``task_name`` waits about ``delay`` seconds in the
        driver for rate limit ``limiter`` before it is sent (once per wait)."""

    def on_split_end(self, run: RunInfo, state: Any, result: SplitResult[Any]) -> None:
        """A split's join resolved (successfully or not)."""

    def on_workflow_end(
        self,
        run: RunInfo,
        *,
        final_state: Any,
        error: BaseException | None,
        duration: float,
    ) -> None:
        """A run ended: ``final_state`` on success, ``error`` on failure."""

    def on_checkpoint(self, run: RunInfo, state: Any, seq: int, bytes_written: int) -> None:
        """A checkpoint of the run (number ``seq``) was committed as it entered ``state``
        (or after a SteppedTask's step); ``bytes_written``: data files written for it (0
        for arrays that did not change)."""

    def on_resume(self, run: RunInfo, state: Any, seq: int) -> None:
        """A run resumes at ``state`` (its recorded name), its store restored from
        checkpoint ``seq``."""


class AttemptObserver(Observer):
    """Base of observers that report each task attempt once, complete, with its best
    timing: the worker's own start and end when the attempt returned (``on_task_timing``),
    the driver's view when it crashed, was killed or cancelled. A BatchTask chunk (timing
    only, no start/end hooks) is an attempt too. Subclasses implement :meth:`on_attempt`;
    one that overrides ``on_task_start``, ``on_task_timing`` or ``on_task_end`` must call
    ``super()``.
    """

    def __init__(self) -> None:
        self._attempt_lock = threading.Lock()
        self._started: dict[tuple[str, str, int], float] = {}
        self._timed: dict[tuple[str, str, int], tuple[int, float, float]] = {}

    def on_attempt(
        self,
        run: RunInfo,
        state: Any,
        task_name: str,
        attempt: int,
        *,
        pid: int | None,
        started: float,
        ended: float,
        error: BaseException | None,
    ) -> None:
        """One attempt, from ``started`` to ``ended`` (``time.time()`` seconds); ``pid`` is
        the process that ran it, ``None`` when only the driver's view is known."""

    def on_task_start(self, run: RunInfo, state: Any, task_name: str, attempt: int) -> None:
        with self._attempt_lock:
            self._started[(run.run_id, task_name, attempt)] = time.time()

    def on_task_timing(
        self,
        run: RunInfo,
        state: Any,
        task_name: str,
        attempt: int,
        *,
        pid: int,
        started: float,
        ended: float,
    ) -> None:
        key = (run.run_id, task_name, attempt)
        with self._attempt_lock:
            known = key in self._started
            if known:
                self._timed[key] = (pid, started, ended)
        if not known:  # a BatchTask chunk: no start/end hooks of its own
            self.on_attempt(
                run, state, task_name, attempt, pid=pid, started=started, ended=ended, error=None
            )

    def on_task_end(
        self,
        run: RunInfo,
        state: Any,
        task_name: str,
        attempt: int,
        *,
        error: BaseException | None,
        duration: float,
    ) -> None:
        key = (run.run_id, task_name, attempt)
        now = time.time()
        with self._attempt_lock:
            started = self._started.pop(key, now - duration)
            timed = self._timed.pop(key, None)
        pid: int | None = None
        if timed is not None:
            pid, started, now = timed
        self.on_attempt(
            run, state, task_name, attempt, pid=pid, started=started, ended=now, error=error
        )


_HOOKS = tuple(
    name for name, value in vars(Observer).items() if name.startswith("on_") and callable(value)
)

Hook = tuple[Callable[..., Any], ...]


class Observers:
    """Calls each observer's hook, logging (never raising) what an observer raises.

    Only hooks an observer's class overrides are called: a no-op hook costs nothing. Each
    hook is also an attribute, the tuple of the observers' bound methods that implement it
    (empty: nobody does), so that a hot path skips the dispatch, arguments and all, with
    ``if observers.on_task_start: observers.emit("on_task_start", ...)``.
    """

    __slots__ = ("_hooks", "_observers", *_HOOKS)

    on_workflow_start: Hook
    on_state_enter: Hook
    on_task_start: Hook
    on_task_end: Hook
    on_task_timing: Hook
    on_retry: Hook
    on_circuit_open: Hook
    on_rate_wait: Hook
    on_split_end: Hook
    on_workflow_end: Hook
    on_checkpoint: Hook
    on_resume: Hook

    def __init__(self, observers: Iterable[Observer]) -> None:
        self._observers = tuple(observers)
        self._hooks: dict[str, Hook] = {}
        for name in _HOOKS:
            base = getattr(Observer, name)
            fns = tuple(
                getattr(o, name)
                for o in self._observers
                if getattr(type(o), name, base) is not base or name in vars(o)
            )
            self._hooks[name] = fns
            setattr(self, name, fns)

    def __bool__(self) -> bool:
        return bool(self._observers)

    def plus(self, observer: Observer) -> Observers:
        """These observers and ``observer`` (once)."""
        if observer in self._observers:
            return self
        return Observers((*self._observers, observer))

    def wants(self, hook: str) -> bool:
        """Whether some observer implements ``hook``."""
        return bool(self._hooks.get(hook))

    def emit(self, hook: str, *args: Any, **kwargs: Any) -> None:
        for fn in self._hooks.get(hook, ()):
            try:
                fn(*args, **kwargs)
            except Exception:
                raised(fn, hook)


def raised(fn: Callable[..., Any], hook: str) -> None:
    """Log that an observer's hook raised (called in its ``except`` block): ignored."""
    log.exception("observer %r raised in %s; ignored", getattr(fn, "__self__", fn), hook)


public(Observer, RunInfo)
