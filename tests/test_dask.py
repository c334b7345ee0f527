"""The contract on a Dask cluster: DaskExecutor over a LocalCluster of 2 worker processes.

The core, split/join, batch and concurrent-instance contract tests (those of ``test_workflow``,
``test_split``, ``test_batch`` and ``test_concurrent`` that take the ``executor`` fixture) run
again here on Dask; then what is Dask's own: values by value, worker loss, cancellation and
timeouts, what is left behind, and the example.
"""

from __future__ import annotations

import glob
import inspect
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

distributed = pytest.importorskip("distributed")

from cano_mp import (  # noqa: E402
    ConfigError,
    ItemFailure,
    JoinConfig,
    JoinStrategy,
    RetryPolicy,
    SharedStore,
    TaskConfig,
    TaskTimeout,
    WorkerCrashed,
    Workflow,
    task,
    task_context,
)
from cano_mp._store import shm as _shm  # noqa: E402
from cano_mp.dask import DaskExecutor  # noqa: E402

from . import test_batch, test_concurrent, test_split, test_workflow  # noqa: E402
from .conftest import cano_files  # noqa: E402

pytestmark = pytest.mark.slow

NO_RETRY = TaskConfig.minimal()

# -- the cluster ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Any]:
    """One LocalCluster (processes, 2 workers x 1 thread) for the whole module."""
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    client = distributed.Client(cluster)
    try:
        client.wait_for_workers(2)
        yield client
    finally:
        try:
            pids = _worker_pids(client)
        except Exception:
            pids = []
        client.close()
        cluster.close()
        _gone, alive = psutil.wait_procs(
            [p for p in (_process(pid) for pid in pids) if p is not None], timeout=10
        )
        assert not alive, f"Dask workers still running: {alive}"
        # a worker that exits removes its segment directories (killed ones: the janitor)
        left = [
            d
            for pid in pids
            for root in (_shm.SHM_ROOT, tempfile.gettempdir())
            for d in glob.glob(os.path.join(root, f"{_shm.PREFIX}{pid}-*"))
        ]
        assert not left, f"Dask workers left shared memory: {left}"


@pytest.fixture(scope="module")
def dask_executor(dask_client: Any) -> Iterator[DaskExecutor]:
    with DaskExecutor(dask_client) as ex:
        yield ex


@pytest.fixture
def executor(dask_executor: DaskExecutor, dask_client: Any) -> DaskExecutor:
    """The contract tests' executor, here: Dask (overrides the conftest's)."""
    _wait_for_workers(dask_client, 2)
    _wait_until_idle(dask_client)
    return dask_executor


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _worker_pids(client: Any) -> list[int]:
    return [int(pid) for pid in client.run(os.getpid).values()]


def _wait_for_workers(client: Any, n: int, timeout: float = 30.0) -> None:
    """After a test killed a worker: wait until its nanny has started it again."""
    deadline = time.monotonic() + timeout
    while len(client.nthreads()) < n and time.monotonic() < deadline:
        time.sleep(0.05)


def _calls_running() -> int:
    from cano_mp._dask import remote

    return len(remote.running)


def _wait_until_idle(client: Any, timeout: float = 30.0) -> None:
    """Until no worker runs a cano_mp call: a call abandoned by an earlier test (timed out,
    cancelled) runs to its end on its worker."""
    deadline = time.monotonic() + timeout
    while any(client.run(_calls_running).values()) and time.monotonic() < deadline:
        time.sleep(0.05)


def _set_allowed_failures(n: int, dask_scheduler: Any = None) -> int:
    previous = int(dask_scheduler.allowed_failures)
    dask_scheduler.allowed_failures = n
    return previous


@pytest.fixture
def no_dask_retries(dask_client: Any) -> Iterator[None]:
    """``distributed.scheduler.allowed-failures: 0`` while the test runs."""
    previous = dask_client.run_on_scheduler(_set_allowed_failures, 0)
    try:
        yield
    finally:
        dask_client.run_on_scheduler(_set_allowed_failures, previous)


