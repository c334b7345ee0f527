"""Observability: hooks, worker log records, metrics, trace files, OpenTelemetry spans."""

from __future__ import annotations

import json
import logging
import os
import time
from enum import Enum, auto
from pathlib import Path
from typing import Any

import pytest

from cano_mp import (
    JoinConfig,
    JoinStrategy,
    MetricsObserver,
    Observer,
    ProcessExecutor,
    RetryPolicy,
    RunInfo,
    SharedStore,
    TaskCancelled,
    TaskConfig,
    TaskError,
    TraceRecorder,
    WorkerCrashed,
    Workflow,
    task,
)
from cano_mp._log import TAGS


class S(Enum):
    A = auto()
    B = auto()
    DONE = auto()


class Spy(Observer):
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def on_workflow_start(self, run: RunInfo) -> None:
        self.calls.append(("start",))

    def on_state_enter(self, run: RunInfo, state: Any) -> None:
        self.calls.append(("enter", state))

    def on_task_start(self, run: RunInfo, state: Any, task_name: str, attempt: int) -> None:
        self.calls.append(("task_start", task_name, attempt))

    def on_task_timing(self, run: RunInfo, state: Any, task_name: str, attempt: int, *,
                       pid: int, started: float, ended: float) -> None:  # fmt: skip
        self.calls.append(("timing", task_name, attempt, pid, ended >= started))

    def on_task_end(self, run: RunInfo, state: Any, task_name: str, attempt: int, *,
                    error: BaseException | None, duration: float) -> None:  # fmt: skip
        self.calls.append(("task_end", task_name, attempt, type(error).__name__ if error else None))

    def on_retry(self, run: RunInfo, state: Any, task_name: str, attempt: int, delay: float,
                 error: BaseException) -> None:  # fmt: skip
        self.calls.append(("retry", task_name, attempt, type(error).__name__))

    def on_split_end(self, run: RunInfo, state: Any, result: Any) -> None:
        self.calls.append(("split_end", len(result.successes), len(result.cancelled)))

    def on_workflow_end(self, run: RunInfo, *, final_state: Any, error: BaseException | None,
                        duration: float) -> None:  # fmt: skip
        self.calls.append(("end", final_state, type(error).__name__ if error else None))


def flaky_once(store: SharedStore) -> S:
    from cano_mp import task_context

    if task_context().attempt == 1:
        raise ValueError("first time")
    return S.DONE


def crash(store: SharedStore) -> S:
    os._exit(9)


def quick(store: SharedStore) -> S:
    return S.DONE


def slow(store: SharedStore) -> S:
    time.sleep(30)
    return S.DONE


def chatty(store: SharedStore) -> S:
    logging.getLogger("user.task").info("processing %d rows", 42)
    logging.getLogger("user.task").debug("not shown at INFO")
    try:
        raise KeyError("k")
    except KeyError:
        logging.getLogger("user.task").exception("handled")
    return S.DONE


def test_hooks_on_retry_then_success_in_order(pool: ProcessExecutor, store: SharedStore) -> None:
    spy = Spy()
    cfg = TaskConfig(retry=RetryPolicy.fixed(1, 0.0))
    flow = Workflow(executor=pool, observers=[spy]).register(S.A, flaky_once, config=cfg)
    flow.add_exit_state(S.DONE).orchestrate(S.A, store=store)
    names = [c[0] for c in spy.calls]
    assert names == ["start", "enter", "task_start", "timing", "task_end", "retry",
                     "task_start", "timing", "task_end", "enter", "end"]  # fmt: skip
    assert spy.calls[3][3] in pool.worker_pids() and spy.calls[3][4]  # the worker's pid
    assert spy.calls[4] == ("task_end", "flaky_once", 1, "ValueError")
    assert spy.calls[5] == ("retry", "flaky_once", 1, "ValueError")
    assert spy.calls[-1] == ("end", S.DONE, None)


