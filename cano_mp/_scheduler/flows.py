"""One flow of the scheduler: its configuration, its state, and the decisions made on it.

* :class:`FlowSpec` is what was registered, frozen and checked when it is built: a bad
  option is a :class:`ConfigError` at registration, naming the option.
* :class:`FlowState` is what changes: due times, counters, the runs going on. The scheduler
  changes it under its lock, through the functions below.
* The functions are pure in time: they read ``mono`` (``time.monotonic()``) and ``wall``
  (an aware UTC datetime) from their arguments, never from a clock, and never sleep or
  start anything. ``take_tick`` says whether a scheduled tick is due and moves the schedule
  on; :func:`decide_due` says what becomes of a due tick or trigger (:class:`Start`,
  :class:`Queue` or :class:`Skip`); ``record_*`` keep the counters, the backoff and the trip.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol, TypedDict

from .._concurrent import ConcurrentWorkflow, WaitStrategy
from .._errors import ConfigError
from .._store import SharedStore
from .._workflow import Workflow
from .status import FlowInfo, FlowStatus
from .triggers import CronSchedule, Every, duration

__all__ = [
    "Backoff",
    "Decision",
    "Flow",
    "FlowOptions",
    "FlowSpec",
    "FlowState",
    "Instances",
    "Queue",
    "Skip",
    "Start",
    "arm",
    "decide_due",
    "flow_info",
    "record_decision",
    "record_end",
    "record_start",
    "seconds_until_due",
    "take_tick",
]

Overlap = Literal["skip", "queue", "allow"]
# Runs of one flow at once with overlap="allow", unless max_overlap says otherwise.
DEFAULT_MAX_OVERLAP = 4
# The scheduler thread wakes at least this often while cron flows are registered, so that a
# wall-clock change (NTP step, suspend) delays a cron run by at most this much.
CRON_RECHECK = 60.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays a flow's next runs after consecutive failures: after the n-th failure in a
    row, no run starts before ``min(initial * multiplier**(n-1), max_delay)`` seconds
    (± ``jitter`` of it) have passed since that failure. A success resets it, and so does
    ``Scheduler.reset``. ``max_delay=math.inf`` sets no cap."""

    initial: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        initial = duration(self.initial, "Backoff.initial", inf_ok=False)
        object.__setattr__(self, "initial", initial)
        max_delay = duration(self.max_delay, "Backoff.max_delay", inf_ok=True)
        object.__setattr__(self, "max_delay", max_delay)
        multiplier = self.multiplier
        if not isinstance(multiplier, int | float) or isinstance(multiplier, bool):
            raise ConfigError(f"Backoff.multiplier must be a number, got {multiplier!r}")
        if not 1 <= multiplier < math.inf:
            raise ConfigError(f"Backoff.multiplier must be >= 1 and finite, got {multiplier!r}")
        jitter = self.jitter
        if not isinstance(jitter, int | float) or isinstance(jitter, bool):
            raise ConfigError(f"Backoff.jitter must be a number, got {jitter!r}")
        if not 0 <= jitter <= 1:
            raise ConfigError(f"Backoff.jitter must be in [0, 1], got {jitter!r}")

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


class FlowOptions(TypedDict, total=False):
    """The keywords every registration method takes (see :class:`FlowSpec`)."""

    store: SharedStore | None
    overlap: Overlap
    max_overlap: int
    backoff: Backoff | None
    trip_after: int | None
    resume_unfinished: bool


@dataclass(frozen=True, slots=True)
class Instances:
    """A ``*_concurrent`` flow: each run is ``ConcurrentWorkflow(workflow,
    max_concurrency).execute(count, wait=wait)``."""

    count: int
    wait: WaitStrategy | None = None
    max_concurrency: int | None = None

    def problems(self) -> list[str]:
        found = []
        if not _is_int(self.count) or self.count < 1:
            found.append(f"instances must be an int >= 1, got {self.count!r}")
        if self.wait is not None and not isinstance(self.wait, WaitStrategy):
            found.append(f"wait must be a WaitStrategy, got {self.wait!r}")
        if self.max_concurrency is not None and (
            not _is_int(self.max_concurrency) or self.max_concurrency < 1
        ):
            found.append(f"max_concurrency must be an int >= 1, got {self.max_concurrency!r}")
        return found


