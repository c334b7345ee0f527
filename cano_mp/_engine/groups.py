"""A state's branches, and grouped calls: several quick split branches in one pool call.

A split of many small branches pays a pool round trip per branch: a message each way, a
future, a wake-up of the run thread. Once a split's branches prove quick (more than 4 in 5
of at least :data:`GROUP_AFTER` finished ones under :data:`QUICK_BRANCH` in their worker),
:meth:`Grouped.submit_group` sends up to :data:`GROUP_MAX` of them in one call
(``_calls.run_unit_group``), as ``multiprocessing.Pool.map`` sends chunks. Each branch keeps
its own attempt, store writes, outcome, retries and observers' events; the group only
shares the trip.

What a group may hold, and what it costs when a call fails:

- only branches without a timeout, circuit breaker or rate limit of their own, with no
  quota held, on an executor that reports which item of a call runs (the local pool): a
  timeout would tick while a branch waits behind the others, a breaker or a limiter would
  admit 16 attempts at once ahead of their run, and the crash blame below needs the
  position;
- a worker that dies in a group fails the branch it was running (the call's progress
  position says which), like a crash of that branch alone. The branches that had finished
  keep their outcomes (the worker keeps each in the slot's flags file as it finishes, see
  ``_worker.flags``); those not yet begun run again, not charged;
- a branch that leaves its worker unusable (closes fd 1, changes a resource limit: the
  worker's health check) ends the call there; the branches after it run again, not
  charged, on a new worker;
- a group whose call fails as a whole (a reply that does not pickle, a worker error) is run
  again, not charged, one branch per call, and the state groups no more branches: the
  single calls then give each branch its own error.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .._calls import run_unit_group
from .._errors import TaskError
from .._executors import Executor
from .._join import JoinConfig
from .._wire import Call, UnitOutcome, WorkerDied
from .attempts import Subject, crash_error, submit
from .plan import StateEntry, UnitRef
from .scope import RunScope

__all__ = ["GROUP_AFTER", "GROUP_MAX", "QUICK_BRANCH", "Branch", "Grouped", "joins_all"]

# A split's branch calls may be queued in a busy worker's pipe (Call.ahead: pre-feed) while
# more than 4 in 5 of its finished branches took less than this in their worker: a queued
# call waits for the one before it, so only quick branches are worth it (the odd slow one,
# a worker descheduled on a busy machine, does not turn it off). Grouping asks the same.
QUICK_BRANCH = 0.01

# Branches of one grouped call, at most; and the quick branches that must have finished
# before the first group (they are the evidence that the rest are quick too).
GROUP_MAX = 16
GROUP_AFTER = 16


@dataclass(eq=False)
class Branch:
    index: int
    ref: UnitRef
    status: str = "waiting"  # waiting | running | retry | ok | failed | cancelled
    attempt: int = 0
    future: Future[Any] | None = None
    executor: Executor | None = None
    token: str = ""
    deadline: float | None = None
    started: float = 0.0
    retry_at: float = 0.0
    next_state: Any = None
    log: list[Any] = field(default_factory=list)
    error: TaskError | None = None
    rate_told: bool = False  # observers know it waits for its rate limit
    announced: int = 0  # the attempt whose start observers were told of

    def subject(self, state: Any) -> Subject:
        return Subject(state, self.ref.name, self.ref.config)


# What finished: one branch's call, or a group's (its branches, in call order).
Finished = tuple["Branch | tuple[Branch, ...]", Future[Any]]


def joins_all(join: JoinConfig[Any]) -> bool:
    """Whether a split's branches may be grouped under ``join``: its verdict waits for every
    branch (``all``, ``quorum``, ``percentage``: a grouped outcome reported a few ms late
    changes nothing), with no join timeout (an outcome held in a running call would count
    as not finished) and no ``max_parallel`` (it counts branches, not calls)."""
    return (
        join.strategy.kind in ("all", "quorum", "percentage")
        and join.timeout is None
        and not join.max_parallel
    )


class Grouped:
    """The grouped calls of :class:`~.task_state.TaskState` (its base class)."""

    scope: RunScope
    entry: StateEntry
    state: Any
    snap: Any
    waiting: deque[Branch]
    running: set[Branch]
    done: deque[Finished]
    quick: int
    slow: int
    grouping: bool  # this state may group branches (a split on an executor that can)

    def _attempt_starts(self, b: Branch) -> None:
        raise NotImplementedError

    def discard(self, b: Branch) -> None:
        raise NotImplementedError

    def attempt_failed(self, b: Branch, error: BaseException, remote_tb: str | None) -> None:
        raise NotImplementedError

    def outcome(self, b: Branch, out: UnitOutcome, overdue: bool) -> None:
        raise NotImplementedError

    def group_size(self, limit: float) -> int:
        """How many waiting branches the next call may take (1: no group now). Enough
        calls stay for every in-flight place twice over, so the last ones balance."""
        if not self.grouping or self.quick < GROUP_AFTER or self.quick <= 4 * self.slow:
            return 1
        return max(1, min(GROUP_MAX, len(self.waiting) // max(1, int(2 * limit))))

    def groupable(self, b: Branch) -> bool:
        # A breaker or a rate limit guards a service: its attempts are admitted (or paced)
        # one call at a time, not 16 at once ahead of their run.
        config = b.ref.config
        return (
            config.timeout is None
            and not config.inline
            and config.circuit_breaker is None
            and config.rate_limit is None
        )

    def submit_group(self, group: list[Branch]) -> None:
        """Start one attempt of each branch of ``group`` in one call."""
        scope, now = self.scope, time.monotonic()
        calls = []
        for b in group:
            b.attempt += 1
            b.status = "running"
            b.token = scope.new_token()
            b.started, b.deadline, b.executor = now, None, scope.executor
            calls.append((b.ref.index, b.attempt, scope.run_id, b.token, True))
            self._attempt_starts(b)
            self.running.add(b)
        call = Call(run_unit_group, (scope.units, self.snap.blob), (tuple(calls),), ahead=True)
        members, done, wake = tuple(group), self.done, scope.wake

        def finished(f: Future[Any]) -> None:
            done.append((members, f))
            wake.set()

        fut: Future[Any] | None = None
        try:
            fut = submit(
                scope,
                scope.executor,
                call,
                group[0].subject(self.state),
                holds_quota=False,
                on_done=finished,
            )
        finally:
            if fut is None:  # never sent
                for b in reversed(group):
                    self.running.discard(b)
                    self.again(b)
            else:  # sent (even if Ctrl-C came right after): stop() must cancel it
                for b in group:
                    b.future = fut

    def again(self, b: Branch) -> None:
        """Put ``b`` back at the front of the queue, its attempt not charged (observers
        were told it started: they are not told again, see ``TaskState._attempt_starts``)."""
        b.attempt -= 1
        b.status = "waiting"
        b.future = None
        self.waiting.appendleft(b)

    def collect_group(self, members: tuple[Branch, ...], fut: Future[Any]) -> None:
        live = [b for b in members if b.future is fut and b.status == "running"]
        if not live:
            return  # cancelled (the run stopped them)
        for b in live:
            self.running.discard(b)
        try:
            _, outcomes = fut.result()
        except WorkerDied as died:
            # The branch at the call's position crashed, unless its outcome was kept: then
            # the worker died between two branches, and none is charged (the rest run again;
            # nothing deterministic runs there, so this cannot repeat for ever).
            k = died.position if died.position is not None else 0
            k = k if 0 <= k < len(members) else 0
            culprit = members[k] if len(died.finished) <= k else None
            kept = dict(zip(members, died.finished, strict=False))  # finished before it
            for b in reversed(live):
                if b in kept and b is not culprit:
                    continue
                self.discard(b)
                if b is not culprit:
                    self.again(b)
            for b in live:
                if b in kept and b is not culprit:
                    self.outcome(b, UnitOutcome.from_wire(kept[b]), overdue=False)
            if culprit is not None and culprit in live:
                error = crash_error(culprit.subject(self.state), culprit.attempt, died)
                self.attempt_failed(culprit, error, None)
            return
        except Exception:
            self.grouping = False  # each branch on its own call tells its own error
            for b in reversed(live):
                self.discard(b)
                self.again(b)
            return
        for b in reversed(members[len(outcomes) :]):  # not begun: its worker was unusable
            if b in live:
                self.again(b)
        for b, wire in zip(members, outcomes, strict=False):
            if b in live:
                self.outcome(b, UnitOutcome.from_wire(wire), overdue=False)
