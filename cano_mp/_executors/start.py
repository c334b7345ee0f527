"""How a pool worker process starts: ``start_worker``.

By default with loky's context: fork+exec of a fresh interpreter, which imports cano_mp's
worker (and, through the first call's functions, whatever they need). Opt-in, forked from
a fork server (``ProcessExecutor(start_method="forkserver")``, ``cano-mp run
--fork-server``): see ``cano_mp._executors.forkserver``, imported only then.
"""

from __future__ import annotations

import os
from multiprocessing.connection import Connection
from typing import Any

from loky.backend.context import get_context

from .._worker.loop import worker_main

__all__ = ["start_worker"]


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
