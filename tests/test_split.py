"""Split / join on a real process pool (and inline where it makes sense): strategies, early
resolution, fail-fast, join timeouts, the deterministic merge of branch writes, bulkheads,
crashed branches, and what cancelled branches leave behind."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import time
from enum import Enum, auto
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from cano_mp import (
    InlineExecutor,
    JoinConfig,
    JoinError,
    JoinStrategy,
    Node,
    Observer,
    ProcessExecutor,
    RetryPolicy,
    RunInfo,
    SharedStore,
    SplitResult,
    Task,
    TaskConfig,
    TaskError,
    TaskTimeout,
    WorkerCrashed,
    Workflow,
    WorkflowTimeout,
    task,
    task_context,
)

from .test_store import segment_files

NO_RETRY = TaskConfig.minimal()
PROMPT = 3.0  # seconds: "returns promptly" while a losing branch would run for 60 s
GRACE = 0.05


class S(Enum):
    SPLIT = auto()
    JOINED = auto()


class BranchFailed(Exception):
    def __init__(self, tag: int) -> None:
        super().__init__(tag)  # args == (tag,): pickles back to the same exception
        self.tag = tag

    def __str__(self) -> str:
        return f"branch {self.tag} failed"


class Branch(Task[S]):
    """A branch that records itself, then sleeps, spins, fails or exits as asked.

    Writes ``b<tag>`` and appends ``tag`` to ``trail``; with ``pid_dir`` it also leaves its
    pid in a file (outside the store, so a cancelled branch's pid is still known).
    """

    def __init__(
        self,
        tag: int,
        *,
        sleep: float = 0.0,
        spin: float = 0.0,
        fail: bool = False,
        exit_code: int | None = None,
        pid_dir: str | Path | None = None,
        big: bool = False,
        config: TaskConfig = NO_RETRY,
    ) -> None:
        self.tag, self.sleep, self.spin, self.fail = tag, sleep, spin, fail
        self.exit_code, self.big, self.config = exit_code, big, config
        self.pid_dir = None if pid_dir is None else str(pid_dir)

    @property
    def name(self) -> str:
        return f"branch{self.tag}"

    def run(self, store: SharedStore) -> S:
        if self.pid_dir is not None:
            Path(self.pid_dir, f"pid{self.tag}").write_text(str(os.getpid()))
        store[f"b{self.tag}"] = self.tag
        store.append("trail", self.tag)
        if self.big:
            store[f"arr{self.tag}"] = np.full(200_000, float(self.tag))
        if self.exit_code is not None and self.exit_code < 0:
            os.kill(os.getpid(), -self.exit_code)  # killed by a signal
            time.sleep(5)
        if self.exit_code is not None:
            os._exit(self.exit_code)
        if self.sleep:
            time.sleep(self.sleep)
        end = time.monotonic() + self.spin
        x = 0
        while time.monotonic() < end:  # CPU work that never polls cancelled()
            x += 1
        if self.fail:
            raise BranchFailed(self.tag)
        return S.JOINED


def split_flow(
    executor: Any,
    branches: list[Any],
    strategy: JoinStrategy,
    *,
    observers: tuple[Observer, ...] = (),
    flow_max_parallel: int | None = None,
    grace: float = GRACE,
    **join: Any,
) -> Workflow[S]:
    return (
        Workflow(
            start=S.SPLIT,
            executor=executor,
            cancel_grace=grace,
            observers=observers,
            max_parallel=flow_max_parallel,
        )
        .register_split(
            S.SPLIT, branches, JoinConfig(strategy, S.JOINED, result_key="split", **join)
        )
        .add_exit_state(S.JOINED)
    )


def branch_keys(store: SharedStore) -> set[str]:
    return {k for k in store if k.startswith("b") and k[1:].isdigit()}


def indexes(pairs: list[tuple[int, Any]]) -> list[int]:
    return [i for i, _ in pairs]


def pid_of(pid_dir: Path, tag: int, timeout: float = 5.0) -> int:
    path = pid_dir / f"pid{tag}"
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"branch {tag} never started"
        time.sleep(0.01)
    return int(path.read_text())


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def assert_stopped_and_pool_healthy(pool: ProcessExecutor, pids: list[int]) -> None:
    """The workers of cancelled branches are gone, the live ones alive, and the pool runs."""
    for pid in pids:
        assert wait_until(lambda pid=pid: gone(pid)), f"worker {pid} still runs a cancelled branch"
    for pid in pool.worker_pids():
        assert pid not in pids and not gone(pid)
    with SharedStore() as store:
        flow = split_flow(pool, [Branch(0), Branch(1)], JoinStrategy.all())
        assert flow.orchestrate(store=store) is S.JOINED
        assert store["trail"] == [0, 1]


@pytest.fixture
def warm(pool: ProcessExecutor) -> ProcessExecutor:
    """The pool with both workers started and this module imported in them, so that timing
    assertions measure the join, not process start-up."""
    with SharedStore() as store:
        split_flow(
            pool, [Branch(0, sleep=0.1), Branch(1, sleep=0.1)], JoinStrategy.all()
        ).orchestrate(store=store)
    return pool


class Recorder(Observer):
    def __init__(self) -> None:
        self.splits: list[tuple[Any, SplitResult[Any]]] = []

    def on_split_end(self, run: RunInfo, state: Any, result: SplitResult[Any]) -> None:
        self.splits.append((state, result))


# -- every strategy with success / failure mixes ---------------------------------------------
OK_FAIL_OK_OK = ["ok", "fail", "ok", "ok"]
CASES = [
    (["ok"] * 3, JoinStrategy.all(), True),
    (OK_FAIL_OK_OK, JoinStrategy.all(), False),
    (OK_FAIL_OK_OK, JoinStrategy.any(), True),
    (["fail"] * 3, JoinStrategy.any(), False),
    (OK_FAIL_OK_OK, JoinStrategy.quorum(3), True),
    (OK_FAIL_OK_OK, JoinStrategy.quorum(4), False),
    (OK_FAIL_OK_OK, JoinStrategy.percentage(0.75), True),
    (OK_FAIL_OK_OK, JoinStrategy.percentage(0.8), False),
    (["ok"] * 3 + ["fail"] * 7, JoinStrategy.percentage(0.3), True),  # needs 3, not 4
    (["ok"] * 2 + ["fail"] * 8, JoinStrategy.percentage(0.3), False),
    (OK_FAIL_OK_OK, JoinStrategy.partial_results(3), True),
    (OK_FAIL_OK_OK, JoinStrategy.partial_results(4), False),
    (OK_FAIL_OK_OK, JoinStrategy.partial_timeout(), True),
    (["fail"] * 3, JoinStrategy.partial_timeout(), True),  # failures are completions
]
WAITS_FOR_ALL = ("all", "quorum", "percentage", "partial_timeout")


@pytest.mark.parametrize(
    ("outcomes", "strategy", "proceeds"),
    CASES,
    ids=[f"{s!r}-{'+'.join(o[:4])}-{len(o)}" for o, s, _ in CASES],
)
def test_strategy_with_successes_and_failures(
    executor: Any, store: SharedStore, outcomes: list[str], strategy: JoinStrategy, proceeds: bool
) -> None:
    branches = [Branch(i, fail=o == "fail") for i, o in enumerate(outcomes)]
    recorder = Recorder()
    flow = split_flow(executor, branches, strategy, timeout=30.0, observers=(recorder,))
    ok = [i for i, o in enumerate(outcomes) if o == "ok"]
    failed = [i for i, o in enumerate(outcomes) if o == "fail"]
    if proceeds:
        assert flow.orchestrate(store=store) is S.JOINED
        result = recorder.splits[0][1]
        assert store["split"].successes == result.successes
        assert indexes(store["split"].errors) == indexes(result.errors)
        assert store["split"].cancelled == result.cancelled
    else:
        with pytest.raises(JoinError) as info:
            flow.orchestrate(store=store)
        assert info.value.timed_out is False
        result = info.value.result
        assert "split" not in store
    assert isinstance(result, SplitResult)
    assert result.total_count == len(outcomes)
    assert result.completed_count == len(result.successes) + len(result.errors)
    done = indexes(result.successes) + indexes(result.errors) + result.cancelled
    assert sorted(done) == list(range(len(outcomes)))
    assert set(indexes(result.successes)) <= set(ok)
    assert set(indexes(result.errors)) <= set(failed)
    assert all(state is S.JOINED for _, state in result.successes)
    for i, err in result.errors:
        assert isinstance(err, TaskError) and err.task_name == f"branch{i}"
        assert isinstance(err.__cause__, BranchFailed) and err.__cause__.tag == i
    if proceeds:
        if strategy.kind == "partial_timeout":
            assert result.completed_count >= 1
        else:
            assert len(result.successes) >= strategy.required(len(outcomes))
        if strategy.kind in WAITS_FOR_ALL:  # every branch ran to its end
            assert indexes(result.successes) == ok
            assert indexes(result.errors) == failed and result.cancelled == []
        # successful branches' writes are kept, all others discarded
        assert branch_keys(store) == {f"b{i}" for i in indexes(result.successes)}
        assert store.get("trail", []) == indexes(result.successes)
    else:
        assert result.errors, "a failed join names a failed branch"
        assert branch_keys(store) == set() and "trail" not in store


# -- early resolution --------------------------------------------------------------------------
def test_any_proceeds_at_the_first_success_and_cancels_the_rest(
    warm: ProcessExecutor, store: SharedStore, tmp_path: Path
) -> None:
    branches = [Branch(0, sleep=60, pid_dir=tmp_path), Branch(1, sleep=0.2)]
    started = time.monotonic()
    assert split_flow(warm, branches, JoinStrategy.any()).orchestrate(store=store) is S.JOINED
    assert time.monotonic() - started < PROMPT
    result = store["split"]
    assert result.successes == [(1, S.JOINED)] and result.cancelled == [0]
    assert result.errors == [] and result.completed_count == 1 and result.total_count == 2
    assert branch_keys(store) == {"b1"} and store["trail"] == [1]
    assert_stopped_and_pool_healthy(warm, [pid_of(tmp_path, 0)])


def test_partial_results_proceeds_at_the_nth_success_and_cancels_a_spinning_branch(
    warm: ProcessExecutor, store: SharedStore, tmp_path: Path
) -> None:
    # two workers: 0 and 1 start; 0 finishes, 2 starts and finishes; 1 spins for 60 s
    branches = [Branch(0), Branch(1, spin=60, pid_dir=tmp_path), Branch(2, sleep=0.1)]
    recorder = Recorder()
    flow = split_flow(warm, branches, JoinStrategy.partial_results(2), observers=(recorder,))
    started = time.monotonic()
    assert flow.orchestrate(store=store) is S.JOINED
    assert time.monotonic() - started < PROMPT
    [(state, result)] = recorder.splits
    assert state is S.SPLIT
    assert indexes(result.successes) == [0, 2] and result.cancelled == [1]
    assert store["trail"] == [0, 2] and "b1" not in store
    assert_stopped_and_pool_healthy(warm, [pid_of(tmp_path, 1)])


def cooperative_branch(store: SharedStore) -> S:
    """Polls the cancel flag; leaves a file next to its pid file when it notices."""
    store["coop"] = "wrote before noticing"
    marker = Path(store["marker"])
    ctx = task_context()
    deadline = time.monotonic() + 60
    while not ctx.cancelled() and time.monotonic() < deadline:
        time.sleep(0.01)
    marker.write_text(str(ctx.cancelled()))
    return S.JOINED


def test_cancelled_branch_sees_the_cooperative_flag(
    warm: ProcessExecutor, store: SharedStore, tmp_path: Path
) -> None:
    marker = tmp_path / "noticed"
    store["marker"] = str(marker)
    flow = (
        Workflow(start=S.SPLIT, executor=warm, cancel_grace=2.0)
        .register_split(
            S.SPLIT,
            [task(cooperative_branch, retry=RetryPolicy.none()), Branch(1, sleep=0.2)],
            JoinConfig(JoinStrategy.any(), S.JOINED, result_key="split"),
        )
        .add_exit_state(S.JOINED)
    )
    started = time.monotonic()
    assert flow.orchestrate(store=store) is S.JOINED
    assert time.monotonic() - started < PROMPT
    assert store["split"].cancelled == [0]
    assert wait_until(marker.exists), "the cancelled branch never saw cancelled() turn True"
    assert marker.read_text() == "True"
    assert "coop" not in store  # returned normally, but it was cancelled: writes discarded


# -- fail-fast -----------------------------------------------------------------------------------
def test_all_fails_fast_at_the_first_failure(
    warm: ProcessExecutor, store: SharedStore, tmp_path: Path
) -> None:
    store["before"] = 1
    branches = [
        Branch(0, sleep=60, pid_dir=tmp_path),
        Branch(1, sleep=0.2, fail=True),
        Branch(2, sleep=60, pid_dir=tmp_path),
    ]
    recorder = Recorder()
    started = time.monotonic()
    with pytest.raises(JoinError) as info:
        split_flow(warm, branches, JoinStrategy.all(), observers=(recorder,)).orchestrate(
            store=store
        )
    assert time.monotonic() - started < PROMPT
    err = info.value
    assert err.timed_out is False
    assert err.result is recorder.splits[0][1]
    assert err.result.successes == [] and err.result.cancelled == [0, 2]
    [(index, branch_error)] = err.result.errors
    assert index == 1
    assert isinstance(branch_error, TaskError) and not isinstance(branch_error, TaskTimeout)
    assert branch_error.state is S.SPLIT and branch_error.task_name == "branch1"
    assert branch_error.attempts == 1
    assert isinstance(branch_error.__cause__, BranchFailed) and branch_error.__cause__.tag == 1
    assert "BranchFailed" in (branch_error.remote_traceback or "")
    assert store.keys() == ["before"]  # the failed split left the store as it was
    pids = [pid_of(tmp_path, 0)]
    if (tmp_path / "pid2").exists():  # branch 2 may or may not have got a worker
        pids.append(pid_of(tmp_path, 2))
    assert_stopped_and_pool_healthy(warm, pids)


# -- join timeout --------------------------------------------------------------------------------
def test_join_timeout_without_the_threshold_is_a_timed_out_join_error(
    warm: ProcessExecutor, store: SharedStore, tmp_path: Path
) -> None:
    branches = [Branch(0), Branch(1, sleep=60, pid_dir=tmp_path)]
    started = time.monotonic()
    with pytest.raises(JoinError) as info:
        split_flow(warm, branches, JoinStrategy.all(), timeout=0.5).orchestrate(store=store)
    assert 0.5 <= time.monotonic() - started < PROMPT
    assert info.value.timed_out is True
    result = info.value.result
    assert result.successes == [(0, S.JOINED)] and result.cancelled == [1]
    assert branch_keys(store) == set()  # all() failed: no branch's writes are kept
    assert_stopped_and_pool_healthy(warm, [pid_of(tmp_path, 1)])


def test_join_timeout_with_the_threshold_met_proceeds(
    warm: ProcessExecutor, store: SharedStore, tmp_path: Path
) -> None:
    branches = [Branch(0), Branch(1, sleep=60, pid_dir=tmp_path)]
    started = time.monotonic()
    flow = split_flow(warm, branches, JoinStrategy.quorum(1), timeout=0.5)
    assert flow.orchestrate(store=store) is S.JOINED
    assert 0.5 <= time.monotonic() - started < PROMPT  # quorum waits for all, up to the timeout
    result = store["split"]
    assert result.successes == [(0, S.JOINED)] and result.cancelled == [1]
    assert branch_keys(store) == {"b0"}
    assert_stopped_and_pool_healthy(warm, [pid_of(tmp_path, 1)])


def test_partial_timeout_proceeds_at_the_timeout_with_one_completed(
    warm: ProcessExecutor, store: SharedStore, tmp_path: Path
) -> None:
    branches = [Branch(0, fail=True), Branch(1, sleep=60, pid_dir=tmp_path), Branch(2)]
    started = time.monotonic()
    flow = split_flow(warm, branches, JoinStrategy.partial_timeout(), timeout=0.6)
    assert flow.orchestrate(store=store) is S.JOINED
    assert 0.6 <= time.monotonic() - started < PROMPT
    result = store["split"]
    assert result.successes == [(2, S.JOINED)] and indexes(result.errors) == [0]
    assert result.cancelled == [1] and result.completed_count == 2
    assert branch_keys(store) == {"b2"} and store["trail"] == [2]
    assert_stopped_and_pool_healthy(warm, [pid_of(tmp_path, 1)])


def test_partial_timeout_with_only_a_failure_completed_still_proceeds(
    warm: ProcessExecutor, store: SharedStore, tmp_path: Path
) -> None:
    branches = [Branch(0, fail=True), Branch(1, sleep=60, pid_dir=tmp_path)]
    flow = split_flow(warm, branches, JoinStrategy.partial_timeout(), timeout=0.4)
    assert flow.orchestrate(store=store) is S.JOINED
    result = store["split"]
    assert result.successes == [] and indexes(result.errors) == [0] and result.cancelled == [1]
    assert branch_keys(store) == set()
    assert_stopped_and_pool_healthy(warm, [pid_of(tmp_path, 1)])


def test_partial_timeout_with_nothing_completed_fails(
    warm: ProcessExecutor, store: SharedStore, tmp_path: Path
) -> None:
    branches = [Branch(0, sleep=60, pid_dir=tmp_path), Branch(1, sleep=60, pid_dir=tmp_path)]
    started = time.monotonic()
    with pytest.raises(JoinError) as info:
        split_flow(warm, branches, JoinStrategy.partial_timeout(), timeout=0.3).orchestrate(
            store=store
        )
    assert time.monotonic() - started < PROMPT
    assert info.value.timed_out is True and info.value.result.cancelled == [0, 1]
    assert info.value.result.completed_count == 0
    assert_stopped_and_pool_healthy(warm, [pid_of(tmp_path, 0), pid_of(tmp_path, 1)])


def test_partial_timeout_does_not_wait_for_the_timeout_when_all_finished(
    executor: Any, store: SharedStore
) -> None:
    started = time.monotonic()
    flow = split_flow(executor, [Branch(0), Branch(1)], JoinStrategy.partial_timeout(), timeout=30)
    assert flow.orchestrate(store=store) is S.JOINED
    assert time.monotonic() - started < 10
    assert indexes(store["split"].successes) == [0, 1]


# -- deterministic merge -----------------------------------------------------------------------
class MergeBranch(Task[S]):
    """Lower indexes sleep longer, so they finish last."""

    config = NO_RETRY

    def __init__(self, index: int, count: int) -> None:
        self.index, self.count = index, count

    def run(self, store: SharedStore) -> S:
        time.sleep(0.25 * (self.count - 1 - self.index))
        store["winner"] = self.index
        store.append("order", (self.index, "first"))
        store.append("order", (self.index, "second"))
        store[f"end{self.index}"] = time.monotonic()
        return S.JOINED


def test_merge_is_in_branch_index_order_whatever_the_finish_order(
    executor: Any, store: SharedStore
) -> None:
    store["order"] = ["before"]
    store["winner"] = "before"
    branches = [MergeBranch(i, 3) for i in range(3)]
    assert split_flow(executor, branches, JoinStrategy.all()).orchestrate(store=store) is S.JOINED
    if not isinstance(executor, InlineExecutor):  # the set-up: branch 0 really finished last
        assert store["end0"] > store["end1"] and store["end0"] > store["end2"]
    assert store["winner"] == 2  # put: the highest index wins
    assert store["order"] == [
        "before",
        *[(i, when) for i in range(3) for when in ("first", "second")],
    ]


def test_failed_and_cancelled_branches_writes_and_segments_are_discarded(
    warm: ProcessExecutor, store: SharedStore, tmp_path: Path
) -> None:
    branches = [
        Branch(0, big=True),
        Branch(1, big=True, fail=True),
        Branch(2, big=True, sleep=60, pid_dir=tmp_path),
    ]
    flow = split_flow(warm, branches, JoinStrategy.quorum(1), timeout=0.8)
    assert flow.orchestrate(store=store) is S.JOINED
    result = store["split"]
    assert indexes(result.successes) == [0] and indexes(result.errors) == [1]
    assert result.cancelled == [2]
    assert branch_keys(store) == {"b0"} and store["trail"] == [0]
    assert "arr1" not in store and "arr2" not in store
    assert float(store["arr0"].sum()) == 0.0
    assert_stopped_and_pool_healthy(warm, [pid_of(tmp_path, 2)])
    # only the committed array's segment is left: those of branches 1 and 2 were removed
    assert wait_until(lambda: len(segment_files(store)) == 1), segment_files(store)
    store.close()
    assert segment_files(store) == []


class Hoarder(Task[S]):
    """Writes large arrays to the store until it is stopped; never polls cancelled().

    Leaves ``stopped0`` next to its pid file if it ends by itself (its writes failing once
    the store is closed) rather than by being killed.
    """

    config = NO_RETRY

    def __init__(self, pid_dir: str) -> None:
        self.pid_dir = pid_dir

    def run(self, store: SharedStore) -> S:
        Path(self.pid_dir, "pid0").write_text(str(os.getpid()))
        i = 0
        try:
            while True:
                store[f"hoard{i % 4}"] = np.full(100_000, float(i))
                i += 1
        finally:
            Path(self.pid_dir, "stopped0").write_text("stopped")


def hoard_then_close(pool: ProcessExecutor, tmp_path: Path) -> tuple[SharedStore, list[int]]:
    """Cancel a hoarding branch and close the store at once, while it still writes (the
    long cancel grace keeps it going after close()). Returns the store and the pids of
    workers killed to stop it."""
    store = SharedStore()
    try:
        flow = split_flow(
            pool, [Hoarder(str(tmp_path)), Branch(1, sleep=0.3)], JoinStrategy.any(), grace=1.0
        )
        assert flow.orchestrate(store=store) is S.JOINED
        assert store["split"].cancelled == [0] and "hoard0" not in store
    finally:
        store.close()
    pid = pid_of(tmp_path, 0)
    stopped = tmp_path / "stopped0"
    assert wait_until(lambda: gone(pid) or stopped.exists()), "the cancelled branch never stopped"
    return store, [] if stopped.exists() else [pid]


def test_killed_branch_leaves_no_files_once_the_store_is_closed(
    warm: ProcessExecutor, tmp_path: Path
) -> None:
    store, killed = hoard_then_close(warm, tmp_path)
    assert wait_until(lambda: segment_files(store) == []), segment_files(store)
    time.sleep(0.2)
    assert segment_files(store) == []
    assert_stopped_and_pool_healthy(warm, killed)


def test_closed_store_directory_is_not_recreated_by_a_cancelled_branch(
    warm: ProcessExecutor, tmp_path: Path
) -> None:
    store, killed = hoard_then_close(warm, tmp_path)
    time.sleep(0.3)
    parents = {os.path.dirname(d) for d in store._dirs if d is not None}
    uid = os.path.basename(store._dirs[1])
    left = [os.path.join(p, name) for p in parents if os.path.isdir(p) for name in os.listdir(p)]
    left = [path for path in left if os.path.basename(path).startswith(uid)]
    for path in left:  # clean up what a regression would leave, then report it
        shutil.rmtree(path, ignore_errors=True)
    assert left == []
    assert_stopped_and_pool_healthy(warm, killed)


# -- bulkheads -----------------------------------------------------------------------------------
class Span(Task[S]):
    config = NO_RETRY

    def run(self, store: SharedStore) -> S:
        start = time.time()
        time.sleep(0.25)
        store.append("spans", (start, time.time()))
        return S.JOINED


def overlapping(spans: list[tuple[float, float]]) -> bool:
    spans = sorted(spans)
    return any(b[0] < a[1] for a, b in itertools.pairwise(spans))


def test_join_max_parallel_one_runs_branches_one_at_a_time(
    warm: ProcessExecutor, store: SharedStore
) -> None:
    flow = split_flow(warm, [Span() for _ in range(3)], JoinStrategy.all(), max_parallel=1)
    assert flow.orchestrate(store=store) is S.JOINED
    assert len(store["spans"]) == 3 and not overlapping(store["spans"])


def test_join_max_parallel_two_overlaps(warm: ProcessExecutor, store: SharedStore) -> None:
    flow = split_flow(warm, [Span() for _ in range(2)], JoinStrategy.all(), max_parallel=2)
    assert flow.orchestrate(store=store) is S.JOINED
    assert overlapping(store["spans"])  # the control: two workers do run branches together


def test_workflow_max_parallel_one_runs_branches_one_at_a_time(
    warm: ProcessExecutor, store: SharedStore
) -> None:
    flow = split_flow(warm, [Span() for _ in range(3)], JoinStrategy.all(), flow_max_parallel=1)
    assert flow.orchestrate(store=store) is S.JOINED
    assert len(store["spans"]) == 3 and not overlapping(store["spans"])


# -- crashed, timed-out and retried branches ---------------------------------------------------
@pytest.mark.parametrize("exit_code", [3, -signal.SIGKILL], ids=["os._exit(3)", "SIGKILL"])
def test_a_branch_whose_worker_dies_is_a_worker_crashed_error(
    warm: ProcessExecutor, store: SharedStore, tmp_path: Path, exit_code: int
) -> None:
    branches = [Branch(0, exit_code=exit_code, pid_dir=tmp_path), Branch(1, sleep=0.5)]
    flow = split_flow(warm, branches, JoinStrategy.quorum(1))
    assert flow.orchestrate(store=store) is S.JOINED
    result = store["split"]
    assert result.successes == [(1, S.JOINED)]  # the other in-flight branch was not lost
    [(index, err)] = result.errors
    assert index == 0 and isinstance(err, WorkerCrashed) and err.exitcode == exit_code
    assert err.task_name == "branch0" and err.state is S.SPLIT
    assert branch_keys(store) == {"b1"}
    assert_stopped_and_pool_healthy(warm, [pid_of(tmp_path, 0)])


def test_a_crash_fails_an_all_join_promptly(
    warm: ProcessExecutor, store: SharedStore, tmp_path: Path
) -> None:
    branches = [Branch(0, sleep=60, pid_dir=tmp_path), Branch(1, exit_code=3, pid_dir=tmp_path)]
    started = time.monotonic()
    with pytest.raises(JoinError) as info:
        split_flow(warm, branches, JoinStrategy.all()).orchestrate(store=store)
    assert time.monotonic() - started < PROMPT
    [(index, err)] = info.value.result.errors
    assert index == 1 and isinstance(err, WorkerCrashed) and err.exitcode == 3
    assert info.value.result.cancelled == [0]
    assert_stopped_and_pool_healthy(warm, [pid_of(tmp_path, 0), pid_of(tmp_path, 1)])


def test_a_branch_over_its_timeout_is_a_task_timeout(
    warm: ProcessExecutor, store: SharedStore, tmp_path: Path
) -> None:
    slow = Branch(
        0, sleep=60, pid_dir=tmp_path, config=TaskConfig(retry=RetryPolicy.none(), timeout=0.3)
    )
    flow = split_flow(warm, [slow, Branch(1)], JoinStrategy.quorum(1))
    started = time.monotonic()
    assert flow.orchestrate(store=store) is S.JOINED
    assert time.monotonic() - started < PROMPT
    result = store["split"]
    [(index, err)] = result.errors
    assert index == 0 and isinstance(err, TaskTimeout) and err.attempts == 1
    assert result.successes == [(1, S.JOINED)] and branch_keys(store) == {"b1"}
    assert_stopped_and_pool_healthy(warm, [pid_of(tmp_path, 0)])


class FailsOnce(Task[S]):
    config = TaskConfig(retry=RetryPolicy.fixed(1, 0.0))

    def __init__(self, counter: str) -> None:
        self.counter = counter

    def run(self, store: SharedStore) -> S:
        with open(self.counter, "a") as f:
            f.write("x")
        attempt = len(Path(self.counter).read_text())
        store[f"attempt{attempt}"] = task_context().attempt
        if attempt == 1:
            raise BranchFailed(0)
        return S.JOINED


def test_a_branch_is_retried_before_it_counts_as_failed(
    executor: Any, store: SharedStore, tmp_path: Path
) -> None:
    flow = split_flow(executor, [FailsOnce(str(tmp_path / "n")), Branch(1)], JoinStrategy.all())
    assert flow.orchestrate(store=store) is S.JOINED
    assert "attempt1" not in store and store["attempt2"] == 2
    assert indexes(store["split"].successes) == [0, 1]


# -- never-started branches, workflow timeout, re-entered splits -------------------------------
def test_partial_results_with_a_bulkhead_cancels_the_branches_never_started(
    executor: Any, store: SharedStore
) -> None:
    branches = [Branch(0), Branch(1), Branch(2, sleep=60), Branch(3)]
    flow = split_flow(executor, branches, JoinStrategy.partial_results(2), max_parallel=1)
    started = time.monotonic()
    assert flow.orchestrate(store=store) is S.JOINED
    assert time.monotonic() - started < PROMPT
    result = store["split"]
    assert indexes(result.successes) == [0, 1] and result.cancelled == [2, 3]
    assert store["trail"] == [0, 1]


def test_join_timeout_cancels_running_and_never_started_branches(
    warm: ProcessExecutor, store: SharedStore, tmp_path: Path
) -> None:
    branches = [Branch(0, sleep=60, pid_dir=tmp_path), Branch(1), Branch(2)]
    flow = split_flow(warm, branches, JoinStrategy.quorum(1), timeout=0.4, max_parallel=1)
    started = time.monotonic()
    with pytest.raises(JoinError) as info:
        flow.orchestrate(store=store)
    assert time.monotonic() - started < PROMPT
    assert info.value.timed_out is True
    assert info.value.result.cancelled == [0, 1, 2] and info.value.result.completed_count == 0
    assert_stopped_and_pool_healthy(warm, [pid_of(tmp_path, 0)])


def test_workflow_timeout_during_a_split_stops_its_branches(
    warm: ProcessExecutor, store: SharedStore, tmp_path: Path
) -> None:
    branches = [Branch(0, sleep=60, pid_dir=tmp_path), Branch(1, spin=60, pid_dir=tmp_path)]
    flow = (
        Workflow(start=S.SPLIT, executor=warm, cancel_grace=GRACE, timeout=0.5)
        .register_split(S.SPLIT, branches, JoinConfig(JoinStrategy.all(), S.JOINED))
        .add_exit_state(S.JOINED)
    )
    started = time.monotonic()
    with pytest.raises(WorkflowTimeout) as info:
        flow.orchestrate(store=store)
    assert time.monotonic() - started < PROMPT
    assert info.value.state is S.SPLIT
    assert branch_keys(store) == set()
    assert_stopped_and_pool_healthy(warm, [pid_of(tmp_path, 0), pid_of(tmp_path, 1)])


class Round(Enum):
    SPLIT = auto()
    COUNT = auto()
    DONE = auto()


class RoundBranch(Task[Round]):
    config = NO_RETRY

    def __init__(self, index: int) -> None:
        self.index = index

    def run(self, store: SharedStore) -> Round:
        store.append("seen", (store.get("round", 0), self.index))
        return Round.COUNT


def count_rounds(store: SharedStore) -> Round:
    store["round"] = store.get("round", 0) + 1
    return Round.SPLIT if store["round"] < 3 else Round.DONE


def test_a_split_entered_again_sees_the_previous_rounds_writes(
    executor: Any, store: SharedStore
) -> None:
    flow = (
        Workflow(start=Round.SPLIT, executor=executor)
        .register_split(
            Round.SPLIT,
            [RoundBranch(0), RoundBranch(1)],
            JoinConfig(JoinStrategy.all(), Round.COUNT),
        )
        .register(Round.COUNT, count_rounds)
        .add_exit_state(Round.DONE)
    )
    assert flow.orchestrate(store=store) is Round.DONE
    assert store["seen"] == [(r, i) for r in range(3) for i in range(2)]


# -- what a branch can be, and what it sees ----------------------------------------------------
class TaskBranch(Task[S]):
    config = NO_RETRY

    def run(self, store: SharedStore) -> S:
        store["task"] = (os.getpid(), store["seed"])
        return S.JOINED


class NodeBranch(Node[S, int, int]):
    config = NO_RETRY

    def prep(self, store: SharedStore) -> int:
        return int(store["seed"])

    def exec(self, prep_result: int) -> int:
        return prep_result * 2

    def post(self, store: SharedStore, exec_result: int) -> S:
        store["node"] = (os.getpid(), exec_result)
        return S.JOINED


@task(retry=RetryPolicy.none())
def decorated_branch(store: SharedStore) -> S:
    store["decorated"] = (os.getpid(), store["seed"] + 1)
    return S.JOINED


def bare_branch(store: SharedStore) -> S:
    store["bare"] = (os.getpid(), store["seed"] + 2)
    return S.JOINED


@task(inline=True, retry=RetryPolicy.none())
def inline_branch(store: SharedStore) -> S:
    store["inline"] = (os.getpid(), store["seed"] + 3)
    return S.JOINED


def test_branches_of_every_kind(executor: Any, store: SharedStore) -> None:
    store["seed"] = 10
    branches = [TaskBranch(), NodeBranch(), decorated_branch, bare_branch, inline_branch]
    flow = split_flow(executor, branches, JoinStrategy.all())
    assert flow.orchestrate(store=store) is S.JOINED
    assert indexes(store["split"].successes) == [0, 1, 2, 3, 4]
    values = {k: store[k] for k in ("task", "node", "decorated", "bare", "inline")}
    assert {k: v[1] for k, v in values.items()} == {
        "task": 10,
        "node": 20,
        "decorated": 11,
        "bare": 12,
        "inline": 13,
    }
    driver = os.getpid()
    assert values["inline"][0] == driver
    remote = not isinstance(executor, InlineExecutor)
    for key in ("task", "node", "decorated", "bare"):
        assert (values[key][0] != driver) is remote, key


class Writer(Task[S]):
    config = NO_RETRY

    def run(self, store: SharedStore) -> S:
        store["early"] = True
        return S.JOINED


class LateReader(Task[S]):
    config = NO_RETRY

    def run(self, store: SharedStore) -> S:
        time.sleep(0.5)
        store["late_saw_early"] = "early" in store
        store["late_saw_before"] = store["before"]
        return S.JOINED


def test_branches_see_one_snapshot_taken_before_the_split(
    executor: Any, store: SharedStore
) -> None:
    store["before"] = "x"
    flow = split_flow(executor, [Writer(), LateReader()], JoinStrategy.all())
    assert flow.orchestrate(store=store) is S.JOINED
    assert store["late_saw_early"] is False and store["late_saw_before"] == "x"
    assert store["early"] is True


def test_result_key_holds_the_same_result_the_observer_saw(
    executor: Any, store: SharedStore
) -> None:
    recorder = Recorder()
    flow = split_flow(
        executor, [Branch(0), Branch(1, fail=True)], JoinStrategy.quorum(1), observers=(recorder,)
    )
    assert flow.orchestrate(store=store) is S.JOINED
    [(state, seen)] = recorder.splits
    stored = store["split"]
    assert state is S.SPLIT
    assert stored.successes == seen.successes == [(0, S.JOINED)]
    assert indexes(stored.errors) == indexes(seen.errors) == [1]
    assert isinstance(seen.errors[0][1].__cause__, BranchFailed)
    stored_error = stored.errors[0][1]
    assert isinstance(stored_error, TaskError) and stored_error.task_name == "branch1"
    assert "BranchFailed" in (stored_error.remote_traceback or "")
    assert stored.cancelled == seen.cancelled == [] and stored.total_count == 2
    assert "1 succeeded, 1 failed, 0 cancelled, of 2" in repr(stored)


def test_result_key_errors_keep_their_original_exception(executor: Any, store: SharedStore) -> None:
    flow = split_flow(executor, [Branch(0), Branch(1, fail=True)], JoinStrategy.quorum(1))
    assert flow.orchestrate(store=store) is S.JOINED
    [(index, err)] = store["split"].errors
    assert index == 1 and isinstance(err.__cause__, BranchFailed) and err.__cause__.tag == 1