def test_hooks_on_crash_and_failure(pool: ProcessExecutor, store: SharedStore) -> None:
    spy = Spy()
    flow = Workflow(executor=pool, observers=[spy])
    flow.register(S.A, crash, config=TaskConfig.minimal()).add_exit_state(S.DONE)
    with pytest.raises(WorkerCrashed):
        flow.orchestrate(S.A, store=store)
    assert ("task_end", "crash", 1, "WorkerCrashed") in spy.calls
    assert not any(c[0] == "timing" for c in spy.calls)  # a crash has no worker timing
    assert spy.calls[-1] == ("end", None, "WorkerCrashed")


def test_hooks_on_cancelled_branches(pool: ProcessExecutor, store: SharedStore) -> None:
    spy = Spy()
    flow = Workflow(executor=pool, observers=[spy], cancel_grace=0.05)
    flow.register_split(S.A, [quick, slow], JoinConfig(JoinStrategy.any(), S.DONE))
    flow.add_exit_state(S.DONE).orchestrate(S.A, store=store)
    assert ("task_end", "slow", 1, "TaskCancelled") in spy.calls
    assert ("split_end", 1, 1) in spy.calls
    assert issubclass(TaskCancelled, Exception)


def test_worker_log_records_reach_the_driver_tagged(
    pool: ProcessExecutor, store: SharedStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    flow = Workflow(executor=pool, name="etl").register(S.A, chatty).add_exit_state(S.DONE)
    flow.orchestrate(S.A, store=store)
    records = [r for r in caplog.records if r.name == "user.task"]
    assert [r.levelname for r in records] == ["INFO", "ERROR"]
    info = records[0]
    assert info.getMessage().endswith("processing 42 rows")
    assert "[chatty of A, attempt 1, worker " in info.getMessage()
    assert (info.workflow, info.state, info.task, info.attempt) == ("etl", "A", "chatty", 1)  # type: ignore[attr-defined]
    assert info.worker_pid in pool.worker_pids()  # type: ignore[attr-defined]
    assert info.worker_pid != os.getpid()  # type: ignore[attr-defined]
    assert "KeyError" in (records[1].exc_text or "")
    # the engine's own records carry every tag too
    engine = [r for r in caplog.records if r.name == "cano_mp.engine"]
    assert engine and all(all(hasattr(r, t) for t in TAGS) for r in engine)
    assert engine[0].workflow == "etl"  # type: ignore[attr-defined]


def test_metrics_count_runs_attempts_retries_and_export_prometheus(
    pool: ProcessExecutor, store: SharedStore
) -> None:
    metrics = MetricsObserver()
    cfg = TaskConfig(retry=RetryPolicy.fixed(1, 0.0))
    ok = Workflow(executor=pool, observers=[metrics], name="ok")
    ok.register(S.A, flaky_once, config=cfg).add_exit_state(S.DONE)
    bad = Workflow(executor=pool, observers=[metrics], name="bad")
    bad.register(S.A, crash, config=TaskConfig.minimal()).add_exit_state(S.DONE)
    ok.orchestrate(S.A, store=store)
    ok.orchestrate(S.A, store=store)
    with pytest.raises(TaskError):
        bad.orchestrate(S.A, store=store)
    assert metrics.value("cano_mp_runs_total", workflow="ok", outcome="completed") == 2
    assert metrics.value("cano_mp_runs_total", workflow="bad", outcome="failed") == 1
    assert metrics.value("cano_mp_retries_total") == 2
    assert metrics.value("cano_mp_task_attempts_total", outcome="ok") == 2
    assert metrics.value("cano_mp_task_attempts_total", outcome="error") == 2
    assert metrics.value("cano_mp_crashes_total") == 1
    assert metrics.value("cano_mp_task_failures_total") == 3
    assert metrics.value("cano_mp_states_total", workflow="ok", state="DONE") == 2
    data = metrics.as_dict()
    [hist] = [h for h in data["cano_mp_run_duration_seconds"] if h["labels"]["workflow"] == "ok"]
    assert hist["count"] == 2 and hist["buckets"]["+Inf"] == 2
    text = metrics.to_prometheus()
    assert "# TYPE cano_mp_runs_total counter" in text
    assert 'cano_mp_runs_total{workflow="ok",outcome="completed"} 2' in text
    assert "# TYPE cano_mp_task_duration_seconds histogram" in text
    assert 'cano_mp_run_duration_seconds_bucket{workflow="ok",le="+Inf"} 2' in text
    for line in text.splitlines():  # every sample line is `name{labels} value`
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])
    assert "2 runs" not in repr(MetricsObserver())
    metrics.reset()
    assert metrics.as_dict() == {}


