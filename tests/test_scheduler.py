"""Scheduler: the thread with short intervals, overlap policies, backoff, trips, stops."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from enum import Enum, auto
from pathlib import Path
from typing import Any

import pytest

from cano_mp import (
    Backoff,
    CanoError,
    ConfigError,
    FlowStatus,
    RetryPolicy,
    Scheduler,
    SharedStore,
    WaitStrategy,
    Workflow,
    task,
    task_context,
)


class S(Enum):
    GO = auto()
    DONE = auto()


class Recorder:
    """Spans of runs, recorded from inline tasks (same process)."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self.lock = threading.Lock()

    def most_at_once(self) -> int:
        events = sorted([(a, 1) for a, _ in self.spans] + [(b, -1) for _, b in self.spans])
        now = best = 0
        for _, d in events:
            now += d
            best = max(best, now)
        return best


def flow_of(seconds: float = 0.0, fail: bool = False, rec: Recorder | None = None) -> Workflow[S]:
    @task(inline=True, retry=RetryPolicy.none())
    def step(store: SharedStore) -> S:
        t0 = time.monotonic()
        ctx = task_context()
        while time.monotonic() - t0 < seconds and not ctx.cancelled():
            time.sleep(0.005)
        if rec is not None:
            with rec.lock:
                rec.spans.append((t0, time.monotonic()))
        store["runs"] = store.get("runs", 0) + 1
        if fail:
            raise ValueError("boom")
        return S.DONE

    return Workflow(start=S.GO, name="f").register(S.GO, step).add_exit_state(S.DONE)


@pytest.fixture
def sched() -> Iterator[Scheduler]:
    s = Scheduler()
    try:
        yield s
    finally:
        try:
            s.stop(timeout=5)
        except CanoError:
            pass


