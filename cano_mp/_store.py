"""SharedStore: the key-value state shared by the driver and the workers.

Driver side, :class:`SharedStore` holds an index ``key -> encoded value`` (see ``_codec``):
small values as pickle bytes, large buffers as references to segment files (see ``_shm``).

A task never sees the store itself. The engine takes a :class:`Snapshot` (an immutable copy
of the index, cached per store version and serialised once per version for the workers) and
the task runs against a :class:`TaskStore` over it: reads come from the snapshot, writes go
to an overlay (so the task reads its own writes) and to a *write log*. The engine applies the
log with :meth:`SharedStore._commit` only when the attempt succeeds; otherwise the log and
the segments the attempt created are discarded. Split branches share one snapshot and their
logs are applied in branch-index order.
"""

from __future__ import annotations

import glob
import itertools
import mmap
import os
import pickle
import secrets
import shutil
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, overload

from . import _shm
from ._codec import INLINE_PAYLOAD_MAX, Encoded, Ref, all_refs, buffer_address, decode, encode
from ._errors import StoreError, StoreKeyError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["LogOp", "SharedStore", "Snapshot", "SnapshotData", "TaskStore"]

T = TypeVar("T")

_uids = itertools.count(1)

# A write-log entry: ("put", key, enc) | ("del", key) | ("append", key, enc) | ("clear",)
LogOp = tuple[Any, ...]
# What a worker receives for a snapshot: (store uid, version, (shm dir, disk dir), index)
SnapshotData = tuple[str, int, tuple[str | None, str], dict[str, Encoded]]

_MISSING: Any = object()

# Segments held in memory instead of in files, by the path a snapshot's index names them
# with: a Dask worker on another machine receives a snapshot's large values by value
# (see ``_byvalue``) and serves them from here. Empty in cano_mp's own pool workers.
HELD_SEGMENTS: dict[str, memoryview] = {}

# The segments ``SharedStore.array()`` handed out writable: the only ones whose bytes
# can change after they were written (``_byvalue`` ships them again with each version).
WRITABLE_SEGMENTS: weakref.WeakValueDictionary[str, _shm.Segment] = weakref.WeakValueDictionary()


def _check_key(key: object) -> str:
    if not isinstance(key, str):
        raise StoreError(f"store keys must be str, got {type(key).__name__} {key!r}")
    return key


def _encode_for(key: str, value: Any, write: Any, known: Any) -> Encoded:
    try:
        return encode(value, write, known)
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(
            f"cannot store {key!r}: {type(value).__name__} value cannot be pickled ({exc}); "
            "store plain data (numbers, str, lists, dicts, numpy arrays) or make it picklable"
        ) from exc


def _remove_dirs(dirs: tuple[str | None, str]) -> None:
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
    dirs: tuple[str | None, str]
    index: dict[str, Encoded]
    keep: tuple[_shm.Segment, ...]
    _data: bytes | None = field(default=None, repr=False)
    blob: Any = field(default=None, repr=False)  # the engine's Blob for this snapshot

    @property
    def key(self) -> str:
        """Cache key of this snapshot in a worker."""
        return f"snap:{self.store_uid}:{self.version}"

    def data(self) -> SnapshotData:
        return (self.store_uid, self.version, self.dirs, self.index)

    def serialised(self) -> bytes:
        """The index as bytes for the workers, computed once per store version."""
        if self._data is None:
            self._data = pickle.dumps(self.data(), protocol=pickle.HIGHEST_PROTOCOL)
        return self._data


class _Writable:
    """Writable segments handed out by ``array()``, found again by buffer address."""

    def __init__(self) -> None:
        self._by_addr: dict[int, tuple[int, Ref, weakref.ref[Any]]] = {}

    def add(self, mm: mmap.mmap, ref: Ref, owner: Any) -> None:
        addr = buffer_address(memoryview(mm))
        if addr is not None:
            self._by_addr[addr] = (ref[1], ref, weakref.ref(owner))

    def lookup(self, view: memoryview) -> Ref | None:
        addr = buffer_address(view)
        if addr is None:
            return None
        hit = self._by_addr.get(addr)
        if hit is None or hit[0] != view.nbytes or hit[2]() is None:
            return None
        return hit[1]


