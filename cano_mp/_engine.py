"""The FSM driver: one run of a workflow, from its initial state to an exit state.

For each state the engine takes a snapshot of the store, then drives the state's
*branches* (one for a plain task, several for a split) through their attempts::

    waiting --quota + bulkhead--> running --ok------------------------> ok
                                     |  \\--error / timeout / crash--> retry --delay--> waiting
                                     |                           \\--retries spent--> failed
                                     \\--the join no longer needs it / timeout / Ctrl-C--> cancelled

A running branch is a call on the executor (see ``_executor``): ``(unit blob, snapshot
blob, attempt, deadline, run id, token)``. Its future's done-callback wakes this loop,
which otherwise sleeps until the nearest deadline (attempt timeout, retry time, join
timeout, workflow timeout). Nothing waits without a deadline on a future.

Writes: a successful attempt returns a write log; a plain task's log is committed when the
task succeeds and its next state is valid; a split's successful logs are committed in
branch-index order once the join proceeds. Everything else is discarded, with the segments
the attempt created (found by its token once the call has really stopped).
"""

from __future__ import annotations

import enum
import functools
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from . import _signals
from ._errors import (
    CanoError,
    ConfigError,
    JoinError,
    TaskCancelled,
    TaskError,
    TaskTimeout,
    Terminated,
    TransitionError,
    WorkerCrashed,
    WorkflowTimeout,
)
from ._executor import Blob, Call, Executor, InlineExecutor, WorkerDied
from ._join import JoinConfig, SplitResult, decide
from ._log import get_logger
from ._observe import Observers, RunInfo
from ._retry import TaskConfig
from ._runner import UnitSpec, run_unit_call
from ._store import SharedStore, Snapshot, driver_store, serialise_snapshot

__all__ = ["CANCEL_GRACE", "Plan", "RemoteError", "Run", "RunCancelled", "UnitRef"]

log = get_logger("cano_mp.engine")

# Seconds a cancelled or timed-out call gets to notice task_context().cancelled() and
# return before its worker is killed. Longer lets more tasks stop cleanly (their worker
# survives, no respawn); shorter frees the slot sooner.
CANCEL_GRACE = 0.25

# Calls kept in flight per pool worker for one state: 2 hides the driver's dispatch
# latency behind the running call; more only queues calls where their timeouts tick.
IN_FLIGHT_PER_WORKER = 2

_INLINE = InlineExecutor()
_tokens = itertools.count(1)


class RemoteError(Exception):
    """Stands in for a task's exception that could not be pickled back to the driver."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name


class RunCancelled(CanoError):
    """The run was cancelled from outside (ConcurrentWorkflow, asyncio cancellation)."""


@dataclass(eq=False)
class UnitRef:
    """A registered unit with everything the engine needs to run it."""

    unit: Any
    name: str
    config: TaskConfig
    declared: tuple[Any, ...] | None
    spec: UnitSpec
    blob: Blob


@dataclass(eq=False)
class StateEntry:
    state: Any
    units: list[UnitRef]
    join: JoinConfig[Any] | None  # None: a plain task
    batch: bool = False  # a BatchTask (join is None)


@dataclass(eq=False)
class Plan:
    """A workflow's registrations frozen for running (rebuilt when they change)."""

    name: str
    entries: dict[Any, StateEntry]
    exits: frozenset[Any]
    table: tuple[Any, ...]


