"""PollTask states: one call per poll, the driver asleep in between (no pool slot held).

::

    PollState(poll 1) --"not yet": writes discarded--> sleep interval --> poll 2 ...
        until a poll returns a state (checked and committed like any task's)
        or the whole wait passes its ``timeout``: TaskTimeout (not retried)

Each poll is a :class:`PollState`, a ``TaskState`` of one branch, so quota, rate limits,
breakers, the per-attempt timeout and retries are those of any task (``attempts``). What it
adds is the wait's deadline: a retry that could not start before it, an attempt that runs
past it, or a branch still waiting at it fails the state with the wait's ``TaskTimeout``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .._errors import TaskError, TaskTimeout
from .._poll import PollUnit
from .._stepped import CONTINUE
from .._store import Snapshot
from .gates import record
from .groups import Branch
from .plan import StateEntry, describe
from .scope import RunScope
from .task_state import TaskState

if TYPE_CHECKING:
    from .recovery import Run

__all__ = ["PollState", "run_poll"]


class PollWait:
    """One poll state's wait: its deadline and how many polls it made."""

    def __init__(self, entry: StateEntry, unit: PollUnit) -> None:
        self.entry = entry
        self.unit = unit
        self.started = time.monotonic()
        self.until = None if unit.timeout is None else self.started + unit.timeout
        self.polls = 0

    def expired(self, now: float) -> bool:
        return self.until is not None and now >= self.until

    def error(self, cause: BaseException | None = None) -> TaskTimeout:
        err = TaskTimeout(
            f"poll task {self.unit.name!r} of state {describe(self.entry.state)} timed out: "
            f"no state after {self.polls} poll(s) in its {self.unit.timeout}s timeout",
            state=self.entry.state,
            task_name=self.unit.name,
            attempts=self.polls,
        )
        err.__cause__ = cause
        err._poll_wait = True  # type: ignore[attr-defined]
        return err


class PollState(TaskState):
    """One poll: "not yet" discards its writes and returns ``CONTINUE``."""

    def __init__(self, scope: RunScope, entry: StateEntry, snap: Snapshot, wait: PollWait):
        super().__init__(scope, entry, snap)
        self.wait = wait
        wait.polls += 1

    def attempt_deadline(self, b: Branch, now: float) -> float | None:
        own = super().attempt_deadline(b, now)
        until = self.wait.until
        return until if own is None else own if until is None else min(own, until)

    def wake_times(self, join_deadline: float | None) -> list[float]:
        times = super().wake_times(join_deadline)
        if self.wait.until is not None:
            times.append(self.wait.until)
        return times

    def verdict(self, timed_out: bool) -> str:
        verdict = super().verdict(timed_out)
        b = self.branches[0]
        if verdict == "wait" and self.wait.expired(time.monotonic()):
            b.error = self.wait.error()  # what runs is stopped by the caller (stop())
            return "fail"
        return verdict

    def inline_gates(self, b: Branch) -> TaskError | None:
        refusal = super().inline_gates(b)
        if refusal is None and self.wait.expired(time.monotonic()):
            return self.wait.error()
        return refusal

    def attempt_failed(self, b: Branch, error: BaseException, remote_tb: str | None) -> None:
        now = time.monotonic()
        until = self.wait.until
        if until is not None:
            delay = b.ref.config.retry.delay_for_attempt(b.attempt - 1)
            if now >= until or (delay is not None and now + delay >= until):
                # the wait is over, or a retry could not start before it is: give up now
                record(b.ref.config.circuit_breaker, error)
                self.task_end(b, error)
                b.future = None
                b.status = "failed"
                if isinstance(error, TaskTimeout) and getattr(error, "_poll_wait", False):
                    b.error = error  # already the wait's own timeout
                else:  # an attempt stopped at the wait's end is no cause of its own
                    cut = isinstance(error, TaskTimeout) and now >= until
                    b.error = self.wait.error(None if cut else error)
                self.failed += 1
                return
        super().attempt_failed(b, error, remote_tb)

    def finish(self, verdict: str, timed_out: bool) -> Any:
        b = self.branches[0]
        if verdict != "fail" and b.next_state is CONTINUE:
            self.scope.store._discard(b.token)  # "not yet": its writes are not kept
            return CONTINUE
        return super().finish(verdict, timed_out)


def run_poll(run: Run, entry: StateEntry) -> Any:
    """Poll until the task returns a state (returned) or its wait times out (raised)."""
    scope = run.scope
    unit = entry.units[0].unit
    assert isinstance(unit, PollUnit)
    wait = PollWait(entry, unit)
    inline = entry.units[0].config.inline or not scope.remote
    while True:
        state = PollState(scope, entry, run.snapshot(), wait)
        nxt = state.run_inline() if inline else state.run()
        if nxt is not CONTINUE:
            return nxt
        until = time.monotonic() + unit.interval
        if wait.until is not None:
            until = min(until, wait.until)
        while True:  # asleep between polls: no pool slot held
            now = time.monotonic()
            scope.check_stop(entry.state, now)
            if wait.expired(now):
                raise wait.error()
            if now >= until:
                break
            scope.wake.clear()
            scope.wait_until([until])
