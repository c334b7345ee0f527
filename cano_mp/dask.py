"""DaskExecutor: run the same workflows on a Dask ``distributed`` cluster.

::

    driver (this process)                                Dask workers (any machine)
    ---------------------                                --------------------------
    submit(call)
      blobs: a task unit (pickled once by the engine):
               <= 16 KiB: inline with every call ----->  unpickled once per worker process
               larger: client.scatter, once per key      (LRU by key)
             a snapshot: by value (_byvalue): its index
               once per store version (inline or
               scattered), each large value scattered
               once while unchanged
      client.submit(_run_remote, fn, call id, blobs,
                    segment futures, args) ---------->  _run_remote, in a worker thread:
                                                           fn(cancelled, unit, snapshot, *args),
                                                           the write log packed by value
      Dask done callback -> collector thread: <--------  (outcome, bytes of new segments)
        client.gather in batches; new segments become
        files in the store's directory; future resolves
    cancel(future, grace)
      control thread: client.run(flag), every worker ->  cancelled() turns True there
        not running anywhere: Future.cancel(), CANCELLED now
        running: after grace, Future.cancel() (+ client.restart_workers() of the worker
        still running it, with restart_hung_workers=True), CANCELLED

What crosses the network, and who owns it:

- **Blobs.** A small blob (most task units, the index of a store of small values) travels
  with each call, a few hundred bytes, and each worker process unpickles it once: cheaper
  than a Dask dependency, and no round trip before the first call. A large one is scattered
  once and its future cached by key (bounded LRU); a cached future whose data was lost with
  a worker is scattered again. A snapshot cannot travel as references to this machine's
  files, so its large values travel as bytes: each is scattered once and reused across store
  versions while the driver's segment is unchanged. The executor holds these futures; Dask
  frees the data when they are dropped.
- **Calls.** One Dask task per call (a task, a split branch, a batch chunk), keyed
  ``cano-<function>-<call id>``, ``pure=False``. A task's deadline is sent as the time it
  has left, so ``task_context().deadline`` in the worker is on the worker's own clock.
- **Results.** The outcome comes back through ``client.gather``; segments the call created
  come back as bytes and become segment files in the store's directory again, so the engine
  commits them (and discards a failed attempt's) as it does for its own pool.
- **Cancellation** is a flag per call in each worker process, set through ``client.run``;
  ``task_context().cancelled()`` reads it without any network traffic. Python code that
  does not look at it cannot be stopped inside a Dask worker thread: after the grace period
  the call is abandoned (it runs to its end, its result dropped), or its worker restarted.

Worker loss is Dask's to handle first: the scheduler runs a call whose worker died again
elsewhere, up to ``distributed.scheduler.allowed-failures`` times (default 3; calls only
queued on that worker count too); once Dask gives up (``KilledWorker``) the call fails with
``WorkerCrashed`` and the task's ``RetryPolicy`` applies. With ``allowed-failures: 0`` every
death is one failed attempt, as on cano_mp's own pool.
"""

from __future__ import annotations

import heapq
import inspect
import itertools
import logging
import os
import pickle
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import cloudpickle

try:
    import distributed  # type: ignore[import-not-found, unused-ignore]
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "cano_mp.dask needs the 'distributed' package: pip install 'cano-mp[dask]'"
    ) from exc

from ._errors import CanoError, ConfigError
from ._executor import CANCELLED, Blob, Call, WorkerDied
from ._runner import run_unit_call
from ._store.byvalue import (
    ValueSnapshot,
    hold_snapshot,
    pack_log,
    read_segment,
    release_snapshot,
    unpack_log,
    value_snapshot,
)

if TYPE_CHECKING:
    from distributed import Client  # type: ignore[import-not-found, unused-ignore]

__all__ = ["DaskExecutor"]

log = logging.getLogger("cano_mp.executor")

