"""Direct calls: the caller's thread reads its worker's reply (see :mod:`.pool`).

::

    run thread                                  manager thread
    ----------                                  --------------
    submit(Call(direct=True)) -> idle slot      leaves the slot's pipe out of its next wait
      slot.direct = True                        (slot.watched = False), so a reply does not
    wait_reply: poll(pipe, sentinel, wake fd)   wake it; still watches the sentinel
      pipe readable -> receive: the reply
        resolves the future in this thread      a call given to the slot any other way
      sentinel -> reap (fails the call)         (pending, pre-fed) clears slot.direct and
      wake fd (a cancel) or timeout ->          wakes the manager, which watches it again
        hand the slot back to the manager

A thread hand-over costs tens of microseconds on a busy machine: a chain of plain tasks
pays it once per transition without this. Both threads may see the same pipe readable
(the manager's wait may predate the call): whoever reads holds the slot's ``rlock`` and
reads only a message that is there (:func:`readable`), so neither steals the other's
message nor blocks on one already taken, and messages are handled in order.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import threading
import time
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any, Protocol

from .._wire import CANCELLED
from .base import Job
from .slots import PoolJob, Slot

__all__ = ["Reader", "Watch", "readable", "wait_direct", "wait_reply"]


class Reader(Protocol):
    """What :func:`wait_direct` needs of the pool (``Pool``)."""

    _lock: threading.Lock
    _slots: list[Slot | None]

    def _receive(self, slot: Slot) -> bool | None: ...
    def _gone(self, slot: Slot) -> None: ...
    def _wake(self) -> None: ...


# poll() takes at most INT_MAX milliseconds (24.8 days): a longer wait returns then, and
# the caller waits again (a task timeout of 30 days is valid).
_MAX_MS = 2**31 - 1


def poll_ms(timeout: float | None) -> int | None:
    """``timeout`` seconds as ``poll()`` takes it (None: no limit; inf and nan: the most)."""
    if timeout is None:
        return None
    ms = timeout * 1e3
    return max(0, math.ceil(ms)) if ms < _MAX_MS else _MAX_MS


class Watch:
    """The manager thread's wait: one ``select.poll`` kept across its turns, told each turn
    what to watch (``multiprocessing.connection.wait`` builds a selector every time: 7 µs
    of the manager's ~50 per reply). It watches the wake pipe, every live slot's sentinel,
    and the pipes of the slots whose replies no direct call's thread reads (marked
    ``watched``)."""

    def __init__(self, wake_fd: int) -> None:
        self._poller = select.poll()
        self._poller.register(wake_fd, select.POLLIN)
        self._wake_fd = wake_fd
        self._fds: dict[int, tuple[Slot, bool]] = {}  # fd -> (slot, is its pipe)
        self._want: dict[int, tuple[Slot, bool]] = {}

    def update(self, live: list[Slot]) -> None:
        """What to watch this turn (the pool's lock held: ``direct`` and ``dead`` stay)."""
        want: dict[int, tuple[Slot, bool]] = {}
        for s in live:
            s.watched = not s.direct
            if s.dead:
                continue  # its pipe may be closed already: the reaper is at it
            if s.watched:
                want[s.conn.fileno()] = (s, True)
            want[s.process.sentinel] = (s, False)
        self._want = want

    def wait(self, timeout: float | None) -> tuple[list[Slot], list[Slot]]:
        """Wait up to ``timeout`` s, or a wake-up (read off the wake pipe): (slots whose
        pipe is readable, slots whose sentinel is). An fd that changed owner (closed,
        reused) since :meth:`update` shows up as its new owner's once the next turn
        updates."""
        want, fds, poller = self._want, self._fds, self._poller
        for fd in fds.keys() - want.keys():
            poller.unregister(fd)
        for fd in want.keys() - fds.keys():
            poller.register(fd, select.POLLIN)
        self._fds = want
        ms = poll_ms(timeout)
        pipes, sentinels = list[Slot](), list[Slot]()
        for fd, _ in poller.poll(ms):
            if fd == self._wake_fd:
                with contextlib.suppress(BlockingIOError):
                    os.read(fd, 4096)
            elif (owner := want.get(fd)) is not None:
                (pipes if owner[1] else sentinels).append(owner[0])
        return pipes, sentinels


def readable(conn: Connection) -> bool:
    """Whether a message (or EOF) is waiting on ``conn`` now; raises OSError when closed.
    (``Connection.poll(0)`` builds a selector: ten times the cost.)"""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def wait_direct(pool: Reader, fut: Future[Any], timeout: float | None, wake_fd: int | None) -> bool:
    """Wait up to ``timeout`` s in this thread for the direct call behind ``fut`` (it may
    resolve here), or until ``wake_fd`` turns readable. False: not a direct call being run
    (the caller waits its usual way), or ``wake_fd`` None: the caller will not wait this
    way, and the manager takes the call back."""
    job = Job.of(fut)
    if not isinstance(job, PoolJob) or (slot := job.slot) is None:
        return False
    if slot.job is not job or not slot.direct or slot.dead or pool._slots[slot.index] is not slot:
        return False  # (the last: a slot of a pool since closed, whose key was reused)
    try:
        if wake_fd is not None:
            wait_reply(slot, fut, timeout, wake_fd, pool)
    finally:
        if not fut.done():  # the manager waits for it from now on (or it was requeued)
            with pool._lock:
                if slot.job is job:
                    slot.direct = False
            pool._wake()
    return wake_fd is not None


def wait_reply(
    slot: Slot,
    fut: Future[Any],
    timeout: float | None,
    wake_fd: int,
    pool: Reader,
) -> None:
    """Serve ``slot``'s pipe in this thread until ``fut`` resolves, the worker dies, the
    timeout passes or ``wake_fd`` turns readable (``pool`` handles what comes). Cut off
    while reading a message (Ctrl-C, SIGTERM), it kills the worker (the pipe's framing is
    lost) and raises; a reply it had taken and not resolved resolves as cancelled."""
    try:
        conn_fd, sentinel = slot.conn.fileno(), slot.process.sentinel
        poller = select.poll()
        for fd in (conn_fd, sentinel, wake_fd):
            poller.register(fd, select.POLLIN)
    except (OSError, ValueError):  # the pipe was just closed: the manager reaps it
        return
    end = None if timeout is None else time.monotonic() + timeout
    job = Job.of(fut)
    while not fut.done() and not slot.dead:
        ready = {
            fd for fd, _ in poller.poll(poll_ms(None if end is None else end - time.monotonic()))
        }
        if conn_fd in ready:
            try:
                got = pool._receive(slot)  # the reply, a log record or the retire notice
            except BaseException:
                slot.kill()
                if job is not None and slot.job is not job:  # taken here (the read lock)
                    fut.set_result(CANCELLED)  # a JobFuture: a no-op if resolved already
                raise
            if got is None:
                return  # the worker is gone: the manager reaps it
        elif sentinel in ready:
            pool._gone(slot)
            return
        if wake_fd in ready or not ready:
            return  # the run was woken (a cancel), or the timeout passed
