"""A workflow's registrations frozen for running, and the quota that bounds its pool slots."""

from __future__ import annotations

import enum
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import cloudpickle

from .._calls import UnitSpec
from .._join import JoinConfig
from .._retry import TaskConfig
from .._wire import Blob, short_repr

__all__ = ["Plan", "Quota", "StateEntry", "UnitRef", "describe", "is_hashable", "make_unit_ref"]


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
    key: str,
    workflow: str = "",
) -> UnitRef:
    spec = UnitSpec(unit, state, name, table, workflow)

    def serialise() -> bytes:
        return bytes(cloudpickle.dumps(spec))

    return UnitRef(unit, name, config, declared, spec, Blob(key, spec, "unit", serialise))
