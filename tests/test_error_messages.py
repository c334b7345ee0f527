"""Errors that say what happened (issue 13): an unknown state from a script's own Enum, a
huge returned value, sys.exit() in a task, an exception that cannot be rebuilt."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from enum import Enum
from pathlib import Path

import pytest

from cano_mp import (
    InlineExecutor,
    ProcessExecutor,
    RemoteError,
    SharedStore,
    TaskConfig,
    TaskError,
    TransitionError,
    Workflow,
    task,
)

ROOT = Path(__file__).resolve().parent.parent


class S(Enum):
    A = 1
    DONE = 2


def run_script(path: Path, body: str) -> subprocess.CompletedProcess[str]:
    path.write_text(textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


@pytest.mark.parametrize("executor", ["process", "inline"])
def test_an_unknown_state_of_a_main_enum_is_a_transition_error_at_once(
    tmp_path: Path, executor: str
) -> None:
    out = run_script(
        tmp_path / "flow.py",
        f"""
        from enum import Enum
        from cano_mp import Workflow, TransitionError, Observer

        class S(Enum):
            A = 1
            DONE = 2
            ELSEWHERE = 3

        class Count(Observer):
            attempts = 0
            def on_task_start(self, run, state, name, attempt):
                Count.attempts += 1

        def a(store):
            return S.ELSEWHERE

        flow = Workflow(executor={executor!r}, observers=[Count()])
        flow.register(S.A, a).add_exit_state(S.DONE)
        try:
            flow.orchestrate(S.A)
        except TransitionError as e:
            print("TransitionError:", e)
            print("attempts:", Count.attempts)
        """,
    )
    assert out.returncode == 0, out.stderr
    assert "TransitionError: task 'a' returned S.ELSEWHERE, which is neither" in out.stdout
    assert "attempts: 1" in out.stdout  # not retried: a programming error


def huge(store: SharedStore) -> object:
    return "x" * 10_000_000


@pytest.mark.parametrize("kind", ["process", "inline"])
def test_transition_error_caps_the_returned_value(kind: str, pool: ProcessExecutor) -> None:
    executor = pool if kind == "process" else InlineExecutor()
    flow = Workflow(executor=executor).register(S.A, huge).add_exit_state(S.DONE)
    with SharedStore() as store, pytest.raises(TransitionError) as info:
        flow.orchestrate(S.A, store=store)
    assert len(str(info.value)) < 1000


def exits(store: SharedStore) -> S:
    sys.exit(0)


@pytest.mark.parametrize("kind", ["process", "inline"])
def test_sys_exit_in_a_task_says_so(kind: str, pool: ProcessExecutor) -> None:
    executor = pool if kind == "process" else InlineExecutor()
    flow = Workflow(executor=executor)
    flow.register(S.A, exits, config=TaskConfig.minimal()).add_exit_state(S.DONE)
    with SharedStore() as store, pytest.raises(TaskError) as info:
        flow.orchestrate(S.A, store=store)
    assert "the task called sys.exit(0)" in str(info.value)
    assert "Traceback" not in str(info.value)


class NeedsArgs(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"needs {a} and {b}")


@task(retry=TaskConfig.minimal().retry)
def raises_unrebuildable(store: SharedStore) -> S:
    raise NeedsArgs(1, 2)


def test_an_exception_that_cannot_be_rebuilt_keeps_its_type_and_message(
    pool: ProcessExecutor,
) -> None:
    flow = Workflow(executor=pool).register(S.A, raises_unrebuildable).add_exit_state(S.DONE)
    with SharedStore() as store, pytest.raises(TaskError) as info:
        flow.orchestrate(S.A, store=store)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteError)
    assert "NeedsArgs" in cause.type_name and "needs 1 and 2" in str(cause)
    assert os.getpid()  # the pool is still usable:
    ok = Workflow(executor=pool).register(S.A, lambda st: S.DONE).add_exit_state(S.DONE)
    assert ok.orchestrate(S.A) is S.DONE


def test_worker_tracebacks_show_the_users_file_and_source(tmp_path: Path) -> None:
    script = tmp_path / "flow.py"
    out = run_script(
        script,
        """
        from enum import Enum
        from cano_mp import Workflow, TaskError, TaskConfig

        class S(Enum):
            A = 1
            DONE = 2

        def helper(x):
            return 1 / x  # the failing line

        def a(store):
            return helper(0)

        flow = Workflow().register(S.A, a, config=TaskConfig.minimal()).add_exit_state(S.DONE)
        try:
            flow.orchestrate(S.A)
        except TaskError as e:
            print(e.remote_traceback)
        """,
    )
    assert out.returncode == 0, out.stderr
    assert f'File "{script}", line 10, in helper' in out.stdout
    assert "return 1 / x  # the failing line" in out.stdout
    assert "<dynamic-code>" not in out.stdout


def writes_late(store: SharedStore) -> S:
    import time

    import numpy as np

    time.sleep(1.0)
    store["late"] = np.ones(1_000_000)
    return S.DONE


def test_closing_the_store_while_a_task_runs_says_so(pool: ProcessExecutor) -> None:
    import threading

    store = SharedStore()
    flow = Workflow(executor=pool)
    flow.register(S.A, writes_late, config=TaskConfig.minimal()).add_exit_state(S.DONE)
    closer = threading.Timer(0.3, store.close)
    closer.start()
    try:
        with pytest.raises(Exception) as info:
            flow.orchestrate(S.A, store=store)
    finally:
        closer.join()
        store.close()
    text = f"{info.value} {info.value.__cause__}"
    assert "store was closed" in text, text
    assert "cannot be pickled" not in text
