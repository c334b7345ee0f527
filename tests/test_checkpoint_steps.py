"""SteppedTask (one pool call per step, resumable at its cursor) and compensation (sagas)."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

import pytest

from cano_mp import (
    CheckpointStore,
    Done,
    InlineExecutor,
    JoinConfig,
    JoinError,
    JoinStrategy,
    ProcessExecutor,
    RetryPolicy,
    SharedStore,
    SteppedTask,
    TaskConfig,
    TaskError,
    Workflow,
    WorkflowTimeout,
    task_context,
)


class S(enum.IntEnum):
    A = 1
    PAGES = 2
    B = 3
    DONE = 4


@pytest.fixture(params=["process", "inline"])
def ex(request: pytest.FixtureRequest, pool: ProcessExecutor) -> Any:
    return pool if request.param == "process" else InlineExecutor()


class Pages(SteppedTask[S, int]):
    config = TaskConfig(retry=RetryPolicy.fixed(1, 0.0))

    def __init__(self, stop_at: int, fail_marker: str = "") -> None:
        self.stop_at, self.fail_marker = stop_at, fail_marker

    def start(self, store: SharedStore) -> int:
        return 0

    def step(self, store: SharedStore, cursor: int) -> int | S:
        if self.fail_marker and cursor == 3 and Path(self.fail_marker).exists():
            raise RuntimeError("page 3 fails")
        store.append("pages", (cursor, task_context().attempt))
        return cursor + 1 if cursor + 1 < self.stop_at else S.B  # an IntEnum: still a state


def stepped_flow(ex: Any, task: Any, **kw: Any) -> Workflow[S]:
    return (
        Workflow(start=S.A, executor=ex, **kw)
        .register(S.A, lambda s: S.PAGES)
        .register(S.PAGES, task)
        .register(S.B, lambda s: S.DONE)
        .add_exit_state(S.DONE)
    )


def test_each_step_runs_and_commits_its_cursor(ex: Any) -> None:
    wf = stepped_flow(ex, Pages(5))
    assert wf.orchestrate() == S.DONE
    assert [p for p, _ in wf.store["pages"]] == [0, 1, 2, 3, 4]
    assert not [k for k in wf.store if k.startswith("__cano")]


def test_retry_applies_per_step(tmp_path: Path) -> None:
    marker = tmp_path / "m"
    marker.touch()

    class Flaky(Pages):
        def step(self, store: SharedStore, cursor: int) -> int | S:
            if cursor == 2 and task_context().attempt == 1:
                raise RuntimeError("once")
            return super().step(store, cursor)

    wf = stepped_flow("inline", Flaky(4))
    assert wf.orchestrate() == S.DONE
    assert wf.store["pages"] == [(0, 1), (1, 1), (2, 2), (3, 1)]


def test_a_resumed_run_continues_at_the_last_committed_cursor(tmp_path: Path, ex: Any) -> None:
    marker = tmp_path / "m"
    marker.touch()
    steps: list[Any] = []
    from cano_mp import Observer, RunInfo

    class Rec(Observer):
        def on_checkpoint(self, run: RunInfo, state: Any, seq: int, n: int) -> None:
            steps.append(state)

    wf = stepped_flow(ex, Pages(6, str(marker)), checkpoint=tmp_path / "r.db", observers=[Rec()])
    with pytest.raises(TaskError):
        wf.orchestrate(run_id="p")
    assert steps == [S.A, S.PAGES, S.PAGES, S.PAGES, S.PAGES, S.PAGES]  # start + 3 steps
    marker.unlink()
    wf.store.clear()
    assert wf.resume("p") == S.DONE
    assert [p for p, _ in wf.store["pages"]] == [0, 1, 2, 3, 4, 5]


def test_done_ends_a_task_whose_states_are_not_enums() -> None:
    class Count(SteppedTask[str, int]):
        def start(self, store: SharedStore) -> int:
            return 0

        def step(self, store: SharedStore, cursor: int) -> Any:
            store["n"] = cursor
            return cursor + 1 if cursor < 3 else Done("end")

    wf = Workflow(start="go", executor="inline").register("go", Count()).add_exit_state("end")
    assert wf.orchestrate() == "end"
    assert wf.store["n"] == 3


# -- compensation ---------------------------------------------------------------------------


class T(enum.Enum):
    BOOK = 1
    PAY = 2
    SHIP = 3
    DONE = 4


def undo(name: str) -> Any:
    def comp(store: SharedStore) -> None:
        store.append("undone", name)

    return comp


def saga(ex: Any, ship: Any, **kw: Any) -> Workflow[T]:
    def book(store: SharedStore) -> T:
        store.append("done", "book")
        return T.PAY

    def pay(store: SharedStore) -> T:
        store.append("done", "pay")
        return T.SHIP

    return (
        Workflow(start=T.BOOK, executor=ex, **kw)
        .register(T.BOOK, book, compensate=undo("book"))
        .register(T.PAY, pay, compensate=undo("pay"))
        .register(T.SHIP, ship, config=TaskConfig.minimal())
        .add_exit_state(T.DONE)
    )


def fail(store: SharedStore) -> T:
    raise RuntimeError("no ship")


def test_a_failed_run_compensates_completed_states_last_first(ex: Any) -> None:
    wf = saga(ex, fail)
    with pytest.raises(TaskError) as info:
        wf.orchestrate()
    assert info.value.compensated == [T.PAY, T.BOOK]  # type: ignore[attr-defined]
    assert info.value.compensation_errors == []  # type: ignore[attr-defined]
    assert wf.store["undone"] == ["pay", "book"]


def test_a_state_visited_twice_is_compensated_twice() -> None:
    def book(store: SharedStore) -> T:
        store.append("done", "book")
        return T.PAY if len(store["done"]) < 2 else T.SHIP

    def pay(store: SharedStore) -> T:
        return T.BOOK

    wf = (
        Workflow(start=T.BOOK, executor="inline")
        .register(T.BOOK, book, compensate=undo("book"))
        .register(T.PAY, pay, compensate=undo("pay"))
        .register(T.SHIP, fail, config=TaskConfig.minimal())
        .add_exit_state(T.DONE)
    )
    with pytest.raises(TaskError) as info:
        wf.orchestrate()
    assert info.value.compensated == [T.BOOK, T.PAY, T.BOOK]  # type: ignore[attr-defined]


def test_compensation_errors_are_collected_and_the_rest_still_run() -> None:
    def bad(store: SharedStore) -> None:
        raise ValueError("cannot undo")

    wf = saga("inline", fail)
    wf.register(T.PAY, lambda s: T.SHIP, compensate=bad)
    with pytest.raises(TaskError) as info:
        wf.orchestrate()
    err = info.value
    assert err.compensated == [T.BOOK]  # type: ignore[attr-defined]
    [(state, exc)] = err.compensation_errors  # type: ignore[attr-defined]
    assert state == T.PAY and isinstance(exc, TaskError)
    assert wf.store["undone"] == ["book"]


def test_join_failures_and_workflow_timeouts_roll_back(pool: ProcessExecutor) -> None:
    wf = saga("inline", fail)
    wf.register_split(T.SHIP, [fail], JoinConfig(JoinStrategy.all(), T.DONE))
    with pytest.raises(JoinError) as info:
        wf.orchestrate()
    assert info.value.compensated == [T.PAY, T.BOOK]  # type: ignore[attr-defined]

    import time

    def slow(store: SharedStore) -> T:
        time.sleep(5)
        return T.DONE

    wf2 = saga(pool, slow, timeout=1.0)
    with pytest.raises(WorkflowTimeout) as tinfo:
        wf2.orchestrate()
    assert tinfo.value.compensated == [T.PAY, T.BOOK]  # type: ignore[attr-defined]


def test_a_rolled_back_run_is_failed_and_cannot_be_resumed(tmp_path: Path) -> None:
    wf = saga("inline", fail, checkpoint=tmp_path / "r.db")
    with pytest.raises(TaskError):
        wf.orchestrate(run_id="s")
    (rec,) = CheckpointStore(tmp_path / "r.db").runs()
    assert rec.status == "failed" and not rec.resumable
    from cano_mp import ConfigError

    with pytest.raises(ConfigError, match="rolled back"):
        wf.resume("s")


def test_keyboard_interrupt_does_not_roll_back_and_stays_resumable(tmp_path: Path) -> None:
    def interrupt(store: SharedStore) -> T:
        raise KeyboardInterrupt

    wf = saga("inline", interrupt, checkpoint=tmp_path / "r.db")
    with pytest.raises(KeyboardInterrupt):
        wf.orchestrate(run_id="k")
    assert "undone" not in wf.store
    wf.register(T.SHIP, lambda s: T.DONE)
    assert wf.resume("k") == T.DONE
    assert wf.store["done"] == ["book", "pay"]
