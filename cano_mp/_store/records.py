"""The store's records that cross a process boundary: named in code, plain on the wire.

Driver to worker, once per store version: :class:`SnapshotData`. Worker to driver, once per
successful call: the write log, :data:`LogOp` records — :class:`Put`, :class:`Delete`,
:class:`Append`, :class:`Clear` — in the order the task made them. Encoded values (``enc``)
are ``codec``'s ``(payload, refs)``: large buffers are references to segment files, not bytes.

In code they are ``NamedTuple``s, read by field name and told apart by type
(``isinstance(op, Put)``), never by equality: ``Put(k, e) == Append(k, e)`` is true, as for
any two equal tuples.

On the wire they are plain tuples, made and read only here (:func:`serialise_snapshot`,
:func:`log_to_wire`, :func:`log_from_wire`). Pickle writes a named type as a reference to
its class, which it resolves by importing the class's module on both sides of every message:
~3 µs per message in a warm loop, and enough more in a pool worker between calls that a
200-state chain whose tasks each write one key ran 10-18 % slower than with plain tuples
(paired runs of ``scripts/bench.py``'s chain, with a write added). A plain tuple pickles
with no lookup at all.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from typing import Any, NamedTuple, TypeAlias

from .codec import Encoded

__all__ = [
    "Append",
    "Clear",
    "Delete",
    "Dirs",
    "LogOp",
    "Put",
    "SnapshotData",
    "WireOp",
    "WireSnapshot",
    "log_from_wire",
    "log_to_wire",
    "serialise_snapshot",
]

# A store's segment directories: (on tmpfs, or None when tmpfs is unusable; in the temp dir)
Dirs: TypeAlias = tuple[str | None, str]


class SnapshotData(NamedTuple):
    """What a worker receives for a snapshot: enough to read every value, nothing more.

    Attributes:
        store_uid: the store's id; with ``version``, the worker's cache key.
        version: the store version the snapshot was taken at.
        dirs: the store's segment directories, where the task's own segments go.
        index: key -> encoded value.
    """

    store_uid: str
    version: int
    dirs: Dirs
    index: dict[str, Encoded]  # type: ignore[assignment]  # shadows tuple.index()


class Put(NamedTuple):
    """``store[key] = value``: ``enc`` is the value, encoded in the worker."""

    key: str
    enc: Encoded


class Delete(NamedTuple):
    """``del store[key]``."""

    key: str


class Append(NamedTuple):
    """``store.append(key, item)``: ``enc`` is the item (the driver appends it to the list
    as committed, which other branches may have changed)."""

    key: str
    enc: Encoded


class Clear(NamedTuple):
    """``store.clear()``."""


LogOp: TypeAlias = Put | Delete | Append | Clear


# -- on the wire -----------------------------------------------------------------------------

# A snapshot as a worker receives it: SnapshotData's fields, in order (a SnapshotData is one).
WireSnapshot: TypeAlias = tuple[str, int, Dirs, dict[str, Encoded]]
# A write-log operation on the wire: (its kind's index in _KINDS, *its fields).
WireOp: TypeAlias = tuple[Any, ...]

_KINDS: tuple[type[Put], type[Delete], type[Append], type[Clear]] = (Put, Delete, Append, Clear)
_KIND_INDEX: dict[type, int] = {kind: i for i, kind in enumerate(_KINDS)}


def serialise_snapshot(data: SnapshotData) -> bytes:
    """The bytes a worker receives for a snapshot (once per store version)."""
    return pickle.dumps(tuple(data), protocol=pickle.HIGHEST_PROTOCOL)


def log_to_wire(log: Iterable[LogOp]) -> list[WireOp]:
    """A write log as it crosses to the driver."""
    return [(_KIND_INDEX[type(op)], *op) for op in log]


def log_from_wire(wire: Iterable[WireOp]) -> list[LogOp]:
    """A write log as it came from a worker, named again."""
    return [_KINDS[op[0]]._make(op[1:]) for op in wire]