class SharedStore:
    """Key-value state shared by the driver and the pool's workers.

    Keys are ``str``. Values are pickled when put (a value that cannot be pickled fails at
    once with :class:`StoreError`); large buffers — numpy arrays and anything pickle
    protocol 5 passes out of band — live in shared memory and are read in workers without
    copying, as read-only arrays::

        with SharedStore() as store:
            store["rows"] = np.arange(10_000_000.0)
            out = store.array("out", (100, 100), "float64")   # writable, in shared memory
            flow.orchestrate(store=store)

    Tasks see a snapshot taken when they start; their writes count only if they succeed.
    ``close()`` (or leaving the ``with`` block) releases all shared memory; so does
    interpreter exit.
    """

    def __init__(self) -> None:
        _shm.run_janitor()
        self._uid = f"s{next(_uids)}{secrets.token_hex(3)}"
        self._entries: dict[str, tuple[Encoded, tuple[_shm.Segment, ...]]] = {}
        self._segments: weakref.WeakValueDictionary[str, _shm.Segment] = (
            weakref.WeakValueDictionary()
        )
        self._writable = _Writable()
        self._lock = threading.RLock()
        self._version = 0
        self._snapshot: Snapshot | None = None
        self._closed = False
        self._seq = itertools.count()
        self._pending: list[_shm.Segment] = []
        self._run_lock = threading.RLock()
        self._dirs = _shm.segment_dirs(self._uid)
        self._finalizer = weakref.finalize(self, _remove_dirs, self._dirs)

    # -- segments -------------------------------------------------------------------------
    def _new_name(self) -> str:
        return f"d{next(self._seq)}"

    def _write(self, data: memoryview) -> Ref:
        path = _shm.write_segment(self._dirs, self._new_name(), data)
        seg = _shm.Segment(path, data.nbytes)
        self._segments[path] = seg
        self._pending.append(seg)
        return (path, data.nbytes)

    def _adopt(self, enc: Encoded) -> tuple[_shm.Segment, ...]:
        segs = []
        for path, nbytes in all_refs(enc):
            seg = self._segments.get(path)
            if seg is None:
                seg = _shm.Segment(path, nbytes)
                self._segments[path] = seg
            segs.append(seg)
        return tuple(segs)

    def _map(self, ref: Ref) -> memoryview:
        seg = self._segments.get(ref[0])
        if seg is None:
            raise StoreError(f"segment {ref[0]} is gone (store closed?)")
        return seg.view()

    def _encode(self, key: str, value: Any) -> tuple[Encoded, tuple[_shm.Segment, ...]]:
        self._pending = []
        try:
            enc = _encode_for(key, value, self._write, self._writable.lookup)
            return enc, self._adopt(enc)
        finally:
            self._pending = []

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("this SharedStore is closed")

    def _set(self, key: str, entry: tuple[Encoded, tuple[_shm.Segment, ...]]) -> None:
        self._entries[key] = entry
        self._bump()

    def _bump(self) -> None:
        # A new version: drop the cached snapshot so that it does not keep freed values'
        # segments alive (live snapshots held by running tasks still do).
        self._version += 1
        self._snapshot = None

    # -- the mapping API --------------------------------------------------------------------
    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key`` (replacing what was there)."""
        _check_key(key)
        with self._lock:
            self._check_open()
            self._set(key, self._encode(key, value))

    def __setitem__(self, key: str, value: Any) -> None:
        self.put(key, value)

    @overload
    def get(self, key: str) -> Any: ...
    @overload
    def get(self, key: str, default: T) -> Any | T: ...

    def get(self, key: str, default: Any = None) -> Any:
        """The value under ``key``, or ``default`` when absent.

        Every call returns a fresh copy of small values; arrays in shared memory come back
        as read-only views (no copy).
        """
        _check_key(key)
        with self._lock:
            self._check_open()
            entry = self._entries.get(key)
            if entry is None:
                return default
            return decode(entry[0], self._map)

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise StoreKeyError(f"no key {key!r} in the store (keys: {self._key_summary()})")
        return value

    def _key_summary(self) -> str:
        keys = sorted(self.keys())
        shown = ", ".join(repr(k) for k in keys[:10])
        return shown + (f", ... {len(keys) - 10} more" if len(keys) > 10 else "") or "none"

    def remove(self, key: str) -> None:
        """Delete ``key``; a missing key raises :class:`StoreKeyError`."""
        _check_key(key)
        with self._lock:
            self._check_open()
            if key not in self._entries:
                raise StoreKeyError(f"no key {key!r} in the store (keys: {self._key_summary()})")
            del self._entries[key]
            self._bump()

    def __delitem__(self, key: str) -> None:
        self.remove(key)

    def append(self, key: str, item: Any) -> None:
        """Append ``item`` to the list under ``key``, creating the list when absent."""
        _check_key(key)
        with self._lock:
            self._check_open()
            current = self.get(key, _MISSING)
            self._set(key, self._encode(key, _appended(key, current, [item])))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def keys(self) -> list[str]:
        """The keys, in insertion order."""
        return list(self._entries)

    def clear(self) -> None:
        """Remove every key (shared memory no snapshot uses is released at once)."""
        with self._lock:
            self._check_open()
            self._entries = {}
            self._bump()

    def array(
        self, key: str, shape: int | tuple[int, ...], dtype: npt.DTypeLike = "float64"
    ) -> np.ndarray[Any, Any]:
        """Allocate a zero-filled writable numpy array in shared memory, stored under ``key``.

        Fill it in place; tasks that start afterwards read it without copying. Writes made
        to it after a task started are visible to that task (the array is shared, not
        snapshotted).
        """
        _check_key(key)
        import numpy as np

        with self._lock:
            self._check_open()
            dt = np.dtype(dtype)
            shp = (shape,) if isinstance(shape, int) else tuple(shape)
            nbytes = int(np.prod(shp, dtype=np.int64)) * dt.itemsize
            path, mm = _shm.create_writable(self._dirs, self._new_name(), nbytes)
            seg = _shm.Segment(path, nbytes, mm)
            self._segments[path] = seg
            WRITABLE_SEGMENTS[path] = seg
            arr: np.ndarray[Any, Any] = np.ndarray(shp, dtype=dt, buffer=mm)
            if nbytes >= 1:
                self._writable.add(mm, (path, nbytes), seg)
            enc, segs = self._encode(key, arr)
            self._set(key, (enc, segs))
            return arr

    def close(self) -> None:
        """Release all shared memory of this store; idempotent. The store is unusable after."""
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
        """True after :meth:`close`."""
        return self._closed

    def __enter__(self) -> SharedStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> Any:
        raise StoreError(
            "a SharedStore cannot be pickled into a task: tasks receive the store as their "
            "argument (run(self, store)); read what you need from it there"
        )

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

    def _commit(self, log: list[LogOp]) -> None:
        """Apply a successful attempt's write log."""
        if not log:
            return
        with self._lock:
            self._check_open()
            for op in log:
                kind = op[0]
                if kind == "put":
                    self._set(op[1], (op[2], self._adopt(op[2])))
                elif kind == "del":
                    if self._entries.pop(op[1], None) is not None:
                        self._bump()
                elif kind == "append":
                    key = op[1]
                    current = self.get(key, _MISSING)
                    item = decode(op[2], _read_once)
                    self._set(key, self._encode(key, _appended(key, current, [item])))
                    # the item was copied into the new list's segments: free its own
                    for path, _ in all_refs(op[2]):
                        try:
                            os.unlink(path)
                        except FileNotFoundError:
                            pass
                elif kind == "clear":
                    self._entries = {}
                    self._bump()
                else:  # pragma: no cover - a bug, not user input
                    raise StoreError(f"unknown write-log operation {kind!r}")

    def _discard(self, token: str) -> None:
        """Remove the segments an attempt created (it failed or was cancelled)."""
        discard_segments(self._dirs, token)

    # -- checkpoints (cano_mp._checkpoint) ----------------------------------------------------
    def _put_encoded(
        self, key: str, payload: bytes | memoryview, buffers: list[memoryview]
    ) -> None:
        """Store a value given as its pickle and its out-of-band buffers, as ``encode`` would
        have stored it (a checkpoint being restored): buffers into new segments."""
        with self._lock:
            self._check_open()
            try:
                refs = tuple(self._write(b) for b in buffers)
                body = (
                    bytes(payload)
                    if len(payload) <= INLINE_PAYLOAD_MAX
                    else self._write(memoryview(payload))
                )
                enc: Encoded = (body, refs)
                self._set(key, (enc, self._adopt(enc)))
            finally:
                self._pending = []


