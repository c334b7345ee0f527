"""A store's contents as a checkpoint, and back.

A checkpoint's ``entries`` mirror the store's index: ``key -> (payload, buffers)`` where the
payload is the value's pickle (bytes, inline in SQLite) or ``("f", digest, nbytes)`` (a data
file), and each out-of-band buffer (a numpy array's data) is a data file.

Change detection is by segment identity: a store segment never changes once written, so a
segment seen at an earlier checkpoint of the run is the data file it was then (0 bytes
written). Only the arrays ``store.array()`` handed out writable can change in place; they
are hashed at every checkpoint, and written only when their hash is new.
"""

from __future__ import annotations

import mmap
from typing import Any

from .._store import WRITABLE_SEGMENTS, SharedStore, Snapshot, driver_store
from .._store import shm as _shm
from .._store.codec import Ref
from .files import DataFiles, content_hash

__all__ = ["Capture", "restore"]

FileRef = tuple[str, str, int]  # ("f", digest, nbytes)


class Capture:
    """Writes the data files of one run's checkpoints; remembers what it wrote."""

    def __init__(self, files: DataFiles) -> None:
        self.files = files
        self._known: dict[str, tuple[str, int]] = {}  # immutable segment path -> digest
        self.written = 0

    def entries(self, snap: Snapshot) -> tuple[dict[str, Any], dict[str, int]]:
        """``(entries, data files they name: digest -> nbytes)``; data files are written
        (the caller holds the files' shared lock until its row commits)."""
        self.written = 0
        refs: dict[str, int] = {}
        out: dict[str, Any] = {}
        for key, (payload, buffers) in snap.index.items():
            p: bytes | FileRef = payload if isinstance(payload, bytes) else self._file(payload)
            bufs = tuple(self._file(r) for r in buffers)
            for f in (p, *bufs):
                if isinstance(f, tuple):
                    refs[f[1]] = f[2]
            out[key] = (p, bufs)
        return out, refs

    def _file(self, ref: Ref) -> FileRef:
        path, nbytes = ref
        writable = path in WRITABLE_SEGMENTS
        hit = None if writable else self._known.get(path)
        if hit is not None and self.files.has(hit[0]):
            return ("f", hit[0], nbytes)
        mm = _shm.map_readonly(path, nbytes)
        try:
            view = memoryview(mm)[:nbytes]
            try:
                if writable:  # changes in place: hash first, write only new contents
                    digest = content_hash(view)
                    self.written += self.files.write(digest, view)
                else:
                    digest, n = self.files.write_new(view)
                    self.written += n
                    self._known[path] = (digest, nbytes)
            finally:
                view.release()
        finally:
            mm.close()
        return ("f", digest, nbytes)


def restore(store: SharedStore, files: DataFiles, entries: dict[str, Any]) -> None:
    """Replace ``store``'s contents with a checkpoint's ``entries``."""
    driver = driver_store(store)
    driver.clear()
    for key, (payload, bufs) in entries.items():
        maps: list[tuple[mmap.mmap, memoryview]] = []
        try:
            body = payload if isinstance(payload, bytes) else _view(files, payload, maps)
            driver._put_encoded(key, body, [_view(files, b, maps) for b in bufs])
        finally:
            for mm, view in maps:
                view.release()
                mm.close()


def _view(files: DataFiles, ref: FileRef, maps: list[tuple[mmap.mmap, memoryview]]) -> memoryview:
    mm = files.map(ref[1], ref[2])
    view = memoryview(mm)[: ref[2]]
    maps.append((mm, view))
    return view
