"""The scheduler's decisions without threads: FlowSpec checks, decide_due, ticks, run ends.

Times are plain numbers (monotonic seconds) and one fixed wall instant; nothing sleeps.
"""

from __future__ import annotations

import math
import pickle
import random
from datetime import UTC, datetime, timedelta
from enum import Enum, auto
from typing import Any

import pytest

from cano_mp import (
    Backoff,
    ConfigError,
    FlowInfo,
    FlowStatus,
    Scheduler,
    SharedStore,
    WaitStrategy,
    Workflow,
)
from cano_mp._scheduler.flows import (
    FlowSpec,
    FlowState,
    Instances,
    Queue,
    Skip,
    Start,
    arm,
    decide_due,
    flow_info,
    record_decision,
    record_end,
    record_start,
    seconds_until_due,
    take_tick,
)
from cano_mp._scheduler.triggers import CronSchedule, Every


class S(Enum):
    GO = auto()
    DONE = auto()


def step(store: SharedStore) -> S:
    return S.DONE


WF = Workflow(start=S.GO, name="f", executor="inline").register(S.GO, step).add_exit_state(S.DONE)
WALL = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def spec(**kw: Any) -> FlowSpec:
    kw.setdefault("schedule", Every(10.0))
    return FlowSpec("f", WF, S.GO, **kw)


class Run:
    """Stands for a run going on (anything with cancel())."""

    def cancel(self, grace: float | None = None) -> None:
        pass


def started(state: FlowState) -> Run:
    run = Run()
    state.waiting += 1
    record_start(state, run, WALL)
    return run


# -- FlowSpec: every option checked when the flow is built ---------------------------------------
@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"overlap": "sometimes"}, "overlap"),
        ({"max_overlap": 0}, "max_overlap"),
        ({"max_overlap": True}, "max_overlap"),
        ({"backoff": 5}, "backoff"),
        ({"trip_after": 0}, "trip_after"),
        ({"trip_after": 1.5}, "trip_after"),
        ({"store": "not a store"}, "store"),
        ({"instances": Instances(0)}, "instances"),
        ({"instances": Instances(2, wait="forever")}, "wait"),  # type: ignore[arg-type]
        ({"instances": Instances(2, max_concurrency=0)}, "max_concurrency"),
        ({"schedule": "*/5 * * * *"}, "schedule"),
    ],
)
def test_a_bad_option_is_a_config_error_naming_it(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        spec(**options)


def test_every_problem_of_a_spec_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        spec(overlap="never", max_overlap=-1, trip_after=0)
    assert all(word in str(err.value) for word in ("overlap", "max_overlap", "trip_after"))


def test_a_spec_checks_its_workflow_and_id() -> None:
    with pytest.raises(ConfigError, match="flow id"):
        FlowSpec("", WF, S.GO)
    with pytest.raises(ConfigError, match="expected a Workflow"):
        FlowSpec("f", "wf", S.GO)  # type: ignore[arg-type]
    no_start = Workflow(name="x").register(S.GO, step).add_exit_state(S.DONE)
    with pytest.raises(ConfigError, match="no initial state"):
        FlowSpec("f", no_start, None)
    with pytest.raises(ConfigError):
        FlowSpec("f", Workflow(start=S.GO).register(S.GO, step), S.GO)  # no exit state


def test_a_registered_store_is_never_shared_by_overlapping_runs() -> None:
    with SharedStore() as store:
        assert spec(store=store).store is store
        for shared in ({"overlap": "allow"}, {"instances": Instances(2)}):
            with pytest.raises(ConfigError, match="cannot be shared"):
                spec(store=store, **shared)


def test_unknown_registration_keywords_are_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown option\(s\) overlapp, retries"):
        FlowSpec.build("f", WF, S.GO, None, {"overlapp": "skip", "retries": 3})
    built = FlowSpec.build("f", WF, S.GO, None, {"overlap": "queue", "trip_after": 2})
    assert (built.overlap, built.trip_after, built.kind, built.describe()) == (
        "queue",
        2,
        "manual",
        "manual",
    )


def test_registration_methods_check_their_options_before_anything_runs() -> None:
    sched = Scheduler()
    with pytest.raises(ConfigError, match="trip_after"):
        sched.manual("m", WF, S.GO, trip_after=-1)
    with pytest.raises(ConfigError, match="mode"):
        sched.every("e", WF, S.GO, 1.0, mode="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown option"):
        sched.cron("c", WF, S.GO, "* * * * *", mode="delay")  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="max_concurrency"):
        sched.every_concurrent("c", WF, S.GO, 1, instances=2, max_concurrency=0)
    assert sched.list() == []