def test_trace_file_has_a_track_per_worker_and_the_driver_states(
    pool: ProcessExecutor, tmp_path: Path
) -> None:
    path = tmp_path / "trace.json"
    rec = TraceRecorder(path)
    branches = [task(quick, name=f"b{i}") for i in range(6)]
    flow = Workflow(executor=pool, observers=[rec], name="traced")
    flow.register(S.A, quick, config=TaskConfig(retry=RetryPolicy.none()))
    flow.register_split(S.B, branches, JoinConfig(JoinStrategy.all(), S.DONE))
    flow.add_exit_state(S.DONE)
    with SharedStore() as store:
        flow.orchestrate(S.B, store=store)
    data = json.loads(path.read_text())
    events = data["traceEvents"]
    slices = [e for e in events if e["ph"] == "X" and e.get("cat") == "task"]
    assert sorted(e["name"] for e in slices) == [f"b{i}" for i in range(6)]
    worker_pids = {e["pid"] for e in slices}
    assert worker_pids <= set(pool.worker_pids()) and os.getpid() not in worker_pids
    named = {e["pid"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert worker_pids | {os.getpid()} <= named  # one named track per worker, and the driver
    states = [e for e in events if e.get("cat") == "state"]
    assert [e["name"] for e in states] == ["B", "DONE"]  # the exit state: closed at the end
    assert all(e["dur"] >= 0 and e["ts"] > 0 for e in slices + states)
    assert "events" in repr(rec)


def test_batch_chunks_are_timed_slices(pool: ProcessExecutor, store: SharedStore) -> None:
    from cano_mp import BatchTask

    class Double(BatchTask[S, int, int]):
        chunk_size = 10

        def load(self, store: SharedStore) -> range:
            return range(30)

        def process(self, item: int) -> int:
            return item * 2

        def finish(self, store: SharedStore, results: list[int]) -> S:
            return S.DONE

    rec = TraceRecorder()
    flow = Workflow(executor=pool, observers=[rec]).register(S.A, Double()).add_exit_state(S.DONE)
    flow.orchestrate(S.A, store=store)
    names = sorted(e["name"] for e in rec.events() if e.get("cat") == "task")
    assert names == ["Double", "Double[0..9]", "Double[10..19]", "Double[20..29]"]


def test_opentelemetry_spans_nest_run_state_attempt(
    pool: ProcessExecutor, store: SharedStore
) -> None:
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from cano_mp.otel import OpenTelemetryObserver

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel = OpenTelemetryObserver(tracer_provider=provider)
    cfg = TaskConfig(retry=RetryPolicy.fixed(1, 0.0))
    flow = Workflow(executor=pool, observers=[otel], name="spans")
    flow.register(S.A, flaky_once, config=cfg).add_exit_state(S.DONE)
    flow.orchestrate(S.A, store=store)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    attempts = [s for s in exporter.get_finished_spans() if s.name == "cano_mp.task flaky_once"]
    run, state = spans["cano_mp.run spans"], spans["cano_mp.state A"]
    assert state.parent is not None and state.parent.span_id == run.context.span_id
    assert len(attempts) == 2
    for a in attempts:
        assert a.parent is not None and a.parent.span_id == state.context.span_id
        assert a.attributes["process.pid"] in pool.worker_pids()
        assert a.start_time <= a.end_time
    failed = next(a for a in attempts if a.attributes["cano_mp.attempt"] == 1)
    assert failed.status.status_code.name == "ERROR"
    assert any(e.name == "exception" for e in failed.events)
    assert run.attributes["cano_mp.final_state"] == "DONE"
    assert any(e.name == "cano_mp.retry" for e in state.events)


def test_a_raising_observer_never_breaks_a_run(pool: ProcessExecutor, store: SharedStore) -> None:
    class Broken(Observer):
        def on_task_timing(self, *a: Any, **k: Any) -> None:
            raise RuntimeError("observer bug")

        def on_state_enter(self, run: RunInfo, state: Any) -> None:
            raise RuntimeError("observer bug")

    flow = Workflow(executor=pool, observers=[Broken()]).register(S.A, quick)
    assert flow.add_exit_state(S.DONE).orchestrate(S.A, store=store) is S.DONE


def test_log_records_of_batch_items_name_the_item(
    pool: ProcessExecutor, store: SharedStore, caplog: pytest.LogCaptureFixture
) -> None:
    from cano_mp import BatchTask

    class Noisy(BatchTask[S, int, int]):
        chunk_size = 4

        def load(self, store: SharedStore) -> range:
            return range(6)

        def process(self, item: int) -> int:
            if item == 5:
                logging.getLogger("user.batch").warning("odd one: %d", item)
            return item

        def finish(self, store: SharedStore, results: list[int]) -> S:
            return S.DONE

    caplog.set_level(logging.INFO)
    flow = Workflow(executor=pool).register(S.A, Noisy()).add_exit_state(S.DONE)
    flow.orchestrate(S.A, store=store)
    [record] = [r for r in caplog.records if r.name == "user.batch"]
    assert "[Noisy of A, item 5, attempt 1, worker " in record.getMessage()
    assert record.item == 5 and record.task == "Noisy"  # type: ignore[attr-defined]


def test_hooks_nobody_implements_are_skipped_and_a_later_observer_gets_every_event(
    store: SharedStore,
) -> None:
    from cano_mp._observe import Observers

    metrics = MetricsObserver()
    obs = Observers([metrics])
    # the engine's hot paths test these tuples instead of dispatching
    assert obs.on_state_enter and obs.on_task_end and obs.on_workflow_end
    assert not obs.on_task_start and not obs.on_task_timing and not Observers([]).on_state_enter

    class ByInstance(Observer):
        pass

    by_instance = ByInstance()
    seen: list[Any] = []
    by_instance.on_task_start = lambda run, state, name, attempt: seen.append(name)  # type: ignore[method-assign]
    assert Observers([by_instance]).on_task_start  # a hook set on the instance counts too

    flow = Workflow(executor="inline", name="late").register(S.A, quick).add_exit_state(S.DONE)
    flow.orchestrate(S.A, store=store)  # no observer at all: the fast path
    spy = Spy()
    flow._observe(spy)
    flow._observe(by_instance)
    flow.orchestrate(S.A, store=store)
    assert spy.calls == [
        ("start",),
        ("enter", S.A),
        ("task_start", "quick", 1),
        ("timing", "quick", 1, os.getpid(), True),
        ("task_end", "quick", 1, None),
        ("enter", S.DONE),
        ("end", S.DONE, None),
    ]
    assert seen == ["quick"]


def test_metrics_count_again_after_reset_and_keep_states_apart(store: SharedStore) -> None:
    metrics = MetricsObserver()
    flow = Workflow(executor="inline", observers=[metrics], name="m")
    flow.register(S.A, lambda s: S.B).register(S.B, quick).add_exit_state(S.DONE)
    flow.orchestrate(S.A, store=store)
    flow.orchestrate(S.A, store=store)
    assert metrics.value("cano_mp_states_total", state="A") == 2
    assert metrics.value("cano_mp_states_total", state="DONE") == 2
    assert metrics.value("cano_mp_task_attempts_total", state="B", outcome="ok") == 2
    [hist] = [h for h in metrics.as_dict()["cano_mp_task_duration_seconds"]
              if h["labels"]["state"] == "A"]  # fmt: skip
    assert hist["count"] == 2
    metrics.reset()  # the cached series go with the counts
    flow.orchestrate(S.A, store=store)
    assert metrics.value("cano_mp_states_total", state="A") == 1
    assert metrics.value("cano_mp_task_attempts_total", outcome="ok") == 2
    [hist] = [h for h in metrics.as_dict()["cano_mp_task_duration_seconds"]
              if h["labels"]["state"] == "A"]  # fmt: skip
    assert hist["count"] == 1


def test_the_transition_record_is_one_lazy_record_with_its_fields(
    store: SharedStore, caplog: pytest.LogCaptureFixture
) -> None:
    made: list[logging.LogRecord] = []
    factory = logging.getLogRecordFactory()

    def counting(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        made.append(record)
        return record

    flow = Workflow(executor="inline", name="tagged").register(S.A, lambda s: S.B)
    flow.register(S.B, quick).add_exit_state(S.DONE)
    caplog.set_level(logging.INFO, logger="cano_mp.engine")
    logging.setLogRecordFactory(counting)  # a factory in force is used
    try:
        flow.orchestrate(S.A, store=store)
    finally:
        logging.setLogRecordFactory(factory)
    lines = [r for r in caplog.records if "->" in r.getMessage()]
    assert [r.getMessage().split(": ", 1)[1] for r in lines] == ["A -> B", "B -> DONE"]
    assert all(r in made for r in lines)  # one record each, from the factory
    first = lines[0]
    assert (first.workflow, first.state, first.task, first.attempt) == ("tagged", S.A, None, None)  # type: ignore[attr-defined]
    assert first.run_id == flow.last_run_id  # type: ignore[attr-defined]
    assert first.levelno == logging.INFO and first.name == "cano_mp.engine"
    # where the record was made: the engine's run loop, as findCaller would say
    assert first.pathname.endswith(os.path.join("_engine", "run.py")) and first.lineno > 0
    assert first.funcName == "run"


def test_metrics_fold_their_notes_exactly_across_threads_and_keep_no_errors() -> None:
    import gc
    import threading
    import weakref

    from cano_mp import RunInfo, TaskTimeout
    from cano_mp._metrics import _FOLD_AT

    metrics = MetricsObserver()
    per_thread = _FOLD_AT + 123  # each thread passes the fold threshold while others note
    run = RunInfo("r", "wf")

    def note() -> None:
        for i in range(per_thread):
            metrics.on_state_enter(run, S.A)
            metrics.on_task_end(run, S.A, "t", 1, error=None, duration=0.002)
            if i % 1000 == 0:
                metrics.value("cano_mp_states_total")  # a reader folds meanwhile

    threads = [threading.Thread(target=note) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert metrics.value("cano_mp_states_total", state="A") == 4 * per_thread
    assert metrics.value("cano_mp_task_attempts_total", outcome="ok") == 4 * per_thread
    [hist] = metrics.as_dict()["cano_mp_task_duration_seconds"]
    assert hist["count"] == 4 * per_thread and hist["buckets"]["0.005"] == 4 * per_thread

    error = TaskTimeout("slow")
    ref = weakref.ref(error)
    metrics.on_task_end(run, S.A, "t", 2, error=error, duration=5.0)
    del error
    gc.collect()
    assert ref() is None  # a noted failure keeps only its outcome, not the exception
    assert metrics.value("cano_mp_task_attempts_total", outcome="timeout") == 1
    assert metrics.value("cano_mp_task_failures_total") == 1
    metrics.on_state_enter(run, S.B)
    metrics.reset()  # notes not yet folded go too
    assert metrics.value("cano_mp_states_total") == 0
