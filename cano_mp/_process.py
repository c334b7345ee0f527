"""ProcessExecutor: a pool of loky worker processes, one pipe and one call per slot.

::

    submitting threads                      manager thread                 worker processes
    ------------------                      --------------                 ----------------
    submit(call) --idle slot?--> send ("call", seq, ...) on the slot's pipe ----> run fn
          |                                                                          |
          +--no--> pending queue   <--- wait(pipes, sentinels, wake pipe) <--- ("ok", seq, r)
                                        resolve the future; send the next pending call
                                        to the slot; spawn / reap / kill slots

Each slot is one loky process (started with loky's fork+exec context, so it is a fresh
interpreter: no fork-safety issues, cloudpickle for user code) with its own duplex pipe.
Because the driver knows which call runs in which process:

- a worker that dies (segfault, ``os._exit``, SIGKILL, OOM kill) fails only its own call
  (``WorkerDied``); other calls are untouched and the slot is respawned on demand;
- cancelling a call (timeout, a join that no longer needs it, KeyboardInterrupt) sets its
  cooperative flag, then kills that process tree after a grace period, and nothing else.

Why not one shared ``loky.ProcessPoolExecutor``: when one of its workers dies, loky fails
*every* pending and running future and restarts all workers, and it cannot cancel one
running call (loky#176). A pool of one-worker loky executors isolates deaths but pays
loky's queue threads and ~0.3-0.5 ms of dispatch per call. A raw pipe ping-pong to a
loky process costs ~16-30 µs; a whole workflow transition over these pipes (store snapshot,
task, commit) measures ~116 µs against loky's 276 µs ``submit().result()``
(``scripts/bench.py chain``), with per-call isolation kept.

Spawning happens on the manager thread only: workers ask the kernel to kill them when the
thread that started them exits (PR_SET_PDEATHSIG), so that thread must live as long as the
pool does.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import mmap
import os
import secrets
import shutil
import signal
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from loky import cpu_count
from loky.backend.context import get_context

from ._errors import CanoError, ConfigError
from ._executor import CANCELLED, Call, WorkerDied
from ._log import get_logger
from ._store import shm as _shm
from ._store.janitor import run_janitor
from ._worker import (
    CACHE_SIZES,
    CANCEL,
    LRU,
    POSITION,
    PROGRESS_SEQ,
    SLOT_BYTES,
    STARTED,
    worker_main,
)

__all__ = ["ProcessExecutor", "default_workers", "shutdown_shared_pools"]

log = get_logger("cano_mp.executor")

# How long close() waits for workers to exit after ("stop",) before killing them.
STOP_GRACE = 1.0


def _read_progress(flags: mmap.mmap, index: int, seq: int) -> tuple[int, float] | None:
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
    if position < 0:
        return None
    return int(position), started / 1e9


def _emit_remote(payload: dict[str, Any]) -> None:
    """Hand a task's log record from a worker to the driver's logger of the same name."""
    try:
        logger = logging.getLogger(payload["name"])
        if not logger.isEnabledFor(payload["levelno"]):
            return
        tags = payload.pop("cano_tags", {}) or {}
        record = logging.makeLogRecord(payload)
        record.args = None
        item = f" item {tags['item']}," if tags.get("item") is not None else ""
        record.msg = (
            f"[{tags.get('task')} of {tags.get('state')},{item} attempt {tags.get('attempt')}, "
            f"worker {payload.get('process')}] {payload['msg']}"
        )
        for k, v in tags.items():
            setattr(record, k, v)
        record.worker_pid = payload.get("process")
        logger.handle(record)
    except Exception:  # a log record must never break the pool
        log.debug("could not re-emit a worker's log record", exc_info=True)


def _job_of(fut: Future[Any]) -> _Job | None:
    ref: weakref.ref[_Job] | None = getattr(fut, "_cano_job", None)
    return ref() if ref is not None else None


def default_workers() -> int:
    """Usable CPUs: loky's count honours affinity masks and cgroup CPU quotas."""
    return max(1, int(cpu_count()))


@dataclass(eq=False, slots=True, weakref_slot=True)
class _Job:
    call: Call
    future: Future[Any]
    seq: int
    slot: _Slot | None = None
    cancelled: bool = False
    kill_at: float | None = None


@dataclass(eq=False, slots=True)
class _Slot:
    index: int
    process: Any
    conn: Connection
    caches: dict[str, LRU] = field(
        default_factory=lambda: {cat: LRU(size) for cat, size in CACHE_SIZES.items()}
    )
    job: _Job | None = None
    dead: bool = False

    @property
    def pid(self) -> int:
        return int(self.process.pid)


