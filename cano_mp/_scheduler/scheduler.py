"""The :class:`Scheduler`: the scheduler thread, start, stop and control of flows (its
registration verbs come from ``registration``).

The thread only decides, under the scheduler's lock, with the functions of ``flows``; runs
are :class:`~.runs.Job` objects executed in a run pool of threads; reports go through
``status``. See the package docstring for the whole picture.
"""

from __future__ import annotations

import builtins
import math
import random
import signal
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, Self

from .._errors import CanoError, ConfigError
from .._log import get_logger
from .flows import (
    Decision,
    Flow,
    FlowSpec,
    FlowState,
    Queue,
    Skip,
    arm,
    decide_due,
    flow_info,
    record_decision,
    record_end,
    record_start,
    seconds_until_due,
    take_tick,
)
from .registration import Registration
from .runs import Job
from .status import FlowInfo, FlowStatus, write_status_file
from .triggers import duration

__all__ = ["Scheduler"]

log = get_logger("cano_mp.scheduler")

# The longest the thread sleeps at once: Event.wait refuses an infinite timeout (a flow
# backing off with Backoff(max_delay=inf) has an infinite due time).
MAX_SLEEP = 3600.0


def _wall_now() -> datetime:
    return datetime.now(UTC)


class Scheduler(Registration):
    """Runs workflows on intervals, cron expressions or by hand, from one background
    thread::

        sched = Scheduler(max_concurrent_runs=4)
        sched.every_seconds("report", report_flow, Step.START, 30)
        sched.cron("nightly", cleanup_flow, Step.START, "0 3 * * *", tz="Europe/Paris")
        sched.manual("backfill", backfill_flow, Step.START)
        with sched:                      # start(); stop() on exit
            sched.trigger("backfill")
            ...

    Registration keywords (every kind), checked at registration: ``store`` (every run
    uses it instead of a fresh store), ``overlap`` (``"skip"``: a tick that arrives while
    the previous run still goes is skipped and logged; ``"queue"``: one run waits and
    starts when the current ends; ``"allow"``: runs overlap, at most ``max_overlap``),
    ``backoff`` (a :class:`Backoff` after consecutive failures) and ``trip_after`` (stop
    scheduling after that many consecutive failures; :meth:`reset` resumes).

    Args:
        max_concurrent_runs: most runs going on at once, across flows; due runs wait for a
            free slot. ``None``: no limit.
        status_file: a path rewritten atomically (JSON of every FlowInfo) after each run,
            mode 0600; ``stop()`` writes it a last time with ``"stopped": true``. A flow
            whose workflow has resources also shows ``"resources"``: its
            ``Workflow.check_health()`` at the time of writing.
    """

    def __init__(
        self, *, max_concurrent_runs: int | None = None, status_file: str | None = None
    ) -> None:
        if max_concurrent_runs is not None and (
            isinstance(max_concurrent_runs, bool)
            or not isinstance(max_concurrent_runs, int)
            or max_concurrent_runs < 1
        ):
            raise ConfigError(
                f"max_concurrent_runs must be an int >= 1 or None, got {max_concurrent_runs!r}"
            )
        self.max_concurrent_runs = max_concurrent_runs
        self.status_file = status_file
        self._flows: dict[str, Flow] = {}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._started = False
        self._stopping = False
        self._stopped = threading.Event()
        self._rng = random.Random()
        self._last_health: dict[str, dict[str, bool]] = {}  # flow id -> check_health()
        self.lateness: deque[float] = deque(maxlen=100_000)
        """Seconds between each run's due time and its start (latest 100,000)."""

    # -- registration (the verbs are in registration.py) ------------------------------------
    def _add(self, spec: FlowSpec) -> Self:
        with self._lock:
            if spec.id in self._flows:
                raise ConfigError(f"a flow with id {spec.id!r} is already registered")
            if self._stopping:
                raise ConfigError("the scheduler is stopping: no new flows")
            flow = self._flows[spec.id] = Flow(spec, FlowState())
            if self._started:
                arm(spec, flow.state, time.monotonic(), _wall_now())
        self._wake.set()
        return self

    # -- control -------------------------------------------------------------------------
    def start(self) -> Self:
        """Start the scheduler thread (interval flows run at once). Returns self."""
        with self._lock:
            if self._started:
                raise CanoError("the scheduler is already started")
            if self._stopping:
                raise CanoError("a stopped scheduler cannot be started again")
            self._started = True
            workers = self.max_concurrent_runs or 1024
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="cano_mp-run")
            mono, wall = time.monotonic(), _wall_now()
            for flow in self._flows.values():
                arm(flow.spec, flow.state, mono, wall)
                if flow.spec.resume_unfinished:
                    flow.state.resume_id = flow.spec.unfinished_run()
                    if flow.state.resume_id is not None and flow.spec.kind != "every":
                        flow.state.triggers += 1  # "every" flows run at start() anyway
            self._thread = threading.Thread(
                target=self._loop, name="cano_mp-scheduler", daemon=True
            )
            self._thread.start()
        self._write_status()
        return self

    def _get(self, flow_id: str) -> Flow:
        flow = self._flows.get(flow_id)
        if flow is None:
            known = ", ".join(repr(k) for k in self._flows) or "none"
            raise ConfigError(f"no flow with id {flow_id!r} (known: {known})")
        return flow

    def trigger(self, flow_id: str) -> None:
        """Run the flow now (any kind, paused or tripped too), subject to its overlap
        policy."""
        with self._lock:
            self._get(flow_id).state.triggers += 1
        self._wake.set()

    def pause(self, flow_id: str) -> None:
        """Stop starting scheduled runs of the flow until :meth:`resume`. A run going on
        is left alone, a queued tick is dropped, ticks missed while paused are not made
        up, and :meth:`trigger` still runs it."""
        with self._lock:
            state = self._get(flow_id).state
            if state.paused:
                return
            state.paused = True
            if state.queued == "tick":
                state.queued = None
        log.info("flow %r paused", flow_id, extra={"flow": flow_id})
        self._changed()

    def resume(self, flow_id: str) -> None:
        """Schedule a paused flow again, from its next tick after now."""
        with self._lock:
            flow = self._get(flow_id)
            if not flow.state.paused:
                return
            flow.state.paused = False
            if self._started and not flow.state.tripped:
                arm(flow.spec, flow.state, time.monotonic(), _wall_now(), resume=True)
            info = flow_info(flow.spec, flow.state)
        nxt = info.next_run.isoformat(timespec="seconds") if info.next_run else "on trigger"
        log.info("flow %r resumed; next run %s", flow_id, nxt, extra={"flow": flow_id})
        self._changed()

    def reset(self, flow_id: str) -> None:
        """Resume a tripped flow and clear its backoff (it forgets its consecutive
        failures). A paused flow stays paused."""
        with self._lock:
            flow = self._get(flow_id)
            state = flow.state
            state.tripped = False
            state.consecutive = 0
            state.not_before = 0.0
            if state.status is FlowStatus.FAILED and not state.running:
                state.status = FlowStatus.IDLE
            if self._started and not state.paused:
                arm(flow.spec, state, time.monotonic(), _wall_now(), resume=True)
        self._changed()

    def _changed(self) -> None:
        self._wake.set()
        if self._started and not self._stopping:  # stop() wrote the last one
            self._write_status()

    def status(self, flow_id: str) -> FlowInfo | None:
        """The flow's :class:`FlowInfo`, or ``None`` for an unknown id."""
        with self._lock:
            flow = self._flows.get(flow_id)
            return flow_info(flow.spec, flow.state) if flow is not None else None

    def list(self) -> list[FlowInfo]:
        """Every flow's :class:`FlowInfo`, in registration order."""
        with self._lock:
            return [flow_info(f.spec, f.state) for f in self._flows.values()]

    def has_running_flows(self) -> bool:
        """Whether any run is going on (or handed to the run pool)."""
        return self.running_count() > 0

    def running_count(self) -> int:
        """Runs going on now, plus those waiting for a run-pool slot."""
        with self._lock:
            return sum(f.state.busy for f in self._flows.values())

    def stop(self, timeout: float | timedelta = 30.0) -> None:
        """Stop scheduling; wait up to ``timeout`` seconds (``math.inf``: as long as it
        takes) for running flows to finish.

        Past the timeout, what still runs is cancelled and :class:`CanoError` is raised.
        """
        seconds = duration(timeout, "the stop timeout", inf_ok=True)
        with self._lock:
            first = not self._stopping
            self._stopping = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        late = self._wait_idle(seconds)
        if late:
            with self._lock:
                victims = [run for f in self._flows.values() for run in f.state.running]
            for run in victims:
                run.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=bool(late))
        self._stopped.set()
        if late or first:
            self._write_status(stopped=True)
        if late:
            what = ", ".join(f"{fid!r} ({n} run(s))" for fid, n in late)
            raise CanoError(
                f"the scheduler did not stop within {seconds:g}s: cancelled the runs of {what}"
            )
        if first:
            log.info("scheduler stopped")

    def _wait_idle(self, seconds: float) -> builtins.list[tuple[str, int]]:
        """Wait until no run goes on, for ``seconds`` at most; return what still runs."""
        deadline = None if math.isinf(seconds) else time.monotonic() + seconds
        with self._idle:
            while any(f.state.busy for f in self._flows.values()):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._idle.wait(left)
            return [(f.spec.id, f.state.busy) for f in self._flows.values() if f.state.busy]

    def run_forever(self, *, stop_timeout: float | timedelta = 30.0) -> None:
        """Start (if needed) and block until SIGINT / SIGTERM or :meth:`stop`; then stop
        gracefully (waiting ``stop_timeout`` for running flows) and return.

        Raises :class:`CanoError` when running flows had to be cancelled.
        """
        seconds = duration(stop_timeout, "stop_timeout", inf_ok=True)
        if not self._started:
            self.start()
        received: list[int] = []

        def handler(signum: int, _frame: Any) -> None:
            received.append(signum)
            self._wake.set()
            self._stopped.set()

        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handler)
        try:
            while not self._stopped.wait(1.0):
                pass
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)
        if received:
            name = signal.Signals(received[0]).name
            limit = "as long as they take" if math.isinf(seconds) else f"up to {seconds:g}s"
            log.info("%s received: stopping (waiting %s for running flows)", name, limit)
        self.stop(seconds)

    def _request_stop(self) -> None:
        """Make :meth:`run_forever` stop as on SIGTERM (``cano-mp ctl PATH stop``)."""
        self._wake.set()
        self._stopped.set()

    def __enter__(self) -> Self:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopping else "running" if self._started else "not started"
        return f"<Scheduler {len(self._flows)} flows, {state}, {self.running_count()} runs going>"

    # -- the scheduler thread ----------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                self._wake.clear()
                with self._lock:
                    if self._stopping:
                        return
                    timeout = self._tick()
                self._wake.wait(timeout)
        except BaseException:  # pragma: no cover - a bug: say so, loudly
            log.exception("the cano_mp scheduler thread crashed")
            raise

    def _tick(self) -> float | None:
        """Start what is due; return seconds until the next thing is due (None: none)."""
        mono, wall = time.monotonic(), _wall_now()
        nearest: float | None = None
        for flow in self._flows.values():
            spec, state = flow.spec, flow.state
            while state.triggers:
                state.triggers -= 1
                self._decide(flow, decide_due(spec, state, mono, mono, manual=True), mono, wall)
            due = take_tick(spec, state, mono, wall)
            if due is not None:
                self._decide(flow, decide_due(spec, state, mono, due), mono, wall, due=due)
            wait = seconds_until_due(spec, state, mono)
            if wait is not None:
                nearest = wait if nearest is None else min(nearest, wait)
        return None if nearest is None else min(MAX_SLEEP, max(0.0, nearest))

    def _decide(
        self, flow: Flow, decision: Decision, mono: float, wall: datetime, *,
        due: float | None = None,
    ) -> None:  # fmt: skip
        """Act on a decision: launch a run, or log why not (``due``: a tick, else a
        trigger)."""
        manual = due is None
        record_decision(flow.spec, flow.state, decision, mono, wall, manual=manual)
        if isinstance(decision, Queue | Skip):
            what = "its trigger" if due is None else f"its run due at {_fmt_wall(due, mono)}"
            form = "flow %r: %s %s" if isinstance(decision, Queue) else "flow %r: skipped %s: %s"
            log.info(form, flow.spec.id, what, decision.reason, extra={"flow": flow.spec.id})
            return
        self._launch(flow, decision.due)

    def _launch(self, flow: Flow, due: float) -> None:
        assert self._pool is not None
        flow.state.waiting += 1
        try:
            self._pool.submit(self._run_flow, flow, due)
        except RuntimeError:  # the pool is shut down: we are stopping
            flow.state.waiting -= 1

    # -- a run (in a run-pool thread) --------------------------------------------------
    def _run_flow(self, flow: Flow, due: float) -> None:
        spec, state = flow.spec, flow.state
        started = time.monotonic()
        with self._lock:
            resume_id, state.resume_id = state.resume_id, None
        job = Job(spec, resume_id)  # a fresh store is made outside the scheduler's lock
        with self._lock:
            begins = not self._stopping
            if begins:
                self.lateness.append(started - due)
                number = record_start(state, job, _wall_now())
            else:
                state.waiting -= 1
                self._idle.notify_all()
        if not begins:
            job.discard()
            return
        outcome, error = job.execute()
        with self._lock:
            mono = time.monotonic()
            record_end(
                spec, state, job, error,
                duration=mono - started, mono=mono, wall=_wall_now(), rng=self._rng,
            )  # fmt: skip
            info = flow_info(spec, state)
            if state.queued and not self._stopping and not state.tripped:
                state.queued = None
                self._launch(flow, mono)
            self._idle.notify_all()
        self._log_end(spec, number, outcome, error, info)
        self._write_status()
        self._wake.set()

    def _log_end(
        self, spec: FlowSpec, number: int, outcome: str, error: BaseException | None,
        info: FlowInfo,
    ) -> None:  # fmt: skip
        nxt = info.next_run.isoformat(timespec="milliseconds") if info.next_run else "on trigger"
        took = info.last_duration or 0.0
        if error is None:
            log.info(
                "flow %r run %d %s in %.3fs; next run %s",
                spec.id, number, outcome, took, nxt, extra={"flow": spec.id},
            )  # fmt: skip
            return
        tripped = (
            f" (tripped after {info.consecutive_failures} consecutive failures: reset() resumes)"
            if info.tripped
            else ""
        )
        log.warning(
            "flow %r run %d failed in %.3fs: %s; next run %s%s",
            spec.id, number, took, info.last_error, nxt, tripped, extra={"flow": spec.id},
        )  # fmt: skip

    # -- reporting ---------------------------------------------------------------------
    def _write_status(self, *, stopped: bool = False) -> None:
        path = self.status_file
        if path is None:
            return
        try:
            write_status_file(
                path, self.list(), _wall_now(), stopped=stopped, health=self._health(stopped)
            )
        except OSError as exc:
            log.error("could not write the status file %s: %s", path, exc)

    def _health(self, stopped: bool) -> dict[str, dict[str, bool]]:
        """``check_health()`` of each flow whose workflow has resources (the last verdicts
        once stopping: the pool may be gone). A probe that raises is logged, never fatal."""
        if stopped:
            return dict(self._last_health)
        with self._lock:
            flows = [(f.spec.id, f.spec.workflow) for f in self._flows.values()]
        report: dict[str, dict[str, bool]] = {}
        seen: dict[int, dict[str, bool]] = {}  # a workflow shared by flows: probed once
        for flow_id, wf in flows:
            if wf._resources is None:  # no resources: nothing to report
                continue
            if id(wf) not in seen:
                try:
                    seen[id(wf)] = wf.check_health()
                except Exception:
                    log.warning("check_health() of flow %r failed", flow_id, exc_info=True)
                    continue
            report[flow_id] = seen[id(wf)]
        self._last_health.update(report)
        return report


def _fmt_wall(due: float, mono: float) -> str:
    wall = datetime.now().astimezone() - timedelta(seconds=mono - due)
    return wall.isoformat(timespec="milliseconds")
