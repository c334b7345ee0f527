"""Grouped calls: a split's quick branches share pool calls (``_engine.groups``) and each
keeps its own outcome, writes, retries, crash blame and observer events."""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from cano_mp import (
    JoinConfig,
    JoinStrategy,
    Observer,
    ProcessExecutor,
    RetryPolicy,
    SharedStore,
    SplitResult,
    Task,
    TaskConfig,
    WorkerCrashed,
    Workflow,
    WorkflowTimeout,
)
from cano_mp._calls import run_unit_group
from cano_mp._engine import groups
from cano_mp._wire import Call, WorkerDied

N = 400


@pytest.fixture
def own_pool() -> Iterator[ProcessExecutor]:
    with ProcessExecutor(max_workers=2, reuse=False) as ex:
        ex.warm()
        yield ex


@pytest.fixture
def group_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The branch indexes of every grouped call the engine submits, attempt 1 or later."""
    seen: list[list[int]] = []
    submit = groups.submit

    def spy(scope: Any, executor: Any, call: Call, *args: Any, **kwargs: Any) -> Future[Any]:
        if call.fn is run_unit_group:
            seen.append([c[0] for c in call.args[0]])
        return submit(scope, executor, call, *args, **kwargs)

    monkeypatch.setattr(groups, "submit", spy)
    return seen


def record(folder: str, i: int) -> None:
    with open(os.path.join(folder, "runs"), "a") as f:  # one short line: an atomic append
        f.write(f"{i}\n")


def runs(folder: Path) -> collections.Counter[int]:
    path = folder / "runs"
    return collections.Counter(int(x) for x in path.read_text().split()) if path.exists() else {}  # type: ignore[return-value]


class Leaf(Task[str]):
    """A distinct quick branch; ``crash_once``: its first attempt kills its worker."""

    def __init__(self, i: int, folder: str, crash_once: bool = False) -> None:
        self.i, self.folder, self.crash_once = i, folder, crash_once
        self.config = TaskConfig(retry=RetryPolicy.fixed(1, 0.0))

    def run(self, store: Any) -> str:
        record(self.folder, self.i)
        marker = os.path.join(self.folder, f"crashed{self.i}")
        if self.crash_once and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(3)
        store[f"r{self.i}"] = self.i * 3
        return "done"


class Count(Observer):
    def __init__(self) -> None:
        self.starts: collections.Counter[int] = collections.Counter()
        self.errors: list[BaseException] = []
        self.ends = 0

    def on_task_start(self, run: Any, state: Any, task_name: str, attempt: int) -> None:
        self.starts[attempt] += 1

    def on_task_end(self, run: Any, state: Any, task_name: str, attempt: int, **kw: Any) -> None:
        self.ends += 1
        if kw["error"] is not None:
            self.errors.append(kw["error"])


def split(executor: Any, branches: list[Leaf], observer: Observer | None = None) -> Workflow[str]:
    join = JoinConfig(JoinStrategy.all(), "done", result_key="split")
    flow: Workflow[str] = Workflow(
        start="split", executor=executor, observers=[observer] if observer else []
    )
    return flow.register_split("split", branches, join).add_exit_state("done")


def test_quick_branches_share_calls_and_keep_their_own_results(
    own_pool: ProcessExecutor, store: SharedStore, tmp_path: Path, group_calls: list[list[int]]
) -> None:
    count = Count()
    branches = [Leaf(i, str(tmp_path)) for i in range(N)]
    assert split(own_pool, branches, count).orchestrate(store=store) == "done"
    result: SplitResult[str] = store["split"]
    assert result.successes == [(i, "done") for i in range(N)]
    assert [store[f"r{i}"] for i in range(N)] == [3 * i for i in range(N)]
    assert runs(tmp_path) == {i: 1 for i in range(N)}
    assert count.starts == {1: N} and count.ends == N and count.errors == []
    grouped = [i for g in group_calls for i in g]
    assert len(group_calls) >= 5 and max(map(len, group_calls)) == groups.GROUP_MAX
    assert len(grouped) == len(set(grouped)) and len(grouped) > N // 2
    assert grouped == sorted(grouped), "groups take branches in order"


def test_a_crash_in_a_group_charges_its_branch_alone_and_loses_no_finished_outcome(
    own_pool: ProcessExecutor, store: SharedStore, tmp_path: Path, group_calls: list[list[int]]
) -> None:
    crashers = {200, 233, 266, 299}
    count = Count()
    branches = [Leaf(i, str(tmp_path), crash_once=i in crashers) for i in range(N)]
    assert split(own_pool, branches, count).orchestrate(store=store) == "done"
    assert [store[f"r{i}"] for i in range(N)] == [3 * i for i in range(N)]
    # Each crasher ran twice (its crash, its retry); every other branch once: the branches
    # of a crashed group that had finished kept their outcomes, the others were not charged.
    assert runs(tmp_path) == {i: 2 if i in crashers else 1 for i in range(N)}
    assert count.ends == N + len(crashers)
    assert len(count.errors) == len(crashers)
    assert all(isinstance(e, WorkerCrashed) for e in count.errors)
    assert count.starts == {1: N, 2: len(crashers)}  # each attempt's start told once
    crashed_in_groups = [g for g in group_calls if crashers & set(g)]
    assert crashed_in_groups, "no crasher was in a grouped call"


def test_collect_group_keeps_the_finished_charges_the_culprit_requeues_the_rest(
    own_pool: ProcessExecutor, store: SharedStore, tmp_path: Path
) -> None:
    from cano_mp._engine.task_state import TaskState

    seen: dict[str, list[Any]] = {"outcome": [], "failed": [], "discard": []}

    class Probe(TaskState):
        def outcome(self, b: Any, out: Any, overdue: bool) -> None:
            seen["outcome"].append((b.index, out.state))

        def attempt_failed(self, b: Any, error: BaseException, remote_tb: str | None) -> None:
            seen["failed"].append((b.index, type(error).__name__, b.attempt))

        def discard(self, b: Any) -> None:
            seen["discard"].append(b.index)

    flow = split(own_pool, [Leaf(i, str(tmp_path)) for i in range(6)])
    state = _probe_state(flow, store, Probe)
    members = tuple(state.branches[:5])
    for b in members:
        b.status, b.attempt = "running", 1
        state.waiting.remove(b)
        state.running.add(b)
    fut: Future[Any] = Future()
    died = WorkerDied(-9, 1234)
    died.position = 2
    wire = ("unit", ("i", 0), [], None, 1234, 0.0, 0.0)
    died.finished = [wire, wire]
    fut.set_exception(died)
    for b in members:
        b.future = fut
    state.collect_group(members, fut)
    assert seen["outcome"] == [(0, ("i", 0)), (1, ("i", 0))]
    assert seen["failed"] == [(2, "WorkerCrashed", 1)]
    assert sorted(seen["discard"]) == [2, 3, 4]
    assert [b.index for b in state.waiting] == [3, 4, 5]
    assert [b.attempt for b in members[3:]] == [0, 0] and state.running == set()


def _probe_state(flow: Workflow[str], store: SharedStore, cls: type) -> Any:
    """A TaskState of ``flow``'s split state, its scope built as a run builds it."""
    captured: dict[str, Any] = {}
    from cano_mp._engine import task_state

    original = task_state.TaskState.run

    def grab(self: Any) -> Any:
        captured["state"] = self
        return original(self)

    task_state.TaskState.run = grab  # type: ignore[method-assign]
    try:
        flow.orchestrate(store=store)
    finally:
        task_state.TaskState.run = original  # type: ignore[method-assign]
    ts = captured["state"]
    probe = cls(ts.scope, ts.entry, ts.snap)
    return probe


