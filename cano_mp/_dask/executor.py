"""DaskExecutor: the Executor protocol on a Dask cluster (see ``cano_mp.dask`` for the picture).

::

    submit(call) -> DaskJob -> Shipper (blobs, snapshot) -> client.submit(run_remote, ...)
    Dask done callback -> the results thread: client.gather in batches -> RemoteResult ->
      new segments become files in the store's directory again -> the future resolves
    cancel(future, grace) -> Controller (the control thread)
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import distributed  # type: ignore[import-not-found, unused-ignore]

from .._errors import CanoError, ConfigError
from .._executors.base import Capabilities, ExecutorBase, Job, JobFuture
from .._store.byvalue import unpack_log
from .._wire import CANCELLED, Call, UnitOutcome, WorkerDied
from .control import Controller
from .jobs import DaskJob, GatherFailed, drain, resolve
from .remote import Layout, run_remote
from .shipping import Shipper

if TYPE_CHECKING:
    from distributed import Client  # type: ignore[import-not-found, unused-ignore]

__all__ = ["DaskExecutor"]

log = logging.getLogger("cano_mp.executor")

# A call whose scattered inputs were lost with a worker is sent again this many times
# (without spending an attempt) before it fails.
MAX_RESUBMITS = 3

_ids = itertools.count(1)


class DaskExecutor(ExecutorBase):
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
        # With a known item count, a BatchTask starts with balanced chunks (items /
        # (workers * 4)) instead of growing from one item: each growth step would cost a
        # Dask round trip.
        self.capabilities = Capabilities(
            in_flight_per_worker=in_flight_per_worker,
            chunk_seconds=float(chunk_seconds),
            eager_chunks=True,
        )
        self._client: Any = client
        self._fixed = max_workers
        self._uid = uuid.uuid4().hex[:12]
        self._lock = threading.Lock()
        self._jobs: dict[str, DaskJob] = {}
        self._shipper = Shipper(client, self._uid)
        self._closed = False
        self._control = Controller(client, bool(restart_hung_workers), self._cancelled)
        if max_workers is None:
            self._control.refresh()
        self._done: queue.SimpleQueue[DaskJob | None] = queue.SimpleQueue()
        self._collector = threading.Thread(
            target=self._collect_loop, name="cano_mp-dask-results", daemon=True
        )
        self._collector.start()
        self._control.start()

    # -- the Executor protocol --------------------------------------------------------------
    @property
    def max_workers(self) -> int:
        """How many calls count as running at once (see the class docstring)."""
        if self._fixed is not None:
            return self._fixed
        return self._control.threads()

    @property
    def in_flight_per_worker(self) -> int:
        """Calls the engine keeps in flight per worker thread (``capabilities``)."""
        return self.capabilities.in_flight_per_worker

    @property
    def chunk_seconds(self) -> float:
        """Seconds of work an automatic BatchTask chunk aims at (``capabilities``)."""
        return self.capabilities.chunk_seconds

    @property
    def eager_chunks(self) -> bool:
        """Always True: BatchTask chunks start balanced (``capabilities``)."""
        return self.capabilities.eager_chunks

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
        seq = next(_ids)
        job = DaskJob(call, JobFuture(), seq, call_id=f"{seq}-{uuid.uuid4().hex[:16]}")
        self._prepare(job)
        with self._lock:
            self._jobs[job.call_id] = job
        try:
            self._dispatch(job)
        except BaseException:
            with self._lock:
                self._jobs.pop(job.call_id, None)
            job.future.job = None  # never accepted: leave no cycle behind
            raise
        return job.future

    def cancel(self, future: Future[Any], grace: float) -> None:
        """Set the call's cooperative flag on the workers; a call that has not started is
        dropped at once, a running one after ``grace`` seconds (see the class docstring)."""
        job = Job.of(future)
        if not isinstance(job, DaskJob):
            return
        with self._lock:
            if self._jobs.get(job.call_id) is not job or job.cancelled or future.done():
                return
            job.cancelled = True
        self._control.cancel(job, grace)

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
            resolve(job.future, error=CanoError("the executor was closed"))
        self._done.put(None)
        self._control.stop()
        self._collector.join(timeout=10)
        self._control.join()
        futures.extend(self._shipper.release())
        if futures and self._client.status == "running":
            try:
                self._client.cancel(futures)
            except Exception as exc:  # the cluster may be gone already
                log.debug("releasing the executor's Dask futures failed: %s", exc)

    def __enter__(self) -> DaskExecutor:
        return self

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"max_workers={self.max_workers}"
        return f"DaskExecutor({self._client.scheduler.address}, {state})"

    # -- sending ---------------------------------------------------------------------------
    def _prepare(self, job: DaskJob) -> None:
        """The call's layout (fixed for every submission of it)."""
        call = job.call
        snapshot_at = next((i for i, b in enumerate(call.blobs) if b.category == "snapshot"), -1)
        remaining = None if call.deadline is None else call.deadline - time.monotonic()
        job.layout = Layout(snapshot_at, len(call.blobs), 0, remaining, time.time())

    def _dispatch(self, job: DaskJob) -> None:
        """Submit the job's call to Dask (again, after its inputs were lost)."""
        call = job.call
        assert job.layout is not None
        deps: list[Any] = []
        segments: tuple[Any, ...] = ()
        for blob in call.blobs:
            if blob.category == "snapshot":
                shipped = self._shipper.snapshot(blob)
                deps.append(shipped.snapshot)
                segments = shipped.segments
            else:
                deps.append(self._shipper.unit(blob))
        layout = job.layout
        if layout.segments != len(segments):
            layout = Layout(
                layout.snapshot_at,
                layout.blobs,
                len(segments),
                layout.remaining,
                layout.sent,
            )
            job.layout = layout
        name = getattr(call.fn, "__name__", "call")
        key = f"cano-{name}-{job.call_id}-{job.resubmits}"
        dfut = self._client.submit(
            run_remote,
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

    # -- receiving -------------------------------------------------------------------------
    def _on_done(self, job: DaskJob, dfut: Any) -> None:
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
        batch = drain(self._done, self._done.get())
        if batch is None:
            return False
        try:
            self._collect(batch)
        except BaseException:  # pragma: no cover - a bug: fail the calls, never hang
            log.exception("the cano_mp Dask result thread failed")
            for job in batch:
                self._finish(job, error=CanoError("internal error collecting the result"))
        return True

    def _collect(self, batch: list[DaskJob]) -> None:
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
                        values[j.call_id] = GatherFailed(exc)
        for job in batch:
            if job.future.done():
                self._forget(job)
                continue
            status = job.dask.status
            if status == "finished":
                value = values.get(job.call_id)
                if isinstance(value, GatherFailed):
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

    def _settle(self, job: DaskJob, value: Any) -> None:
        if job.cancelled:
            self._finish(job, value=CANCELLED)
            return
        out, data = value.outcome, value.segments
        if data:
            snap = next(b.obj for b in job.call.blobs if b.category == "snapshot")
            try:
                unit = UnitOutcome.from_wire(out)
                out = unit._replace(log=unpack_log(unit.log, data, snap.dirs)).to_wire()
            except Exception as exc:
                self._finish(job, error=exc)
                return
        self._finish(job, value=out)

    def _failed(self, job: DaskJob) -> None:
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

    def _lost_inputs(self, job: DaskJob) -> None:
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

    def _finish(
        self, job: DaskJob, *, value: Any = None, error: BaseException | None = None
    ) -> None:
        self._forget(job)
        resolve(job.future, value=value, error=error)

    def _cancelled(self, job: DaskJob) -> None:
        self._finish(job, value=CANCELLED)

    def _forget(self, job: DaskJob) -> None:
        with self._lock:
            self._jobs.pop(job.call_id, None)


DaskExecutor.__module__ = "cano_mp.dask"