# Blobs (a task unit, a snapshot's index) up to this size travel with each call and are
# unpickled once per worker process (cached by key); larger ones are scattered once. A small
# blob costs less inline than as a Dask dependency, and a scatter is a round trip: the first
# run of a 1,000-branch split took 2 s longer with every branch's unit scattered.
INLINE_BLOB_MAX = 16 * 1024
# Task units the executor keeps scattered, and each worker process keeps unpickled.
UNIT_CACHE = 1024
# Stores whose latest snapshot the executor keeps scattered. Each holds cluster memory for
# its large values until it is evicted or the store moves on to a new version.
SNAPSHOT_CACHE = 16
# How often max_workers asks the scheduler again how many threads the cluster has.
REFRESH_SECONDS = 5.0
# A call whose scattered inputs were lost with a worker is sent again this many times
# (without spending an attempt) before it fails.
MAX_RESUBMITS = 3
# Worker side: cancel flags older than this are forgotten (a flag is set on every worker;
# only the one running the call removes it when the call ends).
FLAG_TTL = 600.0

_ids = itertools.count(1)


# -- worker side -------------------------------------------------------------------------------

# call id -> time.monotonic() when its cancel flag was set (in this worker process)
_flags: dict[str, float] = {}
# ids of the calls running in this worker process
_running: set[str] = set()


def _flag_calls(ids: Sequence[str]) -> list[str]:
    """Set the cancel flags of ``ids`` here; return those running here (via client.run)."""
    now = time.monotonic()
    for i in ids:
        _flags[i] = now
    if len(_flags) > 10_000:
        for i, at in list(_flags.items()):
            if now - at > FLAG_TTL:
                _flags.pop(i, None)
    return [i for i in ids if i in _running]


def _running_calls(ids: Sequence[str]) -> list[str]:
    """Which of ``ids`` still run in this worker process (via client.run)."""
    return [i for i in ids if i in _running]


@dataclass(frozen=True, slots=True)
class _Inline:
    """A small blob sent with each call: its pickle, unpickled once per worker process."""

    key: str
    category: str
    data: bytes


_cache_lock = threading.Lock()
_caches: dict[str, OrderedDict[str, Any]] = {"unit": OrderedDict(), "snapshot": OrderedDict()}
_CACHE_SIZES = {"unit": UNIT_CACHE, "snapshot": SNAPSHOT_CACHE}


def _unpack_blob(blob: Any) -> Any:
    if not isinstance(blob, _Inline):
        return blob  # scattered: Dask already holds the object
    cache = _caches.setdefault(blob.category, OrderedDict())
    with _cache_lock:
        if blob.key in cache:
            cache.move_to_end(blob.key)
            return cache[blob.key]
    obj = cloudpickle.loads(blob.data)
    with _cache_lock:
        cache[blob.key] = obj
        while len(cache) > _CACHE_SIZES.get(blob.category, UNIT_CACHE):
            cache.popitem(last=False)
    return obj


@dataclass(frozen=True, slots=True)
class _Layout:
    """How ``_run_remote``'s positional arguments are laid out after the call id."""

    snapshot_at: int  # which blob is a ValueSnapshot (-1: none)
    blobs: int
    segments: int
    deadline_at: int  # index into the call's args of a deadline to re-base (-1: none)
    remaining: float  # seconds the deadline had left when the call was submitted
    sent: float  # time.time() at submission


class _RemoteBaseException(CanoError):
    """A call raised a BaseException (SystemExit...) in a Dask worker; re-raising it there
    would take the worker down."""


