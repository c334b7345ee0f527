"""A batch chunk's results, back to the driver through shared memory.

A ``BatchTask.process()`` that returns numpy arrays (or anything whose pickle passes large
buffers out of band) should not push them through the pipe as pickles: the worker would
copy them into a pickle, the pipe would copy them twice, and the driver would copy them out
again. Instead, :func:`pack` pickles a chunk's results with protocol 5 and writes every
buffer of at least ``MIN_BYTES`` into **one** segment per chunk (``<token>-r-<pid>-<n>`` in
the store's directories: 0600, ``O_EXCL``, ``pwrite``, tmpfs first), 64-byte aligned;
only the small pickle crosses the pipe.

:func:`unpack`, in the driver, checks and maps that segment (``shm.open_checked``: no
symlink, ours, not writable by others, long enough) **copy-on-write** (``MAP_PRIVATE``),
unlinks it at once, and rebuilds the results over the mapping: zero-copy, and writable like
any array (a write copies only the page it touches, privately). Nothing is left in
``/dev/shm``: the memory goes with the last array over it.

A chunk whose results the driver never takes (cancelled, stopped, the run failed) leaves its
file to :func:`drop` (done-callbacks of stopped chunks) or to the batch's end, which removes
``<token>-r-*`` (``SharedStore._discard``).
"""

from __future__ import annotations

import itertools
import mmap
import os
import pickle
from typing import Any

import cloudpickle

from .shm import _place, _unlink, open_checked

__all__ = ["MIN_BYTES", "RESULTS_TAG", "drop", "inband", "pack", "unpack"]

# Buffers below this stay in the pickle (a segment costs a file and a mapping: ~30 µs).
MIN_BYTES = 64 * 1024
ALIGN = 64
# Result segments are named <token>-r-<pid>-<n>: SharedStore._discard(token + RESULTS_TAG)
# removes a batch's leftovers, never a committed value (those are <token>-<n>).
RESULTS_TAG = "-r"
_seq = itertools.count()
# Segments unpacked in this process, and their bytes: for tests and diagnostics.
counts = {"segments": 0, "bytes": 0}

# What crosses the pipe: the pickle, and the segment (path, size, buffer offsets) or None.
Packed = tuple[bytes, tuple[str, int, tuple[tuple[int, int], ...]] | None]


def pack(value: Any, dirs: tuple[str | None, str], token: str) -> Packed:
    """Pickle ``value``; its large buffers go to one new segment in ``dirs``."""
    bufs: list[memoryview] = []

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < MIN_BYTES:
            return True  # in the pickle
        bufs.append(raw)
        return False

    payload = bytes(cloudpickle.dumps(value, protocol=5, buffer_callback=out_of_band))
    if not bufs:
        return (payload, None)
    spans, at = [], 0
    for raw in bufs:
        spans.append((at, raw.nbytes))
        at += (raw.nbytes + ALIGN - 1) // ALIGN * ALIGN
    end = spans[-1][0] + spans[-1][1]  # the file's size: the last buffer's end
    name = f"{token}{RESULTS_TAG}-{os.getpid()}-{next(_seq)}"

    def make(path: str) -> str:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        try:
            # Written, not mapped: a full tmpfs is an ENOSPC here (handled by _place), never
            # a SIGBUS; no posix_fallocate, which would zero every page before the write.
            for raw, (off, n) in zip(bufs, spans, strict=True):
                done = 0
                while done < n:
                    done += os.pwrite(fd, raw[done:], off + done)
        except BaseException:
            _unlink(path)
            raise
        finally:
            os.close(fd)
        return path

    path = _place(dirs, name, end, make)
    return (payload, (path, end, tuple(spans)))


def unpack(packed: Packed) -> Any:
    """The results :func:`pack` packed: large buffers are copy-on-write mappings of its
    segment, which is unlinked here (checked first; a bad file raises ``StoreError``)."""
    payload, seg = packed
    if seg is None:
        return pickle.loads(payload)
    path, size, spans = seg
    try:
        fd, _st = open_checked(path, size)
        try:
            mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
    finally:
        _unlink(path)
    counts["segments"] += 1
    counts["bytes"] += size
    view = memoryview(mm)
    return pickle.loads(payload, buffers=[view[off : off + n] for off, n in spans])


def drop(packed: Any) -> None:
    """Remove the segment of results nobody will unpack (a stopped chunk's)."""
    if isinstance(packed, tuple) and len(packed) == 2 and packed[1] is not None:
        _unlink(packed[1][0])


def inband(packed: Packed) -> Packed:
    """The same results with every buffer in the pickle: for a Dask worker, whose segment
    files the driver (maybe on another machine) cannot open."""
    if packed[1] is None:
        return packed
    return (bytes(cloudpickle.dumps(unpack(packed), protocol=5)), None)
