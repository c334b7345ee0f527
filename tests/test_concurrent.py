"""ConcurrentWorkflow: instances, wait strategies, quotas, cancellation, no leaks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from enum import Enum, auto
from typing import Any

import psutil
import pytest

from cano_mp import (
    ConcurrentResult,
    ConcurrentWorkflow,
    ConfigError,
    ProcessExecutor,
    SharedStore,
    TaskConfig,
    TaskError,
    WaitStrategy,
    Workflow,
    task,
    task_context,
)

from .test_crash import run_script
from .test_store import segment_files

NO_RETRY = TaskConfig.minimal()


class S(Enum):
    PREP = auto()
    WORK = auto()
    DONE = auto()


@task(config=NO_RETRY)
def prep(store: SharedStore) -> S:
    store["prepped"] = store.get("i", -1)
    return S.WORK


@task(config=NO_RETRY)
def work(store: SharedStore) -> S:
    """Behaves as the store says: sleep (cooperatively), fail, or record its span."""
    t0 = time.monotonic()
    np = __import__("numpy")
    store["scratch"] = np.ones(200_000)  # a segment: discarded if the instance is cancelled
    seconds = store.get("seconds", 0.0)
    ctx = task_context()
    while time.monotonic() - t0 < seconds and not ctx.cancelled():
        time.sleep(0.01)
    if store.get("fail"):
        raise ValueError(f"instance {store.get('i')} fails")
    store["span"] = (t0, time.monotonic())
    store["out"] = store.get("i", -1) * 2
    return S.DONE


@task(config=NO_RETRY)
def spin(store: SharedStore) -> S:
    while True:  # never looks at the cancel flag: only a kill stops it
        pass


def flow(executor: Any, **kw: Any) -> Workflow[S]:
    return (
        Workflow(start=S.PREP, executor=executor, **kw)
        .register(S.PREP, prep)
        .register(S.WORK, work)
        .add_exit_state(S.DONE)
    )


@pytest.fixture(scope="module")
def wide() -> Iterator[ProcessExecutor]:
    """More workers than cores: instances that sleep do not queue behind each other."""
    with ProcessExecutor(6, reuse=False) as ex:
        yield ex


def make_stores(specs: list[dict[str, Any]]) -> list[SharedStore]:
    stores = []
    for i, spec in enumerate(specs):
        s = SharedStore()
        s["i"] = i
        for k, v in spec.items():
            s[k] = v
        stores.append(s)
    return stores


def most_at_once(spans: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    now = best = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best


def test_every_instance_runs_on_its_own_store_in_order(executor: Any) -> None:
    stores = make_stores([{} for _ in range(8)])
    try:
        result = ConcurrentWorkflow(flow(executor), max_concurrency=3).execute(stores)
        assert [r.index for r in result.results] == list(range(8))
        assert all(r.status == "completed" and r.final_state is S.DONE for r in result.results)
        assert [r.store["out"] for r in result.results] == [2 * i for i in range(8)]
        assert all(r.store is s for r, s in zip(result.results, stores, strict=True))
        assert (result.completed, result.failed, result.cancelled) == (8, 0, 0)
        assert result.duration > 0 and all(r.duration > 0 for r in result.results)
    finally:
        for s in stores:
            s.close()


def test_stores_n_makes_fresh_stores_closed_by_the_result(executor: Any) -> None:
    result = ConcurrentWorkflow(flow(executor)).execute(3)
    stores = [r.store for r in result.results]
    assert len({id(s) for s in stores}) == 3
    assert all(s["prepped"] == -1 and not s.closed for s in stores)
    with result:
        pass
    assert all(s.closed for s in stores)


def test_failures_are_isolated_per_instance(executor: Any) -> None:
    stores = make_stores([{}, {"fail": True}, {}])
    try:
        result = ConcurrentWorkflow(flow(executor)).execute(stores)
        assert [r.status for r in result.results] == ["completed", "failed", "completed"]
        err = result.results[1].error
        assert isinstance(err, TaskError) and isinstance(err.__cause__, ValueError)
        assert result.results[1].final_state is None
        assert "out" not in stores[1] and stores[1]["prepped"] == 1  # PREP committed
        assert (result.completed, result.failed, result.cancelled) == (2, 1, 0)
        assert "1 failed" in repr(result) and "ValueError" in result._repr_html_()
    finally:
        for s in stores:
            s.close()


def test_quota_returns_at_n_finished_and_cancels_minute_long_instances(
    wide: ProcessExecutor,
) -> None:
    stores = make_stores([{}, {"fail": True}] + [{"seconds": 60.0} for _ in range(4)])
    try:
        t0 = time.monotonic()
        result = ConcurrentWorkflow(flow(wide)).execute(stores, wait=WaitStrategy.quota(2))
        assert time.monotonic() - t0 < 10
        assert [r.status for r in result.results] == ["completed", "failed"] + ["cancelled"] * 4
        for r in result.results[2:]:
            assert "scratch" not in r.store and "span" not in r.store  # writes discarded
    finally:
        for s in stores:
            s.close()
    assert all(segment_files(s) == [] for s in stores)


def test_duration_cancels_what_still_runs_and_what_never_started(wide: ProcessExecutor) -> None:
    specs = [{"seconds": 0.0}, {"seconds": 60.0}, {"seconds": 60.0}, {"seconds": 0.0}]
    stores = make_stores(specs)
    try:
        t0 = time.monotonic()
        result = ConcurrentWorkflow(flow(wide), max_concurrency=2).execute(
            stores, wait=WaitStrategy.duration(1.0)
        )
        elapsed = time.monotonic() - t0
        assert 1.0 <= elapsed < 5
        statuses = [r.status for r in result.results]
        assert statuses[0] == "completed" and statuses[1] == "cancelled"
        # #2 took #0's driver and runs a minute; #3 waits behind #1 and #2 and never starts
        assert statuses[2] == "cancelled" and statuses[3] == "cancelled"
        assert result.results[3].duration == 0.0 and "prepped" not in stores[3]
    finally:
        for s in stores:
            s.close()


@pytest.mark.parametrize(
    ("wait", "expect_completed", "max_seconds"),
    [
        (WaitStrategy.quota_or_duration(2, 30.0), 2, 10),  # the quota comes first
        (WaitStrategy.quota_or_duration(5, 0.8), 2, 5),  # the duration comes first
    ],
)
def test_quota_or_duration_whichever_first(
    wide: ProcessExecutor, wait: WaitStrategy, expect_completed: int, max_seconds: float
) -> None:
    stores = make_stores([{}, {}, {"seconds": 60.0}, {"seconds": 60.0}])
    try:
        t0 = time.monotonic()
        result = ConcurrentWorkflow(flow(wide)).execute(stores, wait=wait)
        assert time.monotonic() - t0 < max_seconds
        assert result.completed == expect_completed and result.cancelled == 2
    finally:
        for s in stores:
            s.close()


def test_max_concurrency_is_never_exceeded(wide: ProcessExecutor) -> None:
    stores = make_stores([{"seconds": 0.1} for _ in range(9)])
    try:
        result = ConcurrentWorkflow(flow(wide), max_concurrency=2).execute(stores)
        assert result.completed == 9
        assert most_at_once([s["span"] for s in stores]) == 2
    finally:
        for s in stores:
            s.close()


def test_workflow_max_parallel_caps_pool_slots_across_instances(wide: ProcessExecutor) -> None:
    stores = make_stores([{"seconds": 0.1} for _ in range(5)])
    try:
        result = ConcurrentWorkflow(flow(wide, max_parallel=1)).execute(stores)
        assert result.completed == 5
        assert most_at_once([s["span"] for s in stores]) == 1
    finally:
        for s in stores:
            s.close()


def test_cancelled_spinning_instances_leave_no_busy_worker_and_no_files(
    wide: ProcessExecutor,
) -> None:
    spinning = (
        Workflow(start=S.PREP, executor=wide, cancel_grace=0.1)
        .register(S.PREP, prep)
        .register(S.WORK, spin)
        .add_exit_state(S.DONE)
    )
    stores = make_stores([{} for _ in range(3)])
    try:
        result = ConcurrentWorkflow(spinning).execute(stores, wait=WaitStrategy.duration(0.5))
        assert result.cancelled == 3
    finally:
        for s in stores:
            s.close()
    time.sleep(0.3)
    busy = [p for p in wide.worker_pids() if psutil.Process(p).cpu_percent(0.3) > 50]
    assert busy == []
    assert all(segment_files(s) == [] for s in stores)


def test_no_instances_is_an_empty_result(executor: Any) -> None:
    result = ConcurrentWorkflow(flow(executor)).execute(0)
    assert result.results == [] and result.completed == 0


def test_bad_arguments_are_config_errors(executor: Any) -> None:
    wf = flow(executor)
    with pytest.raises(ConfigError):
        ConcurrentWorkflow(wf, max_concurrency=0)
    with pytest.raises(ConfigError):
        ConcurrentWorkflow("not a workflow")  # type: ignore[arg-type]
    cw = ConcurrentWorkflow(wf)
    with pytest.raises(ConfigError):
        cw.execute("three")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        cw.execute(-1)
    with SharedStore() as s, pytest.raises(ConfigError, match="its own store"):
        cw.execute([s, s])
    with pytest.raises(ConfigError):
        cw.execute(1, wait="forever")  # type: ignore[arg-type]
    for bad in (lambda: WaitStrategy.quota(0), lambda: WaitStrategy.duration(0)):
        with pytest.raises(ConfigError):
            bad()
    assert repr(WaitStrategy.quota_or_duration(3, 2.5)) == "WaitStrategy.quota_or_duration(3, 2.5)"
    unstartable = Workflow(executor=executor).register(S.PREP, prep).add_exit_state(S.DONE)
    with pytest.raises(ConfigError, match="initial state"):
        ConcurrentWorkflow(unstartable).execute(1)


def test_execute_async_and_its_cancellation(wide: ProcessExecutor) -> None:
    async def main() -> tuple[ConcurrentResult[S], float]:
        cw = ConcurrentWorkflow(flow(wide))
        done = await cw.execute_async(2)
        done.close()
        stores = make_stores([{"seconds": 60.0}, {"seconds": 60.0}])
        task_ = asyncio.ensure_future(cw.execute_async(stores))
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        task_.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task_
        stopped = time.monotonic() - t0
        assert all("span" not in s for s in stores)
        for s in stores:
            s.close()
        return done, stopped

    done, stopped = asyncio.run(main())
    assert done.completed == 2
    assert stopped < 3


def test_progress_bar_counts_instances(executor: Any, capsys: pytest.CaptureFixture[str]) -> None:
    with ConcurrentWorkflow(flow(executor), progress=True).execute(4):
        pass
    err = capsys.readouterr().err
    assert "instance" in err and "4" in err


def test_keyboard_interrupt_cancels_every_instance() -> None:
    out = run_script(
        """
        import psutil
        from cano_mp import ConcurrentWorkflow

        ex = ProcessExecutor(2).warm()
        flow = Workflow(executor=ex).register(S.A, spin, config=TaskConfig.minimal())
        flow.add_exit_state(S.DONE)
        threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        t0 = time.monotonic()
        try:
            ConcurrentWorkflow(flow).execute(4, S.A)
        except KeyboardInterrupt:
            print("interrupted after", round(time.monotonic() - t0, 2))
        time.sleep(0.5)
        busy = [p for p in ex.worker_pids() if psutil.Process(p).cpu_percent(0.3) > 50]
        print("busy workers", len(busy))
        ok = Workflow(executor=ex).register(S.A, quick).add_exit_state(S.DONE)
        result = ConcurrentWorkflow(ok).execute(3, S.A)
        print("after", result.completed)
        """
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("interrupted after") and float(lines[0].split()[-1]) < 3
    assert lines[1] == "busy workers 0"
    assert lines[2] == "after 3"
