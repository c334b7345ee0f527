"""What a run does beyond walking the machine: SteppedTask states (one call per step,
committed and checkpointed after each) and the rollback of a failed run (compensations of
the states that completed, last first).

::

    stepped state:  StepState(step 1) --commit (writes + cursor)--> checkpoint --> step 2 ...
                    until a step returns a state (checked like any task's transition)
    failure (task, transition, join, workflow timeout):
                    for each completed state, last first: CompensationState --commit-->
                    [checkpoint: the store and the rollback's progress] -->
                    error.compensated / error.compensation_errors
    resume of a run that crashed while rolling back: the compensations not recorded done
                    (the one cut short runs again) --> RolledBack
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from .._errors import CanoError, TaskError, Terminated, TransitionError, WorkflowTimeout
from .._join import JoinError
from .._stepped import CONTINUE
from .._store import Snapshot
from .plan import StateEntry
from .scope import RunScope
from .task_state import TaskState

if TYPE_CHECKING:
    from .._checkpoint.session import Session


class Run(Protocol):
    """What these functions use of a ``run.Run``."""

    scope: RunScope
    checkpoint: Session | None

    def snapshot(self) -> Snapshot: ...


__all__ = [
    "CompensationState",
    "StepState",
    "compensable",
    "compensate",
    "rollback",
    "run_stepped",
]


class StepState(TaskState):
    """One step of a SteppedTask: its writes and cursor commit when it goes on."""

    def finish(self, verdict: str, timed_out: bool) -> Any:
        b = self.branches[0]
        if verdict != "fail" and b.next_state is CONTINUE:
            self.scope.store._commit(b.log)
            return CONTINUE
        return super().finish(verdict, timed_out)


class CompensationState(TaskState):
    """A compensation: its writes commit when it succeeds; it returns nothing."""

    def finish(self, verdict: str, timed_out: bool) -> Any:
        b = self.branches[0]
        if verdict == "fail":
            assert b.error is not None
            raise b.error
        self.scope.store._commit(b.log)
        return None


def _drive(run: Run, state: TaskState) -> Any:
    entry, scope = state.entry, run.scope
    if entry.units[0].config.inline or not scope.remote:
        return state.run_inline()
    return state.run()


def run_stepped(run: Run, entry: StateEntry) -> Any:
    """Run a SteppedTask's state one step at a time; return the state it ends in."""
    scope, ckpt = run.scope, run.checkpoint
    while True:
        snap = run.snapshot()
        nxt = _drive(run, StepState(scope, entry, snap))
        if nxt is not CONTINUE:
            return nxt
        if ckpt is not None:
            ckpt.enter(scope.store, entry.state)


def compensable(error: BaseException) -> bool:
    """Failures that roll a run back; Ctrl-C, SIGTERM, cancellation and crashes leave it
    resumable instead."""
    if isinstance(error, Terminated):
        return False
    return isinstance(error, TaskError | TransitionError | JoinError | WorkflowTimeout)


def rollback(run: Run, completed: list[Any]) -> tuple[list[Any], list[tuple[Any, BaseException]]]:
    """Run the compensations of ``completed`` states, last first, each on the store as
    last committed; return ``(states compensated, (state, error) of those that failed)``."""
    todo = [s for s in reversed(completed) if s in run.scope.plan.compensations]
    return compensate(run, todo, [], [])


def compensate(
    run: Run, todo: list[Any], done: list[Any], errors: list[tuple[Any, BaseException]]
) -> tuple[list[Any], list[tuple[Any, BaseException]]]:
    """Run the compensations of the states ``todo``, in order, after those already
    ``done`` (or failed: ``errors``); with a checkpoint, the progress is recorded before
    the first and after each (a crash resumes the rollback there)."""
    scope, ckpt = run.scope, run.checkpoint
    scope.deadline = None  # the workflow's budget may be what failed: undo anyway
    todo = list(todo)
    if ckpt is not None:
        ckpt.rolling_back(scope.store, todo, done, errors)
    while todo:
        state = todo[0]
        ref = scope.plan.compensations.get(state)  # a resumed rollback's workflow may lack it
        if ref is None:
            del todo[0]
            continue
        snap = run.snapshot()
        entry = StateEntry(state, [ref], None)
        try:
            _drive(run, CompensationState(scope, entry, snap))
        except CanoError as exc:
            if isinstance(exc, Terminated):
                raise
            errors.append((state, exc))
        else:
            done.append(state)
        del todo[0]
        if ckpt is not None:
            ckpt.rolling_back(scope.store, todo, done, errors)
    return done, errors