@dataclass(frozen=True, slots=True)
class FlowSpec:
    """A registered flow, checked when built: ``schedule`` is an :class:`Every`, a
    :class:`CronSchedule` or ``None`` (manual).

    Options: ``store`` (every run uses it instead of a fresh store), ``overlap`` (``"skip"``:
    a tick that arrives while the previous run still goes is skipped and logged;
    ``"queue"``: one run waits and starts when the current one ends; ``"allow"``: runs
    overlap, at most ``max_overlap``), ``backoff`` (a :class:`Backoff` after consecutive
    failures) and ``trip_after`` (stop scheduling after that many consecutive failures).
    """

    id: str
    workflow: Workflow[Any]
    initial: Hashable
    schedule: Every | CronSchedule | None = None
    store: SharedStore | None = None
    overlap: Overlap = "skip"
    max_overlap: int = DEFAULT_MAX_OVERLAP
    backoff: Backoff | None = None
    trip_after: int | None = None
    instances: Instances | None = None
    resume_unfinished: bool = False  # start() resumes the workflow's unfinished run

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ConfigError(f"a flow id must be a non-empty str, got {self.id!r}")
        if not isinstance(self.workflow, Workflow):
            raise ConfigError(f"flow {self.id!r}: expected a Workflow, got {self.workflow!r}")
        problems = self._problems()
        if problems:
            raise ConfigError(f"flow {self.id!r}: " + "; ".join(problems))
        self.workflow.initial_state(self.initial)  # an initial state is known
        self.workflow.validate()

    @classmethod
    def build(
        cls,
        flow_id: str,
        workflow: Workflow[Any],
        initial: Hashable,
        schedule: Every | CronSchedule | None,
        options: Mapping[str, Any],
        instances: Instances | None = None,
    ) -> FlowSpec:
        """A spec from a registration method's keywords; an unknown one is refused."""
        known = FlowOptions.__annotations__.keys()
        unknown = set(options) - set(known)
        if unknown:
            raise ConfigError(
                f"flow {flow_id!r}: unknown option(s) {', '.join(sorted(unknown))} "
                f"(known: {', '.join(sorted(known))})"
            )
        return cls(flow_id, workflow, initial, schedule, instances=instances, **options)

    def _problems(self) -> list[str]:
        found = []
        if not isinstance(self.schedule, Every | CronSchedule | None):
            found.append(f"schedule must be Every, CronSchedule or None, got {self.schedule!r}")
        if self.overlap not in ("skip", "queue", "allow"):
            found.append(f"overlap must be 'skip', 'queue' or 'allow', got {self.overlap!r}")
        if not _is_int(self.max_overlap) or self.max_overlap < 1:
            found.append(f"max_overlap must be an int >= 1, got {self.max_overlap!r}")
        if self.store is not None and not isinstance(self.store, SharedStore):
            found.append(f"store must be a SharedStore, got {self.store!r}")
        elif self.store is not None and (self.overlap == "allow" or self.instances is not None):
            found.append(
                "a registered store cannot be shared by overlapping runs or concurrent instances"
            )
        if self.backoff is not None and not isinstance(self.backoff, Backoff):
            found.append(f"backoff must be a Backoff, got {self.backoff!r}")
        if self.trip_after is not None and (not _is_int(self.trip_after) or self.trip_after < 1):
            found.append(f"trip_after must be an int >= 1, got {self.trip_after!r}")
        if self.instances is not None:
            found.extend(self.instances.problems())
        if not isinstance(self.resume_unfinished, bool):
            found.append(f"resume_unfinished must be a bool, got {self.resume_unfinished!r}")
        elif self.resume_unfinished and (
            self.instances is not None or self.workflow._checkpoint_arg is None
        ):
            found.append(
                "resume_unfinished=True needs a workflow with a checkpoint "
                "(Workflow(checkpoint=...)) and no concurrent instances"
            )
        return found

    def unfinished_run(self) -> str | None:
        """The id of the workflow's latest run that can be resumed (failed, or crashed:
        recorded as running by a process that is gone), if any."""
        cs = self.workflow.checkpoint_store
        if cs is None:
            return None
        found = [
            r
            for r in cs.runs()
            if r.workflow == self.workflow.name
            and r.resumable
            and r.status != "completed"
            and not r.live
            and r.seq > 0
        ]
        return found[-1].run_id if found else None

    @property
    def kind(self) -> Literal["every", "cron", "manual"]:
        if isinstance(self.schedule, Every):
            return "every"
        return "cron" if isinstance(self.schedule, CronSchedule) else "manual"

    def describe(self) -> str:
        return "manual" if self.schedule is None else self.schedule.describe()

    def new_concurrent(self) -> ConcurrentWorkflow[Any]:
        assert self.instances is not None
        return ConcurrentWorkflow(
            self.workflow, max_concurrency=self.instances.max_concurrency, progress=False
        )


class Cancellable(Protocol):
    def cancel(self, grace: float | None = None) -> None: ...


