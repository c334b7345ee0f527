"""Blobs and snapshots on their way to a Dask cluster, each shipped once while unchanged.

::

    Blob (a task unit)     <= INLINE_BLOB_MAX: Inline(key, bytes), sent with every call
                           larger: client.scatter once; its future cached by key (LRU)
    Blob (a snapshot)      its index: by value (_byvalue.value_snapshot), inline or
                           scattered, once per store version; each large value scattered
                           once and reused across versions while its segment is unchanged

A cached future whose data Dask lost with a worker is scattered again on next use. The
futures held here keep the data on the cluster; :meth:`Shipper.release` hands them back
for the executor to cancel when it closes.
"""

from __future__ import annotations

import os
import pickle
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .._store.byvalue import read_segment, value_snapshot
from .._wire import BLOB_CACHE_SIZES, Blob, BlobCache
from .remote import Inline

__all__ = ["INLINE_BLOB_MAX", "SNAPSHOT_CACHE", "Shipped", "Shipper"]

# Blobs (a task unit, a snapshot's index) up to this size travel with each call and are
# unpickled once per worker process (cached by key); larger ones are scattered once. A small
# blob costs less inline than as a Dask dependency, and a scatter is a round trip: the first
# run of a 1,000-branch split took 2 s longer with every branch's unit scattered.
INLINE_BLOB_MAX = 16 * 1024
# Stores whose latest snapshot the executor keeps scattered. Each holds cluster memory for
# its large values until it is evicted or the store moves on to a new version.
SNAPSHOT_CACHE = BLOB_CACHE_SIZES["snapshot"]


@dataclass(eq=False, slots=True)
class Shipped:
    """A store's latest snapshot as shipped: its index and its segments' futures."""

    version: int
    dirs: tuple[str | None, str]  # the store's directories: gone once it is closed
    snapshot: Any  # the ValueSnapshot: an Inline, or the future it was scattered to
    segments: tuple[Any, ...]  # futures of the segments' bytes, in the snapshot's order
    names: tuple[str, ...]


def _is_live(fut: Any) -> bool:
    if isinstance(fut, Inline):
        return True
    return fut is not None and fut.status == "finished"


class Shipper:
    """What one DaskExecutor has shipped: task units, snapshots and their segments.

    ``uid`` (the executor's) prefixes every inline key: keys are the engine's, unique in
    this process only, and a Dask worker serves many drivers. Thread-safe.
    """

    def __init__(self, client: Any, uid: str) -> None:
        self._client = client
        self._uid = uid
        self._lock = threading.Lock()
        # task units the executor keeps shipped, as many as a worker keeps unpickled
        self._units = BlobCache(BLOB_CACHE_SIZES["unit"])
        self._snapshots: OrderedDict[str, Shipped] = OrderedDict()
        self._segments: dict[str, Any] = {}  # segment name -> future of its bytes

    def unit(self, blob: Blob) -> Any:
        """The argument that stands for ``blob`` in a call: an Inline, or a Dask future."""
        with self._lock:
            fut = self._units.get(blob.key)
            if _is_live(fut):
                self._units.touch(blob.key)
                return fut
            data = blob.data()
            if len(data) <= INLINE_BLOB_MAX:
                fut = Inline(f"{self._uid}:{blob.key}", blob.category, data)
            else:
                [fut] = self._client.scatter([blob.obj], hash=False)
            self._units.add(blob.key, fut)
            return fut

    def snapshot(self, blob: Blob) -> Shipped:
        """The snapshot ``blob`` as shipped (again, where Dask lost some of it)."""
        data = blob.obj
        uid, version = data.store_uid, data.version
        with self._lock:
            shipped = self._snapshots.get(uid)
            if (
                shipped is not None
                and shipped.version == version
                and _is_live(shipped.snapshot)
                and all(_is_live(f) for f in shipped.segments)
            ):
                self._snapshots.move_to_end(uid)
                return shipped
            shipped = self._ship_snapshot(data, uid, version)
            self._snapshots[uid] = shipped
            self._snapshots.move_to_end(uid)
            self._evict()
            return shipped

    def _ship_snapshot(self, data: Any, uid: str, version: int) -> Shipped:
        snap = value_snapshot(data)
        todo = [
            (name, ref)
            for name, ref in zip(snap.segments, snap.sources, strict=True)
            if not _is_live(self._segments.get(name))
        ]
        pickled = pickle.dumps(snap, protocol=pickle.HIGHEST_PROTOCOL)
        index: Any = None
        payload: list[Any] = []
        if len(pickled) <= INLINE_BLOB_MAX:
            index = Inline(f"{self._uid}:snap:{uid}:{version}", "snapshot", pickled)
        else:
            payload.append(snap)
        payload.extend(read_segment(ref) for _, ref in todo)
        futures = self._client.scatter(payload, hash=False) if payload else []
        if index is None:
            index = futures.pop(0)
        for (name, _), fut in zip(todo, futures, strict=True):
            self._segments[name] = fut
        return Shipped(
            version,
            data.dirs,
            index,
            tuple(self._segments[name] for name in snap.segments),
            snap.segments,
        )

    def _evict(self) -> None:
        while len(self._snapshots) > SNAPSHOT_CACHE:
            self._snapshots.popitem(last=False)
        # A closed store's values are not needed again (its first directory is gone; the
        # second, on disk, exists only once a segment fell back to it).
        closed = [
            u for u, s in self._snapshots.items() if not os.path.isdir(s.dirs[0] or s.dirs[1])
        ]
        for gone in closed:
            del self._snapshots[gone]
        # Segments no cached snapshot names any more: drop them (Dask frees the data once no
        # call that still runs needs it).
        used = {name for s in self._snapshots.values() for name in s.names}
        for name in [n for n in self._segments if n not in used]:
            del self._segments[name]

    def release(self) -> list[Any]:
        """Forget everything shipped; return the Dask futures among it (to cancel)."""
        with self._lock:
            held: list[Any] = list(self._units.items.values())
            held.extend(shipped.snapshot for shipped in self._snapshots.values())
            held.extend(self._segments.values())
            self._units.clear()
            self._snapshots.clear()
            self._segments.clear()
        return [f for f in held if not isinstance(f, Inline)]
