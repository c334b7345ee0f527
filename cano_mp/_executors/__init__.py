"""Where calls run: the Executor protocol and the backends that ship with cano_mp.

::

    engine                         executor                              where fn runs
    ------                         --------                              -------------
    capabilities(executor) ----->  Capabilities (base): remote, calls in flight per worker,
                                   chunk sizing, progress reports; the defaults otherwise
    submit(Call(fn, blobs,   ----> InlineExecutor (inline): at once ---> this thread
           args, deadline))        ProcessExecutor (process) -> Pool --> a loky worker
      -> Future                      (pool): a Job per call, its         process (cano_mp.
                                     blobs sent once per worker          _worker), over a pipe
                                   DaskExecutor (cano_mp.dask) ------->  a Dask worker thread
    cancel(future, grace) ------>  the call's Job (the future names it): flag, then kill
    future resolves: the outcome, CANCELLED, or WorkerDied

Modules:

- ``base`` — ``Executor`` (the protocol: ``max_workers``, ``submit``, ``cancel``,
  ``close``), ``ExecutorBase`` and ``Capabilities`` (what a backend may declare, with
  defaults), ``capabilities()``, ``progress_reader()``, ``direct_waiter()``, and
  ``Job`` / ``JobFuture`` (the record of one accepted call, shared by the local pool and
  Dask).
- ``inline`` — ``InlineExecutor``.
- ``process`` — ``ProcessExecutor`` and the process-wide shared pools.
- ``pool`` — ``Pool``: the manager thread that owns the worker processes.

The Dask backend lives in ``cano_mp._dask`` (public face: ``cano_mp.dask``), imported only
when used, so that nothing here needs ``distributed``.
"""

from __future__ import annotations

from .._wire import CANCELLED, Blob, Call, WorkerDied
from .base import (
    Capabilities,
    Executor,
    ExecutorBase,
    Job,
    JobFuture,
    capabilities,
    direct_waiter,
    progress_reader,
)
from .inline import InlineExecutor
from .process import ProcessExecutor, default_workers, shutdown_shared_pools

__all__ = [
    "CANCELLED",
    "Blob",
    "Call",
    "Capabilities",
    "Executor",
    "ExecutorBase",
    "InlineExecutor",
    "Job",
    "JobFuture",
    "ProcessExecutor",
    "WorkerDied",
    "capabilities",
    "default_workers",
    "direct_waiter",
    "progress_reader",
    "shutdown_shared_pools",
]
