"""The store as a running task sees it: a snapshot, the task's own writes, a write log.

A :class:`TaskStore` is built per call over the snapshot the engine sent (a
``records.SnapshotData``, or its plain tuple when it came over a pipe), in a worker, or in the
driver for inline tasks and a BatchTask's ``load``/``finish``.

Reads come from the overlay of the task's own writes, then the snapshot's index; a segment
is mapped on first read (:class:`_CallMaps`) and its arrays come back read-only, zero-copy.
Writes go to the overlay and to a write log of :mod:`.records` operations; large values
the task writes become segment files named ``<token>-<n>`` in the store's directories, so
that the driver can discard a failed attempt's files by its token.

``_finish(ok)`` ends the call: it unmaps what no value uses, returns the log (compacted:
overwritten puts dropped, their segments freed; in its wire form, ``records.log_to_wire``)
when ``ok``, else deletes every segment the call made and returns nothing. Nothing here
touches the driver's store: the engine commits the log there (``DriverStore._commit``).
"""

from __future__ import annotations

import itertools
import mmap
import os
from typing import TYPE_CHECKING, Any

from .._errors import StoreError, StoreKeyError
from .base import MISSING, SharedStore, Writable, appended, check_key, encode_for
from .codec import Encoded, Ref, all_refs, decode
from .mapcache import current as map_cache
from .records import Append, Clear, Delete, LogOp, Put, WireOp, WireSnapshot, log_to_wire
from .shm import create_writable, map_readonly, write_segment

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["HELD_SEGMENTS", "ReadOnlyStore", "TaskStore"]

_WITH_VALUE = (Put, Append)  # the operations that carry an encoded value

# Segments held in memory instead of in files, by the path a snapshot's index names them
# with: a Dask worker on another machine receives a snapshot's large values by value
# (see ``byvalue``) and serves them from here. Empty in cano_mp's own pool workers.
HELD_SEGMENTS: dict[str, memoryview] = {}


class _CallMaps:
    """Segments mapped during one call; unmapped at its end unless a value still uses them
    or the worker's mapping cache (:mod:`.mapcache`) keeps them for later calls."""

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}
        self._kept: dict[str, mmap.mmap] = {}

    def view(self, ref: Ref) -> memoryview:
        path = ref[0]
        mm = self._maps.get(path)
        if mm is None:
            mm = self._kept.get(path)
        if mm is None:
            held = HELD_SEGMENTS.get(path)
            if held is not None:
                return held[: ref[1]]
            cache = map_cache()
            if cache is None:
                mm = self._maps[path] = map_readonly(path, ref[1])
            else:
                mm, kept = cache.map(path, ref[1])
                (self._kept if kept else self._maps)[path] = mm
        return memoryview(mm)[: ref[1]]

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:
                pass  # the task kept an array on it: unmapped when that array dies
        self._maps.clear()
        self._kept.clear()  # the cache's: never closed here


