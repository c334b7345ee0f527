"""Direct calls: a plain task's state waits for its one call in its own thread, reading the
worker's reply there (``Call.direct``, ``ProcessExecutor.wait_direct``). What the manager
thread did for it must still happen: timeouts, crashes, cancels, retiring workers, logs."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest

from cano_mp import (
    ConcurrentWorkflow,
    ProcessExecutor,
    RetryPolicy,
    SharedStore,
    TaskConfig,
    WorkerCrashed,
    Workflow,
    task_context,
)
from cano_mp._engine.scope import RunCancelled


class CountingExecutor(ProcessExecutor):
    """A private pool that counts the waits served directly (the feature really used)."""

    def __init__(self, n: int, **kw: Any) -> None:
        super().__init__(n, reuse=False, **kw)
        self.direct_waits = 0
        self.handed_back = 0
        self.entered = 0  # waits begun (direct_waits counts them once they end)

    def wait_direct(self, future: Future[Any], timeout: float | None, wake_fd: int | None) -> bool:
        self.entered += 1
        waited = super().wait_direct(future, timeout, wake_fd)
        self.direct_waits += waited
        self.handed_back += wake_fd is None
        return waited


@pytest.fixture
def ex() -> Iterator[CountingExecutor]:
    with CountingExecutor(2) as e:
        e.warm()
        deadline = time.monotonic() + 60
        while len(e.worker_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        yield e


def step(store: Any) -> int:
    state = task_context().state
    store["x"] = store.get("x", 0) + 1
    return int(state) + 1


def chain(executor: Any, n: int, fn: Any = step, config: TaskConfig | None = None) -> Workflow[int]:
    flow: Workflow[int] = Workflow(start=0, executor=executor)
    for s in range(n):
        flow.register(s, fn, config=config)
    return flow.add_exit_state(n)


def test_a_chain_of_plain_tasks_waits_directly_and_commits_each_write(
    ex: CountingExecutor, store: SharedStore
) -> None:
    assert chain(ex, 2).orchestrate(store=store) == 2  # the workers are started by now
    ex.direct_waits = 0
    assert chain(ex, 20).orchestrate(store=store) == 20
    assert store["x"] == 22
    assert ex.direct_waits >= 20  # one wait (at least) per state's call
    assert chain(ex, 5).orchestrate(store=store) == 5  # the slots went back to idle
    assert store["x"] == 27


def sleepy_first(store: Any) -> int:
    if task_context().attempt == 1:
        time.sleep(60)
    return 1


def test_a_direct_call_past_its_timeout_is_stopped_and_retried(
    ex: CountingExecutor, store: SharedStore
) -> None:
    cfg = TaskConfig(timeout=3.0, retry=RetryPolicy.fixed(1, 0.0))
    flow = chain(ex, 1, sleepy_first, cfg)
    assert flow.orchestrate(store=store) == 1
    # attempt 1 was waited for directly until its timeout, then handed to the manager to
    # be stopped; attempt 2 runs on the other (idle) worker
    assert ex.direct_waits >= 1
    assert chain(ex, 3).orchestrate(store=store) == 3  # the pool serves on


def die(store: Any) -> int:
    os._exit(7)


def test_a_worker_dying_under_a_direct_call_fails_that_attempt_and_the_pool_heals(
    ex: CountingExecutor, store: SharedStore
) -> None:
    with pytest.raises(WorkerCrashed):
        chain(ex, 1, die, TaskConfig.minimal()).orchestrate(store=store)
    assert ex.direct_waits >= 1
    assert chain(ex, 4).orchestrate(store=store) == 4


def forever(store: Any) -> int:
    while not task_context().cancelled():
        time.sleep(0.01)
    return 1


def test_cancelling_a_run_wakes_its_direct_wait(ex: CountingExecutor, store: SharedStore) -> None:
    run = chain(ex, 1, forever, TaskConfig.minimal()).start_run(store)
    caught: list[BaseException] = []

    def drive() -> None:
        try:
            run.run()
        except BaseException as exc:
            caught.append(exc)

    t = threading.Thread(target=drive)
    t.start()
    deadline = time.monotonic() + 30
    while ex.entered == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # in the poll now (the task never returns by itself)
    assert ex.entered == 1 and ex.direct_waits == 0
    run.cancel()
    t.join(30)
    assert not t.is_alive()
    assert [type(e) for e in caught] == [RunCancelled]
    assert ex.direct_waits == 1  # the wait that the cancel ended
    assert chain(ex, 2).orchestrate(store=store) == 2


def pid_step(store: Any) -> int:
    store[f"pid{task_context().state}"] = os.getpid()
    return int(task_context().state) + 1


def test_workers_retiring_after_their_calls_serve_a_direct_chain(store: SharedStore) -> None:
    with CountingExecutor(1, max_tasks_per_worker=2) as one:
        # each worker says it retires before its second reply: the next call goes to a
        # new worker (queued until it starts, then direct again once one is idle)
        assert chain(one, 6, pid_step).orchestrate(store=store) == 6
        assert len({store[f"pid{i}"] for i in range(6)}) == 3
        assert one.direct_waits >= 1


def chatty(store: Any) -> int:
    logging.getLogger("user.direct").warning("from the worker")
    return 1


def test_log_records_of_a_direct_call_reach_the_driver(
    ex: CountingExecutor, store: SharedStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    chain(ex, 1, chatty).orchestrate(store=store)
    [record] = [r for r in caplog.records if r.name == "user.direct"]
    assert record.getMessage().endswith("from the worker")
    assert record.worker_pid != os.getpid()  # type: ignore[attr-defined]


def test_concurrent_runs_share_the_workers_and_a_lone_run_goes_direct_again(
    ex: CountingExecutor, store: SharedStore
) -> None:
    cw = ConcurrentWorkflow(chain(ex, 3), max_concurrency=6, progress=False)
    with cw.execute(40) as result:
        assert result.completed == 40
        assert all(r.store["x"] == 3 for r in result.results)
    # calls that waited in the pending queue were the manager's; alone, a run's calls are
    # direct again: the slots came back from both kinds of call
    before = ex.direct_waits
    assert chain(ex, 5).orchestrate(store=store) == 5
    assert ex.direct_waits >= before + 5


@pytest.mark.slow  # 6 s; the pool is the same on every interpreter (runs on 3.11)
def test_direct_and_queued_calls_taking_turns_on_the_same_workers_never_hang(
    ex: CountingExecutor,
) -> None:
    # A direct call's reply also wakes a manager thread still waiting on that pipe: the
    # manager must not then read a pipe whose reply the direct thread took (it blocked
    # there, and every queued call with it). Small batches of concurrent runs, each ending
    # alone, and lone runs between them, on two workers: many hand-overs both ways.
    for k in range(800):
        cw = ConcurrentWorkflow(chain(ex, 3), max_concurrency=1 + k % 4, progress=False)
        with cw.execute(1 + k % 7) as result:
            assert result.completed == 1 + k % 7
        with SharedStore() as store:
            assert chain(ex, 2).orchestrate(store=store) == 2
    assert ex.direct_waits >= 800


def test_without_an_fd_for_the_wake_pipe_a_direct_call_is_handed_to_the_manager(
    ex: CountingExecutor, store: SharedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from cano_mp._engine import scope

    def no_fds() -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    assert chain(ex, 2).orchestrate(store=store) == 2  # the workers are started by now
    monkeypatch.setattr(scope, "WakePipe", no_fds)
    ex.direct_waits = 0
    # each call was given to an idle worker as a direct one; its run thread, without a wake
    # pipe, hands it back and the manager thread reads the reply (a hang if nobody did)
    assert chain(ex, 5).orchestrate(store=store) == 5
    assert ex.direct_waits == 0 and ex.handed_back >= 5
    monkeypatch.undo()
    assert chain(ex, 3).orchestrate(store=store) == 3
    assert ex.direct_waits >= 3  # direct again


def closes_stdout_once(store: Any) -> int:
    if task_context().state == 0:
        os.close(1)  # the worker retires after its reply
    store[f"pid{task_context().state}"] = os.getpid()
    return int(task_context().state) + 1


def test_a_direct_call_sent_to_a_worker_that_then_retires_runs_on_a_fresh_one(
    store: SharedStore,
) -> None:
    with CountingExecutor(1) as one:
        # state 1's call goes straight to the idle worker, which then says it retires
        # (fd 1 closed by state 0): it never begins the call, which runs on a fresh worker
        flow = chain(one, 3, closes_stdout_once, TaskConfig.minimal())  # no retry to hide it
        assert flow.orchestrate(store=store) == 3
        assert store["pid0"] != store["pid1"] == store["pid2"]
        assert chain(one, 2).orchestrate(store=store) == 2


def test_a_direct_call_with_a_timeout_beyond_what_poll_takes_runs(
    ex: CountingExecutor, store: SharedStore
) -> None:
    from cano_mp._executors.direct import poll_ms

    assert poll_ms(None) is None and poll_ms(-1.0) == 0 and poll_ms(0.0011) == 2
    assert poll_ms(30 * 86400.0) == poll_ms(float("inf")) == poll_ms(float("nan")) == 2**31 - 1
    month = TaskConfig(timeout=30 * 86400.0)  # poll() takes at most ~24.8 days
    ex.direct_waits = 0
    assert chain(ex, 3, config=month).orchestrate(store=store) == 3
    assert ex.direct_waits >= 3


def test_a_call_resolved_twice_keeps_its_first_outcome() -> None:
    from cano_mp._executors.base import JobFuture

    fut = JobFuture()
    fut.set_result(1)
    fut.set_exception(RuntimeError("late"))  # a second resolver (a race): dropped
    fut.set_result(2)
    assert fut.result() == 1