class _Pool:
    def __init__(
        self,
        max_workers: int,
        initializer: Callable[..., Any] | None,
        initargs: tuple[Any, ...],
    ) -> None:
        run_janitor()
        self.max_workers = max_workers
        self._initializer = initializer
        self._initargs = initargs
        self._ctx = get_context("loky")
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._slots: list[_Slot | None] = [None] * max_workers
        self._idle: deque[_Slot] = deque()
        self._pending: deque[_Job] = deque()
        self._spawning = 0
        self._closed = False
        self._broken: str | None = None
        self._want_extra = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._flags_dirs = _shm.segment_dirs(f"pool{secrets.token_hex(4)}")
        self._flags_path, self._flags = _shm.create_writable(
            self._flags_dirs, "flags", SLOT_BYTES * max_workers
        )
        self._owner = _shm.owner_name()
        self._thread = threading.Thread(target=self._loop, name="cano_mp-pool", daemon=True)
        self._thread.start()

    # -- any thread ---------------------------------------------------------------------
    def submit(self, call: Call) -> Future[Any]:
        for blob in call.blobs:
            blob.data()  # serialise before taking a slot: a failure stays the caller's
        fut: Future[Any] = Future()
        job = _Job(call, fut, next(self._seq))
        # Weakly: a finished job is dropped by the pool, and a cycle future <-> job would
        # keep the call's arguments alive until the cyclic garbage collector runs.
        fut._cano_job = weakref.ref(job)  # type: ignore[attr-defined]
        with self._lock:
            if self._closed:
                raise CanoError("this ProcessExecutor is closed")
            if self._broken is not None:
                raise CanoError(f"the worker initializer failed:\n{self._broken}")
            slot = self._idle.pop() if self._idle else None
            if slot is not None:
                self._claim(slot, job)
            else:
                self._pending.append(job)
                self._wake()
        if slot is not None:
            self._send(slot, job)
        return fut

    def cancel(self, fut: Future[Any], grace: float) -> None:
        job = _job_of(fut)
        if job is None or fut.done():
            return
        with self._lock:
            if job.slot is None:
                try:
                    self._pending.remove(job)
                except ValueError:
                    return
                fut.set_result(CANCELLED)
                return
            if job.cancelled:
                return
            job.cancelled = True
            struct.pack_into("q", self._flags, SLOT_BYTES * job.slot.index + CANCEL, job.seq)
            job.kill_at = time.monotonic() + max(0.0, grace)
            self._wake()

    def progress(self, fut: Future[Any]) -> tuple[int, float] | None:
        """``(position, started)`` of the item a running call reports working on."""
        job = _job_of(fut)
        slot = job.slot if job is not None else None
        if job is None or slot is None or fut.done():
            return None
        return _read_progress(self._flags, slot.index, job.seq)

    def warm(self, n: int | None = None) -> None:
        """Start workers now instead of on first use."""
        with self._lock:
            live = sum(1 for s in self._slots if s is not None) + self._spawning
            self._want_extra = max(0, min(n or self.max_workers, self.max_workers) - live)
            self._wake()

    def pids(self) -> list[int]:
        with self._lock:
            return [s.pid for s in self._slots if s is not None and not s.dead]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending)
            self._pending.clear()
            self._wake()
        for job in pending:
            if not job.future.done():
                job.future.set_exception(CanoError("the executor was closed"))
        self._thread.join(timeout=10)
        try:
            self._flags.close()
        except BufferError:
            pass
        for d in self._flags_dirs:
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- internals ----------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # already awake

    def _claim(self, slot: _Slot, job: _Job) -> None:
        slot.job = job
        job.slot = slot

    def _message(self, slot: _Slot, job: _Job) -> tuple[Any, ...]:
        new = []
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
        return ("call", job.seq, job.call.fn, new, keys, job.call.args, level)

    def _send(self, slot: _Slot, job: _Job) -> None:
        try:
            slot.conn.send(self._message(slot, job))
        except (OSError, ValueError) as exc:
            # The worker is gone; the manager thread sees its sentinel and fails the job.
            log.debug("send to worker %s failed: %s", slot.pid, exc)

    def _spawn(self, index: int) -> _Slot:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        struct.pack_into("qqqq", self._flags, SLOT_BYTES * index, 0, 0, -1, 0)
        proc = self._ctx.Process(
            target=worker_main,
            args=(
                child_conn,
                index,
                self._flags_path,
                os.getpid(),
                self._initializer,
                self._initargs,
                self._owner,
            ),
            name=f"cano_mp-worker-{index}",
        )
        proc.start()
        child_conn.close()
        try:
            _shm.record_process_group(proc.pid)  # the worker leads a group of its own
        except OSError as exc:  # pragma: no cover - only crash cleanup depends on it
            log.debug("could not record worker %s's process group: %s", proc.pid, exc)
        return _Slot(index, proc, parent_conn)

    def _loop(self) -> None:
        try:
            self._run_loop()
        except BaseException:  # pragma: no cover - a bug: fail loudly, never hang callers
            log.exception("the cano_mp pool manager thread crashed")
            with self._lock:
                self._broken = "the pool manager thread crashed (see the log)"
                jobs = list(self._pending) + [s.job for s in self._slots if s and s.job]
                self._pending.clear()
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(CanoError(self._broken))

    def _run_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    break
                sends = self._spawn_needed()
            for slot, job in sends:
                self._send(slot, job)
            # Locals of this long-lived frame must not keep the last call (and through it a
            # store snapshot and its shared memory) alive.
            del sends
            slot = job = None  # type: ignore[assignment]
            with self._lock:
                live = [s for s in self._slots if s is not None]
                kill_times = [s.job.kill_at for s in live if s.job is not None and s.job.kill_at]
            waitables: list[Any] = [self._wake_r]
            for s in live:
                waitables.append(s.conn)
                waitables.append(s.process.sentinel)
            timeout = None
            if kill_times:
                timeout = max(0.0, min(kill_times) - time.monotonic())
            ready = wait(waitables, timeout)
            if self._wake_r in ready:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            for s in live:
                if s.conn in ready:
                    self._receive(s)
            for s in live:
                if not s.dead and s.process.sentinel in ready:
                    self._reap(s)
            now = time.monotonic()
            for s in live:
                running = s.job
                if not s.dead and running is not None and running.kill_at is not None:
                    if now >= running.kill_at:
                        self._kill(s)
                        self._reap(s)
        self._shutdown_workers()

    def _spawn_needed(self) -> list[tuple[_Slot, _Job]]:
        # called with the lock held; returns the sends to make once it is released
        sends: list[tuple[_Slot, _Job]] = []
        free = [i for i, s in enumerate(self._slots) if s is None]
        want = len(self._pending) + self._want_extra
        self._want_extra = 0
        for index in free[:want]:
            try:
                slot = self._spawn(index)
            except Exception as exc:
                log.error("could not start a worker process: %s", exc)
                self._broken = f"could not start a worker process: {exc}"
                for job in self._pending:
                    if not job.future.done():
                        job.future.set_exception(CanoError(self._broken))
                self._pending.clear()
                return sends
            self._slots[index] = slot
            if self._pending:
                job = self._pending.popleft()
                self._claim(slot, job)
                sends.append((slot, job))
            else:
                self._idle.append(slot)
        return sends

    def _receive(self, slot: _Slot) -> None:
        try:
            msg = slot.conn.recv()
        except (EOFError, OSError):
            self._reap(slot)
            return
        kind = msg[0]
        if kind == "log":
            _emit_remote(msg[2])
            return
        if kind == "init_error":
            error = CanoError(f"the worker initializer failed:\n{msg[1]}")
            with self._lock:
                self._broken = msg[1]
                job, slot.job = slot.job, None
            log.error("the worker initializer failed:\n%s", msg[1])
            if job is not None and not job.future.done():
                job.future.set_exception(error)
            self._reap(slot)
            self._fail_pending(error)
            return
        with self._lock:
            job = slot.job
            if job is None or job.seq != msg[1]:
                return  # a stale reply: cannot happen with one call per slot
            slot.job = None
            nxt = self._pending.popleft() if self._pending and not self._closed else None
            if nxt is not None:
                self._claim(slot, nxt)
            else:
                self._idle.append(slot)
        if nxt is not None:
            self._send(slot, nxt)
        fut = job.future
        if fut.done():
            return
        if job.cancelled:
            fut.set_result(CANCELLED)
        elif kind == "ok":
            fut.set_result(msg[2])
        else:
            fut.set_exception(CanoError(f"cano_mp worker error:\n{msg[2]}"))

    def _fail_pending(self, exc: BaseException) -> None:
        with self._lock:
            jobs = list(self._pending)
            self._pending.clear()
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(exc)

    def _kill(self, slot: _Slot) -> None:
        # The worker leads its own process group (see worker_main): one killpg stops it and
        # every process its task started, without waiting for any of them.
        _kill_group(slot.pid)
        try:
            os.kill(slot.pid, signal.SIGKILL)  # not yet a group leader: it just started
        except ProcessLookupError:
            pass

    def _reap(self, slot: _Slot) -> None:
        if slot.dead:
            return
        slot.dead = True
        # Until it is joined the worker's pid (its group's id) cannot be reused: kill what
        # its task left running in the group (a subprocess), however the worker ended.
        _kill_group(slot.pid)
        slot.process.join(timeout=5.0)
        exitcode = slot.process.exitcode
        try:
            slot.conn.close()
        except OSError:
            pass
        with self._lock:
            if self._slots[slot.index] is slot:
                self._slots[slot.index] = None
            try:
                self._idle.remove(slot)
            except ValueError:
                pass
            job, slot.job = slot.job, None
        if job is not None and not job.future.done():
            if job.cancelled:
                job.future.set_result(CANCELLED)
            else:
                log.warning(
                    "worker process %s died (exit code %s) while running a call",
                    slot.pid,
                    exitcode,
                )
                died = WorkerDied(exitcode, slot.pid)
                where = _read_progress(self._flags, slot.index, job.seq)
                died.position = where[0] if where is not None else None
                job.future.set_exception(died)

    def _shutdown_workers(self) -> None:
        live = [s for s in self._slots if s is not None]
        for s in live:
            try:
                s.conn.send(("stop",))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + STOP_GRACE
        for s in live:
            s.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if s.process.exitcode is None:
                self._kill(s)
            was_running = s.job
            self._reap(s)
            if was_running is not None and not was_running.future.done():
                was_running.future.set_exception(CanoError("the executor was closed"))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_shared_lock = threading.Lock()
