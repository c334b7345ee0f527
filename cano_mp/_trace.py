"""``TraceRecorder``: a Chrome trace-event timeline of runs (open it in Perfetto or
chrome://tracing): one track per worker process with a slice per task attempt, and the
driver's states on a track of their own."""

from __future__ import annotations

import enum
import json
import os
import threading
import time
from typing import Any

from ._files import write_atomic
from ._observe import AttemptObserver, RunInfo
from ._public import public

__all__ = ["TraceRecorder"]


def _label(state: Any) -> str:
    return state.name if isinstance(state, enum.Enum) else str(state)


class TraceRecorder(AttemptObserver):
    """Records a timeline; :meth:`save` writes it as trace-event JSON.

    Args:
        path: when given, the file is (re)written at the end of every run, so a daemon's
            trace is always current. ``save(path)`` writes it on demand.
        max_events: the oldest events are dropped beyond this many (long-running daemons).

    Tracks: process ``cano_mp driver`` has one thread per run (its states as slices);
    each worker process (by pid) has a thread with one slice per task attempt (or
    BatchTask chunk), timed from the worker's own clock readings. Failed attempts are
    coloured and carry the error in their ``args``.
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, max_events: int = 1_000_000
    ) -> None:
        super().__init__()
        self.path = None if path is None else os.fspath(path)
        self.max_events = max_events
        self._lock = threading.Lock()
        self._events: list[dict[str, Any]] = []
        self._driver = os.getpid()
        self._state_open: dict[str, tuple[str, float]] = {}  # run id -> (state, start us)
        self._run_tids: dict[str, int] = {}
        self._named: set[tuple[int, int]] = set()  # (pid, tid) with a thread_name event
        self._processes: set[int] = set()  # worker pids with a process_name event

    @staticmethod
    def _now_us() -> float:
        return time.time() * 1e6

    def _add(self, event: dict[str, Any]) -> None:
        self._events.append(event)
        if len(self._events) > self.max_events:
            del self._events[: len(self._events) - self.max_events]

    def _thread_name(self, pid: int, tid: int, name: str) -> None:
        if (pid, tid) not in self._named:
            self._named.add((pid, tid))
            self._add({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                       "args": {"name": name}})  # fmt: skip

    def _run_tid(self, run: RunInfo) -> int:
        tid = self._run_tids.get(run.run_id)
        if tid is None:
            tid = self._run_tids[run.run_id] = len(self._run_tids) + 1
            self._thread_name(self._driver, tid, f"{run.workflow} run {run.run_id}")
        return tid

    def _close_state(self, run: RunInfo, now: float) -> None:
        opened = self._state_open.pop(run.run_id, None)
        if opened is not None:
            state, start = opened
            self._add({"ph": "X", "name": state, "cat": "state", "pid": self._driver,
                       "tid": self._run_tid(run), "ts": start, "dur": max(0.0, now - start),
                       "args": {"run_id": run.run_id, "workflow": run.workflow}})  # fmt: skip

    # -- hooks -------------------------------------------------------------------------------
    def on_workflow_start(self, run: RunInfo) -> None:
        with self._lock:
            if not self._events:
                self._add({"ph": "M", "name": "process_name", "pid": self._driver,
                           "args": {"name": "cano_mp driver"}})  # fmt: skip
            self._run_tid(run)

    def on_state_enter(self, run: RunInfo, state: Any) -> None:
        now = self._now_us()
        with self._lock:
            self._close_state(run, now)
            self._state_open[run.run_id] = (_label(state), now)

    def on_attempt(
        self,
        run: RunInfo,
        state: Any,
        task_name: str,
        attempt: int,
        *,
        pid: int | None,
        started: float,
        ended: float,
        error: BaseException | None,
    ) -> None:
        pid = self._driver if pid is None else pid
        worker = pid != self._driver
        tid = pid if worker else 0
        args: dict[str, Any] = {
            "run_id": run.run_id,
            "workflow": run.workflow,
            "state": _label(state),
            "attempt": attempt,
            "pid": pid,
        }
        event: dict[str, Any] = {
            "ph": "X",
            "name": task_name,
            "cat": "task",
            "pid": pid,
            "tid": tid,
            "ts": started * 1e6,
            "dur": max(0.0, ended - started) * 1e6,
            "args": args,
        }
        if error is not None:
            args["error"] = f"{type(error).__name__}: {error}"
            event["cname"] = "terrible"
        with self._lock:
            if worker and pid not in self._processes:
                self._processes.add(pid)
                self._add({"ph": "M", "name": "process_name", "pid": pid,
                           "args": {"name": f"cano_mp worker {pid}"}})  # fmt: skip
            self._thread_name(pid, tid, f"worker {pid}" if worker else "inline tasks")
            self._add(event)

    def on_workflow_end(
        self, run: RunInfo, *, final_state: Any, error: BaseException | None, duration: float
    ) -> None:
        now = self._now_us()
        with self._lock:
            self._close_state(run, now)
            self._add({"ph": "i", "name": "end" if error is None else "failed", "s": "t",
                       "pid": self._driver, "tid": self._run_tid(run), "ts": now,
                       "args": {"final_state": _label(final_state) if error is None else None,
                                "error": None if error is None else repr(error)}})  # fmt: skip
        if self.path is not None:
            self.save(self.path)

    # -- output ------------------------------------------------------------------------------
    def events(self) -> list[dict[str, Any]]:
        """A copy of the recorded trace events."""
        with self._lock:
            return list(self._events)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``{"traceEvents": [...]}`` to ``path`` atomically (0644: a trace is meant
        to be opened by other tools)."""
        data = {"traceEvents": self.events(), "displayTimeUnit": "ms"}
        write_atomic(path, json.dumps(data).encode(), mode=0o644)

    def __repr__(self) -> str:
        return f"<TraceRecorder {len(self._events)} events" + (
            f" -> {self.path}>" if self.path else ">"
        )


public(TraceRecorder)
