"""worker_main: the loop each pool worker process runs (see the package docstring)."""

from __future__ import annotations

import logging
import mmap
import os
import resource
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle

from .._errors import StoreError
from .._store import mapcache as _mapcache
from .._store import shm as _shm
from .._wire import BlobCache, InitFailed, Raised, RunCall
from .flags import SLOT_BYTES, CallControl
from .logs import ForwardLogs

__all__ = ["worker_main"]

_tuple_new = tuple.__new__


class _BadBlob:
    """Stands in for a blob that could not be unpickled here; using it raises."""

    def __init__(self, key: str, error: str) -> None:
        self.key, self.error = key, error


def _die_with_parent(parent: int) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="cano_mp-parent-watch").start()


def worker_main(
    conn: Connection,
    slot: int,
    flags_path: str,
    parent: int,
    initializer: Any,
    initargs: tuple[Any, ...],
    owner: str = "",
    max_tasks: int | None = None,
    announce: bool = False,
) -> None:
    """Entry point of a worker process; ``announce``: say "ready" once started (a worker
    started ahead by ``warm()``; one started for a call just replies)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A process group of our own: the driver kills it whole when this worker dies or is
    # killed, so what a task started (a subprocess) never outlives it. The variable marks
    # those processes for the janitor, should the driver itself be SIGKILLed.
    try:
        os.setpgid(0, 0)
    except OSError:  # pragma: no cover - already a session leader
        pass
    if owner:
        os.environ[_shm.OWNER_ENV] = owner
    _die_with_parent(parent)
    _mapcache.from_env()  # read-only segment mappings kept across calls
    try:
        fd = _shm.open_private(flags_path, os.O_RDWR, size=SLOT_BYTES * (slot + 1))
    except (OSError, StoreError):
        os._exit(0)  # started as the pool shut down (its files are gone): nothing to do
    flags = mmap.mmap(fd, 0)
    os.close(fd)
    control = CallControl(memoryview(flags).cast("q"), slot)

    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException:
            conn.send(tuple(InitFailed("init_failed", traceback.format_exc())))
            return
    if announce:
        try:
            conn.send(("ready",))  # the pool's warm() waits for this
        except OSError:
            return  # the driver is gone
    _serve(conn, control, max_tasks, Health())
    sys.exit(0)


class Health:
    """What this worker needs to stay usable, as it was at start: its standard fds and its
    resource limits. A task that closes fd 1 or lowers RLIMIT_NOFILE would break every later
    task in this process; after each call's reply the worker compares (~6 µs: three
    ``fstat`` and a few ``getrlimit``) and retires when a task left it unusable — the pool
    starts a fresh one on demand, and runs there a call it had already sent this one."""

    LIMITS = ("RLIMIT_NOFILE", "RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_FSIZE", "RLIMIT_CPU")

    def __init__(self) -> None:
        self.fds = self._fds()
        self.names = [n for n in self.LIMITS if hasattr(resource, n)]
        self.resources = tuple(getattr(resource, n) for n in self.names)
        self.limits = tuple(map(resource.getrlimit, self.resources))

    @staticmethod
    def _fds() -> tuple[int, ...] | None:
        try:
            a, b, c = os.fstat(0), os.fstat(1), os.fstat(2)
        except OSError:
            return None
        return (a.st_dev, a.st_ino, b.st_dev, b.st_ino, c.st_dev, c.st_ino)

    def broken(self) -> str | None:
        """Why this process can no longer serve tasks safely, or None."""
        if self._fds() != self.fds:
            return "its task closed or replaced one of fds 0, 1, 2"
        limits = tuple(map(resource.getrlimit, self.resources))
        if limits != self.limits:
            changed = [
                n
                for n, was, now in zip(self.LIMITS, self.limits, limits, strict=False)
                if was != now
            ]
            return f"its task changed its resource limits ({', '.join(changed)})"
        return None


def _serve(conn: Connection, control: CallControl, max_tasks: int | None, health: Health) -> None:
    """Run calls until the driver says stop, the pipe closes, the worker has run
    ``max_tasks`` calls, or a task left the process unusable (then it exits; the pool
    starts a new worker)."""
    caches = BlobCache.per_category()
    control.broken = health.broken  # a grouped call checks it between its branches
    done = 0
    recv, raw_send = conn.recv, conn.send
    send_lock = threading.Lock()

    def send(msg: tuple[Any, ...]) -> None:
        with send_lock:  # task threads may log while the main thread replies
            raw_send(msg)

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(ForwardLogs(send, control))
    while True:
        try:
            raw = recv()
        except (EOFError, OSError):
            return
        if raw[0] != "call":
            return  # Stop
        msg: RunCall = _tuple_new(RunCall, raw)  # from_wire, less the look-up
        del raw
        if root.level != msg.log_level:
            root.setLevel(msg.log_level)
        for key, category, data in msg.new_blobs:
            try:
                obj = cloudpickle.loads(data)
            except BaseException as exc:
                obj = _BadBlob(key, f"{type(exc).__name__}: {exc}")
            caches[category].add(key, obj)
        objs = [caches[category].touch(key) for key, category in msg.keys]
        seq = msg.seq
        control.begin(seq)
        try:
            # a pre-fed call the driver withdrew while it waited in the pipe: not run
            reply = ("returned", seq, None) if control.skipped() else _run(msg, control, objs)
        except BaseException:
            reply = _raised(seq, traceback.format_exc())
        control.end()
        del msg, objs  # hold no call's arguments while waiting for the next one
        done += 1
        retire = None
        if max_tasks is not None and done >= max_tasks:
            retire = f"it ran its {max_tasks} calls (max_tasks_per_worker)"
        try:
            if retire is not None:  # before the reply: the driver must not send another call
                send(("retire", retire))
            send(reply)
        except OSError:  # the driver is gone
            return
        except (Exception, RecursionError) as exc:  # pickling fails before any byte is sent
            text = f"the call's result could not be sent back: {type(exc).__name__}: {exc}"
            send(_raised(seq, text[:2000]))
        del reply
        # After the reply, off the call's way (~6 µs): the driver may have sent another call
        # meanwhile; a worker that said it retires never begins one, and the driver gives
        # what it never began to another worker.
        if retire is None and (retire := health.broken()) is not None:
            try:
                send(("retire", retire))
            except OSError:
                return
        if retire is not None:
            return  # the pool starts a new worker on demand
        _mapcache.sweep()  # after the reply: drop mappings of deleted segments


def _run(msg: RunCall, control: CallControl, objs: list[Any]) -> tuple[Any, ...]:
    """The reply to ``msg``: a Returned, built as the plain tuple it travels as (the one
    message every call sends: no record constructed only to be taken apart again)."""
    bad = next((o for o in objs if isinstance(o, _BadBlob)), None)
    if bad is not None:
        return _raised(msg.seq, f"could not load {bad.key} in the worker: {bad.error}")
    return ("returned", msg.seq, msg.fn(control, msg.deadline, *objs, *msg.args))


def _raised(seq: int, text: str) -> tuple[Any, ...]:
    return tuple(Raised("raised", seq, text))
