"""SteppedTask: long work cut into steps, each its own call, resumable between steps.

The engine runs a SteppedTask through :class:`StepUnit`, an ordinary task whose every call
runs *one* step: ``start(store)`` first (the first cursor), then ``step(store, cursor)``
until it returns a state. The cursor lives in the store under :func:`cursor_key`, so it is
committed with the step's own writes, in one commit, and a checkpoint taken after the step
holds both: a resumed run continues at the last committed cursor. The key is removed when
the task ends.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ._public import public
from ._retry import TaskConfig
from ._store import SharedStore
from ._task import Task

__all__ = ["CONTINUE", "Done", "StepUnit", "SteppedTask", "cursor_key"]

S = TypeVar("S", bound=Hashable)
C = TypeVar("C")


class _Continue:
    """What a step call returns when the task goes on (travels by reference)."""

    def __reduce__(self) -> str:
        return "CONTINUE"

    def __repr__(self) -> str:
        return "CONTINUE"


CONTINUE = _Continue()


@dataclass(frozen=True, slots=True)
class Done(Generic[S]):
    """Ends a :class:`SteppedTask` in ``state``: needed when states are not Enum members
    (an ``int`` or ``str`` state would read as the next cursor)."""

    state: S


class SteppedTask(Generic[S, C]):
    """Long work that resumes mid-state: ``start`` gives the first cursor, each ``step``
    does one piece and returns the next cursor, or the next state when done::

        class Pages(SteppedTask[S, int]):
            def start(self, store) -> int:
                return 0
            def step(self, store, cursor: int) -> int | S:
                store.append("rows", fetch_page(cursor))
                return cursor + 1 if cursor < 99 else S.DONE

    Each step runs in the pool as a call of its own, with ``config``'s retry and timeout;
    its writes commit at its end together with its cursor (the one place besides
    compensations where a state commits before it ends). With a checkpoint, the cursor is
    checkpointed after every step. A step ends the task by returning a member of the
    workflow's state Enum (``isinstance``, so an ``IntEnum`` state is never a cursor) or
    ``Done(state)``; anything else is the next cursor (picklable).
    """

    config: TaskConfig = TaskConfig()
    next_states: tuple[S, ...] | None = None

    def start(self, store: SharedStore) -> C:
        """The first cursor."""
        raise NotImplementedError(f"{type(self).__name__}.start() is not implemented")

    def step(self, store: SharedStore, cursor: C) -> C | S:
        """One step from ``cursor``: the next cursor, or the next state when done."""
        raise NotImplementedError(f"{type(self).__name__}.step() is not implemented")

    @property
    def name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"<SteppedTask {self.name}>"


def cursor_key(state_label: str) -> str:
    """The store key holding a SteppedTask's cursor while it runs."""
    return f"__cano_cursor__:{state_label}"


class StepUnit(Task[Any]):
    """One step of a SteppedTask per call (see the module docstring)."""

    def __init__(self, stepped: SteppedTask[Any, Any], key: str) -> None:
        self.stepped = stepped
        self.key = key
        self.enums: tuple[type[enum.Enum], ...] = ()  # the workflow's state Enums (plan)
        cfg = getattr(stepped, "config", None)
        self.config = cfg if cfg is not None else TaskConfig()
        self.next_states = getattr(stepped, "next_states", None)

    @property
    def name(self) -> str:
        name = getattr(self.stepped, "name", None)
        return name if isinstance(name, str) else type(self.stepped).__name__

    def run(self, store: SharedStore) -> Any:
        if self.key not in store:
            store.put(self.key, self.stepped.start(store))
            return CONTINUE
        out = self.stepped.step(store, store.get(self.key))
        if isinstance(out, Done):
            store.remove(self.key)
            return out.state
        if isinstance(out, enum.Enum) and (not self.enums or isinstance(out, self.enums)):
            store.remove(self.key)
            return out
        store.put(self.key, out)
        return CONTINUE


public(SteppedTask, Done)