# -- durations ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1, math.inf, math.nan, timedelta(seconds=-1), "5"])
def test_an_interval_must_be_a_positive_finite_duration(bad: Any) -> None:
    with pytest.raises(ConfigError, match="interval"):
        Scheduler().every("e", WF, S.GO, bad)


@pytest.mark.parametrize("method", ["every_seconds", "every_minutes", "every_hours"])
@pytest.mark.parametrize("bad", [0, -2, math.inf, math.nan])
def test_scaled_intervals_are_checked_too(method: str, bad: float) -> None:
    with pytest.raises(ConfigError, match="interval"):
        getattr(Scheduler(), method)("e", WF, S.GO, bad)


def test_backoff_durations() -> None:
    assert Backoff(max_delay=math.inf).max_delay == math.inf  # no cap
    assert Backoff(initial=timedelta(seconds=2)).initial == 2.0
    for bad in ({"initial": -1}, {"initial": math.nan}, {"initial": math.inf}):
        with pytest.raises(ConfigError, match=r"Backoff\.initial"):
            Backoff(**bad)
    for bad in ({"max_delay": -1}, {"max_delay": math.nan}):
        with pytest.raises(ConfigError, match=r"Backoff\.max_delay"):
            Backoff(**bad)
    for m in (0.5, math.nan, math.inf, "2"):
        with pytest.raises(ConfigError, match=r"Backoff\.multiplier"):
            Backoff(multiplier=m)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"Backoff\.jitter"):
        Backoff(jitter=math.nan)
    uncapped = Backoff(initial=1, multiplier=10, max_delay=math.inf, jitter=0)
    assert uncapped.delay(4) == 1000.0 and uncapped.delay(10_000) == math.inf


def test_stop_timeouts_are_checked_and_inf_waits_as_long_as_it_takes() -> None:
    sched = Scheduler()
    for bad in (-1, math.nan, "soon"):
        with pytest.raises(ConfigError, match="stop timeout"):
            sched.stop(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="stop_timeout"):
        sched.run_forever(stop_timeout=-0.5)
    sched.start()
    sched.stop(math.inf)  # nothing runs: returns at once


# -- decide_due ----------------------------------------------------------------------------------
def test_an_idle_flow_starts_its_due_tick() -> None:
    assert decide_due(spec(), FlowState(), now=5.0, due=4.9) == Start(4.9)


@pytest.mark.parametrize("overlap", ["skip", "queue", "allow"])
def test_a_busy_flow_follows_its_overlap_policy(overlap: str) -> None:
    s, state = spec(overlap=overlap, max_overlap=2), FlowState()
    started(state)
    first = decide_due(s, state, 1.0, 1.0)
    expected = {"skip": Skip, "queue": Queue, "allow": Start}[overlap]
    assert isinstance(first, expected)
    record_decision(s, state, first, 1.0, WALL)
    if overlap == "skip":
        assert state.skipped == 1 and "still going (overlap='skip')" in first.reason  # type: ignore[union-attr]
    if overlap == "queue":
        assert state.queued == "tick"
        again = decide_due(s, state, 2.0, 2.0)
        assert isinstance(again, Skip) and "already queued" in again.reason
    if overlap == "allow":
        started(state)  # two going: max_overlap reached
        full = decide_due(s, state, 2.0, 2.0)
        assert isinstance(full, Skip) and "max_overlap=2" in full.reason


def test_a_trigger_takes_over_a_queued_tick() -> None:
    s, state = spec(overlap="queue"), FlowState()
    started(state)
    state.queued = "tick"
    decision = decide_due(s, state, 1.0, 1.0, manual=True)
    assert isinstance(decision, Queue)
    record_decision(s, state, decision, 1.0, WALL, manual=True)
    assert state.queued == "trigger"
    assert isinstance(decide_due(s, state, 1.0, 1.0, manual=True), Skip)