def two_then_die(control: Any, deadline: Any) -> None:
    control.keep_outcome(0, ("first", 1))
    control.keep_outcome(1, ("second", [2.5, float("nan")]))
    control.positions()[0] = 2
    os._exit(7)


def die_at_once(control: Any, deadline: Any) -> None:
    os._exit(5)


def big_then_die(control: Any, deadline: Any) -> None:
    control.keep_outcome(0, ("small",))
    control.keep_outcome(1, ("big", b"x" * (64 << 10)))
    control.keep_outcome(2, ("small again",))  # after a gap: not kept either
    os._exit(7)


def test_a_worker_dying_in_a_grouped_call_leaves_the_outcomes_it_kept(
    own_pool: ProcessExecutor,
) -> None:
    fut = own_pool.submit(Call(two_then_die, (), ()))
    with pytest.raises(WorkerDied) as info:
        fut.result(timeout=60)
    assert info.value.position == 2 and info.value.exitcode == 7
    first, second = info.value.finished
    assert first == ("first", 1) and second[0] == "second" and second[1][0] == 2.5
    # The next call on that slot starts clean: nothing kept from the dead one shows.
    again = own_pool.submit(Call(die_at_once, (), ()))
    with pytest.raises(WorkerDied) as info2:
        again.result(timeout=60)
    assert info2.value.finished == []


