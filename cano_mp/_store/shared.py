"""The driver's store: the index, its segments, snapshots and commits.

:class:`DriverStore` (what ``SharedStore()`` builds) holds an index ``key -> encoded
value`` (see ``codec``): small values as pickle bytes, large buffers as references to
segment files (see ``shm``), each owned through a ``shm.Segment`` that unlinks its file when
no key and no live snapshot refers to it any more.

A task never sees this object. The engine takes a :class:`Snapshot` (an immutable copy of
the index, cached per store version and serialised once per version for the workers,
``records.serialise_snapshot``); the task runs against a ``view.TaskStore`` over it and hands
back a write log. The engine applies the log with :meth:`DriverStore._commit` only when the
attempt succeeds; otherwise it discards the segments the attempt created
(:func:`discard_segments`, by the attempt's token). Split branches share one snapshot and
their logs are applied in branch-index order.
"""

from __future__ import annotations

import glob
import itertools
import os
import secrets
import shutil
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._errors import ConfigError, StoreError, StoreKeyError
from .base import MISSING, SharedStore, Writable, appended, check_key, encode_for
from .codec import INLINE_PAYLOAD_MAX, Encoded, Ref, all_refs, decode
from .janitor import run_janitor
from .records import (
    Append,
    Clear,
    Delete,
    Dirs,
    Put,
    SnapshotData,
    WireOp,
    log_from_wire,
    serialise_snapshot,
)
from .shm import (
    Segment,
    create_writable,
    read_segment_bytes,
    segment_dirs,
    write_segment,
)

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["WRITABLE_SEGMENTS", "DriverStore", "Snapshot", "discard_segments", "driver_store"]

_uids = itertools.count(1)

# The segments ``SharedStore.array()`` handed out writable: the only ones whose bytes
# can change after they were written (``byvalue`` ships them again with each version).
WRITABLE_SEGMENTS: weakref.WeakValueDictionary[str, Segment] = weakref.WeakValueDictionary()


def _remove_dirs(dirs: Dirs) -> None:
    # A cancelled task may still be writing segments here. Renaming the directory first
    # makes its later writes fail (the path is gone) instead of racing rmtree.
    for d in dirs:
        if d is None:
            continue
        doomed = f"{d}.closed"
        try:
            os.rename(d, doomed)
        except OSError:
            doomed = d
        for _ in range(5):
            shutil.rmtree(doomed, ignore_errors=True)
            if not os.path.exists(doomed):
                break


@dataclass(slots=True, eq=False)
class Snapshot:
    """An immutable view of a store at one version; keeps its segments alive."""

    store_uid: str
    version: int
    dirs: Dirs
    index: dict[str, Encoded]
    keep: tuple[Segment, ...]
    _data: bytes | None = field(default=None, repr=False)
    blob: Any = field(default=None, repr=False)  # the engine's Blob for this snapshot

    @property
    def key(self) -> str:
        """Cache key of this snapshot in a worker."""
        return f"snap:{self.store_uid}:{self.version}"

    def data(self) -> SnapshotData:
        return SnapshotData(self.store_uid, self.version, self.dirs, self.index)

    def serialised(self) -> bytes:
        """The index as bytes for the workers, computed once per store version."""
        if self._data is None:
            self._data = serialise_snapshot(self.data())
        return self._data