def _run_remote(fn: Callable[..., Any], call_id: str, layout: _Layout, *rest: Any) -> Any:
    """What a Dask task runs: one cano_mp call, with its snapshot served by value.

    Returns ``(outcome, segments)``: ``fn``'s return value and the bytes of the segments
    its write log refers to (the files are deleted here).
    """
    blobs = [_unpack_blob(b) for b in rest[: layout.blobs]]
    segments = rest[layout.blobs : layout.blobs + layout.segments]
    args = list(rest[layout.blobs + layout.segments :])
    snap: ValueSnapshot | None = None
    if layout.snapshot_at >= 0:
        snap = blobs[layout.snapshot_at]
        assert isinstance(snap, ValueSnapshot)
        blobs[layout.snapshot_at] = hold_snapshot(snap, segments)
    if layout.deadline_at >= 0:
        waited = min(max(0.0, time.time() - layout.sent), max(0.0, layout.remaining))
        args[layout.deadline_at] = time.monotonic() + layout.remaining - waited

    def cancelled() -> bool:
        return call_id in _flags

    _running.add(call_id)
    try:
        out = fn(cancelled, *blobs, *args)
    except BaseException as exc:
        if isinstance(exc, Exception):
            raise
        raise _RemoteBaseException(
            f"the call raised {type(exc).__name__}: {exc} (caught in the Dask worker)"
        ) from None
    finally:
        _running.discard(call_id)
        _flags.pop(call_id, None)
        if snap is not None:
            release_snapshot(snap)
    if fn is run_unit_call and out[0] == "ok":
        packed, data = pack_log(out[2])
        return ((*out[:2], packed, *out[3:]), data)
    return (out, {})


_param_indexes: dict[tuple[Any, str, int], int] = {}


def _param_index(fn: Callable[..., Any], name: str, blobs: int) -> int:
    """Index of parameter ``name`` of ``fn`` in a Call's ``args`` (-1 when absent)."""
    found = _param_indexes.get((fn, name, blobs))
    if found is None:
        try:
            params = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            params = []
        found = params.index(name) - 1 - blobs if name in params else -1
        _param_indexes[(fn, name, blobs)] = found
    return found


# -- driver side -------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Job:
    call: Call
    call_id: str
    future: Future[Any]
    layout: _Layout | None = None
    dask: Any = None  # the distributed.Future of the current submission
    cancelled: bool = False
    resubmits: int = 0
    workers: list[str] = field(default_factory=list)  # where it ran when cancelled


@dataclass(eq=False, slots=True)
class _Shipped:
    """A store's latest snapshot as shipped: its index and its segments' futures."""

    version: int
    dirs: tuple[str | None, str]  # the store's directories: gone once it is closed
    snapshot: Any  # the ValueSnapshot: an _Inline, or the future it was scattered to
    segments: tuple[Any, ...]  # futures of the segments' bytes, in the snapshot's order
    names: tuple[str, ...]


def _is_live(fut: Any) -> bool:
    if isinstance(fut, _Inline):
        return True
    return fut is not None and fut.status == "finished"


