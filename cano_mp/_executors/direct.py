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

import math
import select
import time
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any, Protocol

from .slots import Slot

__all__ = ["Reader", "Watch", "readable", "wait_reply"]


class Reader(Protocol):
    """What :func:`wait_reply` needs of the pool (``Pool``)."""

    def _receive(self, slot: Slot) -> bool: ...
    def _reap(self, slot: Slot) -> None: ...


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

    def wait(self, timeout: float | None) -> tuple[bool, list[Slot], list[Slot]]:
        """Wait up to ``timeout`` s: (woken, slots whose pipe is readable, slots whose
        sentinel is). An fd that changed owner (closed, reused) since :meth:`update`
        shows up as its new owner's only once the next turn updates."""
        want, fds, poller = self._want, self._fds, self._poller
        for fd in fds.keys() - want.keys():
            poller.unregister(fd)
        for fd in want.keys() - fds.keys():
            poller.register(fd, select.POLLIN)
        self._fds = want
        ms = None if timeout is None else max(0, math.ceil(timeout * 1e3))
        woken, pipes, sentinels = False, list[Slot](), list[Slot]()
        for fd, _ in poller.poll(ms):
            if fd == self._wake_fd:
                woken = True
            elif (owner := want.get(fd)) is not None:
                (pipes if owner[1] else sentinels).append(owner[0])
        return woken, pipes, sentinels


def readable(conn: Connection) -> bool:
    """Whether a message (or EOF) is waiting on ``conn`` now; raises OSError when closed.
    (``Connection.poll(0)`` builds a selector: ten times the cost.)"""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return bool(poller.poll(0))


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
    lost) and raises."""
    try:
        conn_fd, sentinel = slot.conn.fileno(), slot.process.sentinel
        poller = select.poll()
        for fd in (conn_fd, sentinel, wake_fd):
            poller.register(fd, select.POLLIN)
    except (OSError, ValueError):  # the pipe was just closed: the manager reaps it
        return
    end = None if timeout is None else time.monotonic() + timeout
    while not fut.done() and not slot.dead:
        ms = None if end is None else max(0, math.ceil((end - time.monotonic()) * 1e3))
        ready = {fd for fd, _ in poller.poll(ms)}
        if conn_fd in ready:
            try:
                pool._receive(slot)  # the reply, a log record or the retire notice
            except BaseException:
                slot.kill()
                raise
        elif sentinel in ready:
            pool._reap(slot)
        if wake_fd in ready or not ready:
            return  # the run was woken (a cancel), or the timeout passed
