"""Pre-feed: BatchTask chunks and quick split branches queued in a busy worker's pipe
(``Call.ahead``) keep the per-item and per-branch semantics of errors, timeouts, crashes, a
retiring worker and a cancelled run."""

from __future__ import annotations

import collections
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cano_mp import (
    ItemFailure,
    JoinConfig,
    JoinStrategy,
    ProcessExecutor,
    RetryPolicy,
    SharedStore,
    SplitResult,
    Task,
    TaskConfig,
    TaskTimeout,
    WorkerCrashed,
    Workflow,
    WorkflowTimeout,
)

from .test_batch import Batch, S, run_batch


@pytest.fixture
def own_pool() -> Iterator[ProcessExecutor]:
    """A pool of its own: its pre-feed counters count this test's calls only."""
    with ProcessExecutor(max_workers=2, reuse=False) as ex:
        ex.warm()
        yield ex


def runs(folder: Path) -> list[tuple[int, float]]:
    """``(item, monotonic start)`` of every execution the items recorded."""
    path = folder / "runs"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        x, t = line.split()
        out.append((int(x), float(t)))
    return out


def record(folder: str, x: int) -> None:
    with open(os.path.join(folder, "runs"), "a") as f:  # one short line: an atomic append
        f.write(f"{x} {time.monotonic()}\n")


def die_once_at_55(item: tuple[int, str]) -> int:
    x, folder = item
    record(folder, x)
    marker = os.path.join(folder, "died")
    if x == 55 and not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(0.5)  # meanwhile the driver queues a chunk behind this one
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.001)
    return x * 2


def record_slowly(item: tuple[int, str]) -> int:
    x, folder = item
    record(folder, x)
    time.sleep(0.05)
    return x


def record_quickly(item: tuple[int, str]) -> int:
    x, folder = item
    record(folder, x)
    return x + 1


def test_a_queued_chunk_of_a_killed_worker_is_sent_again_not_lost(
    own_pool: ProcessExecutor, store: SharedStore, tmp_path: Path
) -> None:
    cfg = TaskConfig(retry=RetryPolicy.fixed(1, 0.0))
    items = [(x, str(tmp_path)) for x in range(200)]
    results = run_batch(Batch(die_once_at_55, items, chunk_size=10, config=cfg), own_pool, store)
    assert results == [2 * x for x in range(200)]
    pool: Any = own_pool._pool()
    assert pool.prefed > 0, "no chunk was queued behind a running one"
    assert pool.requeued >= 1, "the killed worker's queued chunk was not sent again"
    count = collections.Counter(x for x, _ in runs(tmp_path))
    # As without pre-feed: the items of the dead chunk before 55 ran again (their results
    # died with the worker), 55 ran twice (its crash, its retry); every other item once.
    expected = {x: 2 if 50 <= x <= 55 else 1 for x in range(200)}
    assert dict(count) == expected


def die_at_1500(item: tuple[int, str]) -> int:
    x, folder = item
    if x == 1500:
        record(folder, x)
        os._exit(3)
    return x


def test_a_crash_in_a_block_of_quick_items_charges_the_item_that_crashes_alone(
    own_pool: ProcessExecutor, store: SharedStore, tmp_path: Path
) -> None:
    cfg = TaskConfig(retry=RetryPolicy.fixed(1, 0.0))
    items = [(x, str(tmp_path)) for x in range(3000)]
    batch = Batch(die_at_1500, items, chunk_size=3000, config=cfg, on_error="collect")
    results = run_batch(batch, own_pool, store)
    assert [r for i, r in enumerate(results) if i != 1500] == [i for i in range(3000) if i != 1500]
    failure = results[1500]
    assert isinstance(failure, ItemFailure) and isinstance(failure.error, WorkerCrashed)
    assert failure.attempts == 2
    # Quick items run in blocks: the first crash, in a block, charges nobody (each item of
    # the block runs again alone); then it crashes alone twice (its two attempts).
    assert collections.Counter(x for x, _ in runs(tmp_path)) == {1500: 3}


