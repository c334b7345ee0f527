"""PollTask: one call per poll, the driver asleep in between, a whole-wait timeout."""

from __future__ import annotations

import enum
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Literal

import pytest

from cano_mp import (
    ConfigError,
    InlineExecutor,
    PollTask,
    ProcessExecutor,
    RetryPolicy,
    SharedStore,
    TaskConfig,
    TaskError,
    TaskTimeout,
    TransitionError,
    Workflow,
)


class S(enum.Enum):
    WAIT = 1
    FOUND = 2
    DONE = 3


@pytest.fixture(params=["process", "inline"])
def ex(request: pytest.FixtureRequest, pool: ProcessExecutor) -> Any:
    return pool if request.param == "process" else InlineExecutor()


class WaitForFile(PollTask[S]):
    interval = 0.05
    timeout = 30.0

    def __init__(self, path: Path, log: Path, fail_first: int = 0) -> None:
        self.path, self.log, self.fail_first = path, log, fail_first

    def poll(self, store: SharedStore) -> S | None:
        with self.log.open("a") as f:
            f.write(f"{os.getpid()}\n")
        store["seen_by"] = os.getpid()  # kept only from the poll that returns a state
        store.append("polls", 1)
        if len(self.log.read_text().splitlines()) <= self.fail_first:
            raise RuntimeError("the service is down")
        return S.FOUND if self.path.exists() else None


def flow(ex: Any, task: Any) -> Workflow[S]:
    return (
        Workflow(start=S.WAIT, executor=ex)
        .register(S.WAIT, task)
        .register(S.FOUND, lambda s: S.DONE)
        .add_exit_state(S.DONE)
    )


