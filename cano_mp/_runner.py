"""What one call of a unit does, in a worker or inline in the driver.

The engine ships ``(UnitSpec, snapshot, attempt, deadline, run_id, token)``; this module
runs the unit against a :class:`TaskStore` over the snapshot and returns an *outcome*
tuple that pickles cheaply:

    ("ok",  next_state, write_log, pid, started, ended)
    ("err", error, traceback_text, pid, started, ended)

``next_state`` is ``("i", n)`` when the state is the n-th of the workflow's state table
(so an Enum defined in ``__main__`` is not re-pickled by value on every call), else
``("v", value)``. ``error`` is the exception (inline) or its cloudpickle bytes (remote),
or ``("unpicklable", type name, message)``.
"""

from __future__ import annotations

import enum
import os
import time
import traceback
from collections.abc import Callable, Hashable
from typing import Any

from . import _context
from ._context import TaskContext, _set_context
from ._errors import Terminated
from ._store import TaskStore, WireSnapshot
from ._store.codec import error_payload
from ._task import Node, Task

__all__ = ["UnitSpec", "run_unit_call"]


class UnitSpec:
    """A unit, the state it runs for, and the workflow's state table."""

    __slots__ = ("_index", "name", "state", "table", "unit", "workflow")

    def __init__(
        self, unit: Any, state: Any, name: str, table: tuple[Any, ...], workflow: str = ""
    ) -> None:
        self.unit = unit
        self.state = state
        self.name = name
        self.table = table
        self.workflow = workflow
        self._index: dict[Any, int] | None = None

    def encode_state(self, value: Any) -> tuple[str, Any]:
        if self._index is None:
            self._index = {s: i for i, s in enumerate(self.table)}
        try:
            i = self._index.get(value) if isinstance(value, Hashable) else None
        except TypeError:
            i = None
        if i is not None and self.table[i] == value and type(self.table[i]) is type(value):
            return ("i", i)
        return ("v", value)

    def decode_state(self, enc: tuple[str, Any]) -> Any:
        return self.table[enc[1]] if enc[0] == "i" else enc[1]

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.unit, self.state, self.name, self.table, self.workflow)

    def __setstate__(self, st: tuple[Any, ...]) -> None:
        self.unit, self.state, self.name, self.table, self.workflow = st
        self._index = None

    def log_tags(self, run_id: str, attempt: int) -> dict[str, Any]:
        """What a worker-side log record of this unit is tagged with."""
        state = self.state.name if isinstance(self.state, enum.Enum) else self.state
        return {
            "run_id": run_id,
            "workflow": self.workflow,
            "state": state,
            "task": self.name,
            "attempt": attempt,
        }


def execute_unit(unit: Any, store: TaskStore) -> Any:
    if isinstance(unit, Task):
        return unit.run(store)
    if isinstance(unit, Node):
        return unit.post(store, unit.exec(unit.prep(store)))
    return unit(store)


def run_unit_call(
    cancelled: Callable[[], bool],
    spec: UnitSpec,
    snap: WireSnapshot,
    attempt: int,
    deadline: float | None,
    run_id: str,
    token: str,
    remote: bool,
) -> tuple[Any, ...]:
    """Run one attempt of ``spec.unit``; never raises for errors of the task itself."""
    pid = os.getpid()
    started = time.time()
    store = TaskStore(snap, token)
    ctx = TaskContext(run_id, spec.state, attempt, deadline, cancelled)
    previous = _set_context(ctx)
    if remote:
        _context.log_tags = spec.log_tags(run_id, attempt)
    try:
        result = execute_unit(spec.unit, store)
    except Terminated:  # SIGTERM reached an inline task: stop the run, never retry
        store._finish(False)
        raise
    except Exception as exc:
        store._finish(False)
        tb = traceback.format_exc()
        return ("err", error_payload(exc, remote), tb, pid, started, time.time())
    except BaseException:
        store._finish(False)
        raise
    finally:
        _set_context(previous)
        _context.log_tags = None
    try:
        log = store._finish(True)
    except Exception as exc:
        return (
            "err",
            error_payload(exc, remote),
            traceback.format_exc(),
            pid,
            started,
            time.time(),
        )
    return ("ok", spec.encode_state(result), log, pid, started, time.time())
