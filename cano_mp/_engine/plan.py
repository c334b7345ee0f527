"""A workflow's registrations frozen for running, and the quota that bounds its pool slots."""

from __future__ import annotations

import enum
import functools
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from .._calls import UnitSpec
from .._join import JoinConfig
from .._retry import TaskConfig
from .._wire import Blob, dumps, short_repr

__all__ = [
    "Frozen",
    "Plan",
    "Quota",
    "StateEntry",
    "UnitRef",
    "describe",
    "is_hashable",
    "make_unit_ref",
]


@dataclass(eq=False)
class UnitRef:
    """A registered unit with everything the engine needs to run it."""

    unit: Any
    name: str
    config: TaskConfig
    declared: tuple[Any, ...] | None
    spec: UnitSpec
    index: int  # in Plan.specs: what a call names the unit by


@dataclass(eq=False)
class StateEntry:
    """One state's work: a plain task (``join`` None), a split, or a BatchTask."""

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

    @property
    def specs(self) -> tuple[UnitSpec, ...]:
        """Every unit of the plan, by ``UnitRef.index``."""
        refs = sorted((r for e in self.entries.values() for r in e.units), key=lambda r: r.index)
        return tuple(r.spec for r in refs)

    def freeze(self) -> Frozen:
        """The plan with its units as they are now: pickled (once, when a worker first needs
        them) into one blob keyed by the hash of its bytes, so a run sees today's code and
        globals, and workers get the units again only when they changed."""
        specs = self.specs
        return Frozen(self, Blob(None, specs, "unit", functools.partial(dumps, specs)))


@dataclass(frozen=True, slots=True)
class Frozen:
    """A plan and its units as pickled for one run (or one ``ConcurrentWorkflow.execute``)."""

    plan: Plan
    units: Blob


class Quota:
    """A counting semaphore whose waiters are woken through their run's event (a run waits
    on one event for everything: completions, timeouts and free slots)."""

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


def describe(state: Any) -> str:
    """A state as messages show it: an Enum member's name, else a capped ``repr``."""
    if isinstance(state, enum.Enum):
        return state.name
    return short_repr(state)


def is_hashable(value: object) -> bool:
    if not isinstance(value, Hashable):
        return False
    try:
        hash(value)
    except TypeError:
        return False
    return True


def make_unit_ref(
    unit: Any,
    name: str,
    config: TaskConfig,
    declared: tuple[Any, ...] | None,
    state: Any,
    table: tuple[Any, ...],
    index: int,
    workflow: str = "",
) -> UnitRef:
    spec = UnitSpec(unit, state, name, table, workflow)
    return UnitRef(unit, name, config, declared, spec, index)
