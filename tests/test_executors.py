"""The executor layer: what a backend must provide, what it may declare, and the records
that cross to a worker process."""

from __future__ import annotations

import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from enum import Enum, auto
from typing import Any

import pytest

from cano_mp import (
    ConfigError,
    Executor,
    InlineExecutor,
    ProcessExecutor,
    SharedStore,
    TaskConfig,
    TaskError,
    Workflow,
)
from cano_mp._executors import (
    Call,
    Capabilities,
    ExecutorBase,
    Job,
    capabilities,
    progress_reader,
)
from cano_mp._wire import (
    BLOB_CACHE_SIZES,
    BlobCache,
    InitFailed,
    LogMessage,
    Raised,
    Returned,
    RunCall,
    Stop,
    from_wire,
)

NO_RETRY = TaskConfig.minimal()


class S(Enum):
    A = auto()
    B = auto()
    DONE = auto()


class ThreadedExecutor:
    """A third-party backend: the four members of the Executor protocol, nothing else."""

    def __init__(self) -> None:
        self._threads = ThreadPoolExecutor(2)
        self.calls = 0

    @property
    def max_workers(self) -> int:
        return 2

    def submit(self, call: Call) -> Future[Any]:
        self.calls += 1
        objs = [b.obj for b in call.blobs]
        return self._threads.submit(call.fn, lambda: False, call.deadline, *objs, *call.args)

    def cancel(self, future: Future[Any], grace: float) -> None:
        future.cancel()

    def close(self) -> None:
        self._threads.shutdown()


def first(store: SharedStore) -> S:
    store["seen"] = "first"
    return S.B


def second(store: SharedStore) -> S:
    store["seen"] = store["seen"] + ", second"
    return S.DONE


def fails(store: SharedStore) -> S:
    raise ValueError("as planned")


def test_a_backend_with_only_the_four_protocol_members_runs_workflows() -> None:
    ex = ThreadedExecutor()
    try:
        assert isinstance(ex, Executor)
        flow: Workflow[S] = Workflow(executor=ex)
        flow.register(S.A, first).register(S.B, second).add_exit_state(S.DONE)
        with SharedStore() as store:
            assert flow.orchestrate(S.A, store=store) is S.DONE
            assert store["seen"] == "first, second"
        assert ex.calls == 2
    finally:
        ex.close()


def test_a_backend_with_only_the_four_members_reports_task_errors() -> None:
    ex = ThreadedExecutor()
    try:
        flow: Workflow[S] = Workflow(executor=ex)
        flow.register(S.A, fails, config=NO_RETRY).add_exit_state(S.DONE)
        with SharedStore() as store, pytest.raises(TaskError) as info:
            flow.orchestrate(S.A, store=store)
        assert isinstance(info.value.__cause__, ValueError)
    finally:
        ex.close()


def test_an_executor_that_declares_nothing_gets_the_defaults() -> None:
    class LooksCapable(ThreadedExecutor):
        in_flight_per_worker = 99  # not declared through Capabilities: not read
        chunk_seconds = 5.0

        def progress(self, future: Future[Any]) -> tuple[int, float]:
            return (3, 0.0)

    ex = LooksCapable()
    try:
        assert capabilities(ex) == Capabilities()
        assert capabilities(ex).in_flight_per_worker == 2
        assert progress_reader(ex) is None
    finally:
        ex.close()


def test_an_executor_base_subclass_declares_its_capabilities() -> None:
    class Declared(ThreadedExecutor, ExecutorBase):
        capabilities = Capabilities(in_flight_per_worker=5, reports_progress=True)

        def progress(self, future: Future[Any]) -> tuple[int, float] | None:
            return (7, 1.0)

    ex = Declared()
    try:
        assert capabilities(ex).in_flight_per_worker == 5
        reader = progress_reader(ex)
        assert reader is not None and reader(Future()) == (7, 1.0)
    finally:
        ex.close()


