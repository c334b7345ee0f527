"""How a pool worker process starts: ``start_worker``.

By default with loky's context: fork+exec of a fresh interpreter, which imports cano_mp's
worker (and, through the first call's functions, whatever they need). Opt-in,
``ProcessExecutor(start_method="forkserver", preload=[...])``, a ``ForkServerContext``::

    driver (pool manager thread)                 fork server (one per pool)        worker
    ----------------------------                 --------------------------        ------
    ForkServerContext.Process(...).start() --->  a fresh, single-threaded     fork  worker_main
      the Process pickled (std pickle), its        interpreter that imported  ----> (same
      pipe end passed as an fd, the rest of        cano_mp's worker and the         loop as a
      worker_main's arguments as cloudpickle       ``preload`` modules once         loky one)
      bytes (initializer from __main__ works)

Each worker is a fork of the server, not a fresh interpreter: it starts in a few
milliseconds, with cano_mp and the preloaded modules already imported (pages shared with
the server until written). The server itself is a fresh interpreter started from the
driver (fork+exec, like a loky worker) and forks only from its single thread, so the
driver's threads and locks never reach a worker.

Built on ``multiprocessing.forkserver.ForkServer`` (a private instance, so its preload
list is this pool's own and the process-wide one is left alone). The launch differs from
multiprocessing's in one way: the driver's ``__main__`` is never re-imported in the worker
(as with loky, a script needs no ``if __name__ == "__main__"`` guard; its functions reach
workers by value through cloudpickle).
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable, Sequence
from multiprocessing import forkserver, popen_forkserver, process, reduction, spawn, util
from multiprocessing.connection import Connection, Pipe
from multiprocessing.context import set_spawning_popen
from typing import Any

import cloudpickle
from loky.backend.context import get_context

from .._worker.loop import worker_main

__all__ = ["ForkServerContext", "start_worker"]

#: Always imported by the server: what every worker runs.
WORKER_MODULES = ("cano_mp._worker.loop", "cano_mp._executors.start")


def start_worker(
    ctx: ForkServerContext | None, index: int, flags_path: str, setup: tuple[Any, ...]
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


class ForkServerContext:
    """What ``Pool`` needs of a start context (``Pipe``, ``Process``), with workers forked
    from a fork server that imported ``preload`` first; :meth:`close` stops the server."""

    def __init__(self, preload: Sequence[str]) -> None:
        self.preload = tuple(preload)
        self._server = forkserver.ForkServer()
        self._server.set_forkserver_preload([*WORKER_MODULES, *self.preload])

    def start(self) -> None:
        """Start the server now (else at the first worker's start)."""
        self._server.ensure_running()

    def server_pid(self) -> int | None:
        pid = self._server._forkserver_pid  # type: ignore[attr-defined]
        return int(pid) if pid is not None else None

    def Pipe(self, duplex: bool = True) -> tuple[Connection, Connection]:
        return Pipe(duplex)

    def Process(  # the multiprocessing context's name
        self, target: Callable[..., Any], args: tuple[Any, ...], name: str
    ) -> _Process:
        conn, rest = args[0], args[1:]
        return _Process(self._server, (target, conn, cloudpickle.dumps(rest)), name)

    def close(self) -> None:
        """Stop the server (the workers it forked are the pool's to stop)."""
        try:
            self._server._stop()  # type: ignore[attr-defined]
        except (OSError, ChildProcessError):  # pragma: no cover - already gone
            pass


def _forked_main(target: Callable[..., Any], conn: Connection, payload: bytes) -> None:
    """A forked worker's first function: the arguments that did not travel as fds."""
    random = sys.modules.get("numpy.random")
    if random is not None:  # preloaded: its legacy global generator would be the server's
        random.seed()
    target(conn, *cloudpickle.loads(payload))


class _Process(process.BaseProcess):
    _start_method = None  # read by BaseProcess._bootstrap in the child

    def __init__(self, server: Any, args: tuple[Any, ...], name: str) -> None:
        super().__init__(target=_forked_main, args=args, name=name)
        self._server = server

    def _Popen(self, process_obj: Any) -> _ServerPopen:  # called by start()
        return _ServerPopen(self._server, process_obj)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_server", None)  # holds a lock; the child needs none of it
        return state


class _ServerPopen(popen_forkserver.Popen):
    def __init__(self, server: Any, process_obj: Any) -> None:
        self._server = server
        super().__init__(process_obj)

    def _launch(self, process_obj: Any) -> None:
        # multiprocessing's popen_forkserver.Popen._launch, with this pool's server and
        # without re-importing the driver's __main__ in the child.
        prep_data = spawn.get_preparation_data(process_obj._name)
        prep_data.pop("init_main_from_name", None)
        prep_data.pop("init_main_from_path", None)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        fds: list[int] = self._fds  # type: ignore[attr-defined]
        self.sentinel, w = self._server.connect_to_new_process(fds)
        parent_w = os.dup(w)  # the child's sentinel of this process, as in multiprocessing
        close_fds = util.close_fds  # type: ignore[attr-defined]
        self.finalizer = util.Finalize(self, close_fds, (parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)
