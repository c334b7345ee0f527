"""Run: one run of a workflow, from its initial state to an exit state (the FSM loop)."""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING, Any

from .. import _signals
from .._errors import RolledBack
from .._executors import Executor
from .._log import emit, get_logger
from .._observe import Observers, RunInfo, raised
from .._store import SharedStore, Snapshot, serialise_snapshot
from .._wire import Blob
from .plan import Described, Frozen, Quota, StateEntry, describe
from .recovery import compensable, compensate, rollback, run_stepped
from .scope import CANCEL_GRACE, RunScope
from .task_state import TaskState

if TYPE_CHECKING:
    from .._checkpoint.session import Session

__all__ = ["Run"]

log = get_logger("cano_mp.engine")

_NO_INITIAL: Any = object()


class Run:
    """One run of a workflow: made by ``Workflow.start_run()``, driven by :meth:`run`.

    ``cancel()`` (another thread) stops it with ``RunCancelled``; SIGTERM with
    ``Terminated`` (see ``_signals``).
    """

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
        initial: Any = _NO_INITIAL,
        run_id: str | None = None,
        checkpoint: Session | None = None,
        completed: list[Any] | None = None,
    ) -> None:
        self.scope = RunScope(
            frozen,
            store,
            executor,
            observers=observers,
            timeout=timeout,
            quota=quota,
            cancel_grace=cancel_grace,
            run_id=run_id,
        )
        self.initial = initial
        self.state: Any = None
        self.checkpoint = checkpoint
        self.rolled_back = False
        # the states whose work committed, in order: what a rollback compensates
        self.completed: list[Any] = completed if completed is not None else []

    @property
    def run_id(self) -> str:
        return self.scope.run_id

    @property
    def info(self) -> RunInfo:
        return self.scope.info

    @property
    def store(self) -> SharedStore:
        return self.scope.store

    def cancel(self, grace: float | None = None) -> None:
        """Stop the run from another thread: it raises ``RunCancelled``."""
        self.scope.cancel(grace)

    def terminate(self) -> None:
        """Stop the run at once (SIGTERM): it raises ``Terminated``."""
        self.scope.terminate()

    # -- the loop ----------------------------------------------------------------------------
    def run(self, initial: Any = _NO_INITIAL) -> Any:
        """Walk the machine from ``initial`` (default: the state given when it was made) to
        an exit state and return it; raise what ended the run."""
        state = self.initial if initial is _NO_INITIAL else initial
        scope, obs = self.scope, self.scope.observers
        started = time.monotonic()
        if scope.timeout is not None:
            scope.deadline = started + scope.timeout
        if obs.on_workflow_start:
            obs.emit("on_workflow_start", scope.info)
        self.state = state
        error: BaseException | None = None
        holds_store = False
        _signals.install()
        _signals.register_run(self)
        ckpt = self.checkpoint
        track = bool(scope.plan.compensations) or ckpt is not None
        try:
            scope.check_known(state, None)
            holds_store = self.hold_store(state)
            if ckpt is not None:
                ckpt.begin(scope.store)
                if ckpt.resume_rollback is not None:
                    raise self.finish_rollback(*ckpt.resume_rollback)
            while True:
                for fn in obs.on_state_enter:  # Observers.emit, inlined: once per state
                    try:
                        fn(scope.info, state)
                    except Exception:
                        raised(fn, "on_state_enter")
                if state in scope.plan.exits:
                    return state
                if ckpt is not None:
                    ckpt.enter(scope.store, state)
                nxt = self.run_state(scope.plan.entries[state])
                if track:
                    self.state_done(state)
                if log.isEnabledFor(logging.INFO):  # one record per transition, lazy
                    emit(
                        log, logging.INFO, "%s run %s: %s -> %s",
                        (scope.plan.name, scope.run_id, Described(state), Described(nxt)),
                        (scope.run_id, scope.plan.name, state, None, None),
                    )  # fmt: skip
                state = self.state = nxt
        except BaseException as exc:
            error = exc
            if scope.plan.compensations and compensable(exc):
                self.roll_back(exc)
            raise
        finally:
            try:
                if ckpt is not None:
                    ckpt.end(state, error, rolled_back=self.rolled_back)
            finally:
                if holds_store:
                    scope.store._run_lock.release()
                _signals.unregister_run(self)
                scope.close()
                self.ended(state, error, time.monotonic() - started)

    def state_done(self, state: Any) -> None:
        self.completed.append(state)
        if self.checkpoint is not None:
            self.checkpoint.completed(state)

    def roll_back(self, error: BaseException) -> None:
        """Compensate the completed states; the error tells what was undone."""
        if self.checkpoint is not None:
            self.checkpoint.failing(self.state, error)
        done, errors = rollback(self, self.completed)
        self.rolled_back = True
        error.compensated = done  # type: ignore[attr-defined]
        error.compensation_errors = errors  # type: ignore[attr-defined]

    def finish_rollback(
        self, todo: list[Any], done: list[Any], errors: list[tuple[Any, BaseException]]
    ) -> RolledBack:
        """Resume a rollback that a crash cut short; return the error that ends the run."""
        assert self.checkpoint is not None and self.checkpoint.rollback is not None
        why = self.checkpoint.rollback["error"]
        done, errors = compensate(self, todo, done, errors)
        self.rolled_back = True
        error = RolledBack(
            f"run {self.run_id!r} failed ({why}) and was rolling back when its process "
            f"stopped; the rollback was resumed and finished ({len(done)} compensated, "
            f"{len(errors)} failed)"
        )
        error.compensated = done  # type: ignore[attr-defined]
        error.compensation_errors = errors  # type: ignore[attr-defined]
        return error

    def ended(self, state: Any, error: BaseException | None, duration: float) -> None:
        scope = self.scope
        if scope.observers.on_workflow_end:
            scope.observers.emit(
                "on_workflow_end", scope.info,
                final_state=state if error is None else None, error=error, duration=duration,
            )  # fmt: skip
        if log.isEnabledFor(logging.INFO):
            how = f": {type(error).__name__}: {error}" if error else f" at {describe(state)}"
            log.info(
                "%s run %s %s in %.3fs%s",
                scope.plan.name, scope.run_id, "failed" if error else "finished", duration, how,
                extra=scope.log_extra(),
            )  # fmt: skip

    def hold_store(self, state: Any) -> bool:
        """Wait until no other run uses this run's store: runs on one store are serialised,
        so that two of them never overwrite each other's updates."""
        scope = self.scope
        lock = scope.store._run_lock
        if lock.acquire(blocking=False):
            return True
        log.info(
            "%s run %s waits: another run is using its store",
            scope.plan.name,
            scope.run_id,
            extra=scope.log_extra(state),
        )
        while True:
            scope.check_stop(state, time.monotonic())
            wait = 0.1
            if scope.deadline is not None:
                wait = max(0.0, min(wait, scope.deadline - time.monotonic()))
            if lock.acquire(timeout=wait):
                return True

    def snapshot(self) -> Snapshot:
        """The store as last committed, ready to send."""
        return snapshot_blob(self.scope.store._take_snapshot())

    def run_state(self, entry: StateEntry) -> Any:
        """Run one state's work on a snapshot of the store; return the next state."""
        scope = self.scope
        snap = snapshot_blob(scope.store._take_snapshot())
        if entry.stepped:
            return run_stepped(self, entry)
        if entry.poll:
            from .poll_state import run_poll  # imported on first use: import time

            return run_poll(self, entry)
        if entry.batch:
            from .batch_state import BatchState  # imported on first use: import time

            return BatchState(scope, entry, snap).run()
        state = TaskState(scope, entry, snap)
        if entry.join is None and (entry.units[0].config.inline or not scope.remote):
            return state.run_inline()
        return state.run()


def snapshot_blob(snap: Snapshot) -> Snapshot:
    """Give ``snap`` its blob (serialised once per store version) and return it."""
    if snap.blob is None:
        # The blob must not refer back to the snapshot: a cycle would keep the snapshot,
        # and the segments it keeps alive, until the cyclic garbage collector runs.
        data = snap.data()
        snap.blob = Blob(snap.key, data, "snapshot", functools.partial(serialise_snapshot, data))
    return snap