class Quota:
    """A counting semaphore whose waiters are woken through their run's event."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = size
        self._lock = threading.Lock()
        self._waiters: list[threading.Event] = []

    def try_acquire(self, wake: threading.Event) -> bool:
        with self._lock:
            if self._free > 0:
                self._free -= 1
                return True
            self._waiters.append(wake)
            return False

    def release(self) -> None:
        with self._lock:
            self._free += 1
            waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.set()

    @property
    def in_use(self) -> int:
        return self.size - self._free


@dataclass(eq=False)
class _Branch:
    index: int
    ref: UnitRef
    status: str = "waiting"  # waiting | running | retry | ok | failed | cancelled
    attempt: int = 0
    future: Future[Any] | None = None
    executor: Any = None
    token: str = ""
    deadline: float | None = None
    started: float = 0.0
    retry_at: float = 0.0
    next_state: Any = None
    log: list[Any] = field(default_factory=list)
    error: TaskError | None = None


@dataclass(eq=False)
class _Progress:
    """The branches of one state, by where they are; kept incrementally so that a wide
    split costs O(1) per completion, not O(branches)."""

    branches: list[_Branch]
    waiting: deque[_Branch] = field(default_factory=deque)
    retrying: list[_Branch] = field(default_factory=list)
    running: set[_Branch] = field(default_factory=set)
    done: deque[tuple[_Branch, Future[Any]]] = field(default_factory=deque)
    ok: int = 0
    failed: int = 0

    def __post_init__(self) -> None:
        self.waiting.extend(self.branches)


def _describe(state: Any) -> str:
    if isinstance(state, enum.Enum):
        return state.name
    return repr(state)


class Run:
    """One run of a workflow (use ``Workflow.orchestrate``)."""

    def __init__(
        self,
        plan: Plan,
        store: SharedStore,
        executor: Executor,
        *,
        observers: Observers,
        timeout: float | None,
        quota: Quota | None,
        cancel_grace: float = CANCEL_GRACE,
    ) -> None:
        self.plan = plan
        self.store = driver_store(store)  # a task's view cannot be a run's store
        self.executor = executor
        self.observers = observers
        self.timeout = timeout
        self.quota = quota
        self.cancel_grace = cancel_grace
        self.run_id = uuid.uuid4().hex[:12]
        self.info = RunInfo(self.run_id, plan.name)
        self._wake = threading.Event()
        self._cancelled = False
        self._cancel_error: type[CanoError] = RunCancelled
        self._cancel_grace_on_cancel = cancel_grace
        self._deadline: float | None = None
        self._remote = not isinstance(executor, InlineExecutor)
        self.state: Any = None

    def cancel(self, grace: float | None = None) -> None:
        """Stop the run from another thread: it raises :class:`RunCancelled`.

        In-flight calls get ``grace`` seconds (default: the run's ``cancel_grace``) to
        notice ``task_context().cancelled()`` before their workers are killed.
        """
        self._cancel_grace_on_cancel = self.cancel_grace if grace is None else max(0.0, grace)
        self._cancelled = True
        self._wake.set()

    def terminate(self) -> None:
        """Stop the run at once because the process got SIGTERM: it raises ``Terminated``."""
        self._cancel_error = Terminated
        self.cancel(0.0)

    def stop_grace(self, exc: BaseException) -> float:
        """How long in-flight calls get to stop when ``exc`` ends a state."""
        if isinstance(exc, (KeyboardInterrupt, Terminated)):
            return 0.0
        if isinstance(exc, RunCancelled):
            return self._cancel_grace_on_cancel
        return self.cancel_grace

    # -- the run ------------------------------------------------------------------------
    def run(self, initial: Any) -> Any:
        started = time.monotonic()
        if self.timeout is not None:
            self._deadline = started + self.timeout
        obs = self.observers
        if obs:
            obs.emit("on_workflow_start", self.info)
        state = initial
        self.state = state
        error: BaseException | None = None
        holds_store = False
        _signals.install()
        _signals.register_run(self)
        try:
            self._check_known(state, None)
            holds_store = self._hold_store(state)
            while True:
                if obs:
                    obs.emit("on_state_enter", self.info, state)
                if state in self.plan.exits:
                    break
                entry = self.plan.entries[state]
                nxt = self._run_state(entry)
                if log.isEnabledFor(logging.INFO):
                    log.info(
                        "%s run %s: %s -> %s",
                        self.plan.name,
                        self.run_id,
                        _describe(state),
                        _describe(nxt),
                        extra={"run_id": self.run_id, "workflow": self.plan.name, "state": state},
                    )
                state = nxt
                self.state = state
            return state
        except BaseException as exc:
            error = exc
            raise
        finally:
            if holds_store:
                self.store._run_lock.release()
            _signals.unregister_run(self)
            duration = time.monotonic() - started
            if obs:
                obs.emit(
                    "on_workflow_end",
                    self.info,
                    final_state=state if error is None else None,
                    error=error,
                    duration=duration,
                )
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "%s run %s %s in %.3fs%s",
                    self.plan.name,
                    self.run_id,
                    "failed" if error is not None else "finished",
                    duration,
                    f": {type(error).__name__}: {error}"
                    if error is not None
                    else f" at {_describe(state)}",
                    extra={"run_id": self.run_id, "workflow": self.plan.name},
                )

    def _hold_store(self, state: Any) -> bool:
        """Wait until no other run uses this run's store: runs on one store are serialised,
        so that two of them never overwrite each other's updates."""
        lock = self.store._run_lock
        if lock.acquire(blocking=False):
            return True
        log.info(
            "%s run %s waits: another run is using its store",
            self.plan.name,
            self.run_id,
            extra={"run_id": self.run_id, "workflow": self.plan.name},
        )
        while True:
            self._check_stop(StateEntry(state, [], None), time.monotonic())
            wait = 0.1
            if self._deadline is not None:
                wait = max(0.0, min(wait, self._deadline - time.monotonic()))
            if lock.acquire(timeout=wait):
                return True

    def _check_known(self, state: Any, by: UnitRef | None) -> None:
        try:
            known = state in self.plan.entries or state in self.plan.exits
        except TypeError:
            known = False
        if not known:
            valid = ", ".join(_describe(s) for s in self.plan.table) or "none"
            who = f"task {by.name!r} returned" if by is not None else "initial state"
            raise TransitionError(
                f"{who} {_describe(state)}, which is neither a registered state nor an exit "
                f"state of workflow {self.plan.name!r} (valid: {valid})",
                state=state,
            )

    def _run_state(self, entry: StateEntry) -> Any:
        snap = self.store._take_snapshot()
        if snap.blob is None:
            # The blob must not refer back to the snapshot: a cycle would keep the snapshot,
            # and the segments it keeps alive, until the cyclic garbage collector runs.
            data = snap.data()
            dumps = functools.partial(serialise_snapshot, data)
            snap.blob = Blob(snap.key, data, "snapshot", dumps)
        if entry.batch:
            from ._batch_engine import run_batch_state  # imported on first use

            return run_batch_state(self, entry, snap)
        if entry.join is None and (entry.units[0].config.inline or not self._remote):
            return self._run_inline(entry, snap)
        p = _Progress([_Branch(i, ref) for i, ref in enumerate(entry.units)])
        join = entry.join
        join_deadline = None
        if join is not None and join.timeout is not None:
            join_deadline = time.monotonic() + join.timeout
        # Calls beyond what the pool can run only wait in its queue, where they cannot be
        # cancelled cheaply and where their timeouts would already be ticking: keep two per
        # worker in flight (enough to hide the dispatch round trip).
        limit = float(self.executor.max_workers * in_flight_per_worker(self.executor))
        if join is not None and join.max_parallel:
            limit = min(limit, join.max_parallel)
        timed_out = False
        try:
            while True:
                self._wake.clear()
                self._collect(entry, p)
                now = time.monotonic()
                self._expire(entry, p, now)
                timed_out = join_deadline is not None and now >= join_deadline
                verdict = self._verdict(entry, p, timed_out)
                if verdict != "wait":
                    break
                self._check_stop(entry, now)
                self._start(entry, p, snap, limit, now)
                if p.done:
                    continue
                wake_at = [t for t in (join_deadline, self._deadline) if t is not None]
                wake_at.extend(b.deadline for b in p.running if b.deadline is not None)
                wake_at.extend(b.retry_at for b in p.retrying)
                timeout = max(0.0, min(wake_at) - time.monotonic()) if wake_at else None
                self._wake.wait(timeout)
        except BaseException as exc:
            self._stop(p, self.stop_grace(exc), entry)
            raise
        self._stop(p, self.cancel_grace, entry)
        return self._finish(entry, p.branches, verdict, timed_out)

    def _run_inline(self, entry: StateEntry, snap: Snapshot) -> Any:
        """A plain task in the driver: no future, no pool, no wake-ups (the fast path)."""
        b = _Branch(0, entry.units[0])
        p = _Progress([])
        obs = self.observers
        while True:
            now = time.monotonic()
            self._check_stop(entry, now)
            b.attempt += 1
            b.status = "running"
            b.started = now
            timeout = b.ref.config.timeout
            b.deadline = now + timeout if timeout is not None else None
            b.token = f"t{self.run_id}{next(_tokens)}"
            if obs:
                obs.emit("on_task_start", self.info, entry.state, b.ref.name, b.attempt)
            out = run_unit_call(
                self._is_cancelled,
                b.ref.spec,
                snap.data(),
                b.attempt,
                b.deadline,
                self.run_id,
                b.token,
                False,
            )
            if obs.wants("on_task_timing"):
                self._timing(entry, b, out)
            if out[0] == "ok" and b.deadline is not None and time.monotonic() > b.deadline:
                self.store._discard(b.token)
                self._attempt_failed(entry, p, b, self._timeout_error(entry, b), None)
            elif out[0] == "ok":
                b.next_state = b.ref.spec.decode_state(out[1])
                b.log = out[2]
                b.status = "ok"
                if obs:
                    self._task_end(entry, b, None)
                return self._finish(entry, [b], "proceed", False)
            else:
                self._attempt_failed(entry, p, b, _load_error(out[1]), out[2])
            if b.status == "failed":
                return self._finish(entry, [b], "fail", False)
            until = b.retry_at if self._deadline is None else min(b.retry_at, self._deadline)
            self._wake.clear()
            while not self._cancelled and time.monotonic() < until:
                self._wake.wait(until - time.monotonic())

    def _check_stop(self, entry: StateEntry, now: float) -> None:
        """Raise when the run was cancelled or its wall-clock budget is spent."""
        if self._cancelled:
            if self._cancel_error is Terminated:
                raise Terminated(f"run {self.run_id} was stopped: the process received SIGTERM")
            raise RunCancelled(f"run {self.run_id} was cancelled")
        if self._deadline is not None and now >= self._deadline:
            raise WorkflowTimeout(
                f"workflow {self.plan.name!r} timed out after {self.timeout}s "
                f"in state {_describe(entry.state)}",
                state=entry.state,
            )

    def _is_cancelled(self) -> bool:
        return self._cancelled

    def _verdict(self, entry: StateEntry, p: _Progress, timed_out: bool) -> str:
        pending = len(p.branches) - p.ok - p.failed
        if entry.join is None:
            return "proceed" if p.ok else "fail" if p.failed else "wait"
        return decide(entry.join.strategy, p.ok, p.failed, pending, timed_out)

    def _finish(
        self, entry: StateEntry, branches: list[_Branch], verdict: str, timed_out: bool
    ) -> Any:
        join = entry.join
        if join is None:
            b = branches[0]
            if verdict == "fail":
                assert b.error is not None
                raise b.error
            nxt = b.next_state
            self._check_known(nxt, b.ref)
            if b.ref.declared is not None and nxt not in b.ref.declared:
                raise TransitionError(
                    f"task {b.ref.name!r} returned {_describe(nxt)}, which it does not declare "
                    f"(next states: {', '.join(_describe(s) for s in b.ref.declared)})",
                    state=nxt,
                )
            self.store._commit(b.log)
            return nxt
        result: SplitResult[Any] = SplitResult(total=len(branches))
        for b in branches:
            if b.status == "ok":
                result.successes.append((b.index, b.next_state))
            elif b.status == "failed":
                assert b.error is not None
                result.errors.append((b.index, b.error))
            else:
                result.cancelled.append(b.index)
        if self.observers:
            self.observers.emit("on_split_end", self.info, entry.state, result)
        if verdict == "fail":
            raise JoinError(
                f"split in state {_describe(entry.state)} failed its "
                f"{join.strategy!r} join: {result!r}"
                + (f" at its {join.timeout}s timeout" if timed_out else ""),
                result=result,
                timed_out=timed_out,
            )
        for b in branches:
            if b.status == "ok":
                self.store._commit(b.log)
        if join.result_key is not None:
            self.store.put(join.result_key, result)
        return join.join_state

    # -- branches -------------------------------------------------------------------------
    def _start(
        self, entry: StateEntry, p: _Progress, snap: Snapshot, limit: float, now: float
    ) -> None:
        if p.retrying:
            for b in [b for b in p.retrying if now >= b.retry_at]:
                p.retrying.remove(b)
                b.status = "waiting"
                p.waiting.appendleft(b)
        while p.waiting and len(p.running) < limit:
            b = p.waiting[0]
            inline = b.ref.config.inline or not self._remote
            if self.quota is not None and not inline and not self.quota.try_acquire(self._wake):
                return
            p.waiting.popleft()
            self._submit(entry, p, b, snap, inline)

    def _submit(
        self, entry: StateEntry, p: _Progress, b: _Branch, snap: Snapshot, inline: bool
    ) -> None:
        b.attempt += 1
        b.status = "running"
        b.token = f"t{self.run_id}{next(_tokens)}"
        timeout = b.ref.config.timeout
        b.started = time.monotonic()
        b.deadline = b.started + timeout if timeout is not None else None
        executor = _INLINE if inline else self.executor
        b.executor = executor
        call = Call(
            run_unit_call,
            (b.ref.blob, snap.blob),
            (b.attempt, b.deadline, self.run_id, b.token, not inline and self._remote),
        )
        if self.observers:
            self.observers.emit("on_task_start", self.info, entry.state, b.ref.name, b.attempt)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s run %s: %s attempt %d of %s starts",
                self.plan.name,
                self.run_id,
                b.ref.name,
                b.attempt,
                _describe(entry.state),
                extra={
                    "run_id": self.run_id,
                    "workflow": self.plan.name,
                    "state": entry.state,
                    "task": b.ref.name,
                    "attempt": b.attempt,
                },
            )
        p.running.add(b)
        try:
            fut = executor.submit(call)
        except BaseException as exc:
            p.running.discard(b)
            b.status = "waiting"
            b.attempt -= 1
            p.waiting.appendleft(b)
            if self.quota is not None and not inline:
                self.quota.release()
            if isinstance(exc, Exception) and not isinstance(exc, CanoError):
                raise ConfigError(
                    f"task {b.ref.name!r} of state {_describe(entry.state)} cannot be sent to "
                    f"a worker process: {type(exc).__name__}: {exc}. Make it picklable, or "
                    "register it with inline=True to run it in the driver"
                ) from exc
            raise
        b.future = fut
        if self.quota is not None and not inline:
            quota = self.quota
            fut.add_done_callback(lambda _f: quota.release())
        wake, done = self._wake, p.done

        def finished(f: Future[Any]) -> None:
            done.append((b, f))
            wake.set()

        fut.add_done_callback(finished)

    def _collect(self, entry: StateEntry, p: _Progress) -> None:
        while p.done:
            b, fut = p.done.popleft()
            if b.future is not fut or b.status != "running":
                continue  # a call that was cancelled or timed out has stopped
            p.running.discard(b)
            try:
                out = fut.result()
            except WorkerDied as died:
                self._discard(b)  # the dead attempt may have written segments
                self._attempt_failed(entry, p, b, self._crash(entry, b, died), None)
                continue
            except Exception as exc:
                self._discard(b)
                self._attempt_failed(entry, p, b, exc, None)
                continue
            if self.observers.wants("on_task_timing"):
                self._timing(entry, b, out)
            if out[0] == "ok":
                if (
                    isinstance(b.executor, InlineExecutor)
                    and b.deadline is not None
                    and (time.monotonic() > b.deadline)
                ):
                    self._discard(b)
                    self._attempt_failed(entry, p, b, self._timeout_error(entry, b), None)
                    continue
                b.next_state = b.ref.spec.decode_state(out[1])
                b.log = out[2]
                b.status = "ok"
                p.ok += 1
                self._task_end(entry, b, None)
            else:
                self._attempt_failed(entry, p, b, _load_error(out[1]), out[2])

    def _expire(self, entry: StateEntry, p: _Progress, now: float) -> None:
        for b in [b for b in p.running if b.deadline is not None and now >= b.deadline]:
            assert b.future is not None
            if b.future.done():
                continue  # collected on the next pass
            p.running.discard(b)
            b.executor.cancel(b.future, self.cancel_grace)
            self._discard(b)
            self._attempt_failed(entry, p, b, self._timeout_error(entry, b), None)

    def _stop(self, p: _Progress, grace: float, entry: StateEntry | None = None) -> None:
        for b in p.running:
            assert b.future is not None
            b.executor.cancel(b.future, grace)
            self._discard(b)
            b.status = "cancelled"
            if self.observers and entry is not None:
                self._task_end(
                    entry,
                    b,
                    TaskCancelled(f"attempt {b.attempt} of task {b.ref.name!r} was cancelled"),
                )
        for b in [*p.waiting, *p.retrying]:
            b.status = "cancelled"
        p.running.clear()
        p.waiting.clear()
        p.retrying.clear()

    def _discard(self, b: _Branch) -> None:
        token, store = b.token, self.store
        if b.future is not None:
            b.future.add_done_callback(lambda _f: store._discard(token))

    def _timing(self, entry: StateEntry, b: _Branch, out: tuple[Any, ...]) -> None:
        self.observers.emit(
            "on_task_timing",
            self.info,
            entry.state,
            b.ref.name,
            b.attempt,
            pid=out[3],
            started=out[4],
            ended=out[5],
        )

    def _task_end(self, entry: StateEntry, b: _Branch, error: BaseException | None) -> None:
        if self.observers:
            self.observers.emit(
                "on_task_end",
                self.info,
                entry.state,
                b.ref.name,
                b.attempt,
                error=error,
                duration=time.monotonic() - b.started,
            )

    def _timeout_error(self, entry: StateEntry, b: _Branch) -> TaskTimeout:
        return TaskTimeout(
            f"task {b.ref.name!r} of state {_describe(entry.state)} timed out: attempt "
            f"{b.attempt} ran past its {b.ref.config.timeout}s timeout and was stopped",
            state=entry.state,
            task_name=b.ref.name,
            attempts=b.attempt,
        )

    def _crash(self, entry: StateEntry, b: _Branch, died: WorkerDied) -> WorkerCrashed:
        code = died.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return WorkerCrashed(
            f"the worker process (pid {died.pid}) running task {b.ref.name!r} of state "
            f"{_describe(entry.state)} died ({how})",
            exitcode=code,
            state=entry.state,
            task_name=b.ref.name,
            attempts=b.attempt,
        )

    def _attempt_failed(
        self,
        entry: StateEntry,
        p: _Progress,
        b: _Branch,
        error: BaseException,
        remote_tb: str | None,
    ) -> None:
        if remote_tb is not None and not isinstance(error, TaskError):
            try:
                error.add_note(f"\nRemote traceback (from the worker):\n{remote_tb}")
            except Exception:
                pass
        self._task_end(entry, b, error)
        if isinstance(error, TransitionError):
            raise error
        delay = b.ref.config.retry.delay_for_attempt(b.attempt - 1)
        if delay is not None:
            if self.observers:
                self.observers.emit(
                    "on_retry", self.info, entry.state, b.ref.name, b.attempt, delay, error
                )
            log.warning(
                "%s run %s: task %r of state %s failed (attempt %d: %s: %s); retrying in %.3fs",
                self.plan.name,
                self.run_id,
                b.ref.name,
                _describe(entry.state),
                b.attempt,
                type(error).__name__,
                error,
                delay,
                extra={
                    "run_id": self.run_id,
                    "workflow": self.plan.name,
                    "state": entry.state,
                    "task": b.ref.name,
                    "attempt": b.attempt,
                },
            )
            b.status = "retry"
            b.retry_at = time.monotonic() + delay
            b.future = None
            p.retrying.append(b)
            return
        b.status = "failed"
        b.future = None
        p.failed += 1
        if isinstance(error, TaskError):
            error.attempts = b.attempt
            b.error = error
            return
        final = TaskError(
            f"task {b.ref.name!r} of state {_describe(entry.state)} failed after "
            f"{b.attempt} attempt(s): {type(error).__name__}: {error}",
            state=entry.state,
            task_name=b.ref.name,
            attempts=b.attempt,
            remote_traceback=remote_tb,
        )
        final.__cause__ = error
        b.error = final