# -- the contract tests, on Dask -------------------------------------------------------------------

# Contract tests that do not hold on Dask, and why.
NOT_ON_DASK: dict[str, str] = {
    "test_an_item_that_overruns_but_returns_is_a_timeout": (
        "Dask does not report when a call starts (no progress()): a chunk's timeout counts "
        "from its submission, so item 2, queued behind item 1 on one worker, may time out "
        "too (a Dask version is below)"
    ),
    "test_merge_is_in_branch_index_order_whatever_the_finish_order": (
        "its set-up needs branch 2 to start before branch 0 ends; Dask may queue it behind "
        "branch 0 on one worker (a Dask version is below)"
    ),
}


def _contract_tests() -> Iterator[tuple[str, Any]]:
    for module in (test_workflow, test_split, test_batch, test_concurrent):
        short = module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
        for name, fn in list(vars(module).items()):
            if not name.startswith("test_") or not callable(fn):
                continue
            params = inspect.signature(fn).parameters
            if "executor" not in params or "pool" in params:
                continue
            if name in NOT_ON_DASK:
                continue
            yield f"test_{short}__{name.removeprefix('test_')}", fn


for _name, _fn in _contract_tests():
    globals()[_name] = _fn
del _name, _fn


# -- on Dask only ------------------------------------------------------------------------------


class S:
    """States (plain strings: nothing to import in the workers)."""

    A, B, DONE = "a", "b", "done"


def one_state(executor: Any, fn: Any, config: TaskConfig = NO_RETRY, **kw: Any) -> Workflow[str]:
    flow: Workflow[str] = Workflow(start=S.A, executor=executor, **kw)
    return flow.register(S.A, fn, config=config).add_exit_state(S.DONE)


def test_max_workers_is_the_clusters_thread_count(dask_executor: DaskExecutor) -> None:
    assert dask_executor.max_workers == 2


