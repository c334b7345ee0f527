"""The store's records that cross a process boundary, each a named type.

Driver to worker, once per store version: :class:`SnapshotData` (pickled once and cached by
the engine, or sent by value by ``byvalue``). Worker to driver, once per successful call: the
write log, a list of :data:`LogOp` — :class:`Put`, :class:`Delete`, :class:`Append`,
:class:`Clear` — in the order the task made them. Encoded values (``enc``) are ``codec``'s
``(payload, refs)``: their large buffers are references to segment files, not bytes.

They are ``NamedTuple``s: as small and as fast to pickle as the plain tuples they replace,
readable by field name, and told apart by type (``isinstance(op, Put)``), never by equality
— ``Put(k, e) == Append(k, e)`` is true, as for any two equal tuples.
"""

from __future__ import annotations

from typing import NamedTuple, TypeAlias

from .codec import Encoded

__all__ = ["Append", "Clear", "Delete", "Dirs", "LogOp", "Put", "SnapshotData"]

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