def in_flight_per_worker(executor: Any) -> int:
    """Calls to keep in flight per worker: an executor may say (``in_flight_per_worker``,
    an optional hint of the Executor protocol; high-latency backends want more)."""
    hint = getattr(executor, "in_flight_per_worker", None)
    return hint if isinstance(hint, int) and hint >= 1 else IN_FLIGHT_PER_WORKER


def _load_error(payload: Any) -> BaseException:
    if isinstance(payload, BaseException):
        return payload
    if isinstance(payload, bytes):
        try:
            exc = cloudpickle.loads(payload)
            if isinstance(exc, BaseException):
                return exc
        except Exception as load_exc:
            return RemoteError("unloadable exception", str(load_exc))
    if isinstance(payload, tuple) and len(payload) == 3:
        return RemoteError(str(payload[1]), str(payload[2]))
    return RemoteError("unknown", repr(payload))


def make_unit_ref(
    unit: Any,
    name: str,
    config: TaskConfig,
    declared: tuple[Any, ...] | None,
    state: Any,
    table: tuple[Any, ...],
    key: str,
    workflow: str = "",
) -> UnitRef:
    spec = UnitSpec(unit, state, name, table, workflow)

    def serialise() -> bytes:
        return bytes(cloudpickle.dumps(spec))

    return UnitRef(unit, name, config, declared, spec, Blob(key, spec, "unit", serialise))


def is_hashable(value: object) -> bool:
    if not isinstance(value, Hashable):
        return False
    try:
        hash(value)
    except TypeError:
        return False
    return True