def test_an_outcome_too_large_to_keep_ends_the_record_and_later_ones_run_again(
    own_pool: ProcessExecutor,
) -> None:
    fut = own_pool.submit(Call(big_then_die, (), ()))
    with pytest.raises(WorkerDied) as info:
        fut.result(timeout=60)
    assert info.value.finished == [("small",)]


def test_branches_with_timeouts_are_never_grouped(
    own_pool: ProcessExecutor, store: SharedStore, tmp_path: Path, group_calls: list[list[int]]
) -> None:
    branches = [Leaf(i, str(tmp_path)) for i in range(200)]
    for b in branches:
        b.config = TaskConfig(timeout=30.0)
    assert split(own_pool, branches).orchestrate(store=store) == "done"
    assert group_calls == []
    assert runs(tmp_path) == {i: 1 for i in range(200)}


def test_a_grouped_call_that_fails_as_a_whole_runs_its_branches_alone(
    own_pool: ProcessExecutor, store: SharedStore, tmp_path: Path, group_calls: list[list[int]]
) -> None:
    class Interrupts(Leaf):
        def run(self, store: Any) -> str:
            if self.i == 250:
                record(self.folder, self.i)
                raise KeyboardInterrupt  # a BaseException: it ends the whole call
            return super().run(store)

    branches = [Interrupts(i, str(tmp_path)) for i in range(N)]
    for b in branches:
        b.config = TaskConfig(retry=RetryPolicy.none())
    join = JoinConfig(JoinStrategy.percentage(0.5), "done", result_key="split")
    flow: Workflow[str] = Workflow(start="split", executor=own_pool)
    flow.register_split("split", branches, join).add_exit_state("done")
    assert flow.orchestrate(store=store) == "done"
    result: SplitResult[str] = store["split"]
    assert [i for i, _ in result.errors] == [250]
    assert "KeyboardInterrupt" in str(result.errors[0][1])
    assert [i for i, _ in result.successes] == [i for i in range(N) if i != 250]
    assert any(250 in g for g in group_calls)
    ran = runs(tmp_path)
    # The failed group's branches ran again, each alone (their outcomes went with the
    # call): at most twice; every other branch once.
    assert all(ran[i] <= 2 for i in range(N)) and ran[250] == 2
    assert sum(1 for i in range(N) if ran[i] == 2) <= groups.GROUP_MAX


