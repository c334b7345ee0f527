"""``Scheduler``: one background thread that starts workflow runs on intervals, cron
expressions or by hand.

The scheduler thread only decides: it sleeps on ``Event.wait`` until the nearest due time
(no polling; ``trigger()`` and ``stop()`` wake it at once), then hands each due run to a
run pool of threads (``max_concurrent_runs``) and computes the flow's next due time on its
absolute grid. Runs drive their workflow (or ``ConcurrentWorkflow``) like ``orchestrate()``;
their CPU work is in the process pool.

Per flow: an overlap policy for a tick that arrives while a run is still going (``skip``,
``queue``, ``allow``), an optional failure :class:`Backoff` that delays the next runs after
consecutive failures, and an optional trip (``trip_after``) that stops scheduling the flow
until :meth:`Scheduler.reset`.
"""

from __future__ import annotations

import enum
import html
import json
import os
import random
import signal
import threading
import time
from collections import deque
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any, Literal

from ._concurrent import ConcurrentWorkflow, WaitStrategy, _Execution
from ._engine import Run, _describe
from ._errors import CanoError, ConfigError
from ._log import get_logger
from ._retry import to_seconds
from ._store import SharedStore
from ._triggers import CronSchedule, IntervalGrid

if TYPE_CHECKING:
    from ._workflow import Workflow

__all__ = ["Backoff", "FlowInfo", "FlowStatus", "Scheduler"]

log = get_logger("cano_mp.scheduler")

Overlap = Literal["skip", "queue", "allow"]

# The scheduler thread wakes at least this often while cron flows are registered, so that a
# wall-clock change (NTP step, suspend) delays a cron run by at most this much.
CRON_RECHECK = 60.0
# Runs of one flow at once with overlap="allow", unless max_overlap says otherwise.
DEFAULT_MAX_OVERLAP = 4


class FlowStatus(enum.Enum):
    """Where a flow stands: never run, running, its last run completed, or failed (also
    when it tripped after too many consecutive failures)."""

    IDLE = "idle"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays a flow's next runs after consecutive failures: after the n-th failure in a
    row, no run starts before ``min(initial * multiplier**(n-1), max_delay)`` seconds
    (± ``jitter`` of it) have passed since that failure. A success resets it."""

    initial: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        for name in ("initial", "max_delay"):
            value = to_seconds(getattr(self, name), name)
            if value < 0:
                raise ConfigError(f"Backoff.{name} must be >= 0, got {value!r}")
            object.__setattr__(self, name, value)
        if not self.multiplier >= 1:
            raise ConfigError(f"Backoff.multiplier must be >= 1, got {self.multiplier!r}")
        if not 0 <= self.jitter <= 1:
            raise ConfigError(f"Backoff.jitter must be in [0, 1], got {self.jitter!r}")

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after ``failures`` consecutive failures (0 for none)."""
        if failures <= 0:
            return 0.0
        try:
            raw = self.initial * self.multiplier ** (failures - 1)
        except OverflowError:
            raw = self.max_delay
        d = min(raw, self.max_delay)
        if self.jitter:
            d *= 1.0 + self.jitter * (rng or random).uniform(-1.0, 1.0)
        return max(0.0, d)


