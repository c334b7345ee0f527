"""Workflow(resources=...): set up once per worker process on first use, shared by every
task that process runs, torn down when the pool closes; a failing setup fails the task
that asked and is tried again; check_health() reports the driver's probe and the workers'."""

from __future__ import annotations

import os
from enum import Enum, auto
from pathlib import Path
from typing import Any

import pytest

from cano_mp import (
    BatchTask,
    InlineExecutor,
    JoinConfig,
    JoinStrategy,
    ProcessExecutor,
    Resource,
    ResourceError,
    RetryPolicy,
    SharedStore,
    Task,
    TaskConfig,
    TaskError,
    Workflow,
    task_context,
)


class S(Enum):
    GO = auto()
    MORE = auto()
    DONE = auto()


class Journal:
    """setup / teardown / health, each leaving a line in a file (pid, what)."""

    def __init__(self, path: Path, fail_setups: int = 0, healthy: bool = True) -> None:
        self.path, self.fail_setups, self.healthy = str(path), fail_setups, healthy

    def lines(self) -> list[tuple[int, str]]:
        if not os.path.exists(self.path):
            return []
        rows = [line.split() for line in Path(self.path).read_text().splitlines()]
        return [(int(pid), what) for pid, what in rows]

    def note(self, what: str) -> None:
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()} {what}\n")

    def setup(self) -> dict[str, Any]:
        self.note("setup")
        if sum(1 for _p, w in self.lines() if w == "setup") <= self.fail_setups:
            raise ConnectionError("the database is not up yet")
        return {"pid": os.getpid()}

    def teardown(self, value: dict[str, Any]) -> None:
        self.note("teardown")

    def health(self, value: dict[str, Any]) -> bool:
        return self.healthy

    def resource(self) -> Resource[dict[str, Any]]:
        return Resource(setup=self.setup, teardown=self.teardown, health=self.health)


class Items(BatchTask[S, int, int]):
    next_states = (S.DONE,)
    chunk_size = 1  # one call per item: 1,000 calls

    def load(self, store: SharedStore) -> range:
        return range(1000)

    def process(self, item: int) -> int:
        db = task_context().resources["db"]
        assert db["pid"] == os.getpid()  # this process's own instance
        return int(db["pid"])

    def finish(self, store: SharedStore, results: list[Any]) -> S:
        store["pids"] = sorted(set(results))
        return S.DONE


class Uses(Task[S]):
    config = TaskConfig(retry=RetryPolicy.fixed(2, 0.0))

    def run(self, store: SharedStore) -> S:
        store["who"] = task_context().resources["db"]["pid"]
        return S.DONE


def test_set_up_once_per_worker_across_a_thousand_calls_and_torn_down_at_close(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "journal")
    with ProcessExecutor(3, reuse=False) as ex:
        flow = (
            Workflow(start=S.GO, executor=ex, resources={"db": journal.resource()})
            .register(S.GO, Items())
            .add_exit_state(S.DONE)
        )
        with SharedStore() as store:
            flow.orchestrate(store=store)
            pids = store["pids"]
        workers = set(ex.worker_pids())
    setups = [pid for pid, what in journal.lines() if what == "setup"]
    assert sorted(setups) == sorted(pids)  # once per process that used it
    assert set(pids) <= workers and os.getpid() not in pids
    teardowns = [pid for pid, what in journal.lines() if what == "teardown"]
    assert sorted(teardowns) == sorted(setups)  # at the pool's close


def test_inline_tasks_use_the_drivers_instance(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    flow = (
        Workflow(start=S.GO, executor=InlineExecutor(), resources={"db": journal.resource()})
        .register(S.GO, Uses())
        .add_exit_state(S.DONE)
    )
    with SharedStore() as store:
        flow.orchestrate(store=store)
        flow.orchestrate(store=store)
        assert store["who"] == os.getpid()
    assert [w for p, w in journal.lines()] == ["setup"]


def test_a_failing_setup_fails_the_attempt_and_is_tried_again(
    pool: ProcessExecutor, tmp_path: Path
) -> None:
    journal = Journal(tmp_path / "journal", fail_setups=1)
    flow = (
        Workflow(start=S.GO, executor=pool, resources={"db": journal.resource()})
        .register(S.GO, Uses())  # 3 attempts: the first setup fails, the retry sets up
        .add_exit_state(S.DONE)
    )
    with SharedStore() as store:
        assert flow.orchestrate(store=store) is S.DONE
    assert [w for _p, w in journal.lines()][:2] == ["setup", "setup"]


def test_a_setup_that_always_fails_says_which_resource(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal", fail_setups=99)
    flow = (
        Workflow(start=S.GO, executor="inline", resources={"db": journal.resource()})
        .register(S.GO, Uses())
        .add_exit_state(S.DONE)
    )
    with pytest.raises(TaskError, match=r"setup of resource 'db'.*ConnectionError"):
        flow.orchestrate()


def test_a_failing_setup_surfaces_as_the_public_resource_error(
    pool: ProcessExecutor, tmp_path: Path
) -> None:
    journal = Journal(tmp_path / "journal", fail_setups=99)
    flow = (
        Workflow(start=S.GO, executor=pool, resources={"db": journal.resource()})
        .register(S.GO, Uses())
        .add_exit_state(S.DONE)
    )
    with pytest.raises(TaskError) as info:
        flow.orchestrate()
    cause = info.value.__cause__
    assert isinstance(cause, ResourceError), repr(cause)  # typed across the process boundary
    assert type(cause).__module__ == "cano_mp" and "setup of resource 'db'" in str(cause)
    setups = [pid for pid, what in journal.lines() if what == "setup"]
    assert len(setups) == 3 and os.getpid() not in setups  # each attempt tried it again

    def fallback(store: SharedStore) -> S:
        try:
            task_context().resources["db"]
        except ResourceError:  # task code can catch it by name
            store["fallback"] = True
        return S.DONE

    inline = (
        Workflow(start=S.GO, executor="inline", resources={"db": journal.resource()})
        .register(S.GO, fallback)
        .add_exit_state(S.DONE)
    )
    with SharedStore() as store:
        assert inline.orchestrate(store=store) is S.DONE
        assert store["fallback"] is True
    assert inline.check_health() == {"db": False}


def test_check_health_probes_the_driver_and_reports_the_workers(
    pool: ProcessExecutor, tmp_path: Path
) -> None:
    good = Journal(tmp_path / "good")
    sick = Journal(tmp_path / "sick", healthy=False)
    flow = (
        Workflow(
            start=S.GO,
            executor=pool,
            resources={"db": good.resource(), "cache": sick.resource()},
        )
        .register_split(S.GO, [Uses()], JoinConfig(JoinStrategy.all(), S.DONE))
        .add_exit_state(S.DONE)
    )
    flow.orchestrate()
    assert flow.check_health() == {"db": True, "cache": False}
    assert Workflow().check_health() == {}


def test_an_unknown_resource_is_a_clear_key_error() -> None:
    flow = Workflow(resources={"db": Resource(setup=dict)})
    assert flow.check_health() == {"db": True}
    with pytest.raises(Exception, match="must be a Resource"):
        Workflow(resources={"db": dict})  # type: ignore[dict-item]