def polls(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_polls_until_a_file_appears(ex: Any, tmp_path: Path) -> None:
    target, log = tmp_path / "ready", tmp_path / "log"
    stop = threading.Event()

    def appear_after_two_polls() -> None:
        while not stop.is_set() and len(polls(log)) < 2:
            time.sleep(0.01)
        target.touch()

    maker = threading.Thread(target=appear_after_two_polls)
    maker.start()
    try:
        wf = flow(ex, WaitForFile(target, log))
        assert wf.orchestrate() == S.DONE
    finally:
        stop.set()
        maker.join()
    assert len(polls(log)) >= 2  # it said "not yet" at least once
    assert wf.store["polls"] == [1]  # only the last poll's writes were committed
    remote = isinstance(ex, ProcessExecutor)
    assert (wf.store["seen_by"] != os.getpid()) is remote  # each poll is a call in the pool


def test_the_whole_wait_times_out(ex: Any, tmp_path: Path) -> None:
    class Never(WaitForFile):
        interval = 0.05
        timeout = 0.5

    wf = flow(ex, Never(tmp_path / "never", tmp_path / "log"))
    started = time.monotonic()
    with pytest.raises(TaskTimeout, match="no state after") as info:
        wf.orchestrate()
    took = time.monotonic() - started
    assert 0.45 <= took < 15.0
    assert info.value.attempts == len(polls(tmp_path / "log")) >= 1


def test_a_poll_running_past_the_wait_is_stopped(pool: ProcessExecutor, tmp_path: Path) -> None:
    class Slow(PollTask[S]):
        timeout = 0.5

        def poll(self, store: SharedStore) -> S | None:
            time.sleep(60)
            return S.FOUND

    started = time.monotonic()
    with pytest.raises(TaskTimeout, match="poll task 'Slow'"):
        flow(pool, Slow()).orchestrate()
    assert time.monotonic() - started < 15.0


def test_a_raising_poll_is_retried_per_config(ex: Any, tmp_path: Path) -> None:
    target, log = tmp_path / "ready", tmp_path / "log"
    target.touch()

    class Flaky(WaitForFile):
        config = TaskConfig(retry=RetryPolicy.fixed(2, 0.0))

    assert flow(ex, Flaky(target, log, fail_first=2)).orchestrate() == S.DONE
    assert len(polls(log)) == 3  # two failures retried, the third found it

    log.unlink()
    with pytest.raises(TaskError, match="the service is down") as info:
        flow(ex, Flaky(target, log, fail_first=3)).orchestrate()
    assert not isinstance(info.value, TaskTimeout)
    assert info.value.attempts == 3 and len(polls(log)) == 3


def test_retries_stop_at_the_end_of_the_wait(ex: Any, tmp_path: Path) -> None:
    class Down(WaitForFile):
        timeout = 0.6
        config = TaskConfig(retry=RetryPolicy.fixed(1000, 0.1))

    started = time.monotonic()
    with pytest.raises(TaskTimeout, match="no state after") as info:
        flow(ex, Down(tmp_path / "x", tmp_path / "log", fail_first=10**6)).orchestrate()
    assert time.monotonic() - started < 15.0
    assert isinstance(info.value.__cause__, RuntimeError)  # the last poll's own error
    assert 1 <= len(polls(tmp_path / "log")) <= 10


def test_config_inline_polls_in_the_driver(pool: ProcessExecutor, tmp_path: Path) -> None:
    target, log = tmp_path / "ready", tmp_path / "log"
    target.touch()

    class Here(WaitForFile):
        config = TaskConfig(inline=True)

    wf = flow(pool, Here(target, log))
    assert wf.orchestrate() == S.DONE
    assert polls(log) == [os.getpid()] and wf.store["seen_by"] == os.getpid()


def test_no_pool_slot_is_held_between_polls(tmp_path: Path) -> None:
    """On a 1-worker pool, another flow's task runs while the poll waits (it makes the file
    the poll waits for: holding the only worker would deadlock until the timeout)."""
    target, log = tmp_path / "ready", tmp_path / "log"

    def make_file(store: SharedStore) -> S:
        target.touch()
        store["made_by"] = os.getpid()
        return S.DONE

    with ProcessExecutor(max_workers=1, reuse=False) as one:
        waiting = flow(one, WaitForFile(target, log))
        result: list[Any] = []
        t = threading.Thread(target=lambda: result.append(waiting.orchestrate()))
        t.start()
        while not polls(log):  # the poll is waiting
            time.sleep(0.01)
        maker = Workflow(start=S.WAIT, executor=one).register(S.WAIT, make_file)
        assert maker.add_exit_state(S.DONE).orchestrate() == S.DONE
        t.join(30)
        assert result == [S.DONE]
        assert maker.store["made_by"] == waiting.store["seen_by"] != os.getpid()


def test_interval_and_timeout_are_checked(tmp_path: Path) -> None:
    for interval, timeout in [(math.nan, None), (-1.0, None), (1.0, -2.0), (1.0, math.nan)]:

        class Bad(WaitForFile):
            pass

        Bad.interval, Bad.timeout = interval, timeout
        with pytest.raises(ConfigError):
            flow(InlineExecutor(), Bad(tmp_path / "x", tmp_path / "log"))

    class NoLimit(WaitForFile):
        timeout = math.inf

    (tmp_path / "x").touch()
    assert flow(InlineExecutor(), NoLimit(tmp_path / "x", tmp_path / "l")).orchestrate() == S.DONE


class Annotated(PollTask[S]):
    """Declares its next states only through poll()'s return annotation."""

    interval = 0.01

    def __init__(self, answer: S, log: Path) -> None:
        self.answer, self.log = answer, log

    def poll(self, store: SharedStore) -> Literal[S.FOUND] | None:
        with self.log.open("a") as f:
            f.write(f"{os.getpid()}\n")
        first = len(polls(self.log)) < 2  # "not yet" once
        return None if first else self.answer  # type: ignore[return-value]


class TwoStates(PollTask[S]):
    def poll(self, store: SharedStore) -> Literal[S.FOUND, S.DONE] | None:
        return S.DONE


def test_poll_return_annotation_declares_the_next_states(ex: Any, tmp_path: Path) -> None:
    # Validation and the diagram see the Literal, as for Task.run, and "None" is not a state.
    found = Annotated(S.FOUND, tmp_path / "found")
    lonely = Workflow(start=S.WAIT).register(S.WAIT, found).add_exit_state(S.DONE)
    with pytest.raises(ConfigError, match="declares next state FOUND"):
        lonely.validate()
    mermaid = flow(ex, found).to_mermaid()
    assert "WAIT --> FOUND" in mermaid and "None" not in mermaid
    both = flow(ex, TwoStates()).to_mermaid()
    assert "WAIT --> FOUND" in both and "WAIT --> DONE" in both
    # At run time too: the declared states bind, after a "not yet" poll went through.
    assert flow(ex, found).orchestrate() is S.DONE
    assert len(polls(tmp_path / "found")) == 2
    with pytest.raises(TransitionError, match="does not declare"):
        flow(ex, Annotated(S.DONE, tmp_path / "done")).orchestrate()
    assert len(polls(tmp_path / "done")) == 2
    # An explicit next_states still wins over the annotation.
    explicit = Annotated(S.DONE, tmp_path / "explicit")
    explicit.next_states = (S.FOUND, S.DONE)
    assert flow(ex, explicit).orchestrate() is S.DONE