def test_backoff_skips_ticks_but_not_triggers() -> None:
    s, state = spec(backoff=Backoff(initial=10, jitter=0)), FlowState()
    run = started(state)
    record_end(
        s, state, run, ValueError("x"), duration=1.0, mono=100.0, wall=WALL, rng=random.Random()
    )
    assert state.not_before == 110.0
    tick = decide_due(s, state, 105.0, 105.0)
    assert isinstance(tick, Skip) and "backing off for 5.0s more after 1 consecutive" in tick.reason
    assert decide_due(s, state, 105.0, 105.0, manual=True) == Start(105.0)
    assert decide_due(s, state, 110.0, 110.0) == Start(110.0)


# -- ticks --------------------------------------------------------------------------------------
def test_a_rate_flow_ticks_on_its_grid_and_drops_missed_ticks() -> None:
    s, state = spec(schedule=Every(10.0)), FlowState()
    arm(s, state, 100.0, WALL)
    assert take_tick(s, state, 100.0, WALL) == 100.0  # at start()
    assert take_tick(s, state, 105.0, WALL) is None
    assert seconds_until_due(s, state, 105.0) == 5.0
    assert take_tick(s, state, 135.5, WALL) == 110.0  # late: one run, the rest dropped
    assert state.next_due == 140.0
    assert state.next_due_wall == WALL + timedelta(seconds=4.5)


def test_a_delay_flow_waits_its_interval_after_each_run_ends() -> None:
    s, state = spec(schedule=Every(10.0, "delay")), FlowState()
    arm(s, state, 100.0, WALL)
    assert take_tick(s, state, 100.0, WALL) == 100.0  # first run at start()
    assert state.next_due is None and seconds_until_due(s, state, 100.0) is None
    run = started(state)
    assert flow_info(s, state).next_run is None  # not known while it runs
    record_end(s, state, run, None, duration=37.0, mono=137.0, wall=WALL, rng=random.Random())
    assert state.next_due == 147.0 and state.next_due_wall == WALL + timedelta(seconds=10)
    assert take_tick(s, state, 146.9, WALL) is None
    assert take_tick(s, state, 147.0, WALL) == 147.0


def test_a_delay_flow_waits_for_its_backoff_when_longer() -> None:
    s = spec(schedule=Every(1.0, "delay"), backoff=Backoff(initial=30, jitter=0))
    state = FlowState()
    arm(s, state, 0.0, WALL)
    take_tick(s, state, 0.0, WALL)
    run = started(state)
    record_end(
        s, state, run, RuntimeError(), duration=1.0, mono=1.0, wall=WALL, rng=random.Random()
    )
    assert state.next_due == 31.0  # never a tick that the backoff would skip


def test_a_skipped_delay_tick_with_nothing_running_schedules_the_next() -> None:
    s, state = spec(schedule=Every(5.0, "delay")), FlowState()
    arm(s, state, 0.0, WALL)
    take_tick(s, state, 0.0, WALL)
    record_decision(s, state, Skip("why"), 0.0, WALL)
    assert state.next_due == 5.0 and state.skipped == 1


def test_an_infinite_backoff_shows_no_next_run() -> None:
    s = spec(schedule=Every(1.0, "delay"), backoff=Backoff(initial=1, max_delay=math.inf))
    state = FlowState()
    arm(s, state, 0.0, WALL)
    take_tick(s, state, 0.0, WALL)
    state.consecutive = 5000  # the next failure's delay overflows to inf
    run = started(state)
    record_end(
        s, state, run, RuntimeError(), duration=1.0, mono=1.0, wall=WALL, rng=random.Random()
    )
    assert state.next_due == math.inf and flow_info(s, state).next_run is None


