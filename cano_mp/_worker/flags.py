"""The flags file: how the driver and a pool worker talk without a message.

One shared file (``_shm.create_writable``: private, in the pool's own directory) holds five
int64 per pool slot::

    offset  field         written by   meaning
    0       CANCEL        driver       the seq of the call to cancel
    8       PROGRESS_SEQ  worker       the seq of the call running now (0: none)
    16      POSITION      worker       the item of a batch chunk it works on (-1: none yet)
    24      STARTED       worker       when that item started (time.monotonic_ns())
    32      SKIP          driver       the seq of a call queued in the worker's pipe
                                       (pre-fed) that was cancelled before it started
    64      OUTCOMES      worker       the outcomes a grouped call has finished so far
                                       (:meth:`CallControl.keep_outcome`), read by the
                                       driver only if the worker dies in that call

OUTCOMES holds the call's seq, a count and a used-bytes field (int64 each), then one record
per finished branch, in order: a 4-byte length and the pickled outcome. The worker writes a
record before it counts it, so a worker killed at any moment leaves only whole records
counted; a record that does not fit (or does not pickle) ends the recording, and the
branches after it are run again. The space is reserved when the file is made (no SIGBUS on
a full tmpfs).

Cancellation is a flag, not a message: :class:`CallControl` (the ``control`` argument of a
call) compares CANCEL with the running call's seq, so a cancelled call notices without
reading its pipe. The driver reads the progress fields with :func:`read_progress` to time
out one item of a chunk and to tell which item a dead worker was running;
``time.monotonic_ns()`` is the same clock in every process of the machine.
"""

from __future__ import annotations

import mmap
import pickle
import secrets
import shutil
import struct
from collections.abc import Callable
from typing import Any

from .._store import shm as _shm

__all__ = [
    "CANCEL",
    "POSITION",
    "PROGRESS_SEQ",
    "SLOT_BYTES",
    "SKIP",
    "OUTCOMES",
    "began",
    "read_outcomes",
    "STARTED",
    "CallControl",
    "FlagsFile",
    "read_progress",
    "request_cancel",
    "request_skip",
    "reset_slot",
]

# Layout of one pool slot in the flags file (byte offsets of int64 fields, then the area of
# a grouped call's outcomes: see the module docstring).
SLOT_BYTES = 32 << 10
CANCEL, PROGRESS_SEQ, POSITION, STARTED, SKIP = 0, 8, 16, 24, 32
OUTCOMES = 64
_RECORDS = OUTCOMES + 24  # after the seq, count and used fields


def reset_slot(flags: mmap.mmap, index: int) -> None:
    """Driver: clear slot ``index`` before a new worker starts on it."""
    struct.pack_into("qqqqq", flags, SLOT_BYTES * index, 0, 0, -1, 0, 0)
    struct.pack_into("q", flags, SLOT_BYTES * index + OUTCOMES, 0)


def request_cancel(flags: mmap.mmap, index: int, seq: int) -> None:
    """Driver: ask call ``seq``, running in slot ``index``, to stop."""
    struct.pack_into("q", flags, SLOT_BYTES * index + CANCEL, seq)


def request_skip(flags: mmap.mmap, index: int, seq: int) -> None:
    """Driver: call ``seq``, queued in slot ``index``'s pipe, must not start. (Should the
    worker have started it already, the driver asks it to stop with :func:`request_cancel`
    once it is the slot's running call.)"""
    struct.pack_into("q", flags, SLOT_BYTES * index + SKIP, seq)


def began(flags: mmap.mmap, index: int, seq: int) -> bool:
    """Driver: whether the worker of slot ``index`` has begun call ``seq``."""
    return bool(struct.unpack_from("q", flags, SLOT_BYTES * index + PROGRESS_SEQ)[0] == seq)


def read_progress(flags: mmap.mmap, index: int, seq: int) -> tuple[int, float] | None:
    """Driver: ``(position, started)`` of the item call ``seq`` works on in slot ``index``
    (``started`` in ``time.monotonic()`` seconds), or ``None``."""
    # The worker writes an item's start before its position, and resets both before it
    # writes a new call's seq. Read seq, position, start, then seq again (a seqlock): a
    # pair from two different calls, or a half-written one, is never returned.
    base = SLOT_BYTES * index
    if struct.unpack_from("q", flags, base + PROGRESS_SEQ)[0] != seq:
        return None
    position = struct.unpack_from("q", flags, base + POSITION)[0]
    started = struct.unpack_from("q", flags, base + STARTED)[0]
    if struct.unpack_from("q", flags, base + PROGRESS_SEQ)[0] != seq:
        return None
    if position == -1:
        return None
    return int(position), started / 1e9  # position < -1: a block (_calls.block_position)