class LowersItsLimit(Leaf):
    """Branch 200 lowers RLIMIT_NOFILE's soft limit: its worker is no longer usable. Every
    branch notes its worker and when it ran in ``pids``."""

    def run(self, store: Any) -> str:
        broke = 0
        if self.i == 200:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(64, soft // 2), hard))
            broke = 1
        with open(os.path.join(self.folder, "pids"), "a") as f:
            f.write(f"{self.i} {os.getpid()} {time.monotonic_ns()} {broke}\n")
        return super().run(store)


def test_a_branch_that_breaks_its_worker_ends_its_group_and_the_rest_run_elsewhere(
    own_pool: ProcessExecutor, store: SharedStore, tmp_path: Path, group_calls: list[list[int]]
) -> None:
    branches = [LowersItsLimit(i, str(tmp_path)) for i in range(N)]
    assert split(own_pool, branches).orchestrate(store=store) == "done"
    assert [store[f"r{i}"] for i in range(N)] == [3 * i for i in range(N)]
    assert runs(tmp_path) == {i: 1 for i in range(N)}
    rows = [tuple(map(int, line.split())) for line in (tmp_path / "pids").read_text().splitlines()]
    ((_, pid, at, _),) = [r for r in rows if r[3]]
    # Nothing ran in the worker after branch 200 left it unusable, the rest of its group
    # included (it ended the call there; those branches ran on another worker).
    assert [r for r in rows if r[1] == pid and r[2] > at] == []
    assert any(200 in g for g in group_calls)


def test_max_tasks_per_worker_keeps_every_branch_on_a_call_of_its_own(
    store: SharedStore, tmp_path: Path, group_calls: list[list[int]]
) -> None:
    with ProcessExecutor(max_workers=2, reuse=False, max_tasks_per_worker=1000) as ex:
        branches = [Leaf(i, str(tmp_path)) for i in range(300)]
        assert split(ex, branches).orchestrate(store=store) == "done"
    assert group_calls == []
    assert runs(tmp_path) == {i: 1 for i in range(300)}


@pytest.mark.parametrize("where", ["join", "workflow"])
def test_a_max_parallel_keeps_every_branch_on_a_call_of_its_own(
    own_pool: ProcessExecutor,
    store: SharedStore,
    tmp_path: Path,
    group_calls: list[list[int]],
    where: str,
) -> None:
    branches = [Leaf(i, str(tmp_path)) for i in range(200)]
    join = JoinConfig(JoinStrategy.all(), "done", max_parallel=3 if where == "join" else None)
    flow: Workflow[str] = Workflow(
        start="split", executor=own_pool, max_parallel=3 if where == "workflow" else None
    )
    flow.register_split("split", branches, join).add_exit_state("done")
    assert flow.orchestrate(store=store) == "done"
    assert group_calls == []
    assert runs(tmp_path) == {i: 1 for i in range(200)}


class WaitsForCancel(Leaf):
    """Branches from 200 on run until their call is cancelled, then return."""

    def run(self, store: Any) -> str:
        if self.i >= 200:
            record(self.folder, self.i)
            from cano_mp import task_context

            ends = time.monotonic() + 60
            while not task_context().cancelled() and time.monotonic() < ends:
                time.sleep(0.001)
            return "done"
        return super().run(store)


def test_a_cancel_stops_a_grouped_call_before_its_next_branch(
    own_pool: ProcessExecutor, store: SharedStore, tmp_path: Path, group_calls: list[list[int]]
) -> None:
    branches = [WaitsForCancel(i, str(tmp_path)) for i in range(N)]
    flow: Workflow[str] = Workflow(start="split", executor=own_pool, timeout=5.0)
    flow.register_split("split", branches, JoinConfig(JoinStrategy.all(), "done"))
    with pytest.raises(WorkflowTimeout):
        flow.add_exit_state("done").orchestrate(store=store)
    late = [g for g in group_calls if max(g) >= 200]
    assert late, "no branch from 200 on was in a grouped call"
    time.sleep(0.5)  # a call that went on after the cancel would record more meanwhile
    ran = runs(tmp_path)
    assert all(ran[i] == 1 for i in range(200))
    # In each grouped call, the branch that was waiting when the run timed out returned
    # (cancelled); none after it in its call began.
    for g in late:
        assert sum(ran[i] for i in g if i >= 200) <= 1, g


@pytest.mark.parametrize(
    "join",
    [
        JoinConfig(JoinStrategy.any(), "done"),
        JoinConfig(JoinStrategy.partial_results(300), "done"),
        JoinConfig(JoinStrategy.partial_timeout(), "done", timeout=60.0),
        JoinConfig(JoinStrategy.all(), "done", timeout=60.0),
    ],
    ids=["any", "partial_results", "partial_timeout", "join_timeout"],
)
def test_joins_that_may_decide_before_every_branch_ends_never_group(
    own_pool: ProcessExecutor,
    store: SharedStore,
    tmp_path: Path,
    group_calls: list[list[int]],
    join: JoinConfig[str],
) -> None:
    # Their verdict may come at a success or at a timeout: an outcome held in a running
    # grouped call would come late, or count as not finished.
    branches = [Leaf(i, str(tmp_path)) for i in range(N)]
    flow: Workflow[str] = Workflow(start="split", executor=own_pool)
    assert (
        flow.register_split("split", branches, join).add_exit_state("done").orchestrate(store=store)
        == "done"
    )
    assert group_calls == []
