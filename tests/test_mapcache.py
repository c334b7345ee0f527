"""A pool worker keeps its read-only segment mappings across calls (issue 15, item 1): a
second read of an unchanged array maps nothing; a replaced value is never served stale; the
budget evicts; a planted or symlinked segment still fails, cache or not."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cano_mp import ProcessExecutor, SharedStore, TaskError, Workflow
from cano_mp._store import mapcache

MB = 1024 * 1024


@pytest.fixture
def one_worker() -> Iterator[ProcessExecutor]:
    # One worker: every call of a test runs in the same process, so its cache is the one
    # the test looks at.
    with ProcessExecutor(max_workers=1, reuse=False) as ex:
        yield ex


def read_sum(store: SharedStore) -> str:
    key = store["key"]
    store["sum"] = float(store[key].sum())
    store["stats"] = mapcache.stats()
    store["pid"] = os.getpid()
    return "done"


def _wait_entries(at_most: int, deadline: float) -> None:
    """Wait (generously) until this worker's cache holds at most ``at_most`` mappings."""
    while time.monotonic() < deadline:
        stats = mapcache.stats()
        assert stats is not None
        if stats["entries"] <= at_most:
            return
        time.sleep(0.05)


def wait_for_sweep(store: SharedStore) -> str:
    # The sweep runs on a background thread after each call: wait for it.
    _wait_entries(store["want_entries"], time.monotonic() + 30)
    store["stats"] = mapcache.stats()
    return "done"


def flow_of(ex: ProcessExecutor, fn: Any = read_sum) -> Workflow[str]:
    return Workflow(start="go", executor=ex).register("go", fn).add_exit_state("done")


def read(flow: Workflow[str], store: SharedStore, key: str) -> dict[str, int]:
    store["key"] = key
    flow.orchestrate(store=store)
    assert store["sum"] == float(store[key].sum())
    stats: dict[str, int] = store["stats"]
    return stats


def test_second_read_of_an_unchanged_array_hits_the_cache(
    one_worker: ProcessExecutor, store: SharedStore
) -> None:
    store["a"] = np.arange(1 * MB, dtype=np.float64)  # 8 MB
    flow = flow_of(one_worker)
    first = read(flow, store, "a")
    second = read(flow, store, "a")
    assert second["misses"] == first["misses"]  # no new mapping
    assert second["hits"] == first["hits"] + 1
    assert second["entries"] >= 1 and second["bytes"] >= 8 * MB
    # The worker's address space holds the segment once, whatever the number of reads.
    path = store._entries["a"][0][1][0][0]  # type: ignore[attr-defined]
    maps = Path(f"/proc/{store['pid']}/maps").read_text()
    assert maps.count(path) == 1


def test_a_replaced_value_is_never_served_stale(
    one_worker: ProcessExecutor, store: SharedStore
) -> None:
    flow = flow_of(one_worker)
    rng = np.random.default_rng(15)
    for _ in range(4):
        store["a"] = rng.random(200_000)  # same shape, same size: new values
        read(flow, store, "a")  # read() checks the sum against the driver's value


def test_a_reused_path_with_new_content_is_a_miss(tmp_path: Path) -> None:
    # The store never reuses a segment's name; the cache must not depend on that.
    cache = mapcache.MapCache(64 * MB, populate=False)
    path = str(tmp_path / "seg")
    os.chmod(tmp_path, 0o700)
    np.full(100_000, 1.0).tofile(path)
    os.chmod(path, 0o600)
    mm, kept = cache.map(path, 800_000)
    assert kept and np.frombuffer(mm, dtype=np.float64)[0] == 1.0
    os.unlink(path)
    np.full(100_000, 2.0).tofile(path)  # a new file under the same name, same size
    os.chmod(path, 0o600)
    mm2, _ = cache.map(path, 800_000)
    assert np.frombuffer(mm2, dtype=np.float64)[0] == 2.0
    assert cache.stats()["misses"] == 2 and cache.stats()["hits"] == 0
    mm3, _ = cache.map(path, 800_000)
    assert mm3 is mm2 and cache.stats()["hits"] == 1
    # The replaced mapping is still valid for whoever held an array over it.
    assert np.frombuffer(mm, dtype=np.float64)[-1] == 1.0


def test_eviction_under_a_small_budget(monkeypatch: pytest.MonkeyPatch, store: SharedStore) -> None:
    monkeypatch.setenv("CANO_MP_MAP_CACHE_MB", "3")
    with ProcessExecutor(max_workers=1, reuse=False) as ex:
        flow = flow_of(ex)
        for k in "abc":
            store[k] = np.arange(200_000, dtype=np.float64) + ord(k)  # 1.6 MB each
        stats = [read(flow, store, k) for k in "abc"]
        assert stats[-1]["evictions"] >= 1
        assert stats[-1]["bytes"] <= 3 * MB and stats[-1]["entries"] <= 1
        again = read(flow, store, "a")  # evicted: mapped again, and right
        assert again["misses"] == stats[-1]["misses"] + 1
        store["big"] = np.zeros(1 * MB)  # 8 MB: over the budget, read but never kept
        big = read(flow, store, "big")
        assert big["bytes"] <= 3 * MB