def test_bad_arguments_are_config_errors(dask_client: Any) -> None:
    with pytest.raises(ConfigError, match=r"distributed\.Client"):
        DaskExecutor(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_workers"):
        DaskExecutor(dask_client, max_workers=0)


def test_merge_is_in_branch_index_order_whatever_the_finish_order(
    executor: DaskExecutor, store: SharedStore
) -> None:
    # test_split's version needs branch 2 to start before branch 0 ends; Dask may queue it
    # behind branch 0 on the same worker. Two branches on two idle workers: 0 ends last.
    store["order"] = ["before"]
    branches = [test_split.MergeBranch(i, 2) for i in range(2)]
    flow = test_split.split_flow(executor, branches, JoinStrategy.all())
    assert flow.orchestrate(store=store) is test_split.S.JOINED
    assert store["end0"] > store["end1"]
    assert store["winner"] == 1
    assert store["order"] == ["before", *[(i, w) for i in range(2) for w in ("first", "second")]]


# -- values travel by value ---------------------------------------------------------------------


def read_and_write_big(store: SharedStore) -> str:
    from cano_mp._store import HELD_SEGMENTS

    x = store["x"]
    store["sum"] = float(x.sum())
    store["read_only"] = not x.flags.writeable
    store["held"] = len(HELD_SEGMENTS)  # served from memory, not from the driver's files
    store["y"] = x * 2
    return S.DONE


def test_large_values_travel_by_value_both_ways(executor: DaskExecutor, store: SharedStore) -> None:
    x = np.arange(200_000.0)
    store["x"] = x
    assert one_state(executor, read_and_write_big).orchestrate(store=store) == S.DONE
    assert store["sum"] == float(x.sum())
    assert store["read_only"] is True and store["held"] >= 1
    y = store["y"]
    assert np.array_equal(y, x * 2) and not y.flags.writeable
    # the worker's array is in this machine's shared memory again, under the attempt's token
    assert any(os.path.basename(p).startswith("t") for p in cano_files())


def _scattered(dask_scheduler: Any = None) -> list[str]:
    return sorted(str(k) for k in dask_scheduler.tasks if str(k).startswith("bytes-"))


def sum_x(store: SharedStore) -> str:
    store["sum"] = float(store["x"].sum())
    return S.DONE


def test_an_unchanged_large_value_is_scattered_once(
    executor: DaskExecutor, dask_client: Any, store: SharedStore
) -> None:
    flow = one_state(executor, sum_x)
    store["x"] = np.ones(100_000)
    flow.orchestrate(store=store)
    first = set(dask_client.run_on_scheduler(_scattered))
    store["small"] = 1  # a new store version; "x" unchanged
    flow.orchestrate(store=store)
    assert set(dask_client.run_on_scheduler(_scattered)) - first == set()
    store["x"] = np.full(100_000, 2.0)  # a new value: sent, once
    flow.orchestrate(store=store)
    assert store["sum"] == 200_000.0
    assert len(set(dask_client.run_on_scheduler(_scattered)) - first) == 1


def sum_a(store: SharedStore) -> str:
    store["sum"] = float(store["a"].sum())
    return S.DONE


def test_a_driver_filled_array_is_sent_as_it_is_at_each_store_version(
    executor: DaskExecutor, store: SharedStore
) -> None:
    flow = one_state(executor, sum_a)
    a = store.array("a", 100_000)
    a[:] = 1.0
    flow.orchestrate(store=store)
    assert store["sum"] == 100_000.0
    a[:] = 2.0  # in place: the next store version carries the new contents
    flow.orchestrate(store=store)
    assert store["sum"] == 200_000.0


def test_scattered_values_lost_with_their_workers_are_sent_again(
    executor: DaskExecutor, dask_client: Any, store: SharedStore
) -> None:
    flow = one_state(executor, sum_x)
    store["x"] = np.ones(100_000)
    flow.orchestrate(store=store)
    dask_client.restart_workers(list(dask_client.nthreads()))  # every scattered value is lost
    _wait_for_workers(dask_client, 2)
    assert flow.orchestrate(store=store) == S.DONE
    assert store["sum"] == 100_000.0


def sum_x_slowly(store: SharedStore) -> str:
    time.sleep(1.0)
    return sum_x(store)


def test_a_call_whose_inputs_are_lost_while_it_waits_is_sent_again(
    executor: DaskExecutor, dask_client: Any, store: SharedStore
) -> None:
    import threading

    store["x"] = np.ones(100_000)
    flow = one_state(executor, sum_x_slowly)

    def lose_inputs() -> None:
        time.sleep(0.4)  # the call runs, holding its inputs
        dask_client.cancel(list(executor._shipper._segments.values()))  # as if their worker died

    thread = threading.Thread(target=lose_inputs)
    thread.start()
    try:
        assert flow.orchestrate(store=store) == S.DONE
    finally:
        thread.join()
    assert store["sum"] == 100_000.0


def test_the_dask_executor_declares_what_it_can_do(executor: DaskExecutor) -> None:
    from cano_mp._executors import Capabilities, capabilities, progress_reader

    assert capabilities(executor) == Capabilities(
        in_flight_per_worker=8, chunk_seconds=1.0, eager_chunks=True
    )
    assert progress_reader(executor) is None  # a chunk is timed as a whole
    assert DaskExecutor.__module__ == "cano_mp.dask"


# -- worker loss ----------------------------------------------------------------------------------


def kill_own_worker(store: SharedStore) -> str:
    os.kill(os.getpid(), signal.SIGKILL)
    return S.DONE


def put_attempt(store: SharedStore) -> str:
    store["attempt"] = task_context().attempt
    return S.DONE


def test_a_killed_worker_is_worker_crashed_with_allowed_failures_zero(
    executor: DaskExecutor, dask_client: Any, no_dask_retries: None, store: SharedStore
) -> None:
    with pytest.raises(WorkerCrashed) as info:
        one_state(executor, kill_own_worker).orchestrate(store=store)
    assert info.value.attempts == 1 and info.value.exitcode is None
    _wait_for_workers(dask_client, 2)
    assert one_state(executor, put_attempt).orchestrate(store=store) == S.DONE


class KillOnce:
    """Kills its worker the first time it runs (a marker file remembers), then succeeds."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __call__(self, store: SharedStore) -> str:
        with open(self.marker, "a") as f:
            f.write("x")
        if os.path.getsize(self.marker) == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        store["attempt"] = task_context().attempt
        return S.DONE


def test_by_default_dask_reruns_a_call_whose_worker_died(
    executor: DaskExecutor, dask_client: Any, store: SharedStore, tmp_path: Path
) -> None:
    marker = str(tmp_path / "runs")
    assert one_state(executor, KillOnce(marker)).orchestrate(store=store) == S.DONE
    assert os.path.getsize(marker) == 2  # run twice (at-least-once) ...
    assert store["attempt"] == 1  # ... as one cano_mp attempt
    _wait_for_workers(dask_client, 2)


def die_soon(store: SharedStore) -> str:
    time.sleep(0.3)
    return kill_own_worker(store)


def finish_later(store: SharedStore) -> str:
    time.sleep(0.8)
    store["survivor"] = True
    return S.DONE


def test_a_branch_whose_worker_dies_fails_alone(
    executor: DaskExecutor, dask_client: Any, no_dask_retries: None, store: SharedStore
) -> None:
    flow: Workflow[str] = Workflow(start=S.A, executor=executor)
    flow.register_split(
        S.A,
        [task(die_soon, config=NO_RETRY), task(finish_later, config=NO_RETRY)],
        JoinConfig(JoinStrategy.quorum(1), S.DONE, result_key="split"),
    ).add_exit_state(S.DONE)
    assert flow.orchestrate(store=store) == S.DONE
    result = store["split"]
    assert [i for i, _ in result.successes] == [1] and store["survivor"] is True
    assert [(i, type(e)) for i, e in result.errors] == [(0, WorkerCrashed)]
    _wait_for_workers(dask_client, 2)


def test_a_batch_item_that_kills_its_worker_is_worker_crashed(
    executor: DaskExecutor, dask_client: Any, no_dask_retries: None, store: SharedStore
) -> None:
    batch = test_batch.Batch(test_batch.die_on_five, [5], on_error="collect")
    [failure] = test_batch.run_batch(batch, executor, store)
    assert isinstance(failure, ItemFailure) and isinstance(failure.error, WorkerCrashed)
    assert failure.index == 0
    _wait_for_workers(dask_client, 2)


# -- cancellation and timeouts ------------------------------------------------------------------


def sleep_on_one(x: int) -> int:
    time.sleep(0.6 if x == 1 else 0.0)
    return x


def test_a_batch_item_over_its_timeout_is_a_timeout(
    executor: DaskExecutor, store: SharedStore
) -> None:
    # Without progress reports a chunk is timed as a whole, from its submission: one item
    # per chunk here, on an idle cluster.
    cfg = TaskConfig(retry=RetryPolicy.none(), timeout=0.2)
    batch = test_batch.Batch(sleep_on_one, [1], config=cfg, on_error="collect")
    started = time.monotonic()
    [failure] = test_batch.run_batch(batch, executor, store, cancel_grace=0.05)
    assert time.monotonic() - started < 0.55
    assert isinstance(failure, ItemFailure) and isinstance(failure.error, TaskTimeout)


class QuickOnceStarted:
    """Returns as soon as the spinning branch has started (so that it is running, not
    queued, when the join cancels it)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, store: SharedStore) -> str:
        _wait_for(Path(self.path), 10.0)
        return S.DONE