@dataclass(frozen=True)
class FlowInfo:
    """A snapshot of one flow (``Scheduler.status`` / ``list``).

    Attributes:
        id: the flow id.
        status: :class:`FlowStatus`.
        run_count: runs started (a skipped tick is not a run).
        failure_count: runs that failed.
        last_run: when the last run started (aware datetime), or ``None``.
        next_run: when the next run is due (aware), ``None`` for manual or tripped flows.
        last_error: ``"Type: message"`` of the last failure, ``None`` after a success.
        last_duration: seconds the last finished run took, or ``None``.
        kind: ``"every"``, ``"cron"`` or ``"manual"``; ``schedule``: its description.
        skipped: ticks skipped because a run was still going (or backing off).
        consecutive_failures: failures since the last success.
        tripped: ``True`` once ``trip_after`` consecutive failures stopped the flow.
        running: runs of the flow going on now.
    """

    id: str
    status: FlowStatus
    run_count: int
    failure_count: int
    last_run: datetime | None
    next_run: datetime | None
    last_error: str | None
    last_duration: float | None
    kind: str = "manual"
    schedule: str = ""
    skipped: int = 0
    consecutive_failures: int = 0
    tripped: bool = False
    running: int = 0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (datetimes in ISO 8601, the status by value)."""
        d = asdict(self)
        d["status"] = self.status.value
        for k in ("last_run", "next_run"):
            d[k] = d[k].isoformat() if d[k] is not None else None
        return d

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>"
            for k, v in self.to_json().items()
        )
        return f"<table>{rows}</table>"


@dataclass(eq=False)
class _Flow:
    id: str
    kind: Literal["every", "cron", "manual"]
    workflow: Workflow[Any]
    initial: Any
    store: SharedStore | None
    overlap: Overlap
    max_overlap: int
    backoff: Backoff | None
    trip_after: int | None
    interval: float | None = None
    cron: CronSchedule | None = None
    instances: int | None = None  # a *_concurrent flow
    wait: WaitStrategy | None = None
    max_concurrency: int | None = None
    # state
    grid: IntervalGrid | None = None
    next_due: float | None = None  # monotonic
    next_due_wall: datetime | None = None  # the grid / cron time it stands for
    manual_pending: int = 0
    queued: bool = False
    running: set[Any] = field(default_factory=set)  # Run / _Execution objects
    waiting: int = 0  # handed to the run pool, not started yet
    status: FlowStatus = FlowStatus.IDLE
    run_count: int = 0
    failure_count: int = 0
    consecutive: int = 0
    skipped: int = 0
    tripped: bool = False
    last_run: datetime | None = None
    last_error: str | None = None
    last_duration: float | None = None
    not_before: float = 0.0  # monotonic: backoff

    def describe(self) -> str:
        if self.kind == "every":
            return f"every {self.interval:g}s"
        if self.kind == "cron":
            assert self.cron is not None
            return f"cron {self.cron.expr!r} ({self.cron.zone})"
        return "manual"


def _wall_now() -> datetime:
    return datetime.now(UTC)


class Scheduler:
    """Runs workflows on intervals, cron expressions or by hand, from one background
    thread::

        sched = Scheduler(max_concurrent_runs=4)
        sched.every_seconds("report", report_flow, Step.START, 30)
        sched.cron("nightly", cleanup_flow, Step.START, "0 3 * * *", tz="Europe/Paris")
        sched.manual("backfill", backfill_flow, Step.START)
        with sched:                      # start(); stop() on exit
            sched.trigger("backfill")
            ...

    Registration keywords (every kind): ``store`` (every run uses it instead of a fresh
    store), ``overlap`` (``"skip"``: a tick that arrives while the previous run still goes
    is skipped and logged; ``"queue"``: one run waits and starts when the current ends;
    ``"allow"``: runs overlap, at most ``max_overlap``), ``backoff`` (a :class:`Backoff`
    after consecutive failures) and ``trip_after`` (stop scheduling after that many
    consecutive failures; :meth:`reset` resumes).

    Args:
        max_concurrent_runs: most runs going on at once, across flows; due runs wait for a
            free slot. ``None``: no limit.
        status_file: a path rewritten atomically (JSON of every FlowInfo) after each run.
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
        self._flows: dict[str, _Flow] = {}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._started = False
        self._stopping = False
        self._stopped = threading.Event()
        self._rng = random.Random()
        self.lateness: deque[float] = deque(maxlen=100_000)
        """Seconds between each run's due time and its start (latest 100,000)."""

    # -- registration ----------------------------------------------------------------------
    def _register(self, flow: _Flow) -> Scheduler:
        from ._workflow import Workflow

        if not isinstance(flow.id, str) or not flow.id:
            raise ConfigError(f"a flow id must be a non-empty str, got {flow.id!r}")
        if not isinstance(flow.workflow, Workflow):
            raise ConfigError(f"flow {flow.id!r}: expected a Workflow, got {flow.workflow!r}")
        if flow.overlap not in ("skip", "queue", "allow"):
            raise ConfigError(
                f"flow {flow.id!r}: overlap must be 'skip', 'queue' or 'allow', "
                f"got {flow.overlap!r}"
            )
        if isinstance(flow.max_overlap, bool) or not isinstance(flow.max_overlap, int):
            raise ConfigError(f"flow {flow.id!r}: max_overlap must be an int")
        if flow.max_overlap < 1:
            raise ConfigError(f"flow {flow.id!r}: max_overlap must be >= 1")
        if flow.store is not None and not isinstance(flow.store, SharedStore):
            raise ConfigError(f"flow {flow.id!r}: store must be a SharedStore")
        if flow.store is not None and (flow.overlap == "allow" or flow.instances is not None):
            raise ConfigError(
                f"flow {flow.id!r}: a registered store cannot be shared by overlapping runs "
                "or concurrent instances"
            )
        if flow.backoff is not None and not isinstance(flow.backoff, Backoff):
            raise ConfigError(f"flow {flow.id!r}: backoff must be a Backoff")
        if flow.trip_after is not None and (
            isinstance(flow.trip_after, bool)
            or not isinstance(flow.trip_after, int)
            or flow.trip_after < 1
        ):
            raise ConfigError(f"flow {flow.id!r}: trip_after must be an int >= 1")
        if flow.instances is not None:
            ConcurrentWorkflow(flow.workflow, max_concurrency=flow.max_concurrency)  # checks
            if isinstance(flow.instances, bool) or not isinstance(flow.instances, int):
                raise ConfigError(f"flow {flow.id!r}: instances must be an int")
            if flow.instances < 1:
                raise ConfigError(f"flow {flow.id!r}: instances must be >= 1")
            if flow.wait is not None and not isinstance(flow.wait, WaitStrategy):
                raise ConfigError(f"flow {flow.id!r}: wait must be a WaitStrategy")
        flow.workflow._initial(flow.initial)  # an initial state is known
        flow.workflow.validate()
        with self._lock:
            if flow.id in self._flows:
                raise ConfigError(f"a flow with id {flow.id!r} is already registered")
            if self._stopping:
                raise ConfigError("the scheduler is stopping: no new flows")
            self._flows[flow.id] = flow
            if self._started:
                self._arm(flow, time.monotonic(), _wall_now())
        self._wake.set()
        return self

    def every(
        self,
        flow_id: str,
        workflow: Workflow[Any],
        initial_state: Hashable,
        interval: float | timedelta,
        **options: Any,
    ) -> Scheduler:
        """Run ``workflow`` at ``start()``, then every ``interval`` on a fixed grid."""
        seconds = to_seconds(interval, "interval")
        IntervalGrid(0.0, seconds)  # validates
        return self._register(
            _flow(flow_id, "every", workflow, initial_state, options, interval=seconds)
        )

    def every_seconds(
        self,
        flow_id: str,
        workflow: Workflow[Any],
        initial_state: Hashable,
        n: float,
        **options: Any,
    ) -> Scheduler:
        """``every(..., n)`` seconds."""
        return self.every(flow_id, workflow, initial_state, n, **options)

    def every_minutes(
        self,
        flow_id: str,
        workflow: Workflow[Any],
        initial_state: Hashable,
        n: float,
        **options: Any,
    ) -> Scheduler:
        """``every(..., n * 60)``."""
        return self.every(flow_id, workflow, initial_state, _scaled(n, 60), **options)

    def every_hours(
        self,
        flow_id: str,
        workflow: Workflow[Any],
        initial_state: Hashable,
        n: float,
        **options: Any,
    ) -> Scheduler:
        """``every(..., n * 3600)``."""
        return self.every(flow_id, workflow, initial_state, _scaled(n, 3600), **options)

    def cron(
        self,
        flow_id: str,
        workflow: Workflow[Any],
        initial_state: Hashable,
        expr: str,
        *,
        tz: str | tzinfo | None = None,
        **options: Any,
    ) -> Scheduler:
        """Run at the times of the cron expression ``expr`` (5 fields, or 6 with seconds
        last) in time zone ``tz`` (default: the local zone, with its DST rules)."""
        schedule = CronSchedule(expr, tz)
        return self._register(
            _flow(flow_id, "cron", workflow, initial_state, options, cron=schedule)
        )

    def manual(
        self, flow_id: str, workflow: Workflow[Any], initial_state: Hashable, **options: Any
    ) -> Scheduler:
        """A flow that runs only when :meth:`trigger` is called."""
        return self._register(_flow(flow_id, "manual", workflow, initial_state, options))

    def every_concurrent(
        self,
        flow_id: str,
        workflow: Workflow[Any],
        initial_state: Hashable,
        interval: float | timedelta,
        *,
        instances: int,
        wait: WaitStrategy | None = None,
        max_concurrency: int | None = None,
        **options: Any,
    ) -> Scheduler:
        """Like :meth:`every`; each run is ``ConcurrentWorkflow(workflow,
        max_concurrency).execute(instances, wait=wait)`` on fresh stores. A run fails
        when an instance failed."""
        seconds = to_seconds(interval, "interval")
        IntervalGrid(0.0, seconds)
        return self._register(
            _flow(
                flow_id, "every", workflow, initial_state, options, interval=seconds,
                instances=instances, wait=wait, max_concurrency=max_concurrency,
            )
        )  # fmt: skip

    def cron_concurrent(
        self,
        flow_id: str,
        workflow: Workflow[Any],
        initial_state: Hashable,
        expr: str,
        *,
        instances: int,
        wait: WaitStrategy | None = None,
        max_concurrency: int | None = None,
        tz: str | tzinfo | None = None,
        **options: Any,
    ) -> Scheduler:
        """Like :meth:`cron`, running ``instances`` concurrent instances each time."""
        schedule = CronSchedule(expr, tz)
        return self._register(
            _flow(
                flow_id, "cron", workflow, initial_state, options, cron=schedule,
                instances=instances, wait=wait, max_concurrency=max_concurrency,
            )
        )  # fmt: skip

    def manual_concurrent(
        self,
        flow_id: str,
        workflow: Workflow[Any],
        initial_state: Hashable,
        *,
        instances: int,
        wait: WaitStrategy | None = None,
        max_concurrency: int | None = None,
        **options: Any,
    ) -> Scheduler:
        """Like :meth:`manual`, running ``instances`` concurrent instances each time."""
        return self._register(
            _flow(
                flow_id, "manual", workflow, initial_state, options,
                instances=instances, wait=wait, max_concurrency=max_concurrency,
            )
        )  # fmt: skip

    # -- control -------------------------------------------------------------------------
    def start(self) -> Scheduler:
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
                self._arm(flow, mono, wall)
            self._thread = threading.Thread(
                target=self._loop, name="cano_mp-scheduler", daemon=True
            )
            self._thread.start()
        self._write_status()
        return self

    def trigger(self, flow_id: str) -> None:
        """Run the flow now (any kind), subject to its overlap policy."""
        with self._lock:
            flow = self._flows.get(flow_id)
            if flow is None:
                known = ", ".join(repr(k) for k in self._flows) or "none"
                raise ConfigError(f"no flow with id {flow_id!r} (known: {known})")
            flow.manual_pending += 1
        self._wake.set()

    def reset(self, flow_id: str) -> None:
        """Resume a tripped flow (and forget its consecutive failures)."""
        with self._lock:
            flow = self._flows.get(flow_id)
            if flow is None:
                raise ConfigError(f"no flow with id {flow_id!r}")
            flow.tripped = False
            flow.consecutive = 0
            flow.not_before = 0.0
            if flow.status is FlowStatus.FAILED and not flow.running:
                flow.status = FlowStatus.IDLE
            if self._started:
                self._arm(flow, time.monotonic(), _wall_now(), resume=True)
        self._wake.set()

    def status(self, flow_id: str) -> FlowInfo | None:
        """The flow's :class:`FlowInfo`, or ``None`` for an unknown id."""
        with self._lock:
            flow = self._flows.get(flow_id)
            return self._info(flow) if flow is not None else None

    def list(self) -> list[FlowInfo]:
        """Every flow's :class:`FlowInfo`, in registration order."""
        with self._lock:
            return [self._info(f) for f in self._flows.values()]

    def has_running_flows(self) -> bool:
        """Whether any run is going on (or handed to the run pool)."""
        return self.running_count() > 0

    def running_count(self) -> int:
        """Runs going on now, plus those waiting for a run-pool slot."""
        with self._lock:
            return sum(len(f.running) + f.waiting for f in self._flows.values())

    def stop(self, timeout: float = 30.0) -> None:
        """Stop scheduling; wait up to ``timeout`` seconds for running flows to finish.

        Past the timeout, what still runs is cancelled and :class:`CanoError` is raised.
        """
        with self._lock:
            first = not self._stopping
            self._stopping = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        deadline = time.monotonic() + max(0.0, timeout)
        with self._idle:
            while self._busy():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._idle.wait(left)
            late = [
                (f.id, len(f.running) + f.waiting)
                for f in self._flows.values()
                if f.running or f.waiting
            ]
            victims = [r for f in self._flows.values() for r in f.running]
        if late:
            for r in victims:
                r.cancel()
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
            self._stopped.set()
            self._write_status()
            what = ", ".join(f"{fid!r} ({n} run(s))" for fid, n in late)
            raise CanoError(
                f"the scheduler did not stop within {timeout}s: cancelled the runs of {what}"
            )
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._stopped.set()
        if first:
            self._write_status()
            log.info("scheduler stopped")

    def run_forever(self, *, stop_timeout: float = 30.0) -> None:
        """Start (if needed) and block until SIGINT / SIGTERM or :meth:`stop`; then stop
        gracefully (waiting ``stop_timeout`` for running flows) and return.

        Raises :class:`CanoError` when running flows had to be cancelled.
        """
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
            log.info(
                "%s received: stopping (waiting up to %gs for running flows)", name, stop_timeout
            )
        self.stop(stop_timeout)

    def __enter__(self) -> Scheduler:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopping else "running" if self._started else "not started"
        return f"<Scheduler {len(self._flows)} flows, {state}, {self.running_count()} runs going>"

    # -- the scheduler thread ----------------------------------------------------------
    def _busy(self) -> bool:
        return any(f.running or f.waiting for f in self._flows.values())

    def _arm(self, flow: _Flow, mono: float, wall: datetime, *, resume: bool = False) -> None:
        """Set the flow's first (or, after a reset, next) due time."""
        if flow.kind == "every":
            assert flow.interval is not None
            if flow.grid is None:
                flow.grid = IntervalGrid(mono, flow.interval)
                flow.next_due = mono
            elif resume:
                flow.next_due = flow.grid.tick_at_or_after(mono)[1]
            flow.next_due_wall = wall + timedelta(seconds=(flow.next_due or mono) - mono)
        elif flow.kind == "cron":
            assert flow.cron is not None
            due = flow.cron.next_after(wall)
            flow.next_due_wall = due
            flow.next_due = mono + (due - wall).total_seconds()

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
        mono = time.monotonic()
        wall = _wall_now()
        nearest: float | None = None
        for flow in self._flows.values():
            while flow.manual_pending:
                flow.manual_pending -= 1
                self._due(flow, mono, mono, manual=True)
            if flow.tripped or flow.next_due is None:
                continue
            if flow.kind == "cron":
                due = flow.next_due_wall
                assert due is not None and flow.cron is not None
                if wall >= due:
                    self._due(flow, mono, mono - (wall - due).total_seconds())
                    due = flow.next_due_wall = flow.cron.next_after(max(wall, due))
                flow.next_due = mono + (due - wall).total_seconds()
                wait = min(flow.next_due - mono, CRON_RECHECK)
            else:
                assert flow.grid is not None
                if mono >= flow.next_due:
                    self._due(flow, mono, flow.next_due)
                    _k, nxt = flow.grid.tick_after(mono)
                    flow.next_due = nxt
                    flow.next_due_wall = wall + timedelta(seconds=nxt - mono)
                wait = flow.next_due - mono
            nearest = wait if nearest is None else min(nearest, wait)
        return None if nearest is None else max(0.0, nearest)

    def _due(self, flow: _Flow, mono: float, due: float, *, manual: bool = False) -> None:
        """A tick (or trigger) of ``flow`` is due: start, queue or skip it."""
        if not manual and mono < flow.not_before:
            flow.skipped += 1
            log.info(
                "flow %r: skipped its run due at %s: backing off for %.1fs more after %d "
                "consecutive failure(s)",
                flow.id,
                _fmt_wall(due, mono),
                flow.not_before - mono,
                flow.consecutive,
                extra={"flow": flow.id},
            )
            return
        busy = len(flow.running) + flow.waiting
        if busy:
            if flow.overlap == "queue":
                if flow.queued:
                    flow.skipped += 1
                    log.info(
                        "flow %r: skipped its run due at %s: a run is going and another is "
                        "already queued (overlap='queue')",
                        flow.id,
                        _fmt_wall(due, mono),
                        extra={"flow": flow.id},
                    )
                else:
                    flow.queued = True
                    log.info(
                        "flow %r: its run due at %s waits for the running one to finish "
                        "(overlap='queue')",
                        flow.id,
                        _fmt_wall(due, mono),
                        extra={"flow": flow.id},
                    )
                return
            if flow.overlap == "skip" or busy >= flow.max_overlap:
                flow.skipped += 1
                why = (
                    "its previous run is still going (overlap='skip')"
                    if flow.overlap == "skip"
                    else f"{busy} runs are going, its max_overlap={flow.max_overlap}"
                )
                log.info(
                    "flow %r: skipped its run due at %s: %s",
                    flow.id,
                    _fmt_wall(due, mono),
                    why,
                    extra={"flow": flow.id},
                )
                return
        self._launch(flow, due)

    def _launch(self, flow: _Flow, due: float) -> None:
        assert self._pool is not None
        flow.waiting += 1
        try:
            self._pool.submit(self._run_flow, flow, due)
        except RuntimeError:  # the pool is shut down: we are stopping
            flow.waiting -= 1

    # -- a run (in a run-pool thread) --------------------------------------------------
    def _run_flow(self, flow: _Flow, due: float) -> None:
        started = time.monotonic()
        # Stores are made (directories created) outside the scheduler's lock.
        owned = flow.store is None and flow.instances is None
        store = SharedStore() if owned else flow.store
        runner: Run | _Execution[Any]
        if flow.instances is not None:
            cw = ConcurrentWorkflow(
                flow.workflow, max_concurrency=flow.max_concurrency, progress=False
            )
            runner = cw._prepare(flow.instances, flow.initial, flow.wait)
        else:
            runner = flow.workflow._new_run(store)
        with self._lock:
            flow.waiting -= 1
            if self._stopping:
                self._idle.notify_all()
                stopping = True
            else:
                stopping = False
                self.lateness.append(started - due)
                flow.running.add(runner)
                flow.run_count += 1
                number = flow.run_count
                flow.status = FlowStatus.RUNNING
                flow.last_run = _wall_now()
        if stopping:  # the run never starts: give back what was made for it
            if owned and store is not None:
                store.close()
            if isinstance(runner, _Execution):
                for made in runner.owned:
                    made.close()
            return
        error: BaseException | None = None
        outcome = "completed"
        try:
            if isinstance(runner, Run):
                final = runner.run(flow.workflow._initial(flow.initial))
                outcome = f"completed at {_describe(final)}"
            else:
                with runner.run() as result:
                    outcome = repr(result)
                    if result.failed:
                        first = next(r for r in result.results if r.status == "failed")
                        error = CanoError(
                            f"{result.failed} of {len(result.results)} instances failed; "
                            f"instance {first.index}: {type(first.error).__name__}: {first.error}"
                        )
        except BaseException as exc:
            error = exc
        finally:
            if owned and store is not None:
                store.close()
        duration = time.monotonic() - started
        with self._lock:
            flow.running.discard(runner)
            flow.last_duration = duration
            if error is None:
                flow.status = FlowStatus.COMPLETED
                flow.consecutive = 0
                flow.not_before = 0.0
                flow.last_error = None
            else:
                flow.status = FlowStatus.FAILED
                flow.failure_count += 1
                flow.consecutive += 1
                flow.last_error = f"{type(error).__name__}: {error}"
                if flow.backoff is not None:
                    flow.not_before = time.monotonic() + flow.backoff.delay(
                        flow.consecutive, self._rng
                    )
                if flow.trip_after is not None and flow.consecutive >= flow.trip_after:
                    flow.tripped = True
                    flow.next_due = None
                    flow.next_due_wall = None
                    flow.queued = False
            info = self._info(flow)
            if flow.queued and not self._stopping and not flow.tripped:
                flow.queued = False
                self._launch(flow, time.monotonic())
            self._idle.notify_all()
        nxt = info.next_run.isoformat(timespec="milliseconds") if info.next_run else "on trigger"
        if error is None:
            log.info(
                "flow %r run %d %s in %.3fs; next run %s",
                flow.id,
                number,
                outcome,
                duration,
                nxt,
                extra={"flow": flow.id},
            )
        else:
            log.warning(
                "flow %r run %d failed in %.3fs: %s; next run %s%s",
                flow.id,
                number,
                duration,
                info.last_error,
                nxt,
                f" (tripped after {flow.consecutive} consecutive failures: reset() resumes)"
                if flow.tripped
                else "",
                extra={"flow": flow.id},
            )
        self._write_status()
        self._wake.set()

    # -- reporting ---------------------------------------------------------------------
    def _info(self, flow: _Flow) -> FlowInfo:
        next_run = None
        if not flow.tripped and flow.next_due_wall is not None and flow.kind != "manual":
            next_run = flow.next_due_wall
        return FlowInfo(
            id=flow.id,
            status=flow.status,
            run_count=flow.run_count,
            failure_count=flow.failure_count,
            last_run=flow.last_run,
            next_run=next_run,
            last_error=flow.last_error,
            last_duration=flow.last_duration,
            kind=flow.kind,
            schedule=flow.describe(),
            skipped=flow.skipped,
            consecutive_failures=flow.consecutive,
            tripped=flow.tripped,
            running=len(flow.running) + flow.waiting,
        )

    def _write_status(self) -> None:
        path = self.status_file
        if path is None:
            return
        data = {
            "updated": _wall_now().isoformat(),
            "pid": os.getpid(),
            "flows": [i.to_json() for i in self.list()],
        }
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(data, f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except OSError as exc:
            log.error("could not write the status file %s: %s", path, exc)


def _flow(
    flow_id: str,
    kind: Literal["every", "cron", "manual"],
    workflow: Workflow[Any],
    initial: Any,
    options: dict[str, Any],
    **fields: Any,
) -> _Flow:
    allowed = {"store", "overlap", "max_overlap", "backoff", "trip_after"}
    unknown = set(options) - allowed
    if unknown:
        raise ConfigError(
            f"flow {flow_id!r}: unknown option(s) {', '.join(sorted(unknown))} "
            f"(known: {', '.join(sorted(allowed))})"
        )
    return _Flow(
        flow_id,
        kind,
        workflow,
        initial,
        options.get("store"),
        options.get("overlap", "skip"),
        options.get("max_overlap", DEFAULT_MAX_OVERLAP),
        options.get("backoff"),
        options.get("trip_after"),
        **fields,
    )


def _scaled(n: float, factor: int) -> float:
    if isinstance(n, bool) or not isinstance(n, int | float):
        raise ConfigError(f"expected a number, got {n!r}")
    return float(n) * factor


def _fmt_wall(due: float, mono: float) -> str:
    wall = datetime.now().astimezone() - timedelta(seconds=mono - due)
    return wall.isoformat(timespec="milliseconds")
