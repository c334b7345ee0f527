"""A BatchTask's large numpy results come back through shared memory (issue 15, item 6):
intact, writable, counted, and leaving nothing in /dev/shm; ``store.concatenate`` joins them
into one shared-memory array."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from enum import Enum, auto
from typing import Any

import numpy as np
import pytest

from cano_mp import BatchTask, ItemFailure, ProcessExecutor, SharedStore, TaskConfig, Workflow
from cano_mp._store import results as results_shm

from .test_store import segment_files


class S(Enum):
    MAP = auto()
    DONE = auto()


def column(i: int) -> np.ndarray[Any, Any]:
    """Item i's result: 40,000 float64 (320 kB: over the segment threshold), seeded."""
    return np.random.default_rng(i).random(40_000)


def table(i: int) -> dict[str, Any]:
    return {"i": i, "x": column(i), "n": np.arange(i, i + 20_000, dtype=np.int64), "s": "tag"}


class Parse(BatchTask[S, int, Any]):
    next_states = (S.DONE,)
    config = TaskConfig.minimal()

    def __init__(self, fn: Any, n: int, *, concat: bool = False, chunk_size: int = 3) -> None:
        self.fn, self.n, self.concat = fn, n, concat
        self.chunk_size = chunk_size

    def load(self, store: SharedStore) -> Iterable[int]:
        return range(self.n)

    def process(self, item: int) -> Any:
        return self.fn(item)

    def finish(self, store: SharedStore, results: list[Any]) -> S:
        if self.concat:
            store.concatenate("all", results)
        else:
            store["writable"] = all(r.flags.writeable for r in results if hasattr(r, "flags"))
            store["results"] = results
        return S.DONE


@pytest.fixture
def two_workers() -> Iterator[ProcessExecutor]:
    with ProcessExecutor(max_workers=2, reuse=False) as ex:
        yield ex


def run(ex: ProcessExecutor, store: SharedStore, task: BatchTask[S, Any, Any]) -> None:
    flow: Workflow[S] = Workflow(start=S.MAP, executor=ex)
    flow.register(S.MAP, task).add_exit_state(S.DONE)
    flow.orchestrate(store=store)


def result_files(store: SharedStore) -> list[str]:
    return [f for f in segment_files(store) if results_shm.RESULTS_TAG + "-" in f]


def test_large_results_arrive_intact_through_shared_memory(
    two_workers: ProcessExecutor, store: SharedStore
) -> None:
    before = dict(results_shm.counts)
    shm_before = set(os.listdir("/dev/shm"))
    run(two_workers, store, Parse(column, 12))
    got = store["results"]
    assert len(got) == 12
    for i, r in enumerate(got):
        assert r.dtype == np.float64 and np.array_equal(r, column(i))
    # 12 items in chunks of 3: 4 segments (one per chunk), 12 x 320 kB of data.
    assert results_shm.counts["segments"] - before["segments"] >= 4
    assert results_shm.counts["bytes"] - before["bytes"] >= 12 * 320_000
    assert store["writable"] is True  # copy-on-write mappings: writable like any array
    assert result_files(store) == []
    mine = f"cano_mp-{os.getpid()}-"
    assert [e for e in set(os.listdir("/dev/shm")) - shm_before if e.startswith(mine)] == []


def test_nested_results_and_small_buffers_stay_right(
    two_workers: ProcessExecutor, store: SharedStore
) -> None:
    run(two_workers, store, Parse(table, 7, chunk_size=2))
    for i, r in enumerate(store["results"]):
        want = table(i)
        assert r["i"] == i and r["s"] == "tag"
        assert np.array_equal(r["x"], want["x"]) and np.array_equal(r["n"], want["n"])


def test_small_results_stay_in_the_pipe(two_workers: ProcessExecutor, store: SharedStore) -> None:
    before = results_shm.counts["segments"]
    run(two_workers, store, Parse(lambda i: np.arange(10) * i, 20))
    assert [r.tolist() for r in store["results"]] == [
        (np.arange(10) * i).tolist() for i in range(20)
    ]
    assert results_shm.counts["segments"] == before


def test_finish_concatenates_into_one_shared_array(
    two_workers: ProcessExecutor, store: SharedStore
) -> None:
    run(two_workers, store, Parse(column, 9, concat=True))
    joined = store["all"]
    assert np.array_equal(joined, np.concatenate([column(i) for i in range(9)]))
    assert result_files(store) == []


def test_concatenate_checks_before_storing(store: SharedStore) -> None:
    with pytest.raises(ValueError, match="does not join"):
        store.concatenate("bad", [np.zeros((2, 3)), np.zeros((2, 4))])
    assert "bad" not in store
    with pytest.raises(ValueError, match="no arrays"):
        store.concatenate("bad", [])
    out = store.concatenate("ok", [np.ones((2, 3)), np.zeros((2, 2), dtype=np.int32)], axis=1)
    assert out.shape == (2, 5) and out.dtype == np.float64
    assert np.array_equal(store["ok"], np.hstack([np.ones((2, 3)), np.zeros((2, 2))]))


def fails_on_five(i: int) -> np.ndarray[Any, Any]:
    if i == 5:
        raise ValueError("item five")
    return column(i)


def test_collected_failures_beside_large_results(
    two_workers: ProcessExecutor, store: SharedStore
) -> None:
    task = Parse(fails_on_five, 9)
    task.on_error = "collect"
    run(two_workers, store, task)
    got = store["results"]
    assert isinstance(got[5], ItemFailure) and "item five" in str(got[5].error)
    for i in (0, 4, 6, 8):
        assert np.array_equal(got[i], column(i))
    assert result_files(store) == []


def slow_then_fail(i: int) -> np.ndarray[Any, Any]:
    if i == 0:
        raise ValueError("first item fails")
    time.sleep(0.05)
    return column(i)


def test_a_failed_batch_leaves_no_result_segments(
    two_workers: ProcessExecutor, store: SharedStore
) -> None:
    with pytest.raises(Exception, match="first item fails"):
        run(two_workers, store, Parse(slow_then_fail, 40, chunk_size=2))
    # Chunks still running when the batch failed finish later: their results are dropped
    # by done-callbacks. Wait for them (generously).
    deadline = time.monotonic() + 30
    while result_files(store) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert result_files(store) == []