def wait_for(pred: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def test_every_runs_at_start_then_on_a_fixed_grid(sched: Scheduler) -> None:
    rec = Recorder()
    sched.every_seconds("tick", flow_of(rec=rec), S.GO, 0.1)
    t0 = time.monotonic()
    sched.start()
    wait_for(lambda: len(rec.spans) >= 6)
    starts = [a - t0 for a, _ in rec.spans[:6]]
    # k * 0.1 s: never early, never a whole interval late (a tick can be late under load;
    # the median lateness below is the precision check)
    for k, start in enumerate(starts):
        assert k * 0.1 - 0.01 <= start < k * 0.1 + 0.09
    wait_for(lambda: (i := sched.status("tick")) is not None and i.status is FlowStatus.COMPLETED)
    info = sched.status("tick")
    assert info is not None and info.run_count >= 6
    assert info.next_run is not None and info.next_run.tzinfo is not None
    assert info.kind == "every" and info.schedule == "every 0.1s"
    assert sorted(sched.lateness)[len(sched.lateness) // 2] < 0.02


def test_skip_overlap_never_runs_two_at_once_and_counts_skips(sched: Scheduler) -> None:
    rec = Recorder()
    sched.every_seconds("slow", flow_of(0.25, rec=rec), S.GO, 0.05)
    sched.start()
    wait_for(lambda: len(rec.spans) >= 3)
    info = sched.status("slow")
    assert info is not None and info.skipped >= 6
    assert rec.most_at_once() == 1


def test_queue_overlap_runs_one_pending_run_right_after(sched: Scheduler) -> None:
    rec = Recorder()
    sched.every_seconds("q", flow_of(0.2, rec=rec), S.GO, 0.05, overlap="queue")
    sched.start()
    wait_for(lambda: len(rec.spans) >= 3)
    gaps = [b[0] - a[1] for a, b in zip(rec.spans, rec.spans[1:], strict=False)]
    assert all(g < 0.05 for g in gaps[:2])  # the queued run starts as the previous ends
    assert rec.most_at_once() == 1


def test_allow_overlap_is_bounded(sched: Scheduler) -> None:
    rec = Recorder()
    sched.every_seconds("a", flow_of(0.3, rec=rec), S.GO, 0.03, overlap="allow", max_overlap=3)
    sched.start()
    wait_for(lambda: len(rec.spans) >= 6)
    assert rec.most_at_once() == 3


def test_manual_flows_run_on_trigger_only(sched: Scheduler) -> None:
    store = SharedStore()
    try:
        sched.manual("m", flow_of(), S.GO, store=store)
        sched.start()
        time.sleep(0.2)
        info = sched.status("m")
        assert info is not None and info.run_count == 0 and info.status is FlowStatus.IDLE
        assert info.next_run is None
        sched.trigger("m")
        wait_for(lambda: store.get("runs") == 1)
        sched.trigger("m")
        wait_for(lambda: store.get("runs") == 2)  # the registered store is reused
        with pytest.raises(ConfigError, match="no flow with id 'nope'"):
            sched.trigger("nope")
    finally:
        sched.stop()
        store.close()


def test_cron_with_seconds_runs_every_second(sched: Scheduler) -> None:
    rec = Recorder()
    sched.cron("c", flow_of(rec=rec), S.GO, "* * * * * *", tz="UTC")
    sched.start()
    wait_for(lambda: len(rec.spans) >= 2, timeout=4)
    # each run starts just after a whole second of the wall clock, one second apart
    offset = time.time() - time.monotonic()
    walls = [a + offset for a, _ in rec.spans[:2]]
    assert all(w % 1.0 < 0.3 for w in walls), walls
    assert int(walls[1]) - int(walls[0]) == 1
    info = sched.status("c")
    assert info is not None and info.next_run is not None and info.next_run.microsecond == 0


def test_backoff_spaces_runs_after_failures_and_trip_stops_the_flow(sched: Scheduler) -> None:
    rec = Recorder()
    sched.every_seconds(
        "bad",
        flow_of(fail=True, rec=rec),
        S.GO,
        0.02,
        backoff=Backoff(initial=0.2, multiplier=2.0, max_delay=1.0, jitter=0.0),
        trip_after=3,
    )
    sched.start()
    wait_for(lambda: (i := sched.status("bad")) is not None and i.tripped, timeout=5)
    starts = [a for a, _ in rec.spans]
    assert len(starts) == 3
    assert starts[1] - starts[0] >= 0.19 and starts[2] - starts[1] >= 0.39
    info = sched.status("bad")
    assert info is not None
    assert info.status is FlowStatus.FAILED and info.next_run is None
    assert info.failure_count == 3 and info.consecutive_failures == 3
    assert info.last_error is not None and "ValueError: boom" in info.last_error
    time.sleep(0.3)
    assert len(rec.spans) == 3  # tripped: nothing more
    sched.reset("bad")
    wait_for(lambda: len(rec.spans) >= 4)
    info = sched.status("bad")
    assert (info is not None and not info.tripped) or len(rec.spans) >= 4


def test_a_success_resets_the_backoff() -> None:
    b = Backoff(initial=1.0, multiplier=3.0, max_delay=5.0, jitter=0.0)
    assert [b.delay(n) for n in range(5)] == [0.0, 1.0, 3.0, 5.0, 5.0]
    with pytest.raises(ConfigError):
        Backoff(multiplier=0.5)
    with pytest.raises(ConfigError):
        Backoff(jitter=2)


def test_max_concurrent_runs_makes_due_runs_wait() -> None:
    rec = Recorder()
    sched = Scheduler(max_concurrent_runs=1)
    for i in range(3):
        sched.every_seconds(f"f{i}", flow_of(0.1, rec=rec), S.GO, 10)
    with sched:
        wait_for(lambda: len(rec.spans) >= 3)
        wait_for(lambda: sched.running_count() == 0)
    assert rec.most_at_once() == 1
    assert [i.run_count for i in sched.list()] == [1, 1, 1]


def test_stop_waits_for_a_running_flow(sched: Scheduler) -> None:
    rec = Recorder()
    sched.manual("m", flow_of(1.0, rec=rec), S.GO)
    sched.start()
    sched.trigger("m")
    wait_for(lambda: (i := sched.status("m")) is not None and i.run_count == 1)
    t0 = time.monotonic()
    sched.stop(timeout=5)
    assert 0.5 < time.monotonic() - t0 < 3  # it waited for the 1 s run, not its timeout
    assert len(rec.spans) == 1 and not sched.has_running_flows()
    info = sched.status("m")
    assert info is not None and info.status is FlowStatus.COMPLETED


def test_stop_past_its_timeout_cancels_and_raises(sched: Scheduler) -> None:
    sched.manual("long", flow_of(60.0), S.GO)
    sched.start()
    sched.trigger("long")
    wait_for(lambda: (i := sched.status("long")) is not None and i.run_count == 1)
    t0 = time.monotonic()
    with pytest.raises(CanoError, match=r"did not stop within 0\.3s"):
        sched.stop(timeout=0.3)
    assert time.monotonic() - t0 < 3
    assert not sched.has_running_flows()


def test_concurrent_flows_run_their_instances(sched: Scheduler) -> None:
    rec = Recorder()
    sched.manual_concurrent("many", flow_of(0.1, rec=rec), S.GO, instances=4, max_concurrency=2)
    sched.every_concurrent(
        "periodic", flow_of(rec=rec), S.GO, 60, instances=2, wait=WaitStrategy.forever()
    )
    sched.start()
    sched.trigger("many")
    wait_for(lambda: (i := sched.status("many")) is not None and i.status is FlowStatus.COMPLETED)
    assert len(rec.spans) == 6
    failing = flow_of(fail=True)
    sched.manual_concurrent("failing", failing, S.GO, instances=2)
    sched.trigger("failing")
    wait_for(lambda: (i := sched.status("failing")) is not None and i.status is FlowStatus.FAILED)
    info = sched.status("failing")
    assert (
        info is not None and info.last_error is not None and "2 of 2 instances" in info.last_error
    )


def test_status_file_is_rewritten_after_each_run(sched: Scheduler, tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    sched.status_file = str(path)
    sched.manual("m", flow_of(), S.GO)
    sched.start()
    data = json.loads(path.read_text())
    assert data["flows"][0]["id"] == "m" and data["flows"][0]["status"] == "idle"
    sched.trigger("m")
    # run_count counts runs started: wait for the file written when the run ended
    wait_for(lambda: json.loads(path.read_text())["flows"][0]["status"] == "completed")
    flow = json.loads(path.read_text())["flows"][0]
    assert flow["run_count"] == 1 and flow["last_run"].endswith("+00:00")
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left


def test_run_forever_returns_after_stop_from_another_thread() -> None:
    sched = Scheduler()
    sched.every_seconds("t", flow_of(), S.GO, 0.05)
    threading.Timer(0.3, sched.stop).start()
    t0 = time.monotonic()
    sched.run_forever()
    assert time.monotonic() - t0 < 3
    info = sched.status("t")
    assert info is not None and info.run_count >= 3


def test_bad_registrations_raise_config_error_at_once() -> None:
    sched = Scheduler()
    wf = flow_of()
    sched.every_seconds("dup", wf, S.GO, 1)
    with pytest.raises(ConfigError, match="already registered"):
        sched.manual("dup", wf, S.GO)
    with pytest.raises(ConfigError, match="invalid cron"):
        sched.cron("c", wf, S.GO, "61 * * * *")
    for bad in (0, -1, float("inf")):
        with pytest.raises(ConfigError):
            sched.every("neg", wf, S.GO, bad)
    with pytest.raises(ConfigError, match="unknown option"):
        sched.every_seconds("x", wf, S.GO, 1, overlapp="skip")
    with pytest.raises(ConfigError, match="overlap"):
        sched.every_seconds("x", wf, S.GO, 1, overlap="sometimes")
    with pytest.raises(ConfigError, match="unknown time zone"):
        sched.cron("tz", wf, S.GO, "* * * * *", tz="Nowhere/City")
    with pytest.raises(ConfigError):
        sched.manual("x", "not a workflow", S.GO)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        sched.manual_concurrent("x", wf, S.GO, instances=0)
    with SharedStore() as store, pytest.raises(ConfigError, match="cannot be shared"):
        sched.every_seconds("x", wf, S.GO, 1, store=store, overlap="allow")
    with pytest.raises(ConfigError):
        Scheduler(max_concurrent_runs=0)
    assert sched.status("nope") is None
    assert "1 flows, not started" in repr(sched)
    sched.start()
    with pytest.raises(CanoError, match="already started"):
        sched.start()
    sched.stop()
    with pytest.raises(CanoError):
        sched.start()


def info_of(sched: Scheduler, flow_id: str) -> Any:
    info = sched.status(flow_id)
    assert info is not None
    return info


def test_delay_mode_waits_the_interval_after_each_run_ends(sched: Scheduler) -> None:
    rec = Recorder()
    sched.every_seconds("d", flow_of(0.15, rec=rec), S.GO, 0.1, mode="delay")
    t0 = time.monotonic()
    sched.start()
    wait_for(lambda: len(rec.spans) >= 3)
    assert rec.spans[0][0] - t0 < 0.1  # the first run at start()
    gaps = [b[0] - a[1] for a, b in zip(rec.spans, rec.spans[1:], strict=False)]
    assert all(g >= 0.095 for g in gaps[:2]), gaps
    info = info_of(sched, "d")
    assert info.skipped == 0 and info.schedule == "every 0.1s after each run"


def test_pause_leaves_a_running_run_alone_and_trigger_still_works(sched: Scheduler) -> None:
    rec = Recorder()
    sched.every_seconds("p", flow_of(0.3, rec=rec), S.GO, 0.1)
    sched.start()
    wait_for(lambda: info_of(sched, "p").running == 1)
    sched.pause("p")
    info = info_of(sched, "p")
    assert info.paused and info.next_run is None
    wait_for(lambda: len(rec.spans) == 1)
    start, end = rec.spans[0]
    assert end - start >= 0.29  # ran to its end: not cancelled
    time.sleep(0.4)
    info = info_of(sched, "p")
    assert info.run_count == 1 and info.status is FlowStatus.COMPLETED
    sched.trigger("p")
    wait_for(lambda: len(rec.spans) == 2)
    assert info_of(sched, "p").paused


def test_resume_does_not_replay_the_ticks_missed_while_paused(sched: Scheduler) -> None:
    rec = Recorder()
    sched.every_seconds("r", flow_of(rec=rec), S.GO, 0.25)
    sched.start()
    wait_for(lambda: len(rec.spans) == 1)
    sched.pause("r")
    time.sleep(0.8)  # three ticks missed
    resumed = time.monotonic()
    sched.resume("r")
    info = info_of(sched, "r")
    assert not info.paused and info.next_run is not None
    wait_for(lambda: len(rec.spans) >= 3)
    second, third = rec.spans[1][0], rec.spans[2][0]
    assert second - resumed < 0.3  # at the grid's next tick...
    assert third - second > 0.2  # ...then on the grid: no burst of missed ticks
    assert info_of(sched, "r").skipped == 0  # a paused tick is not a skip


def test_pause_drops_a_queued_tick(sched: Scheduler) -> None:
    rec = Recorder()
    sched.every_seconds("q", flow_of(0.3, rec=rec), S.GO, 0.05, overlap="queue")
    sched.start()
    wait_for(lambda: info_of(sched, "q").running == 1)
    time.sleep(0.1)  # a tick is queued behind the running run
    sched.pause("q")
    wait_for(lambda: len(rec.spans) == 1)
    time.sleep(0.3)
    assert len(rec.spans) == 1 and info_of(sched, "q").running == 0


def test_reset_clears_the_backoff(sched: Scheduler) -> None:
    rec = Recorder()
    backoff = Backoff(initial=30, jitter=0)
    sched.every_seconds("b", flow_of(fail=True, rec=rec), S.GO, 0.05, backoff=backoff)
    sched.start()
    wait_for(lambda: len(rec.spans) == 1)
    time.sleep(0.2)
    assert len(rec.spans) == 1 and info_of(sched, "b").skipped >= 1  # backing off
    sched.reset("b")
    wait_for(lambda: info_of(sched, "b").failure_count == 2, timeout=3)
    assert info_of(sched, "b").consecutive_failures == 1  # counted again from the reset


def test_pause_resume_reset_of_an_unknown_flow_is_a_config_error(sched: Scheduler) -> None:
    sched.manual("m", flow_of(), S.GO)
    for verb in (sched.pause, sched.resume, sched.reset):
        with pytest.raises(ConfigError, match=r"no flow with id 'nope' \(known: 'm'\)"):
            verb("nope")


def test_a_flow_paused_before_start_waits_for_resume(sched: Scheduler) -> None:
    rec = Recorder()
    sched.every_seconds("w", flow_of(rec=rec), S.GO, 0.1)
    sched.pause("w")
    sched.start()
    time.sleep(0.3)
    assert rec.spans == [] and info_of(sched, "w").paused
    sched.resume("w")
    wait_for(lambda: len(rec.spans) >= 1)