class DriverStore(SharedStore):
    """The store itself, in the driver process: what ``SharedStore()`` builds.

    Holds the index and owns the segments. Writes, reads of values, snapshots and commits
    take the store's lock, so threads of the driver may share it; ``_run_lock`` serialises
    runs on one store. ``_take_snapshot``, ``_commit`` and ``_discard`` are the engine's.
    The public methods are documented on :class:`SharedStore`.
    """

    def __init__(self) -> None:
        super().__init__()
        run_janitor()
        self._uid = f"s{next(_uids)}{secrets.token_hex(3)}"
        self._entries: dict[str, tuple[Encoded, tuple[Segment, ...]]] = {}
        self._segments: weakref.WeakValueDictionary[str, Segment] = weakref.WeakValueDictionary()
        self._writable = Writable()
        self._lock = threading.RLock()
        self._version = 0
        self._snapshot: Snapshot | None = None
        self._closed = False
        self._seq = itertools.count()
        self._pending: list[Segment] = []
        self._run_lock = threading.RLock()
        self._dirs = segment_dirs(self._uid)
        self._finalizer = weakref.finalize(self, _remove_dirs, self._dirs)

    # -- segments -------------------------------------------------------------------------
    def _new_name(self) -> str:
        return f"d{next(self._seq)}"

    def _write(self, data: memoryview) -> Ref:
        path = write_segment(self._dirs, self._new_name(), data)
        seg = Segment(path, data.nbytes)
        self._segments[path] = seg
        self._pending.append(seg)
        return (path, data.nbytes)

    def _put_encoded(
        self, key: str, payload: bytes | memoryview, buffers: list[memoryview]
    ) -> None:
        """Store a value given as its pickle and its out-of-band buffers, as ``encode`` would
        have stored it (a checkpoint being restored): buffers into new segments."""
        with self._lock:
            self._check_open()
            try:
                refs = tuple(self._write(b) for b in buffers)
                body: bytes | Ref = (
                    bytes(payload)
                    if len(payload) <= INLINE_PAYLOAD_MAX
                    else self._write(memoryview(payload))
                )
                enc: Encoded = (body, refs)
                self._set(key, (enc, self._adopt(enc)))
            finally:
                self._pending = []

    def _adopt(self, enc: Encoded) -> tuple[Segment, ...]:
        segs = []
        for path, nbytes in all_refs(enc):
            seg = self._segments.get(path)
            if seg is None:
                seg = Segment(path, nbytes)
                self._segments[path] = seg
            segs.append(seg)
        return tuple(segs)

    def _map(self, ref: Ref) -> memoryview:
        seg = self._segments.get(ref[0])
        if seg is None:
            raise StoreError(f"segment {ref[0]} is gone (store closed?)")
        return seg.view()

    def _encode(self, key: str, value: Any) -> tuple[Encoded, tuple[Segment, ...]]:
        self._pending = []
        try:
            enc = encode_for(key, value, self._write, self._writable)
            return enc, self._adopt(enc)
        finally:
            self._pending = []

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("this SharedStore is closed")

    def _set(self, key: str, entry: tuple[Encoded, tuple[Segment, ...]]) -> None:
        self._entries[key] = entry
        self._bump()

    def _bump(self) -> None:
        # A new version: drop the cached snapshot so that it does not keep freed values'
        # segments alive (live snapshots held by running tasks still do).
        self._version += 1
        self._snapshot = None

    # -- the mapping API (documented on SharedStore) ----------------------------------------
    def put(self, key: str, value: Any) -> None:
        check_key(key)
        with self._lock:
            self._check_open()
            self._set(key, self._encode(key, value))

    def get(self, key: str, default: Any = None) -> Any:
        check_key(key)
        with self._lock:
            self._check_open()
            entry = self._entries.get(key)
            if entry is None:
                return default
            return decode(entry[0], self._map)

    def remove(self, key: str) -> None:
        check_key(key)
        with self._lock:
            self._check_open()
            if key not in self._entries:
                raise StoreKeyError(f"no key {key!r} in the store (keys: {self._key_summary()})")
            del self._entries[key]
            self._bump()

    def append(self, key: str, item: Any) -> None:
        check_key(key)
        with self._lock:
            self._check_open()
            current = self.get(key, MISSING)
            self._set(key, self._encode(key, appended(key, current, [item])))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._check_open()
            self._entries = {}
            self._bump()

    def array(
        self, key: str, shape: int | tuple[int, ...], dtype: npt.DTypeLike = "float64"
    ) -> np.ndarray[Any, Any]:
        check_key(key)
        import numpy as np

        with self._lock:
            self._check_open()
            dt = np.dtype(dtype)
            shp = (shape,) if isinstance(shape, int) else tuple(shape)
            nbytes = int(np.prod(shp, dtype=np.int64)) * dt.itemsize
            path, mm = create_writable(self._dirs, self._new_name(), nbytes)
            seg = Segment(path, nbytes, mm)
            self._segments[path] = seg
            WRITABLE_SEGMENTS[path] = seg
            arr: np.ndarray[Any, Any] = np.ndarray(shp, dtype=dt, buffer=mm)
            if nbytes >= 1:
                self._writable.add(mm, (path, nbytes), seg)
            enc, segs = self._encode(key, arr)
            self._set(key, (enc, segs))
            return arr

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._entries = {}
            self._snapshot = None
            for seg in list(self._segments.values()):
                seg.release()
            self._finalizer()

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        if self._closed:
            return "<SharedStore closed>"
        n_shared = sum(1 for e in self._entries.values() if e[1])
        size = sum(s.nbytes for e in self._entries.values() for s in e[1])
        return (
            f"<SharedStore {len(self._entries)} keys, {n_shared} in shared memory "
            f"({_fmt_bytes(size)})>"
        )

    # -- engine side ------------------------------------------------------------------------
    def _take_snapshot(self) -> Snapshot:
        with self._lock:
            self._check_open()
            snap = self._snapshot
            if snap is None or snap.version != self._version:
                index = {k: e[0] for k, e in self._entries.items()}
                keep = tuple(s for e in self._entries.values() for s in e[1])
                snap = Snapshot(self._uid, self._version, self._dirs, index, keep)
                self._snapshot = snap
            return snap

    def _commit(self, log: list[WireOp]) -> None:
        """Apply a successful attempt's write log (as ``TaskStore._finish`` returned it)."""
        if not log:
            return
        with self._lock:
            self._check_open()
            for op in log_from_wire(log):
                match op:
                    case Put(key, enc):
                        self._set(key, (enc, self._adopt(enc)))
                    case Delete(key):
                        if self._entries.pop(key, None) is not None:
                            self._bump()
                    case Append(key, enc):
                        current = self.get(key, MISSING)
                        item = decode(enc, _read_once)
                        self._set(key, self._encode(key, appended(key, current, [item])))
                        # the item was copied into the new list's segments: free its own
                        for path, _ in all_refs(enc):
                            try:
                                os.unlink(path)
                            except FileNotFoundError:
                                pass
                    case Clear():
                        self._entries = {}
                        self._bump()
                    case _:  # pragma: no cover - a bug, not user input
                        raise StoreError(f"unknown write-log operation {op!r}")

    def _discard(self, token: str) -> None:
        """Remove the segments an attempt created (it failed or was cancelled)."""
        discard_segments(self._dirs, token)


def discard_segments(dirs: Dirs, token: str) -> None:
    """Delete the segments named ``<token>-*`` in ``dirs``: an attempt's own files."""
    for d in dirs:
        if d is None:
            continue
        for path in glob.glob(os.path.join(glob.escape(d), glob.escape(token) + "-*")):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _read_once(ref: Ref) -> memoryview:
    return memoryview(read_segment_bytes(ref[0], ref[1]))


def _fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


# SharedStore() builds a DriverStore (as pathlib.Path() builds a PosixPath).
SharedStore._driver = DriverStore


def driver_store(store: SharedStore) -> DriverStore:
    """``store`` as the engine runs a workflow on it: the driver's store, never a task's view."""
    if isinstance(store, DriverStore):
        return store
    raise ConfigError(
        f"a workflow runs on a store made with SharedStore(), not on {store!r}: a task's "
        "store is a view of its run's store, valid during the call only"
    )