class TaskStore(SharedStore):
    """The store as a running task sees it: a snapshot plus the task's own writes.

    Reads come from the task's own writes, then the snapshot. Writes are recorded in a write
    log that the engine commits only if the task succeeds.
    """

    def __init__(self, data: WireSnapshot, token: str) -> None:
        super().__init__()
        self._uid, self._version, self._dirs, self._index = data
        self._token = token
        self._overlay: dict[str, Encoded | None] = {}
        self._cleared = False
        self._log: list[LogOp] = []
        self._created: list[str] = []
        self._writable = Writable()
        self._maps = _CallMaps()
        self._seq = itertools.count()
        self._mms: list[mmap.mmap] = []

    def _new_name(self) -> str:
        return f"{self._token}-{next(self._seq)}"

    def _write(self, data: memoryview) -> Ref:
        path = write_segment(self._dirs, self._new_name(), data)
        self._created.append(path)
        return (path, data.nbytes)

    def _enc(self, key: str, value: Any) -> Encoded:
        return encode_for(key, value, self._write, self._writable)

    def _lookup(self, key: str) -> Encoded | None:
        if key in self._overlay:
            return self._overlay[key]
        if self._cleared:
            return None
        return self._index.get(key)

    def put(self, key: str, value: Any) -> None:
        check_key(key)
        enc = self._enc(key, value)
        self._overlay[key] = enc
        self._log.append(Put(key, enc))

    def get(self, key: str, default: Any = None) -> Any:
        check_key(key)
        enc = self._lookup(key)
        if enc is None:
            return default
        return decode(enc, self._maps.view)

    def remove(self, key: str) -> None:
        check_key(key)
        if self._lookup(key) is None:
            raise StoreKeyError(f"no key {key!r} in the store (keys: {self._key_summary()})")
        self._overlay[key] = None
        self._log.append(Delete(key))

    def append(self, key: str, item: Any) -> None:
        check_key(key)
        item_enc = self._enc(key, item)
        current = self.get(key, MISSING)
        self._overlay[key] = self._enc(key, appended(key, current, [item]))
        self._log.append(Append(key, item_enc))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._lookup(key) is not None

    def __len__(self) -> int:
        return len(self.keys())

    def keys(self) -> list[str]:
        base = [] if self._cleared else [k for k in self._index if k not in self._overlay]
        return base + [k for k, v in self._overlay.items() if v is not None]

    def clear(self) -> None:
        self._overlay = {}
        self._cleared = True
        self._log.append(Clear())

    def array(
        self, key: str, shape: int | tuple[int, ...], dtype: npt.DTypeLike = "float64"
    ) -> np.ndarray[Any, Any]:
        check_key(key)
        import numpy as np

        dt = np.dtype(dtype)
        shp = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = int(np.prod(shp, dtype=np.int64)) * dt.itemsize
        path, mm = create_writable(self._dirs, self._new_name(), nbytes)
        self._created.append(path)
        self._mms.append(mm)
        arr: np.ndarray[Any, Any] = np.ndarray(shp, dtype=dt, buffer=mm)
        if nbytes >= 1:
            self._writable.add(mm, (path, nbytes), mm)
        self.put(key, arr)
        return arr

    def close(self) -> None:
        """Tasks do not close the store; this does nothing."""

    @property
    def closed(self) -> bool:
        """Always False: a task's view is open for the whole call."""
        return False

    def __repr__(self) -> str:
        return f"<TaskStore of {self._uid} v{self._version}, {len(self._log)} writes>"

    # -- engine side ------------------------------------------------------------------------
    def _finish(self, ok: bool) -> list[WireOp]:
        """End the call: unmap, free unused segments; return the log (empty on failure),
        ready to cross to the driver."""
        self._maps.close()
        # Never close the task's writable maps: an array the task kept (a global, a cache)
        # would then point at unmapped memory. Dropping them unmaps once no array is left.
        self._mms.clear()
        log = self._compact() if ok else []
        used = {p for op in log if isinstance(op, _WITH_VALUE) for p, _ in all_refs(op.enc)}
        for path in self._created:
            if path not in used:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        return log_to_wire(log)

    def _compact(self) -> list[LogOp]:
        # Only the last put of a key matters when nothing else touched it in between;
        # dropping overwritten puts frees their segments before the commit.
        last_put: dict[str, int] = {}
        for i, op in enumerate(self._log):
            if isinstance(op, Put):
                last_put[op.key] = i
            elif isinstance(op, Clear):
                last_put.clear()
        keep = []
        for i, op in enumerate(self._log):
            if isinstance(op, Put) and last_put.get(op.key, i) != i:
                continue
            keep.append(op)
        return keep


class ReadOnlyStore(TaskStore):
    """A snapshot that refuses writes: what ``BatchTask.process`` sees (through
    ``task_context().store``). Items' results are returned, and written by ``finish``."""

    def _refuse(self) -> StoreError:
        return StoreError(
            "the store is read-only in BatchTask.process(): return the item's result and "
            "write to the store in finish()"
        )

    def put(self, key: str, value: Any) -> None:
        raise self._refuse()

    def remove(self, key: str) -> None:
        raise self._refuse()

    def append(self, key: str, item: Any) -> None:
        raise self._refuse()

    def clear(self) -> None:
        raise self._refuse()

    def array(
        self, key: str, shape: int | tuple[int, ...], dtype: npt.DTypeLike = "float64"
    ) -> np.ndarray[Any, Any]:
        raise self._refuse()

    def __repr__(self) -> str:
        return f"<read-only view of {self._uid} v{self._version}>"