@dataclass(eq=False)
class FlowState:
    """What changes as a flow runs. Times named ``*due`` are monotonic seconds; the wall
    twin is the aware UTC instant it stands for (``FlowInfo.next_run``)."""

    anchor: float | None = None  # an "every" flow's first tick ("rate": k-th at + k*interval)
    next_due: float | None = None  # the next scheduled tick; None: none (yet)
    next_due_wall: datetime | None = None
    triggers: int = 0  # trigger() calls the scheduler thread has not handled yet
    resume_id: str | None = None  # the next run resumes this one (resume_unfinished)
    queued: Literal["tick", "trigger"] | None = None  # overlap="queue": what waits
    running: set[Cancellable] = field(default_factory=set)
    waiting: int = 0  # handed to the run pool, not started yet
    status: FlowStatus = FlowStatus.IDLE
    run_count: int = 0
    failure_count: int = 0
    consecutive: int = 0
    skipped: int = 0
    tripped: bool = False
    paused: bool = False
    last_run: datetime | None = None
    last_error: str | None = None
    last_duration: float | None = None
    not_before: float = 0.0  # backoff: no scheduled run starts before this
    last_end: float | None = None

    @property
    def busy(self) -> int:
        """Runs going on or handed to the run pool."""
        return len(self.running) + self.waiting


@dataclass(eq=False, slots=True)
class Flow:
    """A registered flow: what it is, and where it stands."""

    spec: FlowSpec
    state: FlowState


def _wall_at(due: float, mono: float, wall: datetime) -> datetime | None:
    try:
        return wall + timedelta(seconds=due - mono)
    except OverflowError:  # an infinite backoff: there is no next run to show
        return None


def _delay_next(state: FlowState, due: float, mono: float, wall: datetime) -> None:
    state.next_due = max(due, state.not_before)
    state.next_due_wall = _wall_at(state.next_due, mono, wall)


def arm(
    spec: FlowSpec, state: FlowState, mono: float, wall: datetime, *, resume: bool = False
) -> None:
    """Set the flow's first due time (``start()``, or registration after it), or with
    ``resume`` its next one after a pause or a trip: missed ticks are not made up."""
    schedule = spec.schedule
    if isinstance(schedule, CronSchedule):
        state.next_due_wall = schedule.next_after(wall)
        state.next_due = mono + (state.next_due_wall - wall).total_seconds()
    elif isinstance(schedule, Every):
        interval = schedule.interval
        if state.anchor is None:
            state.anchor = mono
            state.next_due, state.next_due_wall = mono, wall
        elif resume and schedule.mode == "rate":
            grid = schedule.grid(state.anchor)
            state.next_due = grid.tick_at_or_after(mono)[1]
            state.next_due_wall = _wall_at(state.next_due, mono, wall)
        elif resume and state.busy == 0:  # "delay": the run that ends sets it otherwise
            planned = state.next_due if state.last_end is None else state.last_end + interval
            due = planned if planned is not None and planned >= mono else mono + interval
            _delay_next(state, due, mono, wall)


def take_tick(spec: FlowSpec, state: FlowState, mono: float, wall: datetime) -> float | None:
    """If a scheduled tick of the flow is due at ``mono`` / ``wall``: move the schedule to
    the next tick and return the due one (monotonic), else ``None``. Paused and tripped
    flows have no ticks; ticks missed meanwhile are dropped, not made up."""
    schedule = spec.schedule
    if state.tripped or state.paused or state.next_due is None or schedule is None:
        return None
    if isinstance(schedule, CronSchedule):
        due_wall = state.next_due_wall
        assert due_wall is not None
        fired = None
        if wall >= due_wall:
            fired = mono - (wall - due_wall).total_seconds()
            due_wall = state.next_due_wall = schedule.next_after(max(wall, due_wall))
        # From the wall clock every time: a clock step moves the monotonic due time.
        state.next_due = mono + (due_wall - wall).total_seconds()
        return fired
    if mono < state.next_due:
        return None
    fired = state.next_due
    if schedule.mode == "delay":
        state.next_due = state.next_due_wall = None  # set again when the run ends
    else:
        assert state.anchor is not None
        nxt = schedule.grid(state.anchor).tick_after(mono)[1]
        state.next_due, state.next_due_wall = nxt, _wall_at(nxt, mono, wall)
    return fired


def seconds_until_due(spec: FlowSpec, state: FlowState, mono: float) -> float | None:
    """Seconds until the flow's next scheduled tick (``None``: nothing scheduled); a cron
    flow is looked at again within :data:`CRON_RECHECK`."""
    if state.tripped or state.paused or state.next_due is None or spec.schedule is None:
        return None
    wait = state.next_due - mono
    return min(wait, CRON_RECHECK) if isinstance(spec.schedule, CronSchedule) else wait


