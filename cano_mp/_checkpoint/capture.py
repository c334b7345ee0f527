"""A store's contents as a checkpoint, and back.

A checkpoint's ``entries`` mirror the store's index: ``key -> (payload, buffers)`` where the
payload is the value's pickle (bytes, inline in SQLite) or ``("f", name, nbytes)`` (a data
file), and each out-of-band buffer (a numpy array's data) is a data file.

Change detection is by segment identity: a store segment never changes once written, so a
segment seen at an earlier checkpoint of the run (or restored from one) is the data file it
was then (0 bytes written), and a new one is written once under a fresh random name, never
hashed. Only the arrays ``store.array()`` handed out writable can change in place; at every
checkpoint each is compared with the file its last checkpoint wrote and written again (under
a new name) only when it differs.
"""

from __future__ import annotations

import mmap
import os
import threading
from typing import Any

from .._store import WRITABLE_SEGMENTS, SharedStore, Snapshot, driver_store
from .._store import shm as _shm
from .._store.codec import Ref
from .._store.mapcache import POPULATE_MIN, PREFAULT_CHUNK, address, prefault
from .files import DataFiles

__all__ = ["Capture", "restore"]

_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)

FileRef = tuple[str, str, int]  # ("f", digest, nbytes)


class Capture:
    """Writes the data files of one run's checkpoints; remembers what it wrote."""

    def __init__(self, files: DataFiles) -> None:
        self.files = files
        # segment path -> the data file that holds it (for a writable array: its last one)
        self._known: dict[str, str] = {}
        self.written = 0

    def entries(self, snap: Snapshot) -> tuple[dict[str, Any], dict[str, int]]:
        """``(entries, data files they name: name -> nbytes)``; data files are written
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

    def learn(self, snap: Snapshot, entries: dict[str, Any]) -> None:
        """``snap`` is the store just restored from ``entries``: its segments are those data
        files already (a resumed run does not write its data again)."""
        for key, (payload, buffers) in snap.index.items():
            saved = entries.get(key)
            if saved is None:
                continue
            pairs = [(payload, saved[0]), *zip(buffers, saved[1], strict=False)]
            for ref, fref in pairs:
                if isinstance(ref, tuple) and isinstance(fref, tuple) and ref[1] == fref[2]:
                    if ref[0] not in WRITABLE_SEGMENTS:
                        self._known[ref[0]] = fref[1]

    def _file(self, ref: Ref) -> FileRef:
        path, nbytes = ref
        writable = path in WRITABLE_SEGMENTS
        name = self._known.get(path)
        if name is not None and not writable and self.files.has(name):
            return ("f", name, nbytes)
        fd = _shm.open_private(path, size=nbytes)
        try:
            mm, ahead = _map(fd, nbytes)
            try:
                view = memoryview(mm)[:nbytes]
                try:
                    # a writable array changes in place: written only when it differs from
                    # the file its last checkpoint wrote
                    if name is None or not writable or not self.files.same(name, view):
                        name = self.files.new_name()
                        self.written += self.files.write(name, view)
                        self._known[path] = name
                finally:
                    view.release()
            finally:
                if ahead is None:
                    mm.close()
                else:  # unmapping 200 MB takes ~10 ms: not on the run's way
                    ahead.join()
                    threading.Thread(
                        target=_unmap, args=(mm,), name="cano_mp-unmap", daemon=True
                    ).start()
        finally:
            os.close(fd)
        return ("f", name, nbytes)


def _map(fd: int, nbytes: int) -> tuple[mmap.mmap, threading.Thread | None]:
    """A segment mapped to be written out, and the thread faulting it in, if any. Written
    from a fresh map, each 4 KiB page faults on its own: 120 ms for 200 MB here, against
    30-40 for ``np.save`` of a heap array. A thread a step ahead of the writer
    (``MADV_POPULATE_READ``, 2 MB per call, the GIL released) brings it to 37 ms;
    ``MAP_POPULATE`` (all first, in this thread: 46 ms) where that cannot be done."""
    if nbytes >= POPULATE_MIN:
        mm = mmap.mmap(fd, nbytes, prot=mmap.PROT_READ)
        addr = address(mm, nbytes)
        if addr is not None:
            prefault(addr, PREFAULT_CHUNK, write=False)  # the writer's first steps, here
            ahead = threading.Thread(target=_fault_in, args=(addr, nbytes), daemon=True)
            ahead.start()
            return mm, ahead
        mm.close()  # pragma: no cover - numpy is there when arrays are
    return mmap.mmap(fd, max(nbytes, 1), flags=_MAP_FLAGS, prot=mmap.PROT_READ), None


def _unmap(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:  # a view still open (an error path): the map goes with it
        pass


def _fault_in(addr: int, nbytes: int) -> None:
    for start in range(PREFAULT_CHUNK, nbytes, PREFAULT_CHUNK):
        if not prefault(addr + start, min(PREFAULT_CHUNK, nbytes - start), write=False):
            return  # a kernel before 5.14: the writer faults the rest itself


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
