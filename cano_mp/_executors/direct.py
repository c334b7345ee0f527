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

__all__ = ["Reader", "readable", "wait_reply", "watch"]


class Reader(Protocol):
    """What :func:`wait_reply` needs of the pool (``Pool``)."""

    def _receive(self, slot: Slot) -> bool: ...
    def _reap(self, slot: Slot) -> None: ...
    def _kill(self, slot: Slot) -> None: ...


def watch(live: list[Slot], wake_fd: int) -> list[Any]:
    """What the manager thread waits on (its lock held): its wake pipe, every live slot's
    sentinel, and the pipes of the slots whose replies no direct call's thread reads (they
    are marked ``watched``)."""
    waitables: list[Any] = [wake_fd]
    for s in live:
        s.watched = not s.direct
        if s.watched:
            waitables.append(s.conn)
        waitables.append(s.process.sentinel)
    return waitables


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
                pool._kill(slot)
                raise
        elif sentinel in ready:
            pool._reap(slot)
        if wake_fd in ready or not ready:
            return  # the run was woken (a cancel), or the timeout passed