@dataclass(frozen=True, slots=True)
class Start:
    """Start a run now; ``due`` is when it was due (monotonic), for lateness."""

    due: float


@dataclass(frozen=True, slots=True)
class Queue:
    """Start a run when the one going on ends (``overlap="queue"``)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Skip:
    """Drop this tick (or trigger); ``reason`` says why, in words."""

    reason: str


Decision = Start | Queue | Skip


def decide_due(
    spec: FlowSpec, state: FlowState, now: float, due: float, *, manual: bool = False
) -> Decision:
    """What becomes of a tick due at ``due`` (or, with ``manual``, of a ``trigger()``) of
    the flow at ``now``: its backoff (ticks only), then its overlap policy decide."""
    if not manual and now < state.not_before:
        return Skip(
            f"backing off for {state.not_before - now:.1f}s more after "
            f"{state.consecutive} consecutive failure(s)"
        )
    busy = state.busy
    if not busy:
        return Start(due)
    if spec.overlap == "queue":
        # A trigger takes over a queued tick, so that pause() (which drops queued ticks)
        # does not drop it.
        if state.queued is None or (manual and state.queued == "tick"):
            return Queue("waits for the running one to finish (overlap='queue')")
        return Skip("a run is going and another is already queued (overlap='queue')")
    if spec.overlap == "skip":
        return Skip("its previous run is still going (overlap='skip')")
    if busy >= spec.max_overlap:
        return Skip(f"{busy} runs are going, its max_overlap={spec.max_overlap}")
    return Start(due)


def record_decision(
    spec: FlowSpec, state: FlowState, decision: Decision, mono: float, wall: datetime, *,
    manual: bool = False,
) -> None:  # fmt: skip
    """Count a skip, or note what is queued (a :class:`Start` is the caller's)."""
    if isinstance(decision, Queue):
        state.queued = "trigger" if manual else "tick"
    elif isinstance(decision, Skip):
        state.skipped += 1
        schedule = spec.schedule
        if (
            isinstance(schedule, Every)
            and schedule.mode == "delay"
            and state.next_due is None
            and state.busy == 0
        ):  # no run will end to set the next tick
            _delay_next(state, mono + schedule.interval, mono, wall)


def record_start(state: FlowState, run: Cancellable, wall: datetime) -> int:
    """A run begins; returns its number (1-based)."""
    state.waiting -= 1
    state.running.add(run)
    state.run_count += 1
    state.status = FlowStatus.RUNNING
    state.last_run = wall
    return state.run_count


def record_end(
    spec: FlowSpec, state: FlowState, run: Cancellable, error: BaseException | None, *,
    duration: float, mono: float, wall: datetime, rng: random.Random,
) -> None:  # fmt: skip
    """A run ended: status, counters, the backoff and the trip; a ``"delay"`` flow's next
    tick is one interval (or the backoff, if longer) from now."""
    state.running.discard(run)
    state.last_duration = duration
    state.last_end = mono
    if error is None:
        state.status = FlowStatus.COMPLETED
        state.consecutive = 0
        state.not_before = 0.0
        state.last_error = None
    else:
        state.status = FlowStatus.FAILED
        state.failure_count += 1
        state.consecutive += 1
        state.last_error = f"{type(error).__name__}: {error}"
        if spec.backoff is not None:
            state.not_before = mono + spec.backoff.delay(state.consecutive, rng)
        if spec.trip_after is not None and state.consecutive >= spec.trip_after:
            state.tripped = True
            state.next_due = state.next_due_wall = None
            state.queued = None
    schedule = spec.schedule
    if isinstance(schedule, Every) and schedule.mode == "delay" and not state.tripped:
        _delay_next(state, mono + schedule.interval, mono, wall)


def flow_info(spec: FlowSpec, state: FlowState) -> FlowInfo:
    """The flow's :class:`FlowInfo` now."""
    next_run = None
    if not (state.tripped or state.paused or spec.schedule is None):
        next_run = state.next_due_wall
    return FlowInfo(
        id=spec.id,
        status=state.status,
        run_count=state.run_count,
        failure_count=state.failure_count,
        last_run=state.last_run,
        next_run=next_run,
        last_error=state.last_error,
        last_duration=state.last_duration,
        kind=spec.kind,
        schedule=spec.describe(),
        skipped=state.skipped,
        consecutive_failures=state.consecutive,
        tripped=state.tripped,
        running=state.busy,
        paused=state.paused,
    )
