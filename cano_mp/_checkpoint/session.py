"""Session: what one run does with its checkpoint store.

::

    Workflow.orchestrate(run_id)  -> CheckpointStore.create_run (lease taken)
    Workflow.resume(run_id)       -> CheckpointStore.load (lease taken) -> Session(saved)
    Run.run: store held  -> Session.begin     restore the store (resume)
             state entered -> Session.enter   checkpoint: data files, then the row
             a SteppedTask step committed -> Session.enter (same state, its cursor in the store)
             a rollback: before it and after each compensation -> Session.rolling_back
                          (the store and which compensations are left; resume goes on there)
             end          -> Session.end      completed / failed (+ rolled back); lease given up
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

from .._errors import ConfigError, Terminated
from .._observe import Observers, RunInfo
from .._store import SharedStore, driver_store
from .capture import Capture, restore
from .store import CheckpointStore, Saved

__all__ = ["Rollback", "Session", "find_state", "state_name"]

# a rollback to finish: the states left to compensate, those done, (state, error) of failed
Rollback = tuple[list[Any], list[Any], list[tuple[Any, BaseException]]]


def state_name(state: Any) -> str:
    """A state's stable name: an Enum member's name, else its ``repr``."""
    if isinstance(state, enum.Enum):
        return state.name
    return repr(state)


def find_state(name: str, states: Iterable[Any], run_id: str, workflow: str) -> Any:
    """The state of ``states`` recorded as ``name``; ConfigError when none is."""
    for s in states:
        if state_name(s) == name:
            return s
    raise ConfigError(
        f"run {run_id!r} was recorded in state {name!r}, which workflow {workflow!r} no "
        "longer has: register it again (under the same name) to resume the run"
    )


class Session:
    """The checkpoints of one run."""

    def __init__(
        self,
        cs: CheckpointStore,
        run_id: str,
        *,
        keep: bool,
        observers: Observers,
        info: RunInfo,
        saved: Saved | None = None,
    ) -> None:
        self.cs = cs
        self.run_id = run_id
        self.keep = keep
        self.observers = observers
        self.info = info
        self.saved = saved
        self.seq = saved.seq if saved is not None else 0
        self.capture = Capture(cs.files)
        self._skip_next = saved is not None  # the state resumed at is checkpointed already
        self.history: list[str] = list(saved.extra.get("completed", ())) if saved else []
        # a rollback under way: {"error": why the run failed, "state": where, "todo": [names
        # of the states left to compensate], "done": [names], "errors": [(name, why)]}
        self.rollback: dict[str, Any] | None = saved.extra.get("rollback") if saved else None
        # set by resume: the rollback to finish, as (todo, done, errors) of states
        self.resume_rollback: Rollback | None = None

    def begin(self, store: SharedStore) -> None:
        """The run holds its store: a resumed run's store becomes the checkpoint's."""
        if self.saved is not None:
            restore(store, self.cs.files, self.saved.entries)
            self.capture.learn(driver_store(store)._take_snapshot(), self.saved.entries)
            if self.observers:
                self.observers.emit("on_resume", self.info, self.saved.state, self.seq)

    def enter(self, store: SharedStore, state: Any) -> None:
        """Checkpoint the run as it enters ``state``: the store as last committed."""
        if self._skip_next:
            self._skip_next = False
            return
        self._save(store, state_name(state), {"completed": list(self.history)})
        if self.observers:
            self.observers.emit("on_checkpoint", self.info, state, self.seq, self.capture.written)

    def _save(self, store: SharedStore, state: str, extra: dict[str, Any]) -> None:
        self.seq += 1
        files = self.cs.files
        with files.lock(exclusive=False):
            entries, refs = self.capture.entries(driver_store(store)._take_snapshot())
            dropped = self.cs.save(self.run_id, self.seq, state, entries, extra, refs)
        self.cs.collect(dropped)

    def failing(self, state: Any, error: BaseException) -> None:
        """The run failed at ``state`` with ``error`` and is about to roll back."""
        self.rollback = {"error": _why(error), "state": state_name(state)}

    def rolling_back(
        self,
        store: SharedStore,
        todo: list[Any],
        done: list[Any],
        errors: list[tuple[Any, BaseException]],
    ) -> None:
        """Checkpoint a rollback's progress: the store as last committed, the states whose
        compensations are left (``todo``), done, or failed."""
        rb = self.rollback
        assert rb is not None
        rb["todo"] = [state_name(s) for s in todo]
        rb["done"] = [state_name(s) for s in done]
        rb["errors"] = [(state_name(s), _why(e)) for s, e in errors]
        self._save(store, rb["state"], {"completed": list(self.history), "rollback": rb})

    def completed(self, state: Any) -> None:
        """``state``'s work committed (the compensations a rollback would run)."""
        self.history.append(state_name(state))

    def end(self, state: Any, error: BaseException | None, *, rolled_back: bool) -> None:
        """The run ended: completed at ``state``, or failed with ``error`` (resumable
        unless ``rolled_back``)."""
        if error is None:
            self.cs.finish(self.run_id, "completed", state_name(state), keep=self.keep)
            return
        why = _why(error)
        if rolled_back and self.rollback is not None:
            why = self.rollback["error"]  # what failed the run, not how its rollback ended
        self.cs.finish(self.run_id, "failed", None, keep=True, error=why, rolled_back=rolled_back)


def _why(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt | Terminated):
        return f"{type(error).__name__}: stopped"
    return f"{type(error).__name__}: {str(error)[:500]}"