class SpinUntilCancelled:
    """Spins (no deadline) until the cancel flag is set; leaves a file when it saw it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, store: SharedStore) -> str:
        Path(self.path + ".started").write_text("")
        ctx = task_context()
        end = time.monotonic() + 30
        while not ctx.cancelled() and time.monotonic() < end:
            pass
        with open(self.path, "w") as f:
            f.write(str(time.time()) if ctx.cancelled() else "never")
        return S.DONE


def test_a_cancelled_branch_sees_the_flag_and_stops(
    executor: DaskExecutor, store: SharedStore, tmp_path: Path
) -> None:
    seen = tmp_path / "seen"
    flow: Workflow[str] = Workflow(start=S.A, executor=executor, cancel_grace=5.0)
    flow.register_split(
        S.A,
        [
            task(QuickOnceStarted(f"{seen}.started"), config=NO_RETRY),
            task(SpinUntilCancelled(str(seen)), config=NO_RETRY),
        ],
        JoinConfig(JoinStrategy.any(), S.DONE, result_key="split"),
    ).add_exit_state(S.DONE)
    started = time.monotonic()
    assert flow.orchestrate(store=store) == S.DONE
    returned = time.time()
    # Bounds under the 5 s grace: a run that waited the grace out, or a spinner killed after
    # it (it leaves no file), still fails; anything shorter is only load on the machine.
    assert time.monotonic() - started < 4.5
    assert store["split"].cancelled == [1]
    deadline = time.monotonic() + 5
    while not seen.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen.read_text() != "never"
    assert float(seen.read_text()) - returned < 2.5  # it stopped soon after the join


class Hang:
    """Ignores the cancel flag: sleeps for ``seconds``, leaving its pid and a done file."""

    def __init__(self, directory: str, seconds: float) -> None:
        self.directory, self.seconds = directory, seconds

    def __call__(self, store: SharedStore) -> str:
        Path(self.directory, "pid").write_text(str(os.getpid()))
        time.sleep(self.seconds)
        Path(self.directory, "done").write_text("done")
        store["late"] = True
        return S.DONE


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_hung_call_times_out_and_its_worker_is_restarted_when_asked(
    dask_client: Any, store: SharedStore, tmp_path: Path
) -> None:
    cfg = TaskConfig(retry=RetryPolicy.none(), timeout=0.5)
    with DaskExecutor(dask_client, restart_hung_workers=True) as ex:
        flow = one_state(ex, Hang(str(tmp_path), 60.0), cfg, cancel_grace=0.1)
        started = time.monotonic()
        with pytest.raises(TaskTimeout):
            flow.orchestrate(store=store)
        assert time.monotonic() - started < 3.0
        pid = int((tmp_path / "pid").read_text())
        proc = _process(pid)
        if proc is not None:
            proc.wait(timeout=20)  # restarted: the process running the call is gone
        assert "late" not in store
        _wait_for_workers(dask_client, 2)
        assert one_state(ex, put_attempt).orchestrate(store=store) == S.DONE


def test_without_restarts_a_hung_call_times_out_but_runs_to_its_end(
    executor: DaskExecutor, store: SharedStore, tmp_path: Path
) -> None:
    cfg = TaskConfig(retry=RetryPolicy.none(), timeout=0.3)
    flow = one_state(executor, Hang(str(tmp_path), 1.5), cfg, cancel_grace=0.1)
    started = time.monotonic()
    with pytest.raises(TaskTimeout):
        flow.orchestrate(store=store)
    assert time.monotonic() - started < 1.4  # before the call ends
    _wait_for(tmp_path / "done", 10)
    assert (tmp_path / "done").exists()  # not stopped: abandoned
    assert _process(int((tmp_path / "pid").read_text())) is not None  # its worker lives on
    assert "late" not in store  # and its writes are discarded


# -- what is left behind -------------------------------------------------------------------------


def test_nothing_is_left_in_shared_memory_after_the_store_closes(executor: DaskExecutor) -> None:
    with SharedStore() as s:
        s["x"] = np.ones(100_000)
        one_state(executor, read_and_write_big).orchestrate(store=s)
    assert cano_files() == []


def test_the_dask_cluster_example_runs(tmp_path: Path) -> None:
    from .examples_run import run_example

    stdout = run_example("dask_cluster.py", "--size", "2", "--out", str(tmp_path), timeout=300)
    assert "finished in DONE" in stdout
    lines = (tmp_path / "report.csv").read_text().splitlines()
    assert lines[0].startswith("sensor,rows,mean") and len(lines) == 65
