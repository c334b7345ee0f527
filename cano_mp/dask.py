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
      client.submit(run_remote, fn, call id, blobs,
                    segment futures, args) ---------->  run_remote, in a worker thread:
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

try:
    import distributed  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "cano_mp.dask needs the 'distributed' package: pip install 'cano-mp[dask]'"
    ) from exc

from ._dask.executor import DaskExecutor

__all__ = ["DaskExecutor"]