def test_a_deleted_segment_is_dropped_after_the_call(
    one_worker: ProcessExecutor, store: SharedStore
) -> None:
    store["a"] = np.arange(500_000, dtype=np.float64)
    first = read(flow_of(one_worker), store, "a")
    assert first["entries"] == 1
    del store["a"]  # the driver unlinks the segment; the worker's mapping would pin it
    # The sweep after the first call may have run before the unlink: the end of this call
    # sweeps again, and the next one waits for that sweep.
    store["want_entries"] = 1
    flow_of(one_worker, wait_for_sweep).orchestrate(store=store)
    store["want_entries"] = 0
    flow_of(one_worker, wait_for_sweep).orchestrate(store=store)
    after: dict[str, int] = store["stats"]
    assert after["entries"] == 0 and after["bytes"] == 0


def unlink_while_idle(store: SharedStore) -> str:
    # Let the sweep that followed the previous call finish, then delete the segment (as a
    # driver closing its store would) and wait: no call ends meanwhile, so only the idle
    # worker's own sweep can drop the mapping.
    cache = mapcache.current()
    assert cache is not None and cache._jobs is not None
    deadline = time.monotonic() + 30
    while (cache._sweep_pending or not cache._jobs.empty()) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # the job taken off the queue has run
    os.unlink(store["path"])
    _wait_entries(0, deadline)
    store["stats"] = mapcache.stats()
    return "done"


def test_an_idle_worker_drops_a_deleted_segment_without_another_call(
    one_worker: ProcessExecutor, store: SharedStore
) -> None:
    # A store closed after a run must not keep its segments' memory in an idle worker until
    # that worker's next call: the worker sweeps on its own while it holds mappings.
    store["a"] = np.arange(500_000, dtype=np.float64)
    first = read(flow_of(one_worker), store, "a")
    assert first["entries"] == 1
    store["path"] = store._entries["a"][0][1][0][0]  # type: ignore[attr-defined]
    flow_of(one_worker, unlink_while_idle).orchestrate(store=store)
    after: dict[str, int] = store["stats"]
    assert after["entries"] == 0 and after["bytes"] == 0


def test_a_symlink_in_place_of_a_segment_fails_cached_or_not(
    tmp_path: Path, one_worker: ProcessExecutor, store: SharedStore
) -> None:
    decoy = tmp_path / "decoy"
    decoy.write_bytes(b"\0" * 8 * MB)
    flow = flow_of(one_worker)
    store["a"] = np.zeros(1 * MB)
    store["b"] = np.zeros(1 * MB)
    read(flow, store, "a")  # "a" is cached in the worker now; "b" was never mapped there
    for key in ("a", "b"):
        path = store._entries[key][0][1][0][0]  # type: ignore[attr-defined]
        os.unlink(path)
        os.symlink(decoy, path)
        store["key"] = key
        with pytest.raises(TaskError) as info:
            flow.orchestrate(store=store)
        assert "symlink" in str(info.value.__cause__)


def test_a_segment_planted_by_another_user_fails_cached_or_not(
    one_worker: ProcessExecutor, store: SharedStore
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown files to another uid")
    flow = flow_of(one_worker)
    store["a"] = np.zeros(1 * MB)
    store["b"] = np.zeros(1 * MB)
    read(flow, store, "a")
    for key in ("a", "b"):
        path = store._entries[key][0][1][0][0]  # type: ignore[attr-defined]
        os.unlink(path)
        np.ones(1 * MB).tofile(path)
        os.chmod(path, 0o600)
        os.chown(path, 65534, 65534)
        store["key"] = key
        with pytest.raises(TaskError) as info:
            flow.orchestrate(store=store)
        assert "owned by uid" in str(info.value.__cause__)


def test_the_driver_has_no_cache() -> None:
    assert mapcache.stats() is None  # inline tasks map and unmap per call, as before


def _rss_kb(path: str) -> int:
    """Resident kB of this process's mapping of ``path`` (from /proc/self/smaps)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.endswith(path):
            for nxt in lines[i + 1 :]:
                if nxt.startswith("Rss:"):
                    return int(nxt.split()[1])
    raise AssertionError(f"{path} is not mapped")


def test_a_new_large_mapping_is_prefaulted_in_the_background(tmp_path: Path) -> None:
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    if (major, minor) < (5, 14):
        pytest.skip("MADV_POPULATE_READ needs Linux 5.14")
    cache = mapcache.MapCache(64 * MB, populate=True)
    os.chmod(tmp_path, 0o700)
    path = str(tmp_path / "seg")
    np.ones(1 * MB).tofile(path)  # 8 MB
    os.chmod(path, 0o600)
    mm, kept = cache.map(path, 8 * MB)
    assert kept
    deadline = time.monotonic() + 30
    while cache.stats()["populated"] == 0 and cache.populate and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cache.populate and cache.stats()["populated"] == 1
    assert _rss_kb(path) >= 8 * 1024 - 4  # every page mapped, none touched by this test
    del mm
