"""Workers that die, hang or are interrupted: isolation, healing, and no leaks."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from enum import Enum, auto
from typing import Any

import psutil
import pytest

from cano_mp import (
    ProcessExecutor,
    RetryPolicy,
    SharedStore,
    TaskConfig,
    WorkerCrashed,
    Workflow,
)

from .test_store import segment_files

NO_RETRY = TaskConfig.minimal()


class S(Enum):
    A = auto()
    DONE = auto()


def exit_hard(store: SharedStore) -> S:
    store["written"] = 1
    os._exit(3)


def sigkill_self(store: SharedStore) -> S:
    import numpy as np

    store["big"] = np.ones(1_000_000)  # a segment created by the dying attempt
    os.kill(os.getpid(), signal.SIGKILL)
    return S.DONE


def segfault(store: SharedStore) -> S:
    ctypes.string_at(0)
    return S.DONE


def slow_ok(store: SharedStore) -> S:
    time.sleep(1.0)
    store["slow"] = "done"
    return S.DONE


def quick_ok(store: SharedStore) -> S:
    store["ok"] = os.getpid()
    return S.DONE


def one_state(executor: Any, fn: Any, config: TaskConfig = NO_RETRY) -> Workflow[S]:
    return Workflow(executor=executor).register(S.A, fn, config=config).add_exit_state(S.DONE)


@pytest.mark.parametrize(
    ("fn", "exitcode"),
    [(exit_hard, 3), (sigkill_self, -signal.SIGKILL), (segfault, -signal.SIGSEGV)],
)
def test_worker_death_is_worker_crashed_with_exit_code(
    pool: ProcessExecutor, fn: Any, exitcode: int
) -> None:
    with SharedStore() as store:
        with pytest.raises(WorkerCrashed) as info:
            one_state(pool, fn).orchestrate(S.A, store=store)
        assert info.value.exitcode == exitcode
        assert info.value.state is S.A and info.value.attempts == 1
        assert "written" not in store and "big" not in store
        # the pool heals: the next run works
        assert one_state(pool, quick_ok).orchestrate(S.A, store=store) is S.DONE
        deadline = time.monotonic() + 5
        while segment_files(store) and time.monotonic() < deadline:
            time.sleep(0.05)  # the dead attempt's segment is removed once it is reaped
        assert segment_files(store) == []


def test_crash_is_retried_like_any_failure(pool: ProcessExecutor, tmp_path: Any) -> None:
    marker = tmp_path / "crashed-once"

    def crash_once(store: SharedStore) -> S:
        if not marker.exists():
            marker.write_text("x")
            os._exit(9)
        return S.DONE

    flow = one_state(pool, crash_once, TaskConfig(retry=RetryPolicy.fixed(1, 0)))
    assert flow.orchestrate(S.A) is S.DONE


def test_a_crash_does_not_touch_other_in_flight_calls(pool: ProcessExecutor) -> None:
    results: dict[str, Any] = {}
    with SharedStore() as slow_store:

        def run_slow() -> None:
            try:
                results["slow"] = one_state(pool, slow_ok).orchestrate(S.A, store=slow_store)
            except BaseException as exc:
                results["slow"] = exc

        t = threading.Thread(target=run_slow)
        t.start()
        time.sleep(0.3)  # the slow call is running in the other worker
        with pytest.raises(WorkerCrashed):
            one_state(pool, exit_hard).orchestrate(S.A)
        t.join(10)
        assert results["slow"] is S.DONE, results
        assert slow_store["slow"] == "done"


def test_private_pool_closes_its_workers() -> None:
    ex = ProcessExecutor(max_workers=2, reuse=False).warm()
    one_state(ex, quick_ok).orchestrate(S.A)
    deadline = time.monotonic() + 10
    while len(ex.worker_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    pids = ex.worker_pids()
    assert len(pids) == 2
    ex.close()
    procs = [psutil.Process(p) for p in pids if psutil.pid_exists(p)]
    _gone, alive = psutil.wait_procs(procs, 5)
    assert not alive


SCRIPT_PRELUDE = textwrap.dedent(
    """
    import os, sys, time, signal, threading
    # Ctrl-C raises KeyboardInterrupt even when the test runner was started with SIGINT
    # ignored (a background job of a non-interactive shell): Python then installs no handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from enum import Enum, auto
    import numpy as np
    from cano_mp import Workflow, SharedStore, TaskConfig, ProcessExecutor

    class S(Enum):
        A = auto()
        DONE = auto()

    def spin(store):
        store["big"] = np.ones(1_000_000)
        x = 0
        while True:
            x += 1

    def quick(store):
        store["ok"] = 1
        return S.DONE
    """
)


def run_script(body: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT_PRELUDE + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_keyboard_interrupt_stops_work_promptly_and_pool_stays_usable() -> None:
    out = run_script(
        """
        ex = ProcessExecutor(2)
        flow = Workflow(executor=ex).register(S.A, spin, config=TaskConfig.minimal())
        flow.add_exit_state(S.DONE)
        threading.Timer(0.8, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        store = SharedStore()
        t0 = time.monotonic()
        try:
            flow.orchestrate(S.A, store=store)
        except KeyboardInterrupt:
            print("interrupted after", round(time.monotonic() - t0, 2))
        stopped = time.monotonic()
        ok = Workflow(executor=ex).register(S.A, quick).add_exit_state(S.DONE)
        print("after", ok.orchestrate(S.A, store=store).name, "big" in store)
        print("took", round(time.monotonic() - stopped, 2))
        """
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("interrupted after")
    assert float(lines[0].split()[-1]) < 3
    assert lines[1] == "after DONE False"


def test_no_orphans_or_shared_memory_after_a_killed_driver() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SCRIPT_PRELUDE
            + textwrap.dedent(
                """
                from cano_mp._store import shm as _shm
                ex = ProcessExecutor(2).warm()
                flow = Workflow(executor=ex).register(S.A, spin, config=TaskConfig.minimal())
                flow.add_exit_state(S.DONE)
                store = SharedStore()
                store["x"] = np.ones(1_000_000)
                print(os.path.dirname(store._dirs[0] or store._dirs[1]), flush=True)
                flow.orchestrate(S.A, store=store)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    owner_dir = proc.stdout.readline().strip()
    time.sleep(1.5)  # the spin task is running in a worker
    parent = psutil.Process(proc.pid)
    workers = [
        c for c in parent.children(recursive=True) if "cano_mp-worker" in " ".join(c.cmdline())
    ]
    assert workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, "workers outlived their killed driver"
    from cano_mp._store import janitor

    # Any cano_mp process started since the kill (another test run on this machine) runs the
    # janitor too and may have swept the directory already; a broken janitor leaves it either way.
    if os.path.isdir(owner_dir):
        janitor.run_janitor(force=True)
    assert not os.path.exists(owner_dir)


def test_interpreter_exit_leaves_no_workers_and_no_shared_memory() -> None:
    out = run_script(
        """
        from cano_mp._store import shm as _shm
        ex = ProcessExecutor(2).warm()
        store = SharedStore()
        store["x"] = np.ones(1_000_000)
        flow = Workflow(executor=ex).register(S.A, quick).add_exit_state(S.DONE)
        flow.orchestrate(S.A, store=store)
        time.sleep(0.5)
        print(" ".join(str(p) for p in ex.worker_pids()))
        print(_shm.process_dirs()[0])
        """
    )
    assert out.returncode == 0, out.stderr
    pids_line, shm_dir = out.stdout.splitlines()[:2]
    pids = [int(p) for p in pids_line.split()]
    assert pids
    deadline = time.monotonic() + 5
    while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(psutil.pid_exists(p) for p in pids)
    assert not os.path.exists(shm_dir)


_INIT_VALUE: list[str] = []


def set_init_value(value: str) -> None:
    _INIT_VALUE.append(value)


def read_init_value(store: SharedStore) -> S:
    store["init"] = list(_INIT_VALUE)
    return S.DONE


def failing_initializer() -> None:
    raise RuntimeError("no database connection")


def test_initializer_runs_once_in_each_worker() -> None:
    ex = ProcessExecutor(1, initializer=set_init_value, initargs=("ready",), reuse=False)
    with ex, SharedStore() as store:
        one_state(ex, read_init_value).orchestrate(S.A, store=store)
        one_state(ex, read_init_value).orchestrate(S.A, store=store)
        assert store["init"] == ["ready"]


def test_failing_initializer_is_a_clear_error() -> None:
    ex = ProcessExecutor(1, initializer=failing_initializer, reuse=False)
    with ex, pytest.raises(Exception, match="no database connection"):
        one_state(ex, quick_ok).orchestrate(S.A)


def test_keyboard_interrupt_during_a_split_stops_every_branch() -> None:
    out = run_script(
        """
        import psutil
        from cano_mp import JoinConfig, JoinStrategy
        ex = ProcessExecutor(2).warm()
        flow = Workflow(executor=ex).register_split(
            S.A, [spin, spin, spin], JoinConfig(JoinStrategy.all(), S.DONE)
        ).add_exit_state(S.DONE)
        store = SharedStore()
        threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        t0 = time.monotonic()
        try:
            flow.orchestrate(S.A, store=store)
        except KeyboardInterrupt:
            print("interrupted after", round(time.monotonic() - t0, 2))
        time.sleep(0.5)
        busy = [p for p in ex.worker_pids() if psutil.Process(p).cpu_percent(0.3) > 50]
        print("busy workers", len(busy))
        ok = Workflow(executor=ex).register(S.A, quick).add_exit_state(S.DONE)
        print("after", ok.orchestrate(S.A, store=store).name, "big" in store)
        store.close()
        """
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("interrupted after") and float(lines[0].split()[-1]) < 3
    assert lines[1] == "busy workers 0"  # no branch keeps spinning
    assert lines[2] == "after DONE False"