def test_progress_is_not_read_unless_declared() -> None:
    class Quiet(ThreadedExecutor, ExecutorBase):
        def progress(self, future: Future[Any]) -> tuple[int, float] | None:
            raise AssertionError("read without reports_progress")

    ex = Quiet()
    try:
        assert progress_reader(ex) is None
    finally:
        ex.close()


def test_the_builtin_executors_declare_what_they_can_do(pool: ProcessExecutor) -> None:
    assert capabilities(InlineExecutor()) == Capabilities(remote=False)
    assert capabilities(pool) == Capabilities(reports_progress=True, direct=True, group_calls=True)
    assert progress_reader(pool) is not None
    # a worker per so many calls: a split's branches are never grouped there
    with ProcessExecutor(max_workers=1, reuse=False, max_tasks_per_worker=5) as recycled:
        assert capabilities(recycled) == Capabilities(reports_progress=True, direct=True)
    assert isinstance(pool, Executor) and isinstance(InlineExecutor(), Executor)


@pytest.mark.parametrize(
    "bad",
    [
        {"in_flight_per_worker": 0},
        {"in_flight_per_worker": 1.5},
        {"in_flight_per_worker": True},
        {"chunk_seconds": 0},
        {"chunk_seconds": -1.0},
    ],
)
def test_capabilities_reject_invalid_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Capabilities(**bad)


def test_public_executor_classes_live_in_cano_mp() -> None:
    for cls in (Executor, InlineExecutor, ProcessExecutor):
        assert cls.__module__ == "cano_mp"


# -- the job record ------------------------------------------------------------------------------


class Payload:
    """An argument whose lifetime the test watches."""


def echo(control: Any, deadline: float | None, payload: Payload) -> str:
    return "done"


def wait_until(condition: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_a_pending_future_names_its_job_and_a_resolved_one_lets_the_call_go(
    pool: ProcessExecutor,
) -> None:
    payload = Payload()
    gone = weakref.ref(payload)
    fut = pool.submit(Call(echo, (), (payload,)))
    job = Job.of(fut)
    assert job is None or job.future is fut  # None: it may have finished already
    del job, payload
    assert fut.result(timeout=30) == "done"
    assert Job.of(fut) is None
    # The engine keeps the future; the call (its snapshot, in real runs) must not stay alive.
    assert wait_until(lambda: gone() is None), "a resolved future keeps its call alive"


def test_cancelling_a_future_of_another_kind_is_ignored(pool: ProcessExecutor) -> None:
    pool.cancel(Future(), 0.0)
    assert pool.progress(Future()) is None


# -- the pool's pipe -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        RunCall("call", 3, echo, [("k", "unit", b"x")], [("k", "unit")], (1,), None, 20),
        Stop("stop"),
        Returned("returned", 3, {"any": "result"}),
        Raised("raised", 3, "Traceback ..."),
        InitFailed("init_failed", "Traceback ..."),
        LogMessage("log", 3, {"name": "x", "msg": "hello"}, {"task": "t"}),
    ],
)
def test_pipe_messages_travel_as_plain_tuples_and_come_back_as_records(message: Any) -> None:
    wire = tuple(message)
    assert type(wire) is tuple
    back = from_wire(wire)
    assert type(back) is type(message) and back == message


def test_blob_cache_evicts_the_least_recently_used() -> None:
    cache = BlobCache(2)
    cache.add("a", 1)
    cache.add("b", 2)
    assert cache.touch("a") == 1
    cache.add("c", 3)  # evicts b: a was used since
    assert "a" in cache and "c" in cache and "b" not in cache
    assert cache.get("b") is None and len(cache) == 2


def test_every_worker_keeps_one_cache_per_blob_category() -> None:
    caches = BlobCache.per_category()
    assert {k: c.size for k, c in caches.items()} == BLOB_CACHE_SIZES


def test_inline_executor_runs_in_the_calling_thread() -> None:
    seen: list[int] = []

    def where(control: Any, deadline: float | None) -> int:
        seen.append(threading.get_ident())
        return 1

    assert InlineExecutor().submit(Call(where, (), ())).result() == 1
    assert seen == [threading.get_ident()]