def test_a_cancelled_run_leaves_no_queued_chunk_running(
    own_pool: ProcessExecutor, store: SharedStore, tmp_path: Path
) -> None:
    assert run_batch(Batch(abs, range(8)), own_pool, store) == list(range(8))  # workers up
    items = [(x, str(tmp_path)) for x in range(1000)]
    flow = Workflow(executor=own_pool, timeout=0.6).register(
        S.MAP, Batch(record_slowly, items, chunk_size=4)
    )
    with pytest.raises(WorkflowTimeout):
        flow.add_exit_state(S.DONE).orchestrate(S.MAP, store=store)
    stopped = time.monotonic()
    time.sleep(1.0)  # a queued chunk that was not withdrawn would start meanwhile
    pool: Any = own_pool._pool()
    assert pool.withdrawn >= 1, "no queued chunk was withdrawn"
    ran = runs(tmp_path)
    assert ran, "no item started before the run's timeout"
    late = [(x, t) for x, t in ran if t > stopped]
    assert late == []
    # the pool is usable, and what was withdrawn left nothing behind in the workers
    assert run_batch(Batch(lambda x: x, range(50)), own_pool, store) == list(range(50))


def test_a_retiring_worker_hands_its_queued_chunk_back(store: SharedStore, tmp_path: Path) -> None:
    items = [(x, str(tmp_path)) for x in range(300)]
    with ProcessExecutor(max_workers=2, reuse=False, max_tasks_per_worker=3) as ex:
        results = run_batch(Batch(record_quickly, items, chunk_size=5), ex, store)
        pool: Any = ex._pool()
        assert pool.prefed > 0 and pool.requeued >= 1
    assert results == [x + 1 for x in range(300)]
    assert collections.Counter(x for x, _ in runs(tmp_path)) == {x: 1 for x in range(300)}


class Branch(Task[str]):
    """A distinct task object per branch; ``mode`` says what it does besides its write."""

    def __init__(self, i: int, folder: str, mode: str = "ok") -> None:
        self.i, self.folder, self.mode = i, folder, mode
        timeout = 2.0 if mode == "hang" else None
        self.config = TaskConfig(retry=RetryPolicy.none(), timeout=timeout)

    def run(self, store: Any) -> str:
        record(self.folder, self.i)
        if self.mode == "raise":
            raise ValueError(f"branch {self.i}")
        if self.mode == "hang":
            time.sleep(60)
        if self.mode == "die":
            time.sleep(0.3)  # the driver queues a branch behind this one meanwhile
            os._exit(9)
        store[f"r{self.i}"] = self.i * 2
        return "done"


def split_flow(executor: Any, branches: list[Branch]) -> Workflow[str]:
    join = JoinConfig(JoinStrategy.quorum(1), "done", result_key="split")
    flow: Workflow[str] = Workflow(start="split", executor=executor)
    return flow.register_split("split", branches, join).add_exit_state("done")


def test_distinct_branch_objects_give_their_own_results_in_order(
    own_pool: ProcessExecutor, store: SharedStore, tmp_path: Path
) -> None:
    branches = [Branch(i, str(tmp_path)) for i in range(300)]
    assert split_flow(own_pool, branches).orchestrate(store=store) == "done"
    result: SplitResult[str] = store["split"]
    assert result.successes == [(i, "done") for i in range(300)]
    assert [store[f"r{i}"] for i in range(300)] == [2 * i for i in range(300)]
    pool: Any = own_pool._pool()
    assert pool.prefed > 0, "no branch was queued behind a running one"
    assert collections.Counter(x for x, _ in runs(tmp_path)) == {i: 1 for i in range(300)}


def test_queued_branches_keep_their_own_errors_timeouts_and_crashes(
    own_pool: ProcessExecutor, store: SharedStore, tmp_path: Path
) -> None:
    modes = {40: "raise", 80: "hang", 120: "die", 121: "raise"}
    branches = [Branch(i, str(tmp_path), modes.get(i, "ok")) for i in range(200)]
    assert split_flow(own_pool, branches).orchestrate(store=store) == "done"
    result: SplitResult[str] = store["split"]
    errors = dict(result.errors)
    assert sorted(errors) == [40, 80, 120, 121]
    assert isinstance(errors[40].__cause__, ValueError) and "branch 40" in str(errors[40])
    assert isinstance(errors[80], TaskTimeout)
    assert isinstance(errors[120], WorkerCrashed)
    assert isinstance(errors[121].__cause__, ValueError)
    ok = [i for i in range(200) if i not in modes]
    assert result.successes == [(i, "done") for i in ok] and result.cancelled == []
    assert [store[f"r{i}"] for i in ok] == [2 * i for i in ok]
    for i in modes:
        assert f"r{i}" not in store
    pool: Any = own_pool._pool()
    assert pool.prefed > 0 and pool.requeued >= 1, "nothing was queued behind the hang"
    # Each branch ran once: the one queued behind the crash or the hang was not charged
    # (sent again, it ran once, elsewhere or after).
    count = collections.Counter(x for x, _ in runs(tmp_path))
    assert count == {i: 1 for i in range(200)}
