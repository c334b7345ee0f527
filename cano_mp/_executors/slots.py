"""The local pool's slots (see :mod:`.pool`) and its pre-feed rules.

Pre-feed: behind a running call marked ``Call.ahead`` (short and small: BatchTask chunks),
up to :data:`PREFEED` more such calls of the same blobs wait in the slot's pipe, so the
worker starts the next one without waiting for the driver (as ``multiprocessing.Pool``
keeps its task queue fed). A queued call has not started: if its worker dies or retires, it
goes back to the front of the pending queue, not charged (:func:`take_back`); cancelling it
sets the slot's SKIP flag and the worker answers it without running it (should it have
started already, it is cancelled as a running call once it is the slot's first). Messages
reach a pipe in the order their calls were assigned: one thread sends a slot's outbox at a
time (``Pool._flush``). The functions here are bookkeeping, called with the pool's lock
held, except :func:`message` (the slot's sender) and the kills."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from .._log import get_logger
from .._wire import AHEAD_MAX_BYTES, CANCELLED, BlobCache, NewBlob, Stop, WorkerDied
from .base import Job

__all__ = [
    "PREFEED",
    "PoolJob",
    "Slot",
    "fill",
    "flush",
    "jobs_of",
    "stop_all",
    "message",
    "room_ahead",
    "take_back",
]

log = get_logger("cano_mp.executor")

# Calls (Call.ahead) that may wait in a worker's pipe behind the one it runs. One keeps a
# worker busy while the driver answers; more would only unbalance the last chunks.
PREFEED = 1
assert AHEAD_MAX_BYTES * PREFEED < 200 << 10  # queued messages fit a socket's buffer


@dataclass(eq=False, slots=True)
class PoolJob(Job):
    """A call on the local pool; ``slot`` is where it runs or waits in the pipe (``None``:
    still pending); ``grace``: what its cancel gave it, should it start after all."""

    slot: Slot | None = None
    grace: float = 0.0
    prefed: bool = False  # was queued behind another call: its worker may never begin it


@dataclass(eq=False, slots=True)
class Slot:
    index: int
    process: Any
    conn: Connection
    caches: dict[str, BlobCache] = field(default_factory=BlobCache.per_category)
    job: PoolJob | None = None  # the call it runs (or will run first)
    queued: deque[PoolJob] = field(default_factory=deque)  # sent behind it (pre-fed)
    outbox: deque[PoolJob] = field(default_factory=deque)  # assigned, not yet sent
    sending: bool = False  # a thread is sending its outbox (one sender at a time)
    dead: bool = False
    retiring: bool = False  # said it exits after its current call (see _worker.loop)
    ready: bool = False  # said it finished starting (imports, initializer): see warm()
    # Direct calls (Pool.wait_direct): ``direct`` while the last call it was given is one
    # (its caller's thread reads the pipe, so the manager leaves it out of its wait);
    # ``watched``: the manager's current wait includes the pipe. Whoever reads the pipe
    # holds ``rlock`` and reads only what is there: the two never steal or block.
    direct: bool = False
    watched: bool = True
    rlock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def kill_group(self) -> None:
        """SIGKILL the worker's process group: what its task started (a subprocess), and
        the worker unless it has not yet made the group its own."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        """SIGKILL the worker and every process its task started (the worker leads its
        own process group), without waiting for any of them."""
        self.kill_group()
        try:
            os.kill(self.pid, signal.SIGKILL)  # not yet a group leader: it just started
        except ProcessLookupError:
            pass

    def died(self, exitcode: int | None, position: tuple[int, float] | None) -> WorkerDied:
        """The error of the call the worker died in (``position``: the item it was on)."""
        log.warning("worker process %s died (exit code %s) in a call", self.pid, exitcode)
        error = WorkerDied(exitcode, self.pid)
        error.position = position[0] if position is not None else None
        return error


def room_ahead(slots: list[Slot | None], job: PoolJob) -> Slot | None:
    """A busy slot whose pipe may take ``job`` behind its running call, or None (also while
    a worker could still be started: never queue behind a busy one then)."""
    if None in slots:
        return None
    best = None
    for s in slots:
        head = s.job if s is not None else None
        if (
            s is None
            or head is None
            or s.dead
            or s.retiring
            or head.cancelled
            or not head.call.ahead
            or len(s.queued) >= PREFEED
        ):
            continue
        # Only behind a call of the same blobs (the same batch): no blob's bytes in it.
        if head.call.blobs != job.call.blobs:
            continue
        if best is None or len(s.queued) < len(best.queued):
            best = s
    return best


def fill(slot: Slot, pending: deque[PoolJob], ahead: bool) -> tuple[bool, int]:
    """Move calls from the front of ``pending`` to ``slot`` (which has one or pending is
    not empty): a call to run if it has none, then, if ``ahead``, calls to queue behind it
    while both are ``Call.ahead`` of the same blobs. Returns (whether its outbox got calls,
    how many were queued behind a running one)."""
    sent, queued = False, 0
    if slot.job is None:
        job = pending.popleft()
        slot.job, job.slot = job, slot
        slot.direct = False  # a queued call's caller waits for its future: the manager reads
        slot.outbox.append(job)
        sent = True
    head = slot.job
    while (
        ahead
        and pending
        and len(slot.queued) < PREFEED
        and head.call.ahead
        and not head.cancelled
        and pending[0].call.ahead
        and pending[0].call.blobs == head.call.blobs
    ):
        job = pending.popleft()
        slot.queued.append(job)
        job.slot, job.prefed = slot, True
        slot.outbox.append(job)
        sent, queued = True, queued + 1
    return sent, queued


def jobs_of(slot: Slot) -> list[PoolJob]:
    """The calls a slot runs or holds in its pipe."""
    return [j for j in (slot.job, *slot.queued) if j is not None]


def take_back(slot: Slot) -> list[PoolJob]:
    """Empty ``slot`` of the calls it holds that never started (it retires, or died in the
    one before): answer the cancelled ones; return the others, in order, for the pending
    queue."""
    back = []
    for job in jobs_of(slot):
        job.slot = None
        if job.cancelled:
            if not job.future.done():
                job.future.set_result(CANCELLED)
        else:
            back.append(job)
    slot.job = None
    slot.queued.clear()
    slot.outbox.clear()
    return back


def message(slot: Slot, job: PoolJob) -> tuple[Any, ...]:
    """The message that sends ``job`` to ``slot``'s worker: a blob's bytes only the first
    time (the slot's caches mirror the worker's). Called by the slot's one sender."""
    new: list[NewBlob] = []
    keys = []
    for blob in job.call.blobs:
        cache = slot.caches[blob.category]
        if blob.key in cache:
            cache.touch(blob.key)
        else:
            new.append((blob.key, blob.category, blob.data()))
            cache.add(blob.key, None)
        keys.append((blob.key, blob.category))
    level = logging.root.getEffectiveLevel()
    call = job.call
    # A RunCall, built as the plain tuple it travels as (once per call: no record
    # constructed only to be taken apart again); field order as in _wire.RunCall.
    return ("call", job.seq, call.fn, new, keys, call.args, call.deadline, level)


def stop_all(live: list[Slot], grace: float) -> None:
    """Ask every worker of ``live`` to stop, and kill those still there after ``grace``
    seconds (a call still running)."""
    for s in live:
        try:
            s.conn.send(tuple(Stop("stop")))
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + grace
    for s in live:
        s.process.join(timeout=max(0.0, deadline - time.monotonic()))
        if s.process.exitcode is None:
            s.kill()


def flush(slot: Slot, lock: threading.Lock, send: Callable[[Slot, PoolJob], None]) -> None:
    """Send what was assigned to ``slot``, in order (``lock``: the pool's, not held by the
    caller). If another thread is sending to it, that thread sends this too."""
    mine = False
    while True:
        with lock:
            if mine:
                slot.sending = False
            if slot.sending or not slot.outbox:
                return
            slot.sending = mine = True
            jobs = list(slot.outbox)
            slot.outbox.clear()
        try:
            for job in jobs:
                send(slot, job)
        except BaseException:
            with lock:
                slot.sending = False
            raise
        del jobs