def read_outcomes(flags: mmap.mmap, index: int, seq: int) -> list[Any]:
    """Driver: the outcomes grouped call ``seq`` had finished in slot ``index`` when its
    worker died (in order from its first branch), or ``[]``. Read only once the worker is
    gone: nothing writes them any more."""
    base = SLOT_BYTES * index + OUTCOMES
    kept_seq, count, used = struct.unpack_from("qqq", flags, base)
    if kept_seq != seq or not count > 0 or not 0 <= used <= SLOT_BYTES - _RECORDS:
        return []
    out, at, end = [], SLOT_BYTES * index + _RECORDS, SLOT_BYTES * index + _RECORDS + used
    for _ in range(count):
        if at + 4 > end:
            break
        (n,) = struct.unpack_from("I", flags, at)
        if at + 4 + n > end:
            break
        try:
            out.append(pickle.loads(flags[at + 4 : at + 4 + n]))
        except Exception:  # cannot happen for what the worker wrote: stop, run the rest again
            break
        at += 4 + n
    return out


def _healthy() -> str | None:
    return None


class CallControl:
    """Worker: the ``control`` argument of a call in a pool worker.

    Calling it tells whether the driver asked the running call to stop. ``positions()``
    and ``mark_timed(position, started_ns)`` report the item a batch chunk works on.
    """

    __slots__ = ("_area", "_base", "_kept", "_view", "broken", "seq")

    def __init__(self, view: memoryview, slot: int) -> None:
        self._view = view  # the flags file as int64
        self._base = slot * (SLOT_BYTES // 8)
        self.seq = 0
        start = slot * SLOT_BYTES + _RECORDS
        self._area = view.cast("B")[start : start + SLOT_BYTES - _RECORDS]
        self._kept = -1  # bytes of outcomes kept for this call; -1: not recording
        # Why this process can no longer run tasks safely, or None (the worker's health
        # check): a grouped call stops at the branch that broke it.
        self.broken: Callable[[], str | None] = _healthy

    def keep_outcome(self, position: int, outcome: Any) -> None:
        """Record the outcome of branch ``position`` (0, 1, ... in turn) of the running
        grouped call, for the driver to read should this worker die before its reply."""
        v, b, used = self._view, self._base + OUTCOMES // 8, self._kept
        if position == 0:
            v[b + 1] = 0  # count, then used, then the seq that makes them valid
            v[b + 2] = 0
            v[b] = self.seq
            used = 0
        elif used < 0:
            return  # an earlier record did not fit: the branches after it run again
        try:
            data = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            data = None
        if data is None or used + 4 + len(data) > len(self._area):
            self._kept = -1
            return
        self._area[used : used + 4] = struct.pack("I", len(data))
        self._area[used + 4 : used + 4 + len(data)] = data
        self._kept = used = used + 4 + len(data)
        v[b + 2] = used
        v[b + 1] = position + 1  # counted only once it is all there

    def __call__(self) -> bool:
        return bool(self._view[self._base] == self.seq)

    def begin(self, seq: int) -> None:
        b, v = self._base, self._view
        self.seq = seq
        v[b + 2] = -1
        v[b + 3] = 0
        v[b + 1] = seq

    def skipped(self) -> bool:
        """Whether the driver withdrew the call just begun (see :func:`request_skip`)."""
        return bool(self._view[self._base + 4] == self.seq)

    def end(self) -> None:
        self.seq = 0

    def positions(self) -> memoryview:
        """A one-item view of this slot's position field: ``view[0] = k`` marks item k."""
        return self._view[self._base + 2 : self._base + 3]

    def mark_timed(self, position: int, started_ns: int) -> None:
        # start first: a reader that sees the new position also sees its start
        self._view[self._base + 3] = started_ns
        self._view[self._base + 2] = position


class FlagsFile:
    """A pool's flags file for ``slots`` slots, in a private directory of its own;
    ``close()`` unmaps it and removes the directory."""

    def __init__(self, slots: int) -> None:
        self._dirs = _shm.segment_dirs(f"pool{secrets.token_hex(4)}")
        self.path, self.buf = _shm.create_writable(self._dirs, "flags", SLOT_BYTES * slots)

    def close(self) -> None:
        try:
            self.buf.close()
        except BufferError:  # a view of it still alive: the kernel unmaps it at exit
            pass
        for d in self._dirs:
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
