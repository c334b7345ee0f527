"""The DaskExecutor's control thread: cancelling calls, and counting the cluster's threads.

::

    cancel(future, grace) -> Cancel(job, grace) --> control thread
                                                      client.run(flag_calls): every worker
                                                        sets the flag; which run the call?
                                                      running nowhere: finish it now
                                                      running: at job.stop_at (grace later)
                                                        client.cancel (+ restart_workers of
                                                        a worker still running it, if asked)
                                                      -> future resolves to CANCELLED
    max_workers, stale -> Refresh() --------------> client.nthreads(), summed

Requests queue up and are handled in batches, so that one ``client.run`` flags many calls.
"""

from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .jobs import Cancel, DaskJob, Refresh, drain
from .remote import flag_calls, running_calls

__all__ = ["REFRESH_SECONDS", "Controller"]

log = logging.getLogger("cano_mp.executor")

# How often max_workers asks the scheduler again how many threads the cluster has.
REFRESH_SECONDS = 5.0


class Controller:
    """Runs the control thread of one DaskExecutor.

    ``finish(job)`` resolves a job's future to ``CANCELLED`` (and forgets the job);
    ``restart`` restarts a worker still running a call after its grace period.
    """

    def __init__(self, client: Any, restart: bool, finish: Callable[[DaskJob], None]) -> None:
        self._client = client
        self._restart = restart
        self._finish = finish
        self._threads_at = 0.0
        self._threads = 1
        self._refreshing = False
        self._queue: queue.SimpleQueue[Cancel | Refresh | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="cano_mp-dask-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def threads(self) -> int:
        """The cluster's worker threads, as last counted (a new count is asked for when it
        is older than REFRESH_SECONDS)."""
        if time.monotonic() - self._threads_at > REFRESH_SECONDS and not self._refreshing:
            self._refreshing = True
            self._queue.put(Refresh())
        return self._threads

    def cancel(self, job: DaskJob, grace: float) -> None:
        self._queue.put(Cancel(job, max(0.0, grace)))

    def stop(self) -> None:
        """Ask the thread to exit once it has handled what is queued."""
        self._queue.put(None)

    def join(self) -> None:
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        due: list[tuple[float, int, DaskJob]] = []  # (stop_at, seq, job): calls whose grace ends
        while True:
            timeout = max(0.0, due[0][0] - time.monotonic()) if due else None
            try:
                first = self._queue.get(timeout=timeout)
            except queue.Empty:
                items: list[Cancel | Refresh] | None = []  # a grace period ended
            else:
                items = drain(self._queue, first)
            if items is None:
                return
            self._step(items, due)
            del items  # hold no finished call until the next request

    def _step(self, items: list[Cancel | Refresh], due: list[tuple[float, int, DaskJob]]) -> None:
        try:
            cancels = [x for x in items if isinstance(x, Cancel)]
            if cancels:
                for job in self._flag(cancels):
                    assert job.stop_at is not None
                    heapq.heappush(due, (job.stop_at, job.seq, job))
            stop: list[DaskJob] = []
            now = time.monotonic()
            while due and due[0][0] <= now:
                stop.append(heapq.heappop(due)[2])
            if stop:
                self._stop(stop)
            if any(isinstance(x, Refresh) for x in items):
                self.refresh()
        except BaseException:  # pragma: no cover - a bug: never hang the callers
            log.exception("the cano_mp Dask control thread failed")
            for x in items:
                if isinstance(x, Cancel):
                    self._finish(x.job)

    def _flag(self, cancels: list[Cancel]) -> list[DaskJob]:
        """Set the flags; set when to stop each call (now, if it runs nowhere)."""
        live = [c for c in cancels if not c.job.future.done()]
        if not live:
            return []
        ids = [c.job.call_id for c in live]
        try:
            where = self._client.run(flag_calls, ids, on_error="ignore")
        except Exception as exc:
            log.debug("setting cancel flags on the Dask workers failed: %s", exc)
            where = {}
        running: dict[str, list[str]] = {}
        for addr, found in where.items():
            if isinstance(found, list):
                for i in found:
                    running.setdefault(i, []).append(addr)
        now = time.monotonic()
        for job, grace in live:
            job.workers = running.get(job.call_id, [])
            job.stop_at = now + grace if job.workers and grace > 0 else now
        return [c.job for c in live]

    def _stop(self, jobs: list[DaskJob]) -> None:
        """Grace is over: drop the Dask tasks; restart workers that still run one."""
        jobs = [j for j in jobs if not j.future.done()]
        if not jobs:
            return
        try:
            self._client.cancel([j.dask for j in jobs if j.dask is not None])
        except Exception as exc:
            log.debug("cancelling Dask futures failed: %s", exc)
        if self._restart:
            self._restart_hung(jobs)
        for job in jobs:
            self._finish(job)

    def _restart_hung(self, jobs: list[DaskJob]) -> None:
        addrs = sorted({a for j in jobs for a in j.workers})
        if not addrs:
            return
        ids = [j.call_id for j in jobs]
        try:
            still = self._client.run(running_calls, ids, workers=addrs, on_error="ignore")
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

    def refresh(self) -> None:
        """Count the cluster's threads now."""
        try:
            threads = sum(int(n) for n in self._client.nthreads().values())
        except Exception as exc:
            log.debug("asking the Dask scheduler for its threads failed: %s", exc)
            threads = self._threads
        self._threads = max(1, threads)
        self._threads_at = time.monotonic()
        self._refreshing = False
