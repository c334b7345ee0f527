"""BatchTask: order, errors per item, retries, timeouts, crashes, laziness, cancellation."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections.abc import Iterable, Iterator
from enum import Enum, auto
from typing import Any

import psutil
import pytest

from cano_mp import (
    BatchTask,
    ConfigError,
    ItemFailure,
    ProcessExecutor,
    RetryPolicy,
    SharedStore,
    StoreError,
    TaskConfig,
    TaskError,
    TaskTimeout,
    WorkerCrashed,
    Workflow,
    WorkflowTimeout,
    task_context,
)
from cano_mp._engine.chunks import ChunkSizer

from .test_crash import run_script
from .test_store import segment_files

NO_RETRY = TaskConfig.minimal()


class S(Enum):
    MAP = auto()
    DONE = auto()


class Batch(BatchTask[S, Any, Any]):
    """A configurable batch: items from the store, process by a plain function."""

    next_states = (S.DONE,)

    def __init__(
        self,
        fn: Any,
        items: Any = None,
        *,
        config: TaskConfig = NO_RETRY,
        chunk_size: int | None = None,
        max_parallel: int | None = None,
        on_error: Any = "raise",
    ) -> None:
        self.fn = fn
        self.items = items
        self.config = config
        self.chunk_size = chunk_size
        self.max_parallel = max_parallel
        self.on_error = on_error

    def load(self, store: SharedStore) -> Iterable[Any]:
        if self.items is not None:
            return self.items() if callable(self.items) else self.items
        items: list[Any] = store["items"]
        return items

    def process(self, item: Any) -> Any:
        return self.fn(item)

    def finish(self, store: SharedStore, results: list[Any]) -> S:
        store["results"] = results
        return S.DONE


def run_batch(batch: BatchTask[S, Any, Any], executor: Any, store: SharedStore, **kw: Any) -> Any:
    flow = Workflow(executor=executor, **kw).register(S.MAP, batch).add_exit_state(S.DONE)
    assert flow.orchestrate(S.MAP, store=store) is S.DONE
    return store["results"]


def double(x: int) -> int:
    return x * 2


def fail_on_odd(x: int) -> int:
    if x % 2:
        raise ValueError(f"odd {x}")
    return x


def die_on_five(x: int) -> int:
    if x == 5:
        os._exit(7)
    return x


def hang_on_three(x: int) -> int:
    if x == 3:
        while True:  # pure Python: never looks at the cancel flag
            pass
    return x


def sleep_on_three(x: int) -> int:
    if x == 3:
        time.sleep(60)  # in C: only a kill stops it
    return x


def spin_forever(x: int) -> int:
    while True:
        pass


def attempt_and_index(x: int) -> tuple[int, int, int | None]:
    ctx = task_context()
    if ctx.attempt < 3 and x == 4:
        raise RuntimeError("flaky")
    return (x, ctx.attempt, ctx.index)


def timestamps(x: int) -> tuple[int, float, float]:
    t0 = time.monotonic()
    time.sleep(0.05)
    return (os.getpid(), t0, time.monotonic())


def most_at_once(spans: list[tuple[int, float, float]]) -> int:
    events = sorted([(t0, 1) for _, t0, _ in spans] + [(t1, -1) for _, _, t1 in spans])
    now = best = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best


# -- the contract, on both executors ------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 1000])
def test_results_are_in_item_order(executor: Any, store: SharedStore, chunk_size: Any) -> None:
    results = run_batch(Batch(double, range(503), chunk_size=chunk_size), executor, store)
    assert results == [2 * x for x in range(503)]


def test_a_generator_is_consumed_and_results_keep_its_order(
    executor: Any, store: SharedStore
) -> None:
    def gen() -> Iterator[int]:
        yield from range(1000)

    assert run_batch(Batch(double, gen), executor, store) == [2 * x for x in range(1000)]


def test_empty_input_calls_finish_with_no_results(executor: Any, store: SharedStore) -> None:
    assert run_batch(Batch(double, []), executor, store) == []


def test_items_and_results_of_every_kind(executor: Any, store: SharedStore) -> None:
    items = [None, "s", b"b", 1.5, (1, 2), {"k": [1]}, frozenset({3})]
    assert run_batch(Batch(repr, items), executor, store) == [repr(i) for i in items]


def test_on_error_raise_names_the_item(executor: Any, store: SharedStore) -> None:
    flow = Workflow(executor=executor).register(S.MAP, Batch(fail_on_odd, range(10), chunk_size=3))
    flow.add_exit_state(S.DONE)
    with pytest.raises(TaskError) as info:
        flow.orchestrate(S.MAP, store=store)
    err = info.value
    assert err.item_index is not None and err.item_index % 2 == 1
    assert f"item {err.item_index}" in str(err)
    assert isinstance(err.__cause__, ValueError)
    assert err.task_name == "Batch" and err.state is S.MAP and err.attempts == 1
    assert err.remote_traceback is not None and "fail_on_odd" in err.remote_traceback
    assert "results" not in store  # finish never ran, nothing written


def test_on_error_collect_puts_item_failures_in_place(executor: Any, store: SharedStore) -> None:
    results = run_batch(
        Batch(fail_on_odd, range(10), chunk_size=4, on_error="collect"), executor, store
    )
    for i, r in enumerate(results):
        if i % 2:
            assert isinstance(r, ItemFailure)
            assert r.index == i and r.attempts == 1
            assert isinstance(r.error, ValueError) and str(r.error) == f"odd {i}"
        else:
            assert r == i
    assert "ItemFailure(index=1, error=ValueError('odd 1')" in repr(results[1])


def test_each_item_is_retried_alone_with_its_attempt_and_index(
    executor: Any, store: SharedStore
) -> None:
    cfg = TaskConfig(retry=RetryPolicy.fixed(3, 0.01))
    results = run_batch(Batch(attempt_and_index, range(8), config=cfg), executor, store)
    assert results == [(x, 3 if x == 4 else 1, x) for x in range(8)]


def test_retries_spent_fail_with_the_attempt_count(executor: Any, store: SharedStore) -> None:
    cfg = TaskConfig(retry=RetryPolicy.fixed(2, 0.0))
    results = run_batch(
        Batch(fail_on_odd, range(4), config=cfg, on_error="collect"), executor, store
    )
    assert [r.attempts for r in results if isinstance(r, ItemFailure)] == [3, 3]


def test_retry_observer_sees_each_item(executor: Any, store: SharedStore) -> None:
    from cano_mp import Observer, RunInfo

    seen: list[tuple[str, int]] = []

    class Spy(Observer):
        def on_retry(
            self, run: RunInfo, state: Any, name: str, attempt: int, delay: float, error: Any
        ) -> None:
            seen.append((name, attempt))

    cfg = TaskConfig(retry=RetryPolicy.fixed(1, 0.0))
    flow = Workflow(executor=executor, observers=[Spy()])
    flow.register(S.MAP, Batch(fail_on_odd, range(4), config=cfg, on_error="collect"))
    flow.add_exit_state(S.DONE).orchestrate(S.MAP, store=store)
    assert sorted(seen) == [("Batch[1]", 1), ("Batch[3]", 1)]


def test_process_reads_the_store_zero_copy_and_cannot_write(
    executor: Any, store: SharedStore
) -> None:
    np = pytest.importorskip("numpy")
    store["table"] = np.arange(1_000_000, dtype=np.int64)

    def part_sum(rows: range) -> int:
        table = task_context().store.get("table")  # type: ignore[union-attr]
        assert not table.flags.writeable
        return int(table[rows.start : rows.stop].sum())

    def write(_: int) -> None:
        task_context().store.put("x", 1)  # type: ignore[union-attr]

    parts = [range(i, i + 100_000) for i in range(0, 1_000_000, 100_000)]
    assert sum(run_batch(Batch(part_sum, parts), executor, store)) == sum(range(1_000_000))
    results = run_batch(Batch(write, [0], on_error="collect"), executor, store)
    assert isinstance(results[0], ItemFailure) and isinstance(results[0].error, StoreError)


def test_load_and_finish_writes_commit_only_on_success(executor: Any, store: SharedStore) -> None:
    class Writes(Batch):
        def load(self, store: SharedStore) -> Iterable[Any]:
            store["loaded"] = True
            return [1, 2, 3]

    run_batch(Writes(double), executor, store)
    assert store["loaded"] is True
    store.clear()
    flow = Workflow(executor=executor).register(S.MAP, Writes(fail_on_odd)).add_exit_state(S.DONE)
    with pytest.raises(TaskError):
        flow.orchestrate(S.MAP, store=store)
    assert "loaded" not in store


def test_a_generator_that_raises_mid_stream_fails_clearly(
    executor: Any, store: SharedStore
) -> None:
    def gen() -> Iterator[int]:
        yield from range(25)
        raise OSError("disk gone")

    flow = Workflow(executor=executor)
    flow.register(S.MAP, Batch(double, gen, chunk_size=10)).add_exit_state(S.DONE)
    with pytest.raises(TaskError) as info:
        flow.orchestrate(S.MAP, store=store)
    assert "load() (after 20 items)" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.item_index is None


def test_load_and_finish_errors_are_task_errors(executor: Any, store: SharedStore) -> None:
    class BadFinish(Batch):
        def finish(self, store: SharedStore, results: list[Any]) -> S:
            raise KeyError("nope")

    flow = Workflow(executor=executor).register(S.MAP, BadFinish(double, [1]))
    with pytest.raises(TaskError, match="finish"):
        flow.add_exit_state(S.DONE).orchestrate(S.MAP, store=store)

    def not_iterable() -> int:
        return 5

    flow = Workflow(executor=executor).register(S.MAP, Batch(double, not_iterable))
    with pytest.raises(TaskError, match="load"):
        flow.add_exit_state(S.DONE).orchestrate(S.MAP, store=store)


def test_an_undeclared_next_state_is_a_transition_error(executor: Any, store: SharedStore) -> None:
    from cano_mp import TransitionError

    class Other(Batch):
        next_states = (S.DONE,)

        def finish(self, store: SharedStore, results: list[Any]) -> S:
            return S.MAP

    flow = Workflow(executor=executor).register(S.MAP, Other(double, [1])).add_exit_state(S.DONE)
    with pytest.raises(TransitionError, match="does not declare"):
        flow.orchestrate(S.MAP, store=store)


def test_bad_settings_are_config_errors(store: SharedStore) -> None:
    for kw in ({"chunk_size": 0}, {"max_parallel": 0}, {"on_error": "ignore"}):
        flow = Workflow(executor="inline").register(S.MAP, Batch(double, [1], **kw))
        with pytest.raises(ConfigError, match=r"Batch\."):
            flow.add_exit_state(S.DONE).validate()
        with pytest.raises(ConfigError):
            flow.orchestrate(S.MAP, store=store)
    with pytest.raises(ConfigError, match="instance"):
        Workflow().register(S.MAP, Batch)
    from cano_mp import JoinConfig, JoinStrategy

    with pytest.raises(ConfigError, match="split branch"):
        Workflow().register_split(
            S.MAP, [Batch(double, [1])], JoinConfig(JoinStrategy.all(), S.DONE)
        )


def test_unpicklable_items_are_a_clear_config_error(pool: ProcessExecutor) -> None:
    with SharedStore() as store:
        flow = Workflow(executor=pool).register(S.MAP, Batch(repr, [threading.Lock()]))
        with pytest.raises(ConfigError, match="cannot be sent to a worker"):
            flow.add_exit_state(S.DONE).orchestrate(S.MAP, store=store)
        # inline processing takes them as they are
        flow = Workflow(executor=pool).register(
            S.MAP, Batch(repr, [threading.Lock()], config=TaskConfig(inline=True))
        )
        flow.add_exit_state(S.DONE).orchestrate(S.MAP, store=store)
        assert "lock" in store["results"][0]


def test_an_unpicklable_result_fails_only_its_item(
    pool: ProcessExecutor, store: SharedStore
) -> None:
    def lock_on_two(x: int) -> Any:
        return threading.Lock() if x == 2 else x

    results = run_batch(Batch(lock_on_two, range(5), on_error="collect"), pool, store)
    assert results[:2] == [0, 1] and results[3:] == [3, 4]
    assert isinstance(results[2], ItemFailure) and "could not be sent" in str(results[2].error)


# -- the pool: crashes, timeouts, bulkheads ----------------------------------------------
def test_a_crashing_item_is_isolated_and_the_rest_of_its_chunk_runs(
    pool: ProcessExecutor, store: SharedStore
) -> None:
    results = run_batch(
        Batch(die_on_five, range(20), chunk_size=10, on_error="collect"), pool, store
    )
    assert [r for i, r in enumerate(results) if i != 5] == [i for i in range(20) if i != 5]
    failure = results[5]
    assert isinstance(failure, ItemFailure) and isinstance(failure.error, WorkerCrashed)
    assert failure.error.exitcode == 7 and "item 5" in str(failure.error)


def test_a_crashing_item_retried_crashes_each_attempt_and_raises(
    pool: ProcessExecutor, store: SharedStore
) -> None:
    cfg = TaskConfig(retry=RetryPolicy.fixed(1, 0.0))
    flow = Workflow(executor=pool).register(
        S.MAP, Batch(die_on_five, range(12), chunk_size=4, config=cfg)
    )
    with pytest.raises(WorkerCrashed) as info:
        flow.add_exit_state(S.DONE).orchestrate(S.MAP, store=store)
    assert info.value.item_index == 5 and info.value.attempts == 2


@pytest.mark.parametrize("fn", [hang_on_three, sleep_on_three])
def test_one_item_over_its_timeout_is_stopped_and_the_others_finish(
    pool: ProcessExecutor, store: SharedStore, fn: Any
) -> None:
    cfg = TaskConfig(retry=RetryPolicy.none(), timeout=0.5)
    t0 = time.monotonic()
    results = run_batch(
        Batch(fn, range(8), chunk_size=8, config=cfg, on_error="collect"), pool, store
    )
    assert time.monotonic() - t0 < 5
    assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5, 6, 7]
    assert isinstance(results[3], ItemFailure) and isinstance(results[3].error, TaskTimeout)
    assert "item 3" in str(results[3].error)


def test_an_item_that_overruns_but_returns_is_a_timeout(executor: Any, store: SharedStore) -> None:
    def slow(x: int) -> int:
        time.sleep(0.3 if x == 1 else 0)
        return x

    cfg = TaskConfig(retry=RetryPolicy.none(), timeout=0.1)
    results = run_batch(Batch(slow, range(3), config=cfg, on_error="collect"), executor, store)
    assert results[0] == 0 and results[2] == 2
    assert isinstance(results[1], ItemFailure) and isinstance(results[1].error, TaskTimeout)


def test_items_see_their_deadline_and_can_stop_cooperatively(pool: ProcessExecutor) -> None:
    def polite(x: int) -> str:
        ctx = task_context()
        assert ctx.deadline is not None and ctx.index == x
        while not ctx.cancelled():
            time.sleep(0.01)
        return "stopped"

    cfg = TaskConfig(retry=RetryPolicy.none(), timeout=0.2)
    with ProcessExecutor(2, reuse=False) as ex, SharedStore() as store:
        run_batch(Batch(double, range(4), chunk_size=1), ex, store)  # both workers started
        pids = set(ex.worker_pids())
        assert len(pids) == 2
        results = run_batch(Batch(polite, range(2), config=cfg, on_error="collect"), ex, store)
        assert set(ex.worker_pids()) == pids  # a cooperative stop kills no worker
    assert all(isinstance(r, ItemFailure) and isinstance(r.error, TaskTimeout) for r in results)


@pytest.mark.parametrize("cap", [1, 2])
def test_max_parallel_caps_the_pool_slots_used(cap: int, store: SharedStore) -> None:
    with ProcessExecutor(3, reuse=False) as ex:
        spans = run_batch(Batch(timestamps, range(12), chunk_size=1, max_parallel=cap), ex, store)
    assert most_at_once(spans) == cap


def test_workflow_max_parallel_caps_batch_chunks(store: SharedStore) -> None:
    with ProcessExecutor(3, reuse=False) as ex:
        spans = run_batch(Batch(timestamps, range(8), chunk_size=1), ex, store, max_parallel=1)
    assert most_at_once(spans) == 1


def test_a_generator_is_pulled_lazily_and_closed(pool: ProcessExecutor, store: SharedStore) -> None:
    pulled = itertools.count()
    closed: list[bool] = []

    def endless() -> Iterator[int]:
        try:
            for i in itertools.count():
                next(pulled)
                yield i
        finally:
            closed.append(True)

    def stop_at_500(x: int) -> int:
        if x == 500:
            raise ValueError("enough")
        return x

    # One chunk in flight at a time: when the chunk holding item 500 fails, nothing past
    # that chunk has been pulled from the endless generator.
    batch = Batch(stop_at_500, endless, chunk_size=10, max_parallel=1)
    flow = Workflow(executor=pool).register(S.MAP, batch)
    with pytest.raises(TaskError, match="item 500"):
        flow.add_exit_state(S.DONE).orchestrate(S.MAP, store=store)
    assert next(pulled) == 510
    assert closed == [True]


def test_on_error_raise_cancels_the_remaining_items_promptly(
    pool: ProcessExecutor, store: SharedStore
) -> None:
    def first_fails(x: int) -> int:
        if x == 0:
            raise ValueError("first")
        time.sleep(60)
        return x

    t0 = time.monotonic()
    flow = Workflow(executor=pool).register(S.MAP, Batch(first_fails, range(6), chunk_size=1))
    with pytest.raises(TaskError, match="item 0"):
        flow.add_exit_state(S.DONE).orchestrate(S.MAP, store=store)
    assert time.monotonic() - t0 < 5
    run_batch(Batch(double, range(4)), pool, store)  # the pool is usable


def test_workflow_timeout_stops_a_batch_promptly(pool: ProcessExecutor, store: SharedStore) -> None:
    flow = Workflow(executor=pool, timeout=0.5).register(S.MAP, Batch(spin_forever, range(100)))
    t0 = time.monotonic()
    with pytest.raises(WorkflowTimeout):
        flow.add_exit_state(S.DONE).orchestrate(S.MAP, store=store)
    assert time.monotonic() - t0 < 3
    time.sleep(0.5)
    busy = [p for p in pool.worker_pids() if psutil.Process(p).cpu_percent(0.3) > 50]
    assert busy == []


def test_keyboard_interrupt_stops_a_batch_and_leaves_nothing() -> None:
    out = run_script(
        """
        import psutil
        from cano_mp import BatchTask
        from cano_mp._store import shm as _shm

        class Spin(BatchTask):
            def load(self, store):
                return range(1000)
            def process(self, x):
                while True:
                    pass
            def finish(self, store, results):
                return S.DONE

        class Quick(Spin):
            def process(self, x):
                return x

        ex = ProcessExecutor(2).warm()
        store = SharedStore()
        flow = Workflow(executor=ex).register(S.A, Spin()).add_exit_state(S.DONE)
        threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        t0 = time.monotonic()
        try:
            flow.orchestrate(S.A, store=store)
        except KeyboardInterrupt:
            print("interrupted after", round(time.monotonic() - t0, 2))
        time.sleep(0.5)
        busy = [p for p in ex.worker_pids() if psutil.Process(p).cpu_percent(0.3) > 50]
        print("busy workers", len(busy))
        ok = Workflow(executor=ex).register(S.A, Quick()).add_exit_state(S.DONE)
        print("after", ok.orchestrate(S.A, store=store).name)
        store.close()
        """
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("interrupted after") and float(lines[0].split()[-1]) < 3
    assert lines[1] == "busy workers 0"
    assert lines[2] == "after DONE"


def test_crashes_and_timeouts_leave_no_segments(pool: ProcessExecutor) -> None:
    np = pytest.importorskip("numpy")
    store = SharedStore()
    try:
        store["table"] = np.ones(100_000)
        cfg = TaskConfig(retry=RetryPolicy.none(), timeout=0.3)
        run_batch(Batch(die_on_five, range(10), chunk_size=3, on_error="collect"), pool, store)
        run_batch(Batch(sleep_on_three, range(6), config=cfg, on_error="collect"), pool, store)
    finally:
        store.close()
    assert segment_files(store) == []


# -- pieces -------------------------------------------------------------------------------------
def test_auto_chunks_grow_for_quick_items_and_stay_small_for_slow_ones() -> None:
    quick = ChunkSizer(None, workers=2, total=None)
    assert quick.next() == 1
    quick.observe(1, 2e-6)
    quick.observe(1000, 1e-4)
    assert quick.next() > 10_000
    slow = ChunkSizer(None, workers=2, total=None)
    slow.observe(1, 0.5)
    assert slow.next() == 1
    balanced = ChunkSizer(None, workers=2, total=1000)
    balanced.observe(1000, 1e-4)
    assert balanced.next() == 125  # 1000 items / (2 workers * 4 chunks)
    big = ChunkSizer(None, workers=2, total=None)
    big.observe(1000, 1e-4)
    big.observe_bytes(10, 10 << 20)  # 1 MiB per item
    assert big.next() == 8
    assert ChunkSizer(64, workers=2, total=10).next() == 64


def test_batch_runs_inline_when_configured(pool: ProcessExecutor, store: SharedStore) -> None:
    me = os.getpid()
    results = run_batch(
        Batch(lambda x: os.getpid(), range(3), config=TaskConfig(inline=True)), pool, store
    )
    assert results == [me] * 3


def test_repr_and_validate_and_mermaid() -> None:
    flow = Workflow().register(S.MAP, Batch(double, [1])).add_exit_state(S.DONE)
    flow.validate()
    assert "MAP --> DONE" in flow.to_mermaid().replace('"', "")
    assert repr(Batch(double)) == "<Batch batch task>"


def test_progress_bar_when_forced_and_silence_otherwise(
    store: SharedStore, capsys: pytest.CaptureFixture[str]
) -> None:
    class Shown(Batch):
        progress = True

    run_batch(Shown(double, range(50)), "inline", store)
    shown = capsys.readouterr().err
    assert "MAP Shown" in shown and "50" in shown and "item" in shown
    run_batch(Batch(double, range(50)), "inline", store)  # stderr is not a terminal here
    assert capsys.readouterr().err == ""


def test_item_index_survives_pickling() -> None:
    import pickle

    err = TaskError("boom", state=S.MAP, task_name="t", attempts=2)
    err.item_index = 7
    again = pickle.loads(pickle.dumps(err))
    assert again.item_index == 7 and again.attempts == 2


# -- found in review ------------------------------------------------------------------------
def exit_on_two(x: int) -> int:
    if x == 2:
        raise SystemExit(3)
    return x


class Unloadable:
    """Pickles in the worker, cannot be unpickled in the driver."""

    def __reduce__(self) -> Any:
        return (_refuse, ())


def _refuse() -> Any:
    raise ValueError("cannot load this result")


def unloadable_on_two(x: int) -> Any:
    return Unloadable() if x == 2 else x


def big_and_slowish(x: int) -> bytes:
    time.sleep(0.25)
    return bytes(60_000_000)


def test_failed_load_or_unpicklable_items_give_back_the_workflow_quota(
    pool: ProcessExecutor, store: SharedStore
) -> None:
    def gen() -> Iterator[int]:
        yield 1
        raise OSError("gone")

    for bad in (Batch(double, gen, chunk_size=1), Batch(repr, [threading.Lock()])):
        flow = Workflow(executor=pool, max_parallel=1).register(S.MAP, bad).add_exit_state(S.DONE)
        with pytest.raises((TaskError, ConfigError)):
            flow.orchestrate(S.MAP, store=store)
        assert flow._quota is not None and flow._quota.in_use == 0
        ok = Workflow(executor=pool, max_parallel=1, timeout=20)
        ok.register(S.MAP, Batch(double, [1, 2])).add_exit_state(S.DONE)
        assert ok.orchestrate(S.MAP, store=store) is S.DONE


def test_system_exit_in_an_item_is_that_items_failure(executor: Any, store: SharedStore) -> None:
    results = run_batch(Batch(exit_on_two, range(4), on_error="collect"), executor, store)
    assert results[:2] == [0, 1] and results[3] == 3
    assert isinstance(results[2], ItemFailure) and isinstance(results[2].error, SystemExit)


def test_a_result_the_driver_cannot_load_fails_its_chunks_items(
    pool: ProcessExecutor, store: SharedStore
) -> None:
    results = run_batch(
        Batch(unloadable_on_two, range(6), chunk_size=3, on_error="collect"), pool, store
    )
    assert results[3:] == [3, 4, 5]
    assert all(isinstance(r, ItemFailure) for r in results[:3])
    assert "cannot load this result" in str(results[0].error)


def test_packing_large_results_does_not_count_against_the_last_items_timeout(
    pool: ProcessExecutor, store: SharedStore
) -> None:
    cfg = TaskConfig(retry=RetryPolicy.none(), timeout=0.6)
    flow = Workflow(executor=pool).register(
        S.MAP, Batch(big_and_slowish, range(3), chunk_size=3, config=cfg)
    )
    flow.add_exit_state(S.DONE).orchestrate(S.MAP, store=store)
    assert [len(r) for r in store["results"]] == [60_000_000] * 3


def test_inline_batches_stop_when_the_run_is_cancelled() -> None:
    def slow(x: int) -> int:
        time.sleep(0.02)
        return x

    async def main() -> float:
        flow = Workflow(executor="inline").register(S.MAP, Batch(slow, range(500), chunk_size=100))
        with SharedStore() as store:
            run = asyncio.ensure_future(
                flow.add_exit_state(S.DONE).orchestrate_async(S.MAP, store=store)
            )
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run
            return time.monotonic() - t0

    assert asyncio.run(main()) < 0.5


def test_load_and_finish_see_a_task_context(executor: Any, store: SharedStore) -> None:
    seen: list[Any] = []

    class Ctx(Batch):
        def load(self, store: SharedStore) -> Iterable[Any]:
            seen.append(task_context().state)
            return [1]

        def finish(self, store: SharedStore, results: list[Any]) -> S:
            seen.append(task_context().run_id)
            return super().finish(store, results)

    run_batch(Ctx(double), executor, store)
    assert seen[0] is S.MAP and isinstance(seen[1], str)
