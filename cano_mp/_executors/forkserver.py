"""Workers forked from a fork server, opt-in: ``ProcessExecutor(start_method="forkserver",
preload=[...])`` and ``cano-mp run --fork-server``. Imported only then (its imports cost
the default start-up ~10 ms)::

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

import inspect
import io
import os
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing import (
    connection,
    forkserver,
    popen_forkserver,
    process,
    reduction,
    resource_tracker,
    spawn,
    util,
)
from multiprocessing.connection import Connection, Pipe
from multiprocessing.context import set_spawning_popen
from typing import Any

import cloudpickle

__all__ = ["ForkServerContext", "fork_template"]

#: Always imported by the server: what every worker runs.
WORKER_MODULES = ("cano_mp._worker.loop", "cano_mp._executors.forkserver")


class ForkServerContext:
    """What ``Pool`` needs of a start context (``Pipe``, ``Process``), with workers forked
    from a fork server that imported ``preload`` first; :meth:`close` stops the server.
    With no ``preload``, the process's template (:func:`fork_template`) serves if it runs."""

    def __init__(self, preload: Sequence[str]) -> None:
        self.preload = tuple(preload)
        self._own = bool(preload) or _template is None
        self._server: Any = forkserver.ForkServer() if self._own else _template
        if self._own:
            self._server.set_forkserver_preload([*WORKER_MODULES, *self.preload])

    def start(self) -> None:
        """Start the server now (else at the first worker's start)."""
        self._server.ensure_running()

    def server_pid(self) -> int | None:
        pid = self._server._forkserver_pid
        return int(pid) if pid is not None else None

    def Pipe(self, duplex: bool = True) -> tuple[Connection, Connection]:
        return Pipe(duplex)

    def Process(  # the multiprocessing context's name
        self, target: Callable[..., Any], args: tuple[Any, ...], name: str
    ) -> _Process:
        conn, rest = args[0], args[1:]
        return _Process(self._server, (target, conn, cloudpickle.dumps(rest)), name)

    def close(self) -> None:
        """Stop the server (the workers it forked are the pool's to stop); the template
        stays for the next pool (it ends with this process)."""
        if not self._own:
            return
        try:
            self._server._stop()
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


_template: Any = None  # the fork server fork_template() made, if any


def fork_template() -> bool:
    """Make this process's template for workers: a fork server *forked* from it now (a
    few ms), not a fresh interpreter. ``cano-mp run --fork-server`` calls it before it
    imports the target: the process is then single-threaded and has imported cano_mp and
    nothing of the user's, so a fork of it is what a fresh worker would be once it
    imported cano_mp. Later pools with ``start_method="forkserver"`` and no ``preload``
    fork their workers from it. Refused (returns False) once the process has more than
    one thread; returns True when the template runs."""
    global _template
    if _template is not None:
        return True
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        return False
    if "authkey_r" in inspect.signature(forkserver.main).parameters:  # pragma: no cover
        return False  # a newer protocol than the one forked below
    server = forkserver.ForkServer()
    resource_tracker.ensure_running()  # each child gets its fd through the server
    with socket.socket(socket.AF_UNIX) as listener:
        address = connection.arbitrary_address("AF_UNIX")  # type: ignore[attr-defined]
        listener.bind(address)
        if not util.is_abstract_socket_namespace(address):
            os.chmod(address, 0o600)
        listener.listen()
        alive_r, alive_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the template; it leaves by os._exit
            _serve_as_template(listener.fileno(), alive_r, alive_w)
        os.close(alive_r)
    # What ForkServer.ensure_running records; it execs a fresh server if this one dies.
    server.set_forkserver_preload(list(WORKER_MODULES))
    server._forkserver_address = address  # type: ignore[attr-defined]
    server._forkserver_alive_fd = alive_w  # type: ignore[attr-defined]
    server._forkserver_pid = pid  # type: ignore[attr-defined]
    _template = server  # it exits when this process does (EOF on its alive pipe)
    return True


def _serve_as_template(listener: int, alive_r: int, alive_w: int) -> None:  # pragma: no cover
    code = 1
    try:
        os.close(alive_w)  # EOF on alive_r: the driver is gone, the server exits
        for fd in map(int, os.listdir("/proc/self/fd")):  # the driver's files stay its own
            if fd > 2 and fd not in (listener, alive_r):
                try:
                    os.close(fd)
                except OSError:
                    pass
        forkserver.main(listener, alive_r, list(WORKER_MODULES))
    except SystemExit:
        code = 0
    finally:
        os._exit(code)  # never the driver's atexit handlers
