"""How a pool worker process starts: ``start_worker``.

By default with loky's context: fork+exec of a fresh interpreter, which imports cano_mp's
worker (and, through the first call's functions, whatever they need). Opt-in, forked from
a fork server (``ProcessExecutor(start_method="forkserver")``, ``cano-mp run
--fork-server``): see ``cano_mp._executors.forkserver``, imported only then.
"""

from __future__ import annotations

import os
import time
from multiprocessing.connection import Connection
from typing import Any

from loky.backend.context import get_context

from .._log import get_logger
from .._store import shm as _shm
from .._worker.loop import worker_main
from .slots import Slot

__all__ = ["Backoff", "start_slot", "start_worker"]

log = get_logger("cano_mp.executor")


class Backoff:
    """When to try starting a worker again after a start failed (EMFILE, EAGAIN...):
    0.1 s after the first failure, doubling to 5 s, never given up."""

    def __init__(self) -> None:
        self.delay = 0.0  # 0: the last start worked
        self.until = 0.0  # time.monotonic() before which no start is tried

    def failed(self) -> float:
        """Note a failed start; returns the delay before the next try."""
        self.delay = min(5.0, max(0.1, self.delay * 2))
        self.until = time.monotonic() + self.delay
        return self.delay


def start_slot(ctx: Any, index: int, flags_path: str, setup: tuple[Any, ...]) -> Slot:
    """Start worker ``index`` (see :func:`start_worker`) and record its process group for
    crash cleanup; returns its slot."""
    proc, parent_conn = start_worker(ctx, index, flags_path, setup)
    try:
        _shm.record_process_group(proc.pid)  # the worker leads a group of its own
    except OSError as exc:  # pragma: no cover - only crash cleanup depends on it
        log.debug("could not record worker %s's process group: %s", proc.pid, exc)
    return Slot(index, proc, parent_conn)


def start_worker(
    ctx: Any, index: int, flags_path: str, setup: tuple[Any, ...]
) -> tuple[Any, Connection]:
    """Start worker ``index`` running ``worker_main(conn, index, flags_path, parent,
    *setup)``; returns its process object and the driver's end of its pipe."""
    parent = os.getpid()
    if ctx is not None:  # a fork of the server, so the server's child
        ctx.start()
        parent = ctx.server_pid() or parent
    start: Any = ctx if ctx is not None else get_context("loky")
    parent_conn, child_conn = start.Pipe(duplex=True)
    proc = start.Process(
        target=worker_main,
        args=(child_conn, index, flags_path, parent, *setup),
        name=f"cano_mp-worker-{index}",
    )
    proc.start()
    child_conn.close()
    return proc, parent_conn