_shared: dict[tuple[Any, ...], _Pool] = {}


def shutdown_shared_pools() -> None:
    """Stop the process-wide pools (run at interpreter exit; tests use it too)."""
    with _shared_lock:
        pools = list(_shared.values())
        _shared.clear()
    for pool in pools:
        pool.close()


atexit.register(shutdown_shared_pools)


class ProcessExecutor:
    """Runs calls in a pool of loky worker processes.

    Args:
        max_workers: pool size; default: the usable CPUs (affinity and cgroup quotas
            honoured).
        initializer: called with ``initargs`` in each worker when it starts.
        reuse: ``True`` (default) shares one process-wide pool between every executor with
            the same arguments; ``False`` owns a private pool, shut down by :meth:`close`
            (or the ``with`` block).

    A worker that dies fails only the call it was running; the pool starts a new worker.
    Workers start on demand; :meth:`warm` starts them ahead of time.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        reuse: bool = True,
    ) -> None:
        if max_workers is not None and (
            isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1
        ):
            raise ConfigError(f"max_workers must be an int >= 1, got {max_workers!r}")
        if initializer is not None and not callable(initializer):
            raise ConfigError(f"initializer must be callable, got {initializer!r}")
        self._max_workers = max_workers or default_workers()
        self._reuse = reuse
        self._key = (self._max_workers, initializer, tuple(initargs))
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._own: _Pool | None = None
        self._closed = False
        if not reuse:
            self._own = _Pool(self._max_workers, initializer, self._initargs)
            weakref.finalize(self, self._own.close)

    def _pool(self) -> _Pool:
        if self._closed:
            raise CanoError("this ProcessExecutor is closed")
        if self._own is not None:
            return self._own
        with _shared_lock:
            pool = _shared.get(self._key)
            if pool is None or pool._closed:
                pool = _Pool(self._max_workers, self._initializer, self._initargs)
                _shared[self._key] = pool
            return pool

    @property
    def max_workers(self) -> int:
        """How many worker processes the pool runs at most."""
        return self._max_workers

    def submit(self, call: Call) -> Future[Any]:
        """Queue ``call``; it runs in the first free worker."""
        return self._pool().submit(call)

    def cancel(self, future: Future[Any], grace: float) -> None:
        """Set the call's cooperative flag; kill its worker after ``grace`` seconds."""
        if self._own is not None:
            self._own.cancel(future, grace)
            return
        with _shared_lock:
            pool = _shared.get(self._key)
        if pool is not None:
            pool.cancel(future, grace)

    def progress(self, future: Future[Any]) -> tuple[int, float] | None:
        """Where a running call is: ``(position, started)`` of the item a batch chunk works
        on (``started`` in ``time.monotonic()`` seconds), or ``None`` (not started, done,
        or not a chunk). Optional for other executors."""
        pool = self._own
        if pool is None:
            with _shared_lock:
                pool = _shared.get(self._key)
        return pool.progress(future) if pool is not None else None

    def warm(self) -> ProcessExecutor:
        """Start every worker now (they otherwise start on first use); returns self."""
        self._pool().warm()
        return self

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers."""
        return self._pool().pids()

    def close(self) -> None:
        """Shut down a private pool (``reuse=False``); a shared pool stays up."""
        if self._closed:
            return
        self._closed = True
        if self._own is not None:
            self._own.close()

    def __enter__(self) -> ProcessExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "shared" if self._reuse else "private"
        return f"ProcessExecutor(max_workers={self._max_workers}, {kind} pool)"