class DaskExecutor:
    """Runs cano_mp calls as tasks on a Dask ``distributed`` cluster.

    Args:
        client: a connected, synchronous ``distributed.Client``. The executor does not own
            it: closing the executor leaves the client and the cluster up.
        max_workers: how many calls count as running at once. Default: the cluster's
            worker threads, asked again every few seconds (at least 1).
        in_flight_per_worker: calls the engine keeps in flight per worker thread (default
            8; cano_mp's own pool uses 2). Dask answers each call with a latency of several
            milliseconds (it batches messages), so short calls would leave threads idle
            between calls; the cost is that a queued call's timeout is already counting.
        chunk_seconds: the work a BatchTask chunk aims at when sized automatically
            (default 1.0 s, against 0.1 s on the local pool), so that the per-call latency
            stays a small share.
        restart_hung_workers: when a cancelled or timed-out call has not stopped after its
            grace period, restart the Dask worker that runs it (``client.restart_workers``;
            needs a nanny). Off by default: a restart also stops every other task running on
            that worker (Dask reruns them elsewhere), including other clients' tasks.

    ::

        from distributed import Client
        from cano_mp.dask import DaskExecutor

        with Client("tcp://scheduler:8786") as client, DaskExecutor(client) as ex:
            flow = Workflow(start=Step.LOAD, executor=ex)
            ...
            flow.orchestrate()

    What changes from cano_mp's own pool: values reach the workers by value (once per store
    version, large values once while unchanged) instead of through shared memory; a
    ``store.array()`` the driver fills in place is sent as it was when a store version was
    first shipped; running code is stopped cooperatively only, unless
    ``restart_hung_workers``; a call whose worker dies may be run again by Dask before it
    fails (at-least-once). The store's contract (snapshots, commit on success, index order)
    does not change. The workers need cano_mp (and what the tasks import) installed.
    """

    def __init__(
        self,
        client: Client,
        *,
        max_workers: int | None = None,
        restart_hung_workers: bool = False,
        in_flight_per_worker: int = 8,
        chunk_seconds: float = 1.0,
    ) -> None:
        if not isinstance(client, distributed.Client):
            raise ConfigError(f"DaskExecutor needs a distributed.Client, got {client!r}")
        if client.asynchronous:
            raise ConfigError(
                "DaskExecutor needs a synchronous distributed.Client (asynchronous=False)"
            )
        if client.status not in ("running", "connecting", "newly-created"):
            raise ConfigError(f"the distributed.Client is not running (status {client.status})")
        if max_workers is not None and (
            isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1
        ):
            raise ConfigError(f"max_workers must be an int >= 1, got {max_workers!r}")
        if isinstance(in_flight_per_worker, bool) or not isinstance(in_flight_per_worker, int):
            raise ConfigError(f"in_flight_per_worker must be an int, got {in_flight_per_worker!r}")
        if in_flight_per_worker < 1:
            raise ConfigError(f"in_flight_per_worker must be >= 1, got {in_flight_per_worker}")
        if not chunk_seconds > 0:
            raise ConfigError(f"chunk_seconds must be > 0, got {chunk_seconds!r}")
        self.in_flight_per_worker = in_flight_per_worker
        """Engine hint: calls kept in flight per worker thread."""
        self.chunk_seconds = float(chunk_seconds)
        """Engine hint: seconds of work a BatchTask chunk aims at."""
        self.eager_chunks = True
        """Engine hint: with a known item count, a BatchTask starts with balanced chunks
        (items / (workers * 4)) instead of growing from one item: each growth step would
        cost a Dask round trip."""
        self._client: Any = client
        self._fixed = max_workers
        self._uid = uuid.uuid4().hex[:12]
        self._restart = bool(restart_hung_workers)
        self._lock = threading.Lock()
        self._ship_lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._units: OrderedDict[str, Any] = OrderedDict()
        self._snapshots: OrderedDict[str, _Shipped] = OrderedDict()
        self._segments: dict[str, Any] = {}  # segment name -> future of its bytes
        self._closed = False
        self._threads_at = 0.0
        self._threads = 1
        self._refreshing = False
        if max_workers is None:
            self._refresh_threads()
        self._done: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._control: queue.SimpleQueue[tuple[str, Any] | None] = queue.SimpleQueue()
        self._collector = threading.Thread(
            target=self._collect_loop, name="cano_mp-dask-results", daemon=True
        )
        self._controller = threading.Thread(
            target=self._control_loop, name="cano_mp-dask-control", daemon=True
        )
        self._collector.start()
        self._controller.start()

    # -- the Executor protocol --------------------------------------------------------------
    @property
    def max_workers(self) -> int:
        """How many calls count as running at once (see the class docstring)."""
        if self._fixed is not None:
            return self._fixed
        if time.monotonic() - self._threads_at > REFRESH_SECONDS and not self._refreshing:
            self._refreshing = True
            self._control.put(("refresh", None))
        return self._threads

    @property
    def client(self) -> Client:
        """The ``distributed.Client`` the calls go through."""
        client: Client = self._client
        return client

    def submit(self, call: Call) -> Future[Any]:
        """Send ``call`` to the cluster; scatters its blobs first when they are new."""
        if self._closed:
            raise CanoError("this DaskExecutor is closed")
        if self._client.status != "running":
            raise CanoError(f"the DaskExecutor's client is not running ({self._client.status})")
        job = _Job(call, f"{next(_ids)}-{uuid.uuid4().hex[:16]}", Future())
        job.future._cano_call_id = job.call_id  # type: ignore[attr-defined]
        self._prepare(job)
        with self._lock:
            self._jobs[job.call_id] = job
        try:
            self._dispatch(job)
        except BaseException:
            with self._lock:
                self._jobs.pop(job.call_id, None)
            raise
        return job.future

    def cancel(self, future: Future[Any], grace: float) -> None:
        """Set the call's cooperative flag on the workers; a call that has not started is
        dropped at once, a running one after ``grace`` seconds (see the class docstring)."""
        call_id = getattr(future, "_cano_call_id", None)
        with self._lock:
            job = self._jobs.get(call_id) if isinstance(call_id, str) else None
            if job is None or job.cancelled or future.done():
                return
            job.cancelled = True
        self._control.put(("cancel", (job, max(0.0, grace))))

    def close(self) -> None:
        """Stop the executor's threads, drop what it scattered, fail calls still in flight.

        The client and the cluster stay up.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            jobs = list(self._jobs.values())
            self._jobs.clear()
        futures = [j.dask for j in jobs if j.dask is not None]
        for job in jobs:
            _resolve(job.future, error=CanoError("the executor was closed"))
        self._done.put(None)
        self._control.put(None)
        self._collector.join(timeout=10)
        self._controller.join(timeout=10)
        with self._ship_lock:
            futures.extend(self._units.values())
            for shipped in self._snapshots.values():
                futures.append(shipped.snapshot)
            futures.extend(self._segments.values())
            futures = [f for f in futures if not isinstance(f, _Inline)]
            self._units.clear()
            self._snapshots.clear()
            self._segments.clear()
        if futures and self._client.status == "running":
            try:
                self._client.cancel(futures)
            except Exception as exc:  # the cluster may be gone already
                log.debug("releasing the executor's Dask futures failed: %s", exc)

    def __enter__(self) -> DaskExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"max_workers={self.max_workers}"
        return f"DaskExecutor({self._client.scheduler.address}, {state})"

    # -- sending ---------------------------------------------------------------------------
    def _prepare(self, job: _Job) -> None:
        """The call's layout (fixed for every submission of it)."""
        call = job.call
        snapshot_at = next((i for i, b in enumerate(call.blobs) if b.category == "snapshot"), -1)
        deadline_at = _param_index(call.fn, "deadline", len(call.blobs))
        remaining = 0.0
        if 0 <= deadline_at < len(call.args) and isinstance(call.args[deadline_at], float):
            remaining = call.args[deadline_at] - time.monotonic()
        else:
            deadline_at = -1
        job.layout = _Layout(snapshot_at, len(call.blobs), 0, deadline_at, remaining, time.time())

    def _dispatch(self, job: _Job) -> None:
        """Submit the job's call to Dask (again, after its inputs were lost)."""
        call = job.call
        assert job.layout is not None
        deps: list[Any] = []
        segments: tuple[Any, ...] = ()
        for blob in call.blobs:
            if blob.category == "snapshot":
                shipped = self._ship_snapshot(blob)
                deps.append(shipped.snapshot)
                segments = shipped.segments
            else:
                deps.append(self._ship_unit(blob))
        layout = job.layout
        if layout.segments != len(segments):
            layout = _Layout(
                layout.snapshot_at,
                layout.blobs,
                len(segments),
                layout.deadline_at,
                layout.remaining,
                layout.sent,
            )
            job.layout = layout
        name = getattr(call.fn, "__name__", "call")
        key = f"cano-{name}-{job.call_id}-{job.resubmits}"
        dfut = self._client.submit(
            _run_remote,
            call.fn,
            job.call_id,
            layout,
            *deps,
            *segments,
            *call.args,
            key=key,
            pure=False,
        )
        job.dask = dfut
        dfut.add_done_callback(lambda f, job=job: self._on_done(job, f))

    def _ship_unit(self, blob: Blob) -> Any:
        with self._ship_lock:
            fut = self._units.get(blob.key)
            if _is_live(fut):
                self._units.move_to_end(blob.key)
                return fut
            data = blob.data()
            if len(data) <= INLINE_BLOB_MAX:
                # Keys are the engine's, unique in this process only: a Dask worker serves
                # many drivers, so the executor's own id goes in front.
                fut = _Inline(f"{self._uid}:{blob.key}", blob.category, data)
            else:
                [fut] = self._client.scatter([blob.obj], hash=False)
            self._units[blob.key] = fut
            while len(self._units) > UNIT_CACHE:
                self._units.popitem(last=False)
            return fut

    def _ship_snapshot(self, blob: Blob) -> _Shipped:
        data = blob.obj
        uid, version = data.store_uid, data.version
        with self._ship_lock:
            shipped = self._snapshots.get(uid)
            if (
                shipped is not None
                and shipped.version == version
                and _is_live(shipped.snapshot)
                and all(_is_live(f) for f in shipped.segments)
            ):
                self._snapshots.move_to_end(uid)
                return shipped
            snap = value_snapshot(data)
            todo = [
                (name, ref)
                for name, ref in zip(snap.segments, snap.sources, strict=True)
                if not _is_live(self._segments.get(name))
            ]
            pickled = pickle.dumps(snap, protocol=pickle.HIGHEST_PROTOCOL)
            index: Any = None
            payload: list[Any] = []
            if len(pickled) <= INLINE_BLOB_MAX:
                index = _Inline(f"{self._uid}:snap:{uid}:{version}", "snapshot", pickled)
            else:
                payload.append(snap)
            payload.extend(read_segment(ref) for _, ref in todo)
            futures = self._client.scatter(payload, hash=False) if payload else []
            if index is None:
                index = futures.pop(0)
            for (name, _), fut in zip(todo, futures, strict=True):
                self._segments[name] = fut
            shipped = _Shipped(
                version,
                data.dirs,
                index,
                tuple(self._segments[name] for name in snap.segments),
                snap.segments,
            )
            self._snapshots[uid] = shipped
            self._snapshots.move_to_end(uid)
            while len(self._snapshots) > SNAPSHOT_CACHE:
                self._snapshots.popitem(last=False)
            for gone in [u for u, s in self._snapshots.items() if not os.path.isdir(s.dirs[1])]:
                del self._snapshots[gone]  # a closed store: its values are not needed again
            # Segments no cached snapshot names any more: drop them (Dask frees the data
            # once no call that still runs needs it).
            used = {name for s in self._snapshots.values() for name in s.names}
            for name in [n for n in self._segments if n not in used]:
                del self._segments[name]
            return shipped

    # -- receiving -------------------------------------------------------------------------
    def _on_done(self, job: _Job, dfut: Any) -> None:
        # Runs in Dask's callback thread: hand over at once.
        if dfut is job.dask:
            self._done.put(job)

    def _collect_loop(self) -> None:
        # Each batch is handled in a call of its own: this frame lives as long as the
        # executor, and locals here would keep the last calls (their Dask results, their
        # snapshots) alive until the next ones.
        while self._collect_next():
            pass

    def _collect_next(self) -> bool:
        batch = _drain(self._done, self._done.get())
        if batch is None:
            return False
        try:
            self._collect(batch)
        except BaseException:  # pragma: no cover - a bug: fail the calls, never hang
            log.exception("the cano_mp Dask result thread failed")
            for job in batch:
                self._finish(job, error=CanoError("internal error collecting the result"))
        return True

    def _collect(self, batch: list[_Job]) -> None:
        finished = [j for j in batch if j.dask.status == "finished" and not j.future.done()]
        values: dict[str, Any] = {}
        if finished:
            try:
                got = self._client.gather([j.dask for j in finished])
                values = {j.call_id: v for j, v in zip(finished, got, strict=True)}
            except Exception:
                for j in finished:  # one at a time, to find which failed
                    try:
                        values[j.call_id] = j.dask.result(timeout=60)
                    except Exception as exc:
                        values[j.call_id] = _GatherFailed(exc)
        for job in batch:
            if job.future.done():
                self._forget(job)
                continue
            status = job.dask.status
            if status == "finished":
                value = values.get(job.call_id)
                if isinstance(value, _GatherFailed):
                    self._finish(job, error=value.error)
                else:
                    self._settle(job, value)
            elif status == "error":
                self._failed(job)
            elif status == "cancelled" and not job.cancelled:
                self._lost_inputs(job)
            elif job.cancelled:
                self._finish(job, value=CANCELLED)
            else:  # lost after finishing: Dask computes it again
                dfut = job.dask
                dfut.add_done_callback(lambda f, job=job: self._on_done(job, f))

    def _settle(self, job: _Job, value: Any) -> None:
        if job.cancelled:
            self._finish(job, value=CANCELLED)
            return
        out, data = value
        if data:
            snap = next(b.obj for b in job.call.blobs if b.category == "snapshot")
            try:
                out = (*out[:2], unpack_log(out[2], data, snap.dirs), *out[3:])
            except Exception as exc:
                self._finish(job, error=exc)
                return
        self._finish(job, value=out)

    def _failed(self, job: _Job) -> None:
        if job.cancelled:
            self._finish(job, value=CANCELLED)
            return
        try:
            exc = job.dask.exception(timeout=60)
        except Exception as e:
            exc = e
        if isinstance(exc, distributed.KilledWorker):
            worker = getattr(exc, "last_worker", None)
            pid = getattr(worker, "pid", None)
            died = WorkerDied(None, pid if isinstance(pid, int) else None)
            died.add_note(str(exc))
            log.warning("a Dask worker died while running call %s: %s", job.call_id, exc)
            self._finish(job, error=died)
            return
        if not isinstance(exc, BaseException):
            exc = CanoError(f"the Dask task of call {job.call_id} failed: {exc!r}")
        self._finish(job, error=exc)

    def _lost_inputs(self, job: _Job) -> None:
        # Dask cancelled the task without being asked: its scattered inputs were lost with
        # a worker. Scatter them again and resend, without spending an attempt.
        if job.resubmits >= MAX_RESUBMITS or self._closed:
            self._finish(
                job,
                error=CanoError(
                    f"the Dask task of call {job.call_id} was cancelled by the cluster "
                    f"{job.resubmits + 1} times (its inputs were lost with their workers)"
                ),
            )
            return
        job.resubmits += 1
        log.info("resending call %s: its inputs were lost with a Dask worker", job.call_id)
        try:
            self._dispatch(job)
        except Exception as exc:
            self._finish(job, error=exc)

    def _finish(self, job: _Job, *, value: Any = None, error: BaseException | None = None) -> None:
        self._forget(job)
        _resolve(job.future, value=value, error=error)

    def _forget(self, job: _Job) -> None:
        with self._lock:
            self._jobs.pop(job.call_id, None)

    # -- cancelling, refreshing ------------------------------------------------------------
    def _control_loop(self) -> None:
        due: list[tuple[float, int, _Job]] = []  # (when, seq, job): calls whose grace ends
        seq = itertools.count()
        while True:
            timeout = max(0.0, due[0][0] - time.monotonic()) if due else None
            try:
                first: tuple[str, Any] | None = self._control.get(timeout=timeout)
            except queue.Empty:
                first = ("tick", None)
            items = _drain(self._control, first)
            if items is None:
                return
            self._control_step(items, due, seq)
            del items  # hold no finished call until the next request (see _collect_loop)

    def _control_step(
        self,
        items: list[tuple[str, Any]],
        due: list[tuple[float, int, _Job]],
        seq: Iterator[int],
    ) -> None:
        try:
            cancels = [x[1] for x in items if x[0] == "cancel"]
            if cancels:
                for at, job in self._flag(cancels):
                    heapq.heappush(due, (at, next(seq), job))
            stop: list[_Job] = []
            now = time.monotonic()
            while due and due[0][0] <= now:
                stop.append(heapq.heappop(due)[2])
            if stop:
                self._stop(stop)
            if any(x[0] == "refresh" for x in items):
                self._refresh_threads()
        except BaseException:  # pragma: no cover - a bug: never hang the callers
            log.exception("the cano_mp Dask control thread failed")
            for x in items:
                if x[0] == "cancel":
                    self._finish(x[1][0], value=CANCELLED)

    def _flag(self, cancels: list[tuple[_Job, float]]) -> list[tuple[float, _Job]]:
        """Set the flags; drop calls not running anywhere; return when to stop the rest."""
        live = [(j, g) for j, g in cancels if not j.future.done()]
        if not live:
            return []
        ids = [j.call_id for j, _ in live]
        try:
            where = self._client.run(_flag_calls, ids, on_error="ignore")
        except Exception as exc:
            log.debug("setting cancel flags on the Dask workers failed: %s", exc)
            where = {}
        running: dict[str, list[str]] = {}
        for addr, found in where.items():
            if isinstance(found, list):
                for i in found:
                    running.setdefault(i, []).append(addr)
        later: list[tuple[float, _Job]] = []
        now = time.monotonic()
        for job, grace in live:
            job.workers = running.get(job.call_id, [])
            if job.workers and grace > 0:
                later.append((now + grace, job))
            else:
                later.append((now, job))
        return later

    def _stop(self, jobs: list[_Job]) -> None:
        """Grace is over: drop the Dask tasks; restart workers that still run one."""
        jobs = [j for j in jobs if not j.future.done()]
        if not jobs:
            return
        try:
            self._client.cancel([j.dask for j in jobs if j.dask is not None])
        except Exception as exc:
            log.debug("cancelling Dask futures failed: %s", exc)
        if self._restart:
            addrs = sorted({a for j in jobs for a in j.workers})
            if addrs:
                ids = [j.call_id for j in jobs]
                try:
                    still = self._client.run(_running_calls, ids, workers=addrs, on_error="ignore")
                    hung = [a for a, found in still.items() if isinstance(found, list) and found]
                    if hung:
                        log.warning(
                            "restarting Dask worker(s) %s: a cancelled call did not stop "
                            "within its grace period",
                            ", ".join(hung),
                        )
                        self._client.restart_workers(hung, raise_for_error=False)
                except Exception as exc:
                    log.warning("could not restart a hung Dask worker: %s", exc)
        for job in jobs:
            self._finish(job, value=CANCELLED)

    def _refresh_threads(self) -> None:
        try:
            threads = sum(int(n) for n in self._client.nthreads().values())
        except Exception as exc:
            log.debug("asking the Dask scheduler for its threads failed: %s", exc)
            threads = self._threads
        self._threads = max(1, threads)
        self._threads_at = time.monotonic()
        self._refreshing = False


T = TypeVar("T")


def _drain(q: queue.SimpleQueue[T | None], first: T | None) -> list[T] | None:
    """``first`` and whatever else is queued now; ``None`` once the queue says stop."""
    if first is None:
        return None
    items = [first]
    while True:
        try:
            nxt = q.get_nowait()
        except queue.Empty:
            return items
        if nxt is None:
            q.put(None)  # seen again by the next call: stop after this batch
            return items
        items.append(nxt)


@dataclass(frozen=True, slots=True)
class _GatherFailed:
    error: BaseException


def _resolve(fut: Future[Any], *, value: Any = None, error: BaseException | None = None) -> None:
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)
    except Exception:  # resolved already (InvalidStateError)
        pass
