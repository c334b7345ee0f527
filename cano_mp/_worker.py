"""The loop that runs in each pool worker process.

Messages on the worker's duplex pipe (one worker per pipe; FIFO both ways)::

    driver -> worker   ("call", seq, fn, new_blobs, blob_keys, args, log_level)
                           new_blobs: [(key, category, bytes)] not yet cached here
                       ("stop",)
    worker -> driver   ("ok", seq, result) | ("exc", seq, text) | ("init_error", text)
                       ("log", seq, record)   any number, while a call runs

Log records a task emits in the worker (at or above the driver's root level, sent with
each call) go to the driver as they happen, tagged with the run, state, task and attempt,
and are handled there by the logger of the same name.

Blob caches are bounded LRUs whose eviction the driver mirrors exactly (same sizes, same
order of use), so the driver always knows what a worker holds without asking.

Cancellation is a flag, not a message: a shared file with four int64 per pool slot; the
driver writes the ``seq`` of the call to cancel in the first, and ``cancelled()`` compares it
with the seq of the running call. The other three are the call's *progress*, written by the
worker: the seq of the running call, the position of the item it works on (batch chunks)
and that item's start (``time.monotonic_ns()``, the same clock in every process). The
driver reads them to time out one item of a chunk and to tell which item a dead worker was
running. SIGINT is ignored (Ctrl-C reaches the whole process group; the driver
decides what stops), and the worker exits when its driver dies (PR_SET_PDEATHSIG, plus a
parent watchdog where that is unavailable).
"""

from __future__ import annotations

import logging
import mmap
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections import OrderedDict
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle

from . import _context
from ._store import shm as _shm

__all__ = [
    "CACHE_SIZES",
    "CANCEL",
    "LRU",
    "POSITION",
    "PROGRESS_SEQ",
    "SLOT_BYTES",
    "STARTED",
    "CallControl",
    "worker_main",
]

# Layout of one pool slot in the flags file (byte offsets of int64 fields).
SLOT_BYTES = 32
CANCEL, PROGRESS_SEQ, POSITION, STARTED = 0, 8, 16, 24

# Per category: how many blobs a worker keeps. Units (tasks) are small and reused across
# runs; snapshots are per store version and rarely reused after the next commit.
CACHE_SIZES = {"unit": 1024, "snapshot": 16}


class LRU:
    """An LRU of keys (and values, on the worker side); the driver mirrors it without values."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[str, Any] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self.items

    def touch(self, key: str) -> Any:
        self.items.move_to_end(key)
        return self.items[key]

    def add(self, key: str, value: Any) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


class CallControl:
    """The ``cancelled`` argument of a call in a pool worker.

    Calling it tells whether the driver asked the running call to stop. ``positions()``
    and ``mark_timed(position, started_ns)`` report the item a batch chunk works on.
    """

    __slots__ = ("_base", "_view", "seq")

    def __init__(self, view: memoryview, slot: int) -> None:
        self._view = view
        self._base = slot * (SLOT_BYTES // 8)
        self.seq = 0

    def __call__(self) -> bool:
        return bool(self._view[self._base] == self.seq)

    def begin(self, seq: int) -> None:
        b, v = self._base, self._view
        self.seq = seq
        v[b + 2] = -1
        v[b + 3] = 0
        v[b + 1] = seq

    def end(self) -> None:
        self.seq = 0

    def positions(self) -> memoryview:
        """A one-item view of this slot's position field: ``view[0] = k`` marks item k."""
        return self._view[self._base + 2 : self._base + 3]

    def mark_timed(self, position: int, started_ns: int) -> None:
        # start first: a reader that sees the new position also sees its start
        self._view[self._base + 3] = started_ns
        self._view[self._base + 2] = position


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


class _Forward(logging.Handler):
    """Sends the worker's log records to the driver (while a call runs)."""

    def __init__(self, send: Any, control: CallControl) -> None:
        super().__init__()
        self._send = send
        self._control = control

    def emit(self, record: logging.LogRecord) -> None:
        tags = _context.log_tags
        if tags is None:
            return  # not from a task
        ctx = getattr(_context._local, "ctx", None)
        if isinstance(ctx, _context._LazyContext):  # a BatchTask item: say which
            tags = {**tags, "item": ctx.build().index}
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        exc_text = record.exc_text
        if record.exc_info and not exc_text:
            exc_text = logging.Formatter().formatException(record.exc_info)
        payload = {
            "name": record.name,
            "levelno": record.levelno,
            "levelname": record.levelname,
            "msg": message,
            "pathname": record.pathname,
            "filename": record.filename,
            "module": record.module,
            "lineno": record.lineno,
            "funcName": record.funcName,
            "created": record.created,
            "msecs": record.msecs,
            "process": record.process,
            "processName": record.processName,
            "thread": record.thread,
            "threadName": record.threadName,
            "exc_text": exc_text,
            "stack_info": record.stack_info,
            "cano_tags": dict(tags),
        }
        try:
            self._send(("log", self._control.seq, payload))
        except Exception:
            pass  # the driver is gone or the record cannot be sent: never break the task


def worker_main(
    conn: Connection,
    slot: int,
    flags_path: str,
    parent: int,
    initializer: Any,
    initargs: tuple[Any, ...],
    owner: str = "",
) -> None:
    """Entry point of a worker process."""
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
    fd = _shm.open_private(flags_path, os.O_RDWR, size=SLOT_BYTES * (slot + 1))
    flags = mmap.mmap(fd, 0)
    os.close(fd)
    control = CallControl(memoryview(flags).cast("q"), slot)

    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException:
            conn.send(("init_error", traceback.format_exc()))
            return

    caches = {cat: LRU(size) for cat, size in CACHE_SIZES.items()}
    recv, raw_send = conn.recv, conn.send
    send_lock = threading.Lock()

    def send(msg: Any) -> None:
        with send_lock:  # task threads may log while the main thread replies
            raw_send(msg)

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(_Forward(send, control))
    while True:
        try:
            msg = recv()
        except (EOFError, OSError):
            return
        if msg[0] != "call":
            return
        _, seq, fn, new_blobs, keys, args, level = msg
        if root.level != level:
            root.setLevel(level)
        for key, category, data in new_blobs:
            try:
                obj = cloudpickle.loads(data)
            except BaseException as exc:
                obj = _BadBlob(key, f"{type(exc).__name__}: {exc}")
            caches[category].add(key, obj)
        objs = [caches[cat].touch(key) for key, cat in keys]
        control.begin(seq)
        try:
            bad = next((o for o in objs if isinstance(o, _BadBlob)), None)
            if bad is not None:
                reply: tuple[Any, ...] = (
                    "exc",
                    seq,
                    f"could not load {bad.key} in the worker: {bad.error}",
                )
            else:
                reply = ("ok", seq, fn(control, *objs, *args))
        except BaseException:
            reply = ("exc", seq, traceback.format_exc())
        control.end()
        try:
            send(reply)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            send(("exc", seq, f"the call's result could not be sent back: {exc}"))
        except (BrokenPipeError, OSError):
            return
    sys.exit(0)
