"""TaskState: one state's branches — one for a plain task, several for a split — driven
through their attempts until the state's outcome is decided.

::

    waiting --quota + bulkhead--> running --ok------------------------> ok
                                     |  \\--error / timeout / crash--> retry --delay--> waiting
                                     |                           \\--retries spent--> failed
                                     \\--the join no longer needs it / timeout / Ctrl-C--> cancelled

Each pass of :meth:`TaskState.run` collects finished calls, expires overdue ones, asks the
join (``_join.decide``, pure) for a verdict, starts what may start, then sleeps on the run's
event until a call finishes or the nearest deadline. :meth:`TaskState.run_inline` is the
fast path of a plain task in the driver: no future, no wake-ups.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

from .._calls import run_unit_call
from .._errors import TaskCancelled, TaskError
from .._executors import InlineExecutor
from .._join import JoinError, SplitResult, decide
from .._log import get_logger
from .._observe import raised
from .._store import Snapshot
from .._wire import Call, UnitOutcome, WorkerDied, decode_error
from .attempts import Failed, check_transition, crash_error, retry_or_fail, submit
from .attempts import timeout_error as make_timeout_error
from .gates import admitted, rate_wait, record, release
from .groups import QUICK_BRANCH, Branch, Finished, Grouped, joins_all
from .plan import StateEntry, describe
from .scope import RunScope

__all__ = ["TaskState"]

log = get_logger("cano_mp.engine")

_INLINE = InlineExecutor()


class TaskState(Grouped):
    """Drives the branches of one state. Kept incrementally by where each branch is, so that
    a wide split costs O(1) per completion, not O(branches)."""

    def __init__(self, scope: RunScope, entry: StateEntry, snap: Snapshot) -> None:
        self.scope = scope
        self.entry = entry
        self.state = entry.state
        self.snap = snap
        self.branches = [Branch(i, ref) for i, ref in enumerate(entry.units)]
        self.waiting: deque[Branch] = deque(self.branches)
        self.retrying: list[Branch] = []
        self.running: set[Branch] = set()
        self.done: deque[Finished] = deque()
        self.ok = 0
        self.failed = 0
        self.rate_at: float | None = None  # when the first waiting branch may take a token
        self.quick = self.slow = 0  # finished branches under QUICK_BRANCH, and the others
        # A plain task on an executor that can: its thread reads the worker's reply itself.
        self.direct = entry.join is None and scope.wait_direct is not None
        # A split's quick branches may share calls (see .groups).
        join = entry.join
        self.grouping = bool(
            join and joins_all(join) and scope.caps.group_calls and scope.caps.reports_progress
        )

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> Any:
        """Drive the branches to a verdict; return the next state (or raise)."""
        scope, join = self.scope, self.entry.join
        join_deadline = None
        if join is not None and join.timeout is not None:
            join_deadline = time.monotonic() + join.timeout
        # Calls beyond what the pool can run only wait in its queue, where they cannot be
        # cancelled cheaply and where their timeouts would already be ticking.
        limit = float(scope.executor.max_workers * scope.caps.in_flight_per_worker)
        if join is not None and join.max_parallel:
            limit = min(limit, join.max_parallel)
        try:
            while True:
                scope.wake.clear()
                self.collect()
                now = time.monotonic()
                self.expire(now)
                timed_out = join_deadline is not None and now >= join_deadline
                verdict = self.verdict(timed_out)
                if verdict != "wait":
                    break
                scope.check_stop(self.state, now)
                self.start(limit, now)
                if not self.done and not self.wait_direct():
                    scope.wait_until(self.wake_times(join_deadline))
        except BaseException as exc:
            self.stop(scope.stop_grace(exc))
            raise
        self.stop(scope.cancel_grace)
        return self.finish(verdict, timed_out)

    def wait_direct(self) -> bool:
        """Wait for the one running call in this thread (see ``Call.direct``): until it
        ends, its timeout or the run's, or a cancel. False: not such a state now. A direct
        call this thread cannot wait for (no fd for the wake pipe: EMFILE) is handed back
        to the executor, whose own thread then reads its reply."""
        scope, waiter = self.scope, self.scope.wait_direct
        if not self.direct or waiter is None or len(self.running) != 1:
            return False
        (b,) = self.running
        if b.future is None or b.executor is not scope.executor:
            return False
        fd = scope.wake_fd()
        if fd is None or scope.cancelled:
            waiter(b.future, 0.0, None)  # hand it back; a cancel raises in the loop
            return False
        until = [t for t in (b.deadline, scope.deadline) if t is not None]
        timeout = max(0.0, min(until) - time.monotonic()) if until else None
        return waiter(b.future, timeout, fd)

    def wake_times(self, join_deadline: float | None) -> list[float]:
        wake_at = [join_deadline] if join_deadline is not None else []
        wake_at.extend(b.deadline for b in self.running if b.deadline is not None)
        wake_at.extend(b.retry_at for b in self.retrying)
        if self.rate_at is not None:
            wake_at.append(self.rate_at)
        return wake_at

    def verdict(self, timed_out: bool) -> str:
        pending = len(self.branches) - self.ok - self.failed
        if self.entry.join is None:
            return "proceed" if self.ok else "fail" if self.failed else "wait"
        return decide(self.entry.join.strategy, self.ok, self.failed, pending, timed_out)

    # -- starting ----------------------------------------------------------------------------
    def start(self, limit: float, now: float) -> None:
        """Move due retries back to waiting; submit waiting branches while there is room."""
        if self.retrying:
            for b in [b for b in self.retrying if now >= b.retry_at]:
                self.retrying.remove(b)
                b.status = "waiting"
                self.waiting.appendleft(b)
        quota, self.rate_at = self.scope.quota, None
        size = self.group_size(limit) if quota is None else 1
        group: list[Branch] = []
        try:
            self._start(limit, now, size, group)
        except BaseException:
            self.waiting.extendleft(reversed(group))  # taken, never sent
            raise
        if len(group) > 1:
            self.submit_group(group)
        elif group:
            self.submit(group[0], False, False)

    def _start(self, limit: float, now: float, size: int, group: list[Branch]) -> None:
        quota = self.scope.quota
        while self.waiting:
            b = self.waiting[0]
            grouped = size > 1 and self.groupable(b)
            if len(self.running) + len(group) >= (limit * size if grouped else limit):
                break
            inline = b.ref.config.inline or not self.scope.remote
            holds_quota = quota is not None and not inline
            if quota is not None and holds_quota and not quota.try_acquire(self.scope.wake):
                break
            subject = b.subject(self.state)
            wait = rate_wait(self.scope, subject, 1, b.rate_told)
            if wait > 0.0:  # in order: the branches behind it wait too
                if quota is not None and holds_quota:
                    quota.release()
                b.rate_told, self.rate_at = True, now + wait
                break
            b.rate_told = False
            self.waiting.popleft()
            refusal = admitted(self.scope, subject)
            if refusal is not None:
                if quota is not None and holds_quota:
                    quota.release()
                self.refuse(b, refusal)
                continue
            if not grouped:
                self.submit(b, inline, holds_quota)
                continue
            group.append(b)
            if len(group) == size:
                full = group[:]
                group.clear()  # submit_group puts them back itself if it fails
                self.submit_group(full)

    def refuse(self, b: Branch, refusal: TaskError) -> None:
        """An attempt its circuit breaker refused: it fails now, without being sent."""
        b.attempt += 1
        b.status = "running"
        b.started = time.monotonic()
        b.future = None
        self._attempt_starts(b)
        self.attempt_failed(b, refusal, None)
        self.scope.wake.set()  # a verdict may be due: the run loop must look again

    def submit(self, b: Branch, inline: bool, holds_quota: bool) -> None:
        scope = self.scope
        b.attempt += 1
        b.status = "running"
        b.token = scope.new_token()
        b.started = time.monotonic()
        b.deadline = self.attempt_deadline(b, b.started)
        executor = _INLINE if inline else scope.executor
        b.executor = executor
        call = Call(
            run_unit_call,
            (scope.units, self.snap.blob),
            (b.ref.index, b.attempt, scope.run_id, b.token, not inline and scope.remote),
            b.deadline,
            ahead=self.quick > 4 * self.slow and not self.direct,  # a queued call is no
            direct=self.direct and not inline,  # thread's to read: never both
        )
        self._attempt_starts(b)
        self.running.add(b)
        done, wake = self.done, scope.wake

        def finished(f: Future[Any]) -> None:
            done.append((b, f))
            wake.set()

        try:
            b.future = submit(
                scope,
                executor,
                call,
                b.subject(self.state),
                holds_quota=holds_quota,
                on_done=finished,
            )
        except BaseException:
            self.running.discard(b)
            b.status = "waiting"
            b.attempt -= 1
            self.waiting.appendleft(b)
            raise

    def attempt_deadline(self, b: Branch, now: float) -> float | None:
        """When an attempt starting at ``now`` is overdue (its config's timeout)."""
        timeout = b.ref.config.timeout
        return now + timeout if timeout is not None else None

    def _attempt_starts(self, b: Branch) -> None:
        scope = self.scope
        if b.announced == b.attempt:
            return  # run again uncharged (see Grouped.again): observers know it started
        b.announced = b.attempt
        if scope.observers.on_task_start:
            scope.observers.emit("on_task_start", scope.info, self.state, b.ref.name, b.attempt)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s run %s: %s attempt %d of %s starts",
                scope.plan.name,
                scope.run_id,
                b.ref.name,
                b.attempt,
                describe(self.state),
                extra=scope.log_extra(self.state, b.ref.name, b.attempt),
            )

    # -- finishing calls ---------------------------------------------------------------------
    def collect(self) -> None:
        """Take the outcomes of the calls that finished since the last pass."""
        while self.done:
            b, fut = self.done.popleft()
            if isinstance(b, tuple):
                self.collect_group(b, fut)
                continue
            if b.future is not fut or b.status != "running":
                continue  # a call that was cancelled or timed out has stopped
            self.running.discard(b)
            try:
                out = fut.result()
            except WorkerDied as died:
                self.discard(b)  # the dead attempt may have written segments
                self.attempt_failed(b, crash_error(b.subject(self.state), b.attempt, died), None)
                continue
            except Exception as exc:
                self.discard(b)
                self.attempt_failed(b, exc, None)
                continue
            self.outcome(b, UnitOutcome.from_wire(out), overdue=b.executor is _INLINE)

    def outcome(self, b: Branch, out: UnitOutcome, overdue: bool) -> None:
        """One attempt's outcome; ``overdue``: check the deadline (inline calls cannot be
        stopped, so they are judged when they return)."""
        if out.timing.ended - out.timing.started < QUICK_BRANCH:
            self.quick += 1
        else:
            self.slow += 1
        if self.scope.observers.on_task_timing:
            self.scope.observers.emit(
                "on_task_timing",
                self.scope.info,
                self.state,
                b.ref.name,
                b.attempt,
                pid=out.timing.pid,
                started=out.timing.started,
                ended=out.timing.ended,
            )
        failure = out.failure
        if failure is not None:
            self.attempt_failed(b, decode_error(failure), failure.traceback)
        elif overdue and b.deadline is not None and time.monotonic() > b.deadline:
            self.scope.store._discard(b.token)
            self.attempt_failed(b, make_timeout_error(b.subject(self.state), b.attempt), None)
        else:
            b.next_state = b.ref.spec.decode_state(out.state)
            b.log = out.log
            b.status = "ok"
            self.ok += 1
            record(b.ref.config.circuit_breaker, None)
            self.task_end(b, None)

    def expire(self, now: float) -> None:
        """Stop the attempts that overran their timeout (each counts as a failed attempt)."""
        for b in [b for b in self.running if b.deadline is not None and now >= b.deadline]:
            assert b.future is not None and b.executor is not None
            if b.future.done():
                continue  # collected on the next pass
            self.running.discard(b)
            self.slow += 1  # a branch that overran its timeout is no quick one
            b.executor.cancel(b.future, self.scope.cancel_grace)
            self.discard(b)
            self.attempt_failed(b, make_timeout_error(b.subject(self.state), b.attempt), None)

    def attempt_failed(self, b: Branch, error: BaseException, remote_tb: str | None) -> None:
        record(b.ref.config.circuit_breaker, error)
        self.task_end(b, error)
        decision = retry_or_fail(self.scope, b.subject(self.state), b.attempt, error, remote_tb)
        b.future = None
        if isinstance(decision, Failed):
            b.status = "failed"
            b.error = decision.error
            self.failed += 1
        else:
            b.status = "retry"
            b.retry_at = decision.at
            self.retrying.append(b)

    def stop(self, grace: float) -> None:
        """Cancel what still runs (its writes discarded) and what has not started."""
        for b in self.running:
            assert b.future is not None and b.executor is not None
            b.executor.cancel(b.future, grace)
            self.discard(b)
            release(b.ref.config.circuit_breaker)
            b.status = "cancelled"
            if self.scope.observers:
                why = f"attempt {b.attempt} of task {b.ref.name!r} was cancelled"
                self.task_end(b, TaskCancelled(why))
        for b in [*self.waiting, *self.retrying]:
            b.status = "cancelled"
        self.running.clear()
        self.waiting.clear()
        self.retrying.clear()

    def discard(self, b: Branch) -> None:
        """Free the segments the attempt wrote, once its call has really stopped."""
        token, store = b.token, self.scope.store
        if b.future is not None:
            b.future.add_done_callback(lambda _f: store._discard(token))

    def task_end(self, b: Branch, error: BaseException | None) -> None:
        hooks = self.scope.observers.on_task_end
        if not hooks:
            return
        info, duration = self.scope.info, time.monotonic() - b.started
        for fn in hooks:  # Observers.emit, inlined: once per attempt
            try:
                fn(info, self.state, b.ref.name, b.attempt, error=error, duration=duration)
            except Exception:
                raised(fn, "on_task_end")

    # -- the state's outcome -----------------------------------------------------------------
    def finish(self, verdict: str, timed_out: bool) -> Any:
        """Commit what the verdict keeps and return the next state, or raise."""
        if self.entry.join is None:
            b = self.branches[0]
            if verdict == "fail":
                assert b.error is not None
                raise b.error
            check_transition(self.scope, b.ref, b.next_state)
            self.scope.store._commit(b.log)
            return b.next_state
        return self.finish_split(verdict, timed_out)

    def finish_split(self, verdict: str, timed_out: bool) -> Any:
        scope, join = self.scope, self.entry.join
        assert join is not None
        result: SplitResult[Any] = SplitResult(total=len(self.branches))
        for b in self.branches:
            if b.status == "ok":
                result.successes.append((b.index, b.next_state))
            elif b.status == "failed":
                assert b.error is not None
                result.errors.append((b.index, b.error))
            else:
                result.cancelled.append(b.index)
        if scope.observers:
            scope.observers.emit("on_split_end", scope.info, self.state, result)
        if verdict == "fail":
            raise JoinError(
                f"split in state {describe(self.state)} failed its "
                f"{join.strategy!r} join: {result!r}"
                + (f" at its {join.timeout}s timeout" if timed_out else ""),
                result=result,
                timed_out=timed_out,
            )
        for b in self.branches:
            if b.status == "ok":
                scope.store._commit(b.log)
        if join.result_key is not None:
            scope.store.put(join.result_key, result)
        return join.join_state

    # -- the fast path -----------------------------------------------------------------------
    def run_inline(self) -> Any:
        """A plain task in the driver: no future, no pool, no wake-ups."""
        scope, b = self.scope, self.branches[0]
        self.waiting.clear()
        while True:
            now = time.monotonic()
            scope.check_stop(self.state, now)
            refusal = self.inline_gates(b)
            if refusal is None:
                self.inline_attempt(b)
            else:
                self.refuse(b, refusal)
            if b.status == "ok":
                return self.finish("proceed", False)
            if b.status == "failed":
                return self.finish("fail", False)
            self.retrying.clear()
            until = b.retry_at if scope.deadline is None else min(b.retry_at, scope.deadline)
            scope.wake.clear()
            while not scope.cancelled and time.monotonic() < until:
                scope.wake.wait(until - time.monotonic())

    def inline_gates(self, b: Branch) -> TaskError | None:
        """Wait for the rate limit (sleeping on the run's event), then ask the breaker."""
        scope, subject = self.scope, b.subject(self.state)
        told = False
        while (wait := rate_wait(scope, subject, 1, told)) > 0.0:
            told = True
            scope.wake.clear()
            scope.wait_until([time.monotonic() + wait])
            scope.check_stop(self.state, time.monotonic())
        return admitted(scope, subject)

    def inline_attempt(self, b: Branch) -> None:
        """One attempt of a plain task in the driver."""
        scope = self.scope
        now = time.monotonic()
        b.attempt += 1
        b.status = "running"
        b.started = now
        b.deadline = self.attempt_deadline(b, now)
        b.token = scope.new_token()
        if scope.observers.on_task_start:
            scope.observers.emit("on_task_start", scope.info, self.state, b.ref.name, b.attempt)
        out = run_unit_call(
            scope.is_cancelled,
            b.deadline,
            (b.ref.spec,),
            self.snap.data(),
            0,
            b.attempt,
            scope.run_id,
            b.token,
            False,
        )
        self.outcome(b, UnitOutcome.from_wire(out), overdue=True)
