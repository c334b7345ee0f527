"""The Workflow contract, on a real process pool and on the inline executor."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from enum import Enum, auto
from typing import Any, Literal

import numpy as np
import pytest

from cano_mp import (
    ConfigError,
    InlineExecutor,
    JoinConfig,
    JoinStrategy,
    Node,
    RetryPolicy,
    SharedStore,
    Task,
    TaskConfig,
    TaskError,
    TaskTimeout,
    TransitionError,
    Workflow,
    WorkflowTimeout,
    task,
    task_context,
)

NO_RETRY = TaskConfig.minimal()


class S(Enum):
    A = auto()
    B = auto()
    C = auto()
    DONE = auto()
    FAILED = auto()


def bump_file(path: str) -> int:
    """Count calls across processes (store writes of failed attempts are discarded)."""
    with open(path, "a") as f:
        f.write("x")
    with open(path) as f:
        return len(f.read())


@task
def put_pid(store: SharedStore) -> S:
    store["pid"] = os.getpid()
    store.append("trail", "A")
    return S.B


@task(next=(S.DONE,))
def finish(store: SharedStore) -> S:
    store.append("trail", "B")
    return S.DONE


def linear(executor: object, **kw: Any) -> Workflow[S]:
    return (
        Workflow(start=S.A, executor=executor, **kw)  # type: ignore[arg-type]
        .register(S.A, put_pid)
        .register(S.B, finish)
        .add_exit_state(S.DONE)
    )


def test_runs_to_the_exit_state(executor: object, store: SharedStore) -> None:
    flow = linear(executor)
    assert flow.orchestrate(store=store) is S.DONE
    assert store["trail"] == ["A", "B"]
    if isinstance(executor, InlineExecutor):
        assert store["pid"] == os.getpid()
    else:
        assert store["pid"] != os.getpid()  # ran in a worker process


def test_default_store_is_reused_across_runs(executor: object) -> None:
    flow = linear(executor)
    try:
        flow.orchestrate()
        flow.orchestrate()
        assert flow.store["trail"] == ["A", "B", "A", "B"]
    finally:
        flow.store.close()


def test_initial_state_argument_overrides_start(executor: object, store: SharedStore) -> None:
    flow = linear(executor)
    assert flow.orchestrate(S.B, store=store) is S.DONE
    assert store["trail"] == ["B"]


def test_no_initial_state_is_a_config_error(executor: object) -> None:
    flow = Workflow(executor=executor).register(S.A, finish).add_exit_state(S.DONE)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="initial state"):
        flow.orchestrate()


def plain_function(store: SharedStore) -> S:
    store["plain"] = True
    return S.DONE


def test_bare_callable_is_wrapped(executor: object, store: SharedStore) -> None:
    flow = Workflow(executor=executor).register(S.A, plain_function).add_exit_state(S.DONE)  # type: ignore[arg-type]
    assert flow.orchestrate(S.A, store=store) is S.DONE and store["plain"] is True


class Scale(Node[S, np.ndarray, float]):
    config = NO_RETRY

    def prep(self, store: SharedStore) -> np.ndarray:
        return store["x"]  # type: ignore[no-any-return]

    def exec(self, prep_result: np.ndarray) -> float:
        return float((prep_result * 2).sum())

    def post(self, store: SharedStore, exec_result: float) -> S:
        store["total"] = exec_result
        return S.DONE


def test_node_runs_prep_exec_post(executor: object, store: SharedStore) -> None:
    store["x"] = np.arange(200_000, dtype=np.float64)
    flow = Workflow(executor=executor).register(S.A, Scale()).add_exit_state(S.DONE)  # type: ignore[arg-type]
    flow.orchestrate(S.A, store=store)
    assert store["total"] == float(np.arange(200_000).sum() * 2)


class Flaky(Task[S]):
    """Fails until its ``fails``-th call; each attempt writes a key first."""

    config = TaskConfig(retry=RetryPolicy.fixed(3, 0.01))

    def __init__(self, counter: str, fails: int) -> None:
        self.counter, self.fails = counter, fails

    def run(self, store: SharedStore) -> S:
        n = bump_file(self.counter)
        store[f"attempt{n}"] = n
        store["attempt_seen"] = task_context().attempt
        if n <= self.fails:
            raise ValueError(f"flaky failure {n}")
        return S.DONE


def test_retry_until_success_keeps_only_the_successful_writes(
    executor: object, store: SharedStore, tmp_path: Any
) -> None:
    counter = str(tmp_path / "count")
    flow = Workflow(executor=executor).register(S.A, Flaky(counter, 2)).add_exit_state(S.DONE)  # type: ignore[arg-type]
    assert flow.orchestrate(S.A, store=store) is S.DONE
    assert "attempt1" not in store and "attempt2" not in store
    assert store["attempt3"] == 3 and store["attempt_seen"] == 3


def test_retries_spent_raise_task_error_with_original_cause(
    executor: object, store: SharedStore, tmp_path: Any
) -> None:
    counter = str(tmp_path / "count")
    store["keep"] = "before"
    flow = Workflow(executor=executor).register(S.A, Flaky(counter, 10)).add_exit_state(S.DONE)  # type: ignore[arg-type]
    with pytest.raises(TaskError) as info:
        flow.orchestrate(S.A, store=store)
    err = info.value
    assert err.attempts == 4 and err.state is S.A and err.task_name == "Flaky"
    assert isinstance(err.__cause__, ValueError)
    assert "flaky failure 4" in str(err.__cause__)
    assert err.remote_traceback is not None and "ValueError" in err.remote_traceback
    assert store.keys() == ["keep"]  # the failed run left the store as it was


class CustomError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@task(retry=RetryPolicy.none())
def raises_custom(store: SharedStore) -> S:
    raise CustomError(42)


def test_remote_exception_keeps_its_type_and_fields(executor: object) -> None:
    flow = Workflow(executor=executor).register(S.A, raises_custom).add_exit_state(S.DONE)  # type: ignore[arg-type]
    with pytest.raises(TaskError) as info:
        flow.orchestrate(S.A)
    cause = info.value.__cause__
    assert isinstance(cause, CustomError) and cause.code == 42
    assert "raises_custom" in (info.value.remote_traceback or "")


@task(retry=RetryPolicy.fixed(3, 0))
def returns_unregistered(store: SharedStore) -> S:
    store["written"] = 1
    return S.C


def test_unregistered_state_is_transition_error_not_retried(
    executor: object, store: SharedStore
) -> None:
    flow = (
        Workflow(executor=executor)  # type: ignore[arg-type]
        .register(S.A, returns_unregistered)
        .add_exit_state(S.DONE)
    )
    with pytest.raises(TransitionError, match="C") as info:
        flow.orchestrate(S.A, store=store)
    assert "DONE" in str(info.value)  # names the valid states
    assert "written" not in store


@task(next=(S.B,))
def declares_b_returns_done(store: SharedStore) -> S:
    return S.DONE


def test_undeclared_state_is_transition_error(executor: object) -> None:
    flow = (
        Workflow(executor=executor)  # type: ignore[arg-type]
        .register(S.A, declares_b_returns_done)
        .register(S.B, finish)
        .add_exit_state(S.DONE)
    )
    with pytest.raises(TransitionError, match="does not declare"):
        flow.orchestrate(S.A)


@task
def returns_garbage(store: SharedStore) -> Any:
    return ["not", "a", "state"]


def test_non_state_return_is_transition_error(executor: object) -> None:
    flow = Workflow(executor=executor).register(S.A, returns_garbage).add_exit_state(S.DONE)  # type: ignore[arg-type]
    with pytest.raises(TransitionError):
        flow.orchestrate(S.A)


def literal_task(store: SharedStore) -> Literal[S.B, S.DONE]:
    return S.DONE


def test_literal_annotation_declares_next_states() -> None:
    t = task(literal_task)
    assert t.next_states == (S.B, S.DONE)
    flow = Workflow().register(S.A, t).add_exit_state(S.DONE)
    with pytest.raises(ConfigError, match="next state B"):
        flow.validate()


def test_validate_reports_every_problem_at_once() -> None:
    flow = (
        Workflow(start=S.C, max_parallel=0)
        .register(S.A, finish)
        .register_split(S.B, [], JoinConfig(JoinStrategy.all(), S.FAILED))
        .register_split(S.FAILED, [finish, finish], JoinConfig(JoinStrategy.quorum(3), S.DONE))
    )
    with pytest.raises(ConfigError) as info:
        flow.validate()
    text = str(info.value)
    for expected in (
        "no exit state",
        "start state C has no task",
        "has no tasks",
        "quorum(3)",
        "max_parallel",
        "join state DONE",
    ):
        assert expected in text, expected


def test_exit_state_with_a_task_and_partial_timeout_without_timeout() -> None:
    flow = (
        Workflow()
        .register(S.A, finish)
        .register_split(S.B, [finish], JoinConfig(JoinStrategy.partial_timeout(), S.DONE))
        .add_exit_states([S.A, S.DONE])
    )
    with pytest.raises(ConfigError) as info:
        flow.validate()
    assert "exit state A also has a task" in str(info.value)
    assert "partial_timeout() needs" in str(info.value)


def test_register_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="hashable"):
        Workflow().register([1], finish)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="instance"):
        Workflow().register(S.A, Flaky)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Workflow().register(S.A, 42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Workflow(executor="threads")  # type: ignore[arg-type]


def test_to_mermaid_draws_states_transitions_and_exits() -> None:
    flow = linear("inline")
    text = flow.to_mermaid()
    assert text.startswith("stateDiagram-v2")
    assert "[*] --> A" in text and "B --> DONE" in text and "DONE --> [*]" in text
    assert "```mermaid" in flow._repr_markdown_()


def record_context(store: SharedStore) -> S:
    ctx = task_context()
    store["ctx"] = (ctx.run_id, ctx.state, ctx.attempt, ctx.deadline is not None, ctx.cancelled())
    return S.DONE


def test_task_context_inside_a_task(executor: object, store: SharedStore) -> None:
    flow = (
        Workflow(executor=executor)  # type: ignore[arg-type]
        .register(S.A, record_context, config=TaskConfig(timeout=30))
        .add_exit_state(S.DONE)
    )
    flow.orchestrate(S.A, store=store)
    run_id, state, attempt, has_deadline, cancelled = store["ctx"]
    assert isinstance(run_id, str) and state is S.A and attempt == 1
    assert has_deadline and cancelled is False
    with pytest.raises(RuntimeError):
        task_context()


@task(inline=True)
def inline_pid(store: SharedStore) -> S:
    store["pid"] = os.getpid()
    store["lock_ok"] = isinstance(threading.Lock(), object)
    return S.DONE


def test_inline_task_runs_in_the_driver(pool: object, store: SharedStore) -> None:
    flow = Workflow(executor=pool).register(S.A, inline_pid).add_exit_state(S.DONE)  # type: ignore[arg-type]
    flow.orchestrate(S.A, store=store)
    assert store["pid"] == os.getpid()


def test_unpicklable_task_is_a_config_error_naming_it(pool: object) -> None:
    lock = threading.Lock()

    @task(name="holds_a_lock")
    def needs_lock(store: SharedStore) -> S:
        with lock:
            return S.DONE

    flow = Workflow(executor=pool).register(S.A, needs_lock).add_exit_state(S.DONE)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"holds_a_lock.*inline=True"):
        flow.orchestrate(S.A)
    # the same task runs fine inline
    flow2 = (
        Workflow(executor=pool)  # type: ignore[arg-type]
        .register(S.A, needs_lock, config=TaskConfig(inline=True))
        .add_exit_state(S.DONE)
    )
    assert flow2.orchestrate(S.A) is S.DONE


def spin_forever(store: SharedStore) -> S:
    store["partial"] = 1
    x = 0
    while True:  # pure-Python CPU work that never checks cancelled()
        x += 1


def test_timeout_stops_cpu_bound_work(pool: Any, store: SharedStore) -> None:
    flow = (
        Workflow(executor=pool, cancel_grace=0.1)
        .register(S.A, spin_forever, config=TaskConfig(retry=RetryPolicy.fixed(1, 0), timeout=0.3))
        .add_exit_state(S.DONE)
    )
    pids_before = set(pool.worker_pids())
    started = time.monotonic()
    with pytest.raises(TaskTimeout) as info:
        flow.orchestrate(S.A, store=store)
    assert time.monotonic() - started < 5
    assert info.value.attempts == 2
    assert "partial" not in store
    deadline = time.monotonic() + 5
    while set(pool.worker_pids()) & pids_before and time.monotonic() < deadline:
        time.sleep(0.05)  # the killed workers are reaped and replaced
    assert linear(pool).orchestrate(store=store) is S.DONE  # the pool still works


def cooperative(store: SharedStore) -> S:
    ctx = task_context()
    while not ctx.cancelled():
        time.sleep(0.01)
    store["noticed"] = True
    return S.DONE


def test_timeout_sets_the_cooperative_flag(executor: object, store: SharedStore) -> None:
    flow = (
        Workflow(executor=executor)  # type: ignore[arg-type]
        .register(S.A, cooperative, config=TaskConfig(retry=RetryPolicy.none(), timeout=0.2))
        .add_exit_state(S.DONE)
    )
    with pytest.raises(TaskTimeout):
        flow.orchestrate(S.A, store=store)
    assert "noticed" not in store


def sleepy(store: SharedStore) -> S:
    time.sleep(30)
    return S.DONE


def test_workflow_timeout(pool: Any) -> None:
    flow = (
        Workflow(executor=pool, timeout=0.3, cancel_grace=0.05)
        .register(S.A, sleepy)
        .add_exit_state(S.DONE)
    )
    started = time.monotonic()
    with pytest.raises(WorkflowTimeout) as info:
        flow.orchestrate(S.A)
    assert info.value.state is S.A
    assert time.monotonic() - started < 3


def test_orchestrate_async(executor: object, store: SharedStore) -> None:
    flow = linear(executor)
    assert asyncio.run(flow.orchestrate_async(store=store)) is S.DONE
    assert store["trail"] == ["A", "B"]


def test_orchestrate_async_cancellation_stops_the_run(pool: Any) -> None:
    flow = Workflow(executor=pool, cancel_grace=0.05).register(S.A, sleepy).add_exit_state(S.DONE)

    async def main() -> float:
        t = asyncio.create_task(flow.orchestrate_async(S.A))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        return time.monotonic() - started

    assert asyncio.run(main()) < 3


def test_store_value_written_by_worker_is_zero_copy_readable(
    executor: object, store: SharedStore
) -> None:
    def make(store: SharedStore) -> S:
        store["big"] = np.full(1_000_000, 2.0)
        return S.B

    def use(store: SharedStore) -> S:
        big = store["big"]
        store["ro"] = not big.flags.writeable
        store["sum"] = float(big.sum())
        return S.DONE

    flow = (
        Workflow(executor=executor)  # type: ignore[arg-type]
        .register(S.A, make)
        .register(S.B, use)
        .add_exit_state(S.DONE)
    )
    flow.orchestrate(S.A, store=store)
    assert store["ro"] is True and store["sum"] == 2_000_000.0


def test_task_writes_into_array_allocated_in_the_task(executor: object, store: SharedStore) -> None:
    def alloc(store: SharedStore) -> S:
        out = store.array("out", (1000, 100), "float64")
        out[:] = 7.0
        return S.DONE

    flow = Workflow(executor=executor).register(S.A, alloc).add_exit_state(S.DONE)  # type: ignore[arg-type]
    flow.orchestrate(S.A, store=store)
    assert float(store["out"].sum()) == 7.0 * 100_000


def test_repr_names_the_workflow() -> None:
    assert "etl" in repr(Workflow(name="etl"))


# -- second release: re-registration, start at an exit state, Node.run, diagrams ----------


@task(next=(S.DONE,))
def mark_first(store: SharedStore) -> S:
    store["ran"] = "first"
    return S.DONE


@task(next=(S.DONE,))
def mark_second(store: SharedStore) -> S:
    store["ran"] = "second"
    return S.DONE


def test_registering_a_state_again_replaces_its_task(
    executor: object, store: SharedStore, caplog: pytest.LogCaptureFixture
) -> None:
    flow = Workflow(start=S.A, executor=executor, name="nb").add_exit_state(S.DONE)  # type: ignore[arg-type]
    flow.register(S.A, mark_first)
    assert flow.orchestrate(store=store) is S.DONE and store["ran"] == "first"
    with caplog.at_level(logging.DEBUG, logger="cano_mp.workflow"):
        flow.register(S.A, mark_second)  # the notebook habit: re-run the cell
    assert any("registered again" in r.getMessage() for r in caplog.records)
    flow.validate()
    assert flow.orchestrate(store=store) is S.DONE and store["ran"] == "second"
    assert flow.states == [S.A]


def test_register_split_replaces_a_registered_state_and_back(
    executor: object, store: SharedStore
) -> None:
    flow = (
        Workflow(start=S.A, executor=executor)  # type: ignore[arg-type]
        .register(S.A, mark_first)
        .register(S.B, finish)
        .add_exit_state(S.DONE)
    )
    flow.register_split(S.A, [mark_second, mark_second], JoinConfig(JoinStrategy.all(), S.DONE))
    assert flow.orchestrate(store=store) is S.DONE and store["ran"] == "second"
    assert flow.states == [S.A, S.B]  # the state keeps its place
    flow.register(S.A, mark_first)
    assert flow.orchestrate(store=store) is S.DONE and store["ran"] == "first"


def test_registering_an_exit_state_is_still_reported_by_validate() -> None:
    for flow in (
        Workflow(start=S.A).register(S.A, finish).add_exit_state(S.DONE).register(S.DONE, finish),
        Workflow(start=S.A).register(S.A, finish).register(S.DONE, finish).add_exit_state(S.DONE),
    ):
        with pytest.raises(ConfigError, match="exit state DONE also has a task"):
            flow.validate()


def test_start_at_an_exit_state_returns_it_at_once(executor: object, store: SharedStore) -> None:
    flow = Workflow(start=S.DONE, executor=executor).register(S.A, finish).add_exit_state(S.DONE)  # type: ignore[arg-type]
    flow.validate()
    assert flow.orchestrate(store=store) is S.DONE
    assert "trail" not in store  # no task ran
    bare = Workflow(start=S.DONE, executor=executor).add_exit_state(S.DONE)  # type: ignore[arg-type]
    assert bare.orchestrate() is S.DONE


def test_start_state_neither_registered_nor_exit_is_still_a_config_error() -> None:
    flow = Workflow(start=S.C).register(S.A, finish).add_exit_state(S.DONE)
    with pytest.raises(ConfigError, match="start state C has no task"):
        flow.validate()


class ScaleWithOwnRun(Scale):
    """A Node that overrides run(): the override decides, as in Cano."""

    def run(self, store: SharedStore) -> Literal[S.B]:  # type: ignore[override]
        store["own_run"] = os.getpid()
        store["via_super"] = super().run(store).name
        return S.B


def test_node_run_override_is_honoured(executor: object, store: SharedStore) -> None:
    store["x"] = np.arange(10, dtype=np.float64)
    flow = (
        Workflow(executor=executor)  # type: ignore[arg-type]
        .register(S.A, ScaleWithOwnRun())
        .register(S.B, finish)
        .add_exit_state(S.DONE)
    )
    assert flow.orchestrate(S.A, store=store) is S.DONE
    assert "own_run" in store and store["via_super"] == "DONE"
    assert store["total"] == 90.0  # prep/exec/post ran once, through super().run()
    assert store["trail"] == ["B"]


def test_node_run_override_declares_its_next_states() -> None:
    flow = Workflow().register(S.A, ScaleWithOwnRun()).add_exit_state(S.DONE)
    with pytest.raises(ConfigError, match="next state B"):
        flow.validate()  # from run()'s Literal[S.B], not post()'s annotation
    assert "A --> B" in flow.register(S.B, finish).to_mermaid()


def undeclared(store: SharedStore) -> S:
    return S.DONE


def test_to_mermaid_draws_states_without_declared_transitions() -> None:
    flow = (
        Workflow(start=S.A)
        .register(S.A, put_pid)  # @task without next=: nothing declared
        .register(S.B, finish)
        .register(S.C, undeclared)  # reached by no declared edge at all
        .add_exit_state(S.DONE)
    )
    lines = [ln.strip() for ln in flow.to_mermaid().splitlines()]
    for state in ("A", "B", "C", "DONE"):
        assert state in lines, state  # every state is declared, so drawn
    assert "B --> DONE" in lines
    assert "class A, C undeclared" in lines
    assert any(ln.startswith("classDef undeclared") and "dasharray" in ln for ln in lines)
    assert "note right of A: next states not declared" in lines
    assert "note right of C: next states not declared" in lines
    assert not any(ln.startswith("note right of B") for ln in lines)
