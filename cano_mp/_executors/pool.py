"""The local pool's manager: one thread that owns every worker process and pipe.

::

    submitting threads                      manager thread                 worker processes
    ------------------                      --------------                 ----------------
    submit(call) --idle slot?--> send RunCall(seq, ...) on the slot's pipe -----> run fn
          |                                                                          |
          +--no--> pending queue   <--- wait(pipes, sentinels, wake pipe) <--- Returned(seq, r)
                                        resolve the future; send the next pending call
                                        to the slot; spawn / reap / kill slots

Each slot is one loky process (started with loky's fork+exec context, so it is a fresh
interpreter: no fork-safety issues, cloudpickle for user code) with its own duplex pipe and
one call running at a time. Because the manager knows which call runs in which process, a
worker that dies fails only its own call (``WorkerDied``), and cancelling a call (its
cooperative flag in the flags file, then, after the grace period, a kill of that worker's
process group) touches nothing else.

Pre-feed (``Call.ahead``) keeps a next call waiting in a busy worker's pipe (:mod:`.slots`).
Blob caches are mirrored per slot: a call carries a blob's bytes once per worker. A
direct call (``Call.direct``) given to an idle worker skips the manager: its caller's
thread reads the reply (:mod:`.direct`).

Spawning happens on the manager thread only: workers ask the kernel to kill them when the
thread that started them exits (PR_SET_PDEATHSIG), so that thread must live as long as the
pool does.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import pickle
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from .._errors import CanoError
from .._log import get_logger
from .._store import shm as _shm
from .._store.janitor import run_janitor
from .._wire import CANCELLED, Call, InitFailed, LogMessage, Raised, Returned, from_wire
from .._worker.flags import (
    FlagsFile,
    began,
    read_outcomes,
    read_progress,
    request_cancel,
    request_skip,
    reset_slot,
)
from .._worker.logs import emit_remote
from .base import Job, JobFuture
from .direct import Watch, readable, wait_direct
from .slots import PoolJob, Slot, fill, flush, jobs_of, message, room_ahead, stop_all, take_back
from .start import Backoff, start_slot

__all__ = ["Pool", "PoolJob"]

log = get_logger("cano_mp.executor")

# How long close() waits for workers to exit after Stop before killing them.
STOP_GRACE = 1.0


class Pool:
    """The pool of worker processes behind one or more ``ProcessExecutor`` objects."""

    def __init__(
        self,
        max_workers: int,
        initializer: Callable[..., Any] | None,
        initargs: tuple[Any, ...],
        max_tasks: int | None = None,
        ctx: Any = None,
    ) -> None:
        run_janitor()
        self.max_workers = max_workers
        self._max_tasks = max_tasks
        self._initializer = initializer
        self._initargs = initargs
        self._ctx = ctx  # None: loky's fork+exec, a fresh interpreter per worker; or a
        # forkserver.ForkServerContext (imported only when used)
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)  # a worker got ready or went away
        self._seq = itertools.count(1)
        self._slots: list[Slot | None] = [None] * max_workers
        self._idle: deque[Slot] = deque()
        self._pending: deque[PoolJob] = deque()
        self._closed = False
        self._broken: str | None = None  # the initializer failed: every call would fail
        self._backoff = Backoff()  # after a worker failed to start
        self._want_extra = 0
        # Pre-feed counts: calls queued ahead, withdrawn (cancelled there), sent elsewhere.
        self.prefed = self.withdrawn = self.requeued = 0
        self._wake_lock = threading.Lock()  # after the pool lock, when both are taken
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._watch = Watch(self._wake_r)
        self._flags_file = FlagsFile(max_workers)
        self._flags, self._flags_path = self._flags_file.buf, self._flags_file.path
        self._owner = _shm.owner_name()
        self._thread = threading.Thread(target=self._loop, name="cano_mp-pool", daemon=True)
        self._thread.start()

    # -- any thread ---------------------------------------------------------------------
    def submit(self, call: Call) -> Future[Any]:
        for blob in call.blobs:
            blob.data()  # serialise before taking a slot: a failure stays the caller's
        job = PoolJob(call, JobFuture(), next(self._seq))
        with self._lock:
            if self._closed or self._broken is not None:
                job.future.job = None  # never accepted: leave no cycle behind
                self._check_open()
            slot = self._idle.pop() if self._idle else None
            if slot is not None:
                self._claim(slot, job)
            elif call.ahead and not self._pending and (slot := room_ahead(self._slots, job)):
                slot.queued.append(job)
                job.slot, job.prefed = slot, True
                self.prefed += 1
            else:
                self._pending.append(job)
                self._wake()
            if slot is not None:
                slot.outbox.append(job)
        if slot is not None:
            self._flush(slot)
        return job.future

    def wait_direct(self, fut: Future[Any], timeout: float | None, wake_fd: int | None) -> bool:
        """Wait up to ``timeout`` s for a direct call in this thread: see
        :func:`.direct.wait_direct`."""
        return wait_direct(self, fut, timeout, wake_fd)

    def cancel(self, fut: Future[Any], grace: float) -> None:
        job = Job.of(fut)
        if not isinstance(job, PoolJob) or fut.done():
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
            job.slot.direct = False  # its killer is the manager: it must watch the pipe
            if job.slot.job is not job:  # queued in the pipe: the worker skips it
                self.withdrawn += 1
                job.grace = max(0.0, grace)
                request_skip(self._flags, job.slot.index, job.seq)
                return
            request_cancel(self._flags, job.slot.index, job.seq)
            job.stop_at = time.monotonic() + max(0.0, grace)
            self._wake()

    def progress(self, fut: Future[Any]) -> tuple[int, float] | None:
        """``(position, started)`` of the item a running call reports working on."""
        job = Job.of(fut)
        slot = job.slot if isinstance(job, PoolJob) else None
        if job is None or slot is None or fut.done():
            return None
        return read_progress(self._flags, slot.index, job.seq)

    def warm(self, n: int | None = None, *, wait: bool = True, timeout: float | None = None) -> int:
        """Start workers until ``n`` (default: all) run; ``wait``: until they are ready
        (imports done, initializer run; one that dies is replaced). Returns how many are."""
        want = max(1, min(n or self.max_workers, self.max_workers))
        deadline = time.monotonic() + (math.inf if timeout is None else timeout)
        with self._lock:
            while True:
                self._check_open()
                live = [s for s in self._slots if s is not None and not s.dead]
                ready = sum(1 for s in live if s.ready)
                if want - len(live) > self._want_extra:
                    self._want_extra = want - len(live)
                    self._wake()
                if not wait or ready >= want:
                    return ready
                if time.monotonic() >= deadline:
                    raise CanoError(f"{ready} of {want} workers ready after {timeout}s")
                self._ready.wait(min(deadline - time.monotonic(), 0.5))

    def _check_open(self) -> None:
        if self._closed:
            raise CanoError("this ProcessExecutor is closed")
        if self._broken is not None:
            raise CanoError(f"the worker initializer failed:\n{self._broken}")

    @property
    def closed(self) -> bool:
        return self._closed

    def pids(self) -> list[int]:
        with self._lock:
            return [s.pid for s in self._slots if s is not None and not s.dead]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._ready.notify_all()
            self._wake()
        self._fail_pending(CanoError("the executor was closed"))
        self._thread.join(timeout=10)
        self._flags_file.close()
        with self._wake_lock:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_w = -1
        if self._ctx is not None:
            self._ctx.close()  # the fork server

    # -- internals ----------------------------------------------------------------------
    def _wake(self) -> None:
        with self._wake_lock:  # never a write to the fd number once close() freed it
            if self._wake_w >= 0:
                try:
                    os.write(self._wake_w, b"x")
                except BlockingIOError:
                    pass  # already awake

    def _claim(self, slot: Slot, job: PoolJob) -> None:
        slot.job = job
        job.slot = slot
        slot.direct = job.call.direct
        if not slot.direct and not slot.watched:
            self._wake()  # the manager left this pipe out of its wait (a direct call's)

    def _fill(self, slot: Slot) -> bool:
        """Give ``slot`` pending calls (see :func:`.slots.fill`) or make it idle. Lock held;
        True when its outbox has calls to send."""
        if slot.dead or slot.retiring or self._closed:
            return False
        if slot.job is None and not self._pending:
            self._idle.append(slot)
            return False
        sent, queued = fill(slot, self._pending, None not in self._slots)
        self.prefed += queued
        if not slot.watched:
            self._wake()  # see _claim
        return sent

    def _flush(self, slot: Slot) -> None:
        try:
            flush(slot, self._lock, self._send)
        except BaseException:  # cut off while sending (Ctrl-C): what reached the pipe is unknown
            with self._lock:
                slot.retiring = True  # its calls that never began go to other workers
            slot.kill()
            raise

    def _send(self, slot: Slot, job: PoolJob) -> None:
        try:
            slot.conn.send(message(slot, job))
        except (OSError, ValueError) as exc:
            # The worker is gone; the manager thread sees its sentinel and fails the job.
            log.debug("send to worker %s failed: %s", slot.pid, exc)

    def _spawn(self, index: int, announce: bool) -> Slot:
        reset_slot(self._flags, index)
        setup = (self._initializer, self._initargs, self._owner, self._max_tasks, announce)
        return start_slot(self._ctx, index, self._flags_path, setup)

    def _loop(self) -> None:
        try:
            self._run_loop()
        except BaseException:  # pragma: no cover - a bug: fail loudly, never hang callers
            log.exception("the cano_mp pool manager thread crashed")
            with self._lock:
                self._broken = "the pool manager thread crashed (see the log)"
                self._pending.extend(j for s in self._slots if s for j in jobs_of(s))
            self._fail_pending(CanoError(self._broken))

    def _run_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    break
                sends = self._spawn_needed()
            for slot in sends:
                self._flush(slot)
            # Locals of this long-lived frame must not keep the last call (and through it a
            # store snapshot and its shared memory) alive.
            del sends
            slot = None  # type: ignore[assignment]
            with self._lock:
                live = [s for s in self._slots if s is not None]
                self._watch.update(live)
                heads = (s.job for s in live if not s.dead)  # (no local of this frame keeps
                kill_times = [j.stop_at for j in heads if j is not None and j.stop_at]  # a call)
                if self._pending and self._backoff.until and len(live) < self.max_workers:
                    kill_times.append(self._backoff.until)  # try starting a worker again then
            timeout = None
            if kill_times:
                timeout = max(0.0, min(kill_times) - time.monotonic())
            pipes, sentinels = self._watch.wait(timeout)
            for s in pipes:
                if not s.direct:  # else its run thread reads it (the turn's list was older)
                    self._receive(s)
            for s in sentinels:
                self._reap(s)
            self._expire(live)
        self._shutdown_workers()

    def _expire(self, live: list[Slot]) -> None:
        """Kill the workers whose cancelled call's grace period is over."""
        now = time.monotonic()
        for s in live:
            job = s.job
            if not s.dead and job is not None and job.stop_at is not None and now >= job.stop_at:
                s.kill()
                self._reap(s)

    def _spawn_needed(self) -> list[Slot]:
        # called with the lock held; returns the slots to flush once it is released
        sends: list[Slot] = []
        free = [i for i, s in enumerate(self._slots) if s is None]
        want = len(self._pending) + self._want_extra
        self._want_extra = 0
        if free and time.monotonic() < self._backoff.until:
            return sends  # backing off after a failed start
        for index in free[:want]:
            try:  # a worker started ahead (warm) says when it is ready; others reply
                slot = self._spawn(index, announce=not self._pending)
            except Exception as exc:
                self._spawn_failed(exc)
                return sends
            self._backoff.delay = 0.0
            self._slots[index] = slot
            if self._fill(slot):
                sends.append(slot)
        return sends

    def _spawn_failed(self, exc: Exception) -> None:
        """A worker could not start (EMFILE, EAGAIN...): calls no live worker can serve
        fail (their retry policy decides); the next start waits a backoff (start.py)."""
        delay = self._backoff.failed()
        log.warning("could not start a worker process: %s (trying again in %.1fs)", exc, delay)
        if any(s is not None for s in self._slots):
            return  # live workers will serve what is pending
        error = CanoError(f"could not start a worker process: {type(exc).__name__}: {exc}")
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(error)
        self._pending.clear()

    def _receive(self, slot: Slot) -> bool | None:
        """Handle one message from ``slot``'s worker if one is there (the manager and a
        direct call's thread may both have seen the pipe readable: only one reads it).
        True: one was; False: none was there; None: the pipe is closed (see :meth:`_gone`)."""
        with slot.rlock:  # messages are read and handled one at a time, in order
            try:
                if not readable(slot.conn):
                    return False
                data = slot.conn.recv_bytes()
            except (EOFError, OSError, ValueError):
                gone = True
            else:
                gone = False
                self._handle(slot, data)
        if gone:
            self._gone(slot)
            return None
        return True

    def _gone(self, slot: Slot) -> None:
        """``slot``'s worker ended. Only the manager reaps (it watches every sentinel): a
        reap cut off by Ctrl-C on a run thread would strand the slot and its calls."""
        if threading.current_thread() is self._thread:
            self._reap(slot)
        else:
            with self._lock:
                slot.direct = False
            self._wake()

    def _handle(self, slot: Slot, data: bytes) -> None:
        try:
            raw = pickle.loads(data)
            if raw[0] == "ready":  # started ahead: imports done, initializer run
                with self._lock:
                    slot.ready = True
                    self._ready.notify_all()
                return
            if raw[0] == "retire":  # replies no more after its next one: never reuse it
                slot.retiring = True
                log.info("worker %s is replaced: %s", slot.pid, raw[1])
                return
            msg = from_wire(raw)
        except Exception as exc:
            # A reply that pickled in the worker but does not load here (an exception class
            # whose __init__ needs arguments...): that call fails, the pool goes on.
            self._unloadable(slot, exc)
            return
        if isinstance(msg, LogMessage):
            emit_remote(msg.record, msg.tags)
        elif isinstance(msg, InitFailed):
            self._init_failed(slot, msg.text)
        else:
            slot.ready = True  # it replied, so it started (warm() polls for this)
            self._replied(slot, msg)

    def _init_failed(self, slot: Slot, text: str) -> None:
        error = CanoError(f"the worker initializer failed:\n{text}")
        with self._lock:
            self._broken = text
            job, slot.job = slot.job, None
            self._ready.notify_all()
        log.error("the worker initializer failed:\n%s", text)
        if job is not None and not job.future.done():
            job.future.set_exception(error)
        self._gone(slot)
        self._fail_pending(error)

    def _replied(self, slot: Slot, msg: Any) -> None:
        # msg: Returned or Raised; on the manager thread or a direct call's thread
        with self._lock:
            job = slot.job
            if job is None or job.seq != msg.seq:
                return  # a stale reply: cannot happen, the worker answers in order
            slot.job = nxt = slot.queued.popleft() if slot.queued else None
            if nxt is not None and slot.direct:  # never so (ahead calls are not direct)
                slot.direct = False
                self._wake()
            if nxt is not None and nxt.cancelled:  # it may have started before the skip
                request_cancel(self._flags, slot.index, nxt.seq)
                nxt.stop_at = time.monotonic() + nxt.grace
            if slot.retiring:  # it runs nothing more: its queued calls go elsewhere
                others = self._requeue(slot)
            else:
                others = []
                if self._fill(slot):
                    others.append(slot)
        for s in others:
            self._flush(s)
        fut = job.future
        if fut.done():
            return
        if job.cancelled:
            fut.set_result(CANCELLED)
        elif isinstance(msg, Returned):
            fut.set_result(msg.result)
        else:
            fut.set_exception(CanoError(f"cano_mp worker error:\n{msg.text}"))

    def _unloadable(self, slot: Slot, exc: Exception) -> None:
        with self._lock:
            job = slot.job
            seq = job.seq if job is not None else -1
        text = (
            f"the task's result could not be loaded in the driver: {type(exc).__name__}: "
            f"{exc} (make what it returns, or the exception it raises, picklable both ways)"
        )
        log.warning("worker %s: %s", slot.pid, text)
        self._replied(slot, Raised("raised", seq, text))

    def _requeue(self, slot: Slot) -> list[Slot]:
        """Calls ``slot`` never began go back to pending (lock held); slots to flush."""
        back = take_back(slot)
        self.requeued += len(back)
        self._pending.extendleft(reversed(back))
        if self._closed:
            return []
        flush = []
        while self._pending and self._idle:
            idle = self._idle.pop()
            if self._fill(idle):
                flush.append(idle)
        if self._pending:
            self._wake()  # the manager starts a worker for them
        return flush

    def _fail_pending(self, exc: BaseException) -> None:
        with self._lock:
            jobs = list(self._pending)
            self._pending.clear()
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(exc)

    def _reap(self, slot: Slot) -> None:
        # the manager thread only (see _gone)
        with self._lock:
            if slot.dead:
                return
            slot.dead = True
        # Replies it sent before it ended (the call it finished, its queued calls) are
        # still in the pipe: read them before judging which call it died in.
        while self._receive(slot):
            pass
        # Until it is joined the worker's pid (its group's id) cannot be reused: kill what
        # its task left running in the group (a subprocess), however the worker ended.
        slot.kill_group()
        slot.process.join(timeout=5.0)
        exitcode = slot.process.exitcode
        with slot.rlock, contextlib.suppress(OSError):  # not under a reader's feet
            slot.conn.close()
        with self._lock:
            if self._slots[slot.index] is slot:
                self._slots[slot.index] = None
            with contextlib.suppress(ValueError):
                self._idle.remove(slot)
            self._ready.notify_all()
            job = slot.job
            if (
                job is not None
                and (job.prefed or slot.retiring)
                and not began(self._flags, slot.index, job.seq)
            ):
                job = None  # it answered the call before and ended before this one began
            else:
                slot.job = None
            flush = self._requeue(slot)  # the calls it never began go elsewhere
        for s in flush:
            self._flush(s)
        if job is not None and not job.future.done():
            if job.cancelled:
                job.future.set_result(CANCELLED)
            else:
                error = slot.died(exitcode, read_progress(self._flags, slot.index, job.seq))
                error.finished = read_outcomes(self._flags, slot.index, job.seq)
                job.future.set_exception(error)

    def _shutdown_workers(self) -> None:
        live = [s for s in self._slots if s is not None]
        stop_all(live, STOP_GRACE)
        for s in live:
            was_running = jobs_of(s)
            self._reap(s)
            for job in was_running:
                if not job.future.done():
                    job.future.set_exception(CanoError("the executor was closed"))
        self._fail_pending(CanoError("the executor was closed"))  # taken back from a slot
