"""A workflow's registrations frozen for running, and the quota that bounds its pool slots."""

from __future__ import annotations

import enum
import functools
import pickle
import threading
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._calls import PackedUnits, UnitSpec
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
    stepped: bool = False  # a SteppedTask (join is None): one call per step
    poll: bool = False  # a PollTask (join is None): one call per poll, asleep in between


@dataclass(eq=False)
class Plan:
    """A workflow's registrations frozen for running (rebuilt when they change)."""

    name: str
    entries: dict[Any, StateEntry]
    exits: frozenset[Any]
    table: tuple[Any, ...]
    compensations: dict[Any, UnitRef] = field(default_factory=dict)  # register(compensate=)
    resources: Mapping[str, Any] | None = None  # the workflow's ResourceSet
    _layout: tuple[tuple[UnitSpec, ...], tuple[Any, ...], bytes] | None = field(
        default=None, init=False, repr=False
    )

    def _units_layout(self) -> tuple[tuple[UnitSpec, ...], tuple[Any, ...], bytes]:
        """``(specs by index, the distinct user objects, the pickled rest)``: what does not
        change between runs (states, names, the state table) is pickled once per plan."""
        if self._layout is None:
            refs = sorted(
                [
                    *(r for e in self.entries.values() for r in e.units),
                    *self.compensations.values(),
                ],
                key=lambda r: r.index,
            )
            position: dict[int, int] = {}
            objects: list[Any] = []
            rows = []
            for r in refs:
                pos = position.setdefault(id(r.unit), len(objects))
                if pos == len(objects):
                    objects.append(r.unit)
                rows.append((pos, r.spec.state, r.spec.name))
            meta = dumps((self.table, self.name, tuple(rows)))
            for r in refs:
                r.spec.resources = self.resources
            # The resources travel with the units (last): pickled once per run with them.
            objects.append(self.resources)
            self._layout = (tuple(r.spec for r in refs), tuple(objects), meta)
        return self._layout

    def freeze(self) -> Frozen:
        """The plan with its units as they are now. Its blob holds the user's task objects,
        pickled when a worker first needs them (one pickle for all: a function registered
        on 200 states is pickled once) and keyed by the hash of the bytes: a run sees
        today's code and globals, and workers get the units again only when they changed."""
        specs, objects, meta = self._units_layout()
        return Frozen(self, Blob(None, specs, "unit", functools.partial(_pack, meta, objects)))


def _pack(meta: bytes, objects: tuple[Any, ...]) -> bytes:
    return pickle.dumps(PackedUnits(meta, dumps(objects)), protocol=pickle.HIGHEST_PROTOCOL)


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
    if type(state) is int and -(10**12) < state < 10**12:
        return repr(state)  # the common case, without reprlib's dispatch
    return short_repr(state)


class Described:
    """``describe(value)``, computed when a handler formats the record (``%s``), not when
    the record is made: lazy formatting for records that no handler prints."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return describe(self.value)

    __repr__ = __str__


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