def discard_segments(dirs: tuple[str | None, str], token: str) -> None:
    for d in dirs:
        if d is None:
            continue
        for path in glob.glob(os.path.join(glob.escape(d), glob.escape(token) + "-*")):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _read_once(ref: Ref) -> memoryview:
    return memoryview(_shm.read_segment_bytes(ref[0], ref[1]))


def _appended(key: str, current: Any, items: list[Any]) -> list[Any]:
    if current is _MISSING or current is None:
        return list(items)
    if not isinstance(current, list):
        raise StoreError(
            f"cannot append to {key!r}: it holds a {type(current).__name__}, not a list"
        )
    return [*current, *items]


def _fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


class _CallMaps:
    """Segments mapped during one call; unmapped at its end unless a value still uses them."""

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}

    def view(self, ref: Ref) -> memoryview:
        mm = self._maps.get(ref[0])
        if mm is None:
            held = HELD_SEGMENTS.get(ref[0])
            if held is not None:
                return held[: ref[1]]
            mm = _shm.map_readonly(ref[0], ref[1])
            self._maps[ref[0]] = mm
        return memoryview(mm)[: ref[1]]

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:
                pass  # the task kept an array on it: unmapped when that array dies
        self._maps.clear()


class TaskStore(SharedStore):
    """The store as a running task sees it: a snapshot plus the task's own writes.

    Reads come from the task's own writes, then the snapshot. Writes are recorded in a write
    log that the engine commits only if the task succeeds.
    """

    def __init__(self, data: SnapshotData, token: str) -> None:
        self._uid, self._version, self._dirs, self._index = data
        self._token = token
        self._overlay: dict[str, Encoded | None] = {}
        self._cleared = False
        self._log: list[LogOp] = []
        self._created: list[str] = []
        self._writable = _Writable()
        self._maps = _CallMaps()
        self._seq = itertools.count()
        self._lock = threading.RLock()
        self._closed = False
        self._mms: list[mmap.mmap] = []

    def _new_name(self) -> str:
        return f"{self._token}-{next(self._seq)}"

    def _write(self, data: memoryview) -> Ref:
        path = _shm.write_segment(self._dirs, self._new_name(), data)
        self._created.append(path)
        return (path, data.nbytes)

    def _enc(self, key: str, value: Any) -> Encoded:
        return _encode_for(key, value, self._write, self._writable.lookup)

    def _lookup(self, key: str) -> Encoded | None:
        if key in self._overlay:
            return self._overlay[key]
        if self._cleared:
            return None
        return self._index.get(key)

    def put(self, key: str, value: Any) -> None:
        _check_key(key)
        enc = self._enc(key, value)
        self._overlay[key] = enc
        self._log.append(("put", key, enc))

    def get(self, key: str, default: Any = None) -> Any:
        _check_key(key)
        enc = self._lookup(key)
        if enc is None:
            return default
        return decode(enc, self._maps.view)

    def remove(self, key: str) -> None:
        _check_key(key)
        if self._lookup(key) is None:
            raise StoreKeyError(f"no key {key!r} in the store (keys: {self._key_summary()})")
        self._overlay[key] = None
        self._log.append(("del", key))

    def append(self, key: str, item: Any) -> None:
        _check_key(key)
        item_enc = self._enc(key, item)
        current = self.get(key, _MISSING)
        self._overlay[key] = self._enc(key, _appended(key, current, [item]))
        self._log.append(("append", key, item_enc))

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
        self._log.append(("clear",))

    def array(
        self, key: str, shape: int | tuple[int, ...], dtype: npt.DTypeLike = "float64"
    ) -> np.ndarray[Any, Any]:
        _check_key(key)
        import numpy as np

        dt = np.dtype(dtype)
        shp = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = int(np.prod(shp, dtype=np.int64)) * dt.itemsize
        path, mm = _shm.create_writable(self._dirs, self._new_name(), nbytes)
        self._created.append(path)
        self._mms.append(mm)
        arr: np.ndarray[Any, Any] = np.ndarray(shp, dtype=dt, buffer=mm)
        if nbytes >= 1:
            self._writable.add(mm, (path, nbytes), mm)
        self.put(key, arr)
        return arr

    def close(self) -> None:
        """Tasks do not close the store; this does nothing."""

    def __repr__(self) -> str:
        return f"<TaskStore of {self._uid} v{self._version}, {len(self._log)} writes>"

    # -- engine side ------------------------------------------------------------------------
    def _finish(self, ok: bool) -> list[LogOp]:
        """End the call: unmap, free unused segments; return the log (empty on failure)."""
        self._maps.close()
        # Never close the task's writable maps: an array the task kept (a global, a cache)
        # would then point at unmapped memory. Dropping them unmaps once no array is left.
        self._mms.clear()
        log = self._compact() if ok else []
        used = {p for op in log if len(op) == 3 for p, _ in all_refs(op[2])}
        for path in self._created:
            if path not in used:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        return log

    def _compact(self) -> list[LogOp]:
        # Only the last put of a key matters when nothing else touched it in between;
        # dropping overwritten puts frees their segments before the commit.
        last_put: dict[str, int] = {}
        for i, op in enumerate(self._log):
            if op[0] == "put":
                last_put[op[1]] = i
            elif op[0] == "clear":
                last_put.clear()
        keep = []
        for i, op in enumerate(self._log):
            if op[0] == "put" and last_put.get(op[1], i) != i:
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
