"""A pool worker's read-only segment mappings, kept across calls.

Mapping a segment is cheap; touching its pages the first time is not: a 200 MB array is
51,200 pages, each a page fault in every process and every fresh mapping. A worker keeps the
mappings it made (least recently used first out, within a byte budget), so a task that reads
an unchanged array again reads it at memory speed.

Safety: every read still opens the file ``O_NOFOLLOW`` and checks it with ``fstat``
(``shm.open_checked``: a regular file, ours, not writable by others, long enough), cache hit
or not. A hit is a mapping of the *same file*: same device, inode, size and mtime. While the
cache holds a mapping the kernel keeps that inode alive, so a new file under a reused name
cannot carry the same inode number: it is a miss, never stale data.

Memory: a cached mapping of a segment the driver has since deleted keeps that segment's pages
until the mapping goes. After each call, and every ``IDLE_SWEEP_SECONDS`` while it holds
mappings and has nothing else to do, the worker drops mappings whose file is gone or
replaced (``sweep``, on a background thread: unmapping 200 MB takes tens of ms), and the
budget (bytes, and at most ``MAX_ENTRIES`` mappings: each holds a file descriptor) bounds
what is held at any time.
Nothing is ever unmapped under a live array: evicting only drops the cache's reference, and
the ``mmap`` goes when the last array over it goes.

First touch (opt-in): a new cached mapping of at least ``POPULATE_MIN`` bytes is pre-faulted by a
background thread (``MADV_POPULATE_READ``, Linux 5.14+; batched kernel calls instead of a
fault per page), back to front while the task already runs from the front: a task that
reads a slice does not wait for it, a task that reads it all meets the thread halfway.

Knobs (environment, read when a worker starts): ``CANO_MP_MAP_CACHE_MB`` (the budget per
worker in MiB, default 1024; ``0`` turns the cache off) and ``CANO_MP_MAP_POPULATE``
(``1`` turns pre-faulting on; off by default: on the loaded 2-core VM it bought nothing
measurable and costs CPU beside the task — it may pay where cores are idle).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .shm import open_checked

__all__ = [
    "PREFAULT_CHUNK",
    "POPULATE_MIN",
    "MapCache",
    "address",
    "current",
    "enable",
    "from_env",
    "prefault",
    "stats",
    "sweep",
]

DEFAULT_BUDGET_MB = 1024
MAX_ENTRIES = 128
IDLE_SWEEP_SECONDS = 2.0  # an idle worker holding mappings looks for deleted segments
POPULATE_MIN = 4 * 1024 * 1024
PREFAULT_CHUNK = 2 * 1024 * 1024
_MADV_POPULATE_READ = 22
_MADV_POPULATE_WRITE = 23


class _Entry:
    __slots__ = ("ident", "length", "mm")

    def __init__(self, ident: tuple[int, int, int, int], mm: mmap.mmap, length: int) -> None:
        self.ident, self.mm, self.length = ident, mm, length


class MapCache:
    """Read-only mappings by path, each checked against its file's identity on every use."""

    def __init__(self, budget: int, populate: bool = False, max_entries: int = MAX_ENTRIES) -> None:
        self.budget = budget
        self.max_entries = max_entries  # each mapping holds a file descriptor
        self.populate = populate
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.held = 0
        self.counts = {"hits": 0, "misses": 0, "evictions": 0, "populated": 0}
        self._jobs: queue.SimpleQueue[Callable[[], object]] | None = None
        self._sweep_pending = False

    def map(self, path: str, nbytes: int) -> tuple[mmap.mmap, bool]:
        """``(mapping, kept)``: a read-only mapping of the checked segment at ``path``;
        ``kept`` is False when it did not fit the budget (the caller unmaps it after use)."""
        fd, st = open_checked(path, nbytes)
        try:
            ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            with self._lock:
                entry = self._entries.get(path)
                if entry is not None and entry.ident == ident and entry.length >= nbytes:
                    self._entries.move_to_end(path)
                    self.counts["hits"] += 1
                    return entry.mm, True
            length = max(nbytes, 1)
            mm = mmap.mmap(fd, length, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        dropped: list[_Entry] = []
        with self._lock:
            self.counts["misses"] += 1
            old = self._entries.pop(path, None)
            if old is not None:
                self.held -= old.length
                dropped.append(old)
            kept = length <= self.budget
            if kept:
                self._entries[path] = _Entry(ident, mm, length)
                self.held += length
                while self._entries and (
                    self.held > self.budget or len(self._entries) > self.max_entries
                ):
                    dropped.append(self._entries.popitem(last=False)[1])
                    self.held -= dropped[-1].length
                    self.counts["evictions"] += 1
        if dropped:
            self._later(_Release(dropped))
        if self.populate and kept and length >= POPULATE_MIN:
            self._later(lambda: self._prefault(mm, length))
        return mm, kept

    def sweep(self) -> None:
        """Drop, in the background, the mappings whose file was deleted or replaced: their
        pages go with them (unmapping 200 MB takes tens of ms: never on a call's path)."""
        if self._entries and not self._sweep_pending:
            self._sweep_pending = True  # one at a time: quick calls do not queue up sweeps
            self._later(self.sweep_now)

    def sweep_now(self) -> None:
        self._sweep_pending = False
        with self._lock:
            items = list(self._entries.items())
        dropped = []
        for path, entry in items:
            try:
                st = os.lstat(path)
                same = (st.st_dev, st.st_ino) == entry.ident[:2]
            except OSError:
                same = False
            if not same:
                with self._lock:
                    if self._entries.get(path) is entry:
                        del self._entries[path]
                        self.held -= entry.length
                        self.counts["evictions"] += 1
                        dropped.append(entry)
        del dropped  # never mm.close(): an array may still use it (then it goes with it)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.held = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self.counts, "entries": len(self._entries), "bytes": self.held}

    def _later(self, job: Callable[[], object]) -> None:
        if self._jobs is None:
            self._jobs = queue.SimpleQueue()
            threading.Thread(target=self._run, daemon=True, name="cano_mp-mapcache").start()
        self._jobs.put(job)

    def _run(self) -> None:
        assert self._jobs is not None
        while True:
            try:
                # While it holds mappings, an idle worker still sweeps now and then: a store
                # closed after the last call must not keep its segments' memory until the next.
                job = self._jobs.get(timeout=IDLE_SWEEP_SECONDS if self._entries else None)
            except queue.Empty:
                job = self.sweep_now
            try:
                job()
            except Exception:  # pragma: no cover - pre-faulting and freeing are best-effort
                pass
            del job

    def _prefault(self, mm: mmap.mmap, length: int) -> None:
        """Pre-fault a new mapping, back to front, a chunk at a time: a task reading from
        the front meets this thread halfway, each faulting in half the pages (on a free
        core). ``madvise`` releases the GIL."""
        addr = address(mm, length)
        if addr is None:
            self.populate = False
            return
        end = length
        while end > 0:
            start = max(0, end - PREFAULT_CHUNK)
            if not prefault(addr + start, end - start, write=False):
                if _libc_madvise is False or ctypes.get_errno() == errno.EINVAL:
                    self.populate = False  # no libc madvise, or a kernel before 5.14
                return
            end = start
        self.counts["populated"] += 1


class _Release:
    """Drops mappings on the background thread (the last reference unmaps)."""

    def __init__(self, entries: list[_Entry]) -> None:
        self.entries: list[_Entry] | None = entries

    def __call__(self) -> None:
        self.entries = None


_libc_madvise: Any = None


def address(mm: mmap.mmap, length: int) -> int | None:
    """Where ``mm`` (read-only too) starts in memory, without a copy; None without numpy
    (the one library at hand that hands out a read-only buffer's address)."""
    try:
        import numpy as np
    except ImportError:
        return None
    return int(np.frombuffer(mm, dtype=np.uint8, count=length).__array_interface__["data"][0])


def prefault(address: int, length: int, write: bool) -> bool:
    """``MADV_POPULATE_READ`` / ``_WRITE`` over ``[address, address + length)``: one kernel
    call that maps every page, instead of a page fault per page. False where unsupported."""
    global _libc_madvise
    if _libc_madvise is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).madvise
        except (OSError, AttributeError):
            _libc_madvise = False
            return False
        fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        fn.restype = ctypes.c_int
        _libc_madvise = fn
    if _libc_madvise is False:
        return False
    start = address & ~(mmap.PAGESIZE - 1)
    advice = _MADV_POPULATE_WRITE if write else _MADV_POPULATE_READ
    return bool(_libc_madvise(start, length + address - start, advice) == 0)


_current: MapCache | None = None


def enable(budget: int, populate: bool = False) -> MapCache | None:
    """Use a cache of ``budget`` bytes in this process (``0``: none); return it."""
    global _current
    _current = MapCache(budget, populate) if budget > 0 else None
    return _current


def from_env() -> MapCache | None:
    """Enable the cache as the environment says (see the module docstring): pool workers."""
    raw = os.environ.get("CANO_MP_MAP_CACHE_MB", "").strip()
    try:
        mb = float(raw) if raw else DEFAULT_BUDGET_MB
    except ValueError:
        mb = DEFAULT_BUDGET_MB
    populate = os.environ.get("CANO_MP_MAP_POPULATE", "0").strip() in ("1", "true", "yes")
    return enable(int(max(mb, 0) * 1024 * 1024), populate)


def current() -> MapCache | None:
    return _current


def sweep() -> None:
    if _current is not None:
        _current.sweep()


def stats() -> dict[str, int] | None:
    """This process's cache counters (hits, misses, evictions, populated, entries, bytes),
    or None when it has no cache. For tests and diagnostics."""
    return _current.stats() if _current is not None else None