def test_a_cron_flow_fires_once_per_time_and_follows_the_wall_clock() -> None:
    s, state = spec(schedule=CronSchedule("*/15 * * * *", "UTC")), FlowState()
    arm(s, state, 1000.0, WALL)  # 12:00 itself is not after 12:00
    assert state.next_due_wall == WALL + timedelta(minutes=15) and state.next_due == 1900.0
    assert take_tick(s, state, 1000.0, WALL) is None
    assert seconds_until_due(s, state, 1000.0) == 60.0  # looked at again within a minute
    later = WALL + timedelta(minutes=16)
    assert take_tick(s, state, 1960.0, later) == 1900.0
    assert state.next_due_wall == WALL + timedelta(minutes=30)
    # a wall-clock step of +10 min: the monotonic due time follows it
    assert take_tick(s, state, 1970.0, later + timedelta(minutes=10)) is None
    assert state.next_due == 1970.0 + 4 * 60  # 12:26 on the wall: 12:30 is 4 min away


def test_paused_and_tripped_flows_have_no_ticks_and_resume_drops_missed_ones() -> None:
    s, state = spec(schedule=Every(10.0)), FlowState()
    arm(s, state, 0.0, WALL)
    take_tick(s, state, 0.0, WALL)
    state.paused = True
    assert take_tick(s, state, 50.0, WALL) is None and seconds_until_due(s, state, 50) is None
    assert flow_info(s, state).next_run is None and flow_info(s, state).paused
    state.paused = False
    arm(s, state, 55.0, WALL, resume=True)
    assert state.next_due == 60.0  # the grid's next tick; 10..50 are not made up
    state.tripped = True
    assert take_tick(s, state, 60.0, WALL) is None


def test_a_resumed_delay_flow_keeps_its_plan_or_waits_one_interval() -> None:
    s, state = spec(schedule=Every(10.0, "delay")), FlowState()
    arm(s, state, 0.0, WALL)
    take_tick(s, state, 0.0, WALL)
    record_end(s, state, started(state), None, duration=1, mono=5.0, wall=WALL, rng=random.Random())
    arm(s, state, 8.0, WALL, resume=True)
    assert state.next_due == 15.0  # still ahead: kept
    arm(s, state, 40.0, WALL, resume=True)
    assert state.next_due == 50.0  # missed: one interval from now, not at once


# -- run ends -------------------------------------------------------------------------------------
def test_failures_count_trip_and_a_success_clears_them() -> None:
    s, state = spec(trip_after=2, overlap="queue"), FlowState()
    arm(s, state, 0.0, WALL)
    rng = random.Random()
    record_end(s, state, started(state), ValueError("boom"), duration=1, mono=1, wall=WALL, rng=rng)
    info = flow_info(s, state)
    assert (info.status, info.failure_count, info.consecutive_failures, info.tripped) == (
        FlowStatus.FAILED,
        1,
        1,
        False,
    )
    assert info.last_error == "ValueError: boom" and info.last_duration == 1
    state.queued = "tick"
    record_end(
        s, state, started(state), ValueError("again"), duration=1, mono=2, wall=WALL, rng=rng
    )
    assert state.tripped and state.queued is None and flow_info(s, state).next_run is None
    record_end(s, state, started(state), None, duration=1, mono=3, wall=WALL, rng=rng)
    info = flow_info(s, state)
    assert info.status is FlowStatus.COMPLETED and info.consecutive_failures == 0
    assert info.last_error is None and info.run_count == 3 and info.failure_count == 2


def test_flow_info_describes_the_flow() -> None:
    info = flow_info(spec(schedule=Every(0.5, "delay")), FlowState())
    assert isinstance(info, FlowInfo)
    assert (info.kind, info.schedule, info.status, info.paused) == (
        "every",
        "every 0.5s after each run",
        FlowStatus.IDLE,
        False,
    )
    cron = flow_info(spec(schedule=CronSchedule("@daily", "UTC")), FlowState())
    assert (cron.kind, cron.schedule) == ("cron", "cron '@daily' (UTC)")
    many = spec(schedule=None, instances=Instances(3, WaitStrategy.quota(2)))
    assert flow_info(many, FlowState()).kind == "manual"


def test_public_classes_live_in_cano_mp() -> None:
    for cls in (Scheduler, FlowInfo, FlowStatus, Backoff):
        assert cls.__module__ == "cano_mp"
    assert repr(FlowStatus.IDLE) == "<FlowStatus.IDLE: 'idle'>"
    info = flow_info(spec(), FlowState())
    for value in (info, Backoff(initial=2), FlowStatus.FAILED):
        assert pickle.loads(pickle.dumps(value)) == value  # found again as cano_mp.<name>
