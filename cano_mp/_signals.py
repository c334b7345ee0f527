"""SIGTERM: stop runs like Ctrl-C does, and never leave shared memory behind.

Python's default SIGTERM disposition ends the process at once: no ``finally``, no
``atexit``, so a store's segments stayed in ``/dev/shm`` until another cano_mp process
happened to start. When a process first uses shared memory or runs a workflow, and only if
SIGTERM still has the default disposition and this is the main thread, cano_mp installs
:func:`_on_sigterm`:

- while runs are going, each is stopped at once (its in-flight calls killed, nothing
  committed) and the main thread gets :class:`~cano_mp.Terminated` — a ``CanoError``,
  never retried — so ``finally`` blocks and ``atexit`` hooks run as the error unwinds;
- with no run going, it runs the ``atexit`` hooks (the pool stops, shared memory is
  removed), restores the default disposition and sends SIGTERM to itself again, so the
  process ends exactly as it would have (killed by SIGTERM, exit status -15).

A handler installed by the user (before or after) is never replaced.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
from types import FrameType
from typing import Protocol

from ._errors import Terminated
from ._log import get_logger

__all__ = ["install", "register_run", "unregister_run"]

log = get_logger("cano_mp.signals")


class Stoppable(Protocol):
    def terminate(self) -> None: ...


_lock = threading.Lock()
_runs: dict[int, Stoppable] = {}


def install() -> None:
    """Install the SIGTERM handler if SIGTERM has its default disposition (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # pragma: no cover - an embedded interpreter
        pass


def register_run(run: Stoppable) -> None:
    with _lock:
        _runs[id(run)] = run


def unregister_run(run: Stoppable) -> None:
    with _lock:
        _runs.pop(id(run), None)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    with _lock:
        runs = list(_runs.values())
    if runs:
        log.warning("SIGTERM: stopping %d running workflow run(s)", len(runs))
        for run in runs:
            run.terminate()
        raise Terminated("the process received SIGTERM: the run was stopped")
    _exit_like_default()


def _exit_like_default() -> None:
    # CPython runs the atexit hooks (ours stop the pool and remove shared memory) here;
    # the default disposition would skip them.
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    try:
        if run_exitfuncs is not None:
            run_exitfuncs()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
