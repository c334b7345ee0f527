"""TaskConfig(rate_limit=..., circuit_breaker=...): the engine waits for tokens in the driver
before it sends an attempt (no slot held, the wait not counted in the timeout) and fails an
attempt at once while its breaker is open, letting the retry policy decide."""

from __future__ import annotations

import os
import time
from enum import Enum, auto
from pathlib import Path
from typing import Any

import pytest

from cano_mp import (
    BatchTask,
    CircuitBreaker,
    CircuitOpen,
    InlineExecutor,
    ItemFailure,
    JoinConfig,
    JoinStrategy,
    Observer,
    ProcessExecutor,
    RateLimiter,
    RetryPolicy,
    RunInfo,
    SharedStore,
    Task,
    TaskConfig,
    TaskError,
    TaskTimeout,
    Workflow,
)


class S(Enum):
    GO = auto()
    DONE = auto()


class Seen(Observer):
    def __init__(self) -> None:
        self.rate_waits: list[tuple[str, str, float]] = []
        self.refused: list[tuple[str, str]] = []
        self.attempts: list[tuple[str, int, str | None]] = []

    def on_rate_wait(self, run: RunInfo, state: Any, task_name: str, limiter: str, delay: float):
        self.rate_waits.append((task_name, limiter, delay))

    def on_circuit_open(self, run: RunInfo, state: Any, task_name: str, breaker: str) -> None:
        self.refused.append((task_name, breaker))

    def on_task_end(self, run, state, task_name, attempt, *, error, duration) -> None:  # type: ignore[no-untyped-def]
        self.attempts.append((task_name, attempt, type(error).__name__ if error else None))


class Quick(Task[S]):
    def __init__(self, tag: int, config: TaskConfig) -> None:
        self.tag, self.config = tag, config

    def run(self, store: SharedStore) -> S:
        store[f"t{self.tag}"] = time.monotonic()
        return S.DONE


def test_a_split_is_paced_by_its_rate_limit_and_the_wait_is_not_its_timeout(
    pool: ProcessExecutor,
) -> None:
    # The last branches wait 2.5 s for their token: far past their 1 s timeout.
    limiter = RateLimiter(rate=2, burst=1, name="engine-split-test")
    cfg = TaskConfig(retry=RetryPolicy.none(), timeout=1.0, rate_limit=limiter)
    seen = Seen()

    def flow(config: TaskConfig) -> Workflow[S]:
        branches = [Quick(i, config) for i in range(6)]
        return (
            Workflow(start=S.GO, executor=pool, observers=[seen])
            .register_split(S.GO, branches, JoinConfig(JoinStrategy.all(), S.DONE))
            .add_exit_state(S.DONE)
        )

    flow(TaskConfig()).orchestrate()  # warm workers: the timeout is for the calls alone
    started = time.monotonic()
    with SharedStore() as store:
        assert flow(cfg).orchestrate(store=store) is S.DONE  # none timed out while waiting
    assert time.monotonic() - started >= (6 - 1) / 2 - 0.05
    assert limiter.stats["admitted"] == 6
    assert seen.rate_waits and all(lim == "engine-split-test" for _t, lim, _d in seen.rate_waits)


@pytest.mark.parametrize("executor", ["process", "inline"])
def test_a_plain_task_waits_for_tokens(executor: str, pool: ProcessExecutor) -> None:
    limiter = RateLimiter(rate=10, burst=1)
    limiter.acquire()  # empty: the task must wait ~0.1 s
    ex = pool if executor == "process" else InlineExecutor()
    flow = (
        Workflow(start=S.GO, executor=ex)
        .register(S.GO, Quick(0, TaskConfig(rate_limit=limiter)))
        .add_exit_state(S.DONE)
    )
    started = time.monotonic()
    flow.orchestrate()
    assert time.monotonic() - started >= 0.08
    assert limiter.stats["admitted"] == 2


class Down(Task[S]):
    """Always fails; counts its real runs in a file (refused attempts never run)."""

    def __init__(self, config: TaskConfig, counter: str, sleep: float = 0.0) -> None:
        self.config, self.counter, self.sleep = config, counter, sleep

    def run(self, store: SharedStore) -> S:
        with open(self.counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(self.sleep)
        raise ConnectionError("the service is down")


@pytest.mark.parametrize("executor", ["process", "inline"])
def test_an_open_breaker_fails_attempts_at_once_and_they_count(
    executor: str, pool: ProcessExecutor, tmp_path: Path
) -> None:
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=60.0)
    counter = str(tmp_path / "runs")
    cfg = TaskConfig(retry=RetryPolicy.fixed(4, 0.01), circuit_breaker=breaker)
    seen = Seen()
    ex = pool if executor == "process" else InlineExecutor()
    flow = (
        Workflow(start=S.GO, executor=ex, observers=[seen])
        .register(S.GO, Down(cfg, counter))
        .add_exit_state(S.DONE)
    )
    with pytest.raises(CircuitOpen) as info:
        flow.orchestrate()
    assert Path(counter).read_text().count("\n") == 2  # attempts 3..5 were never sent
    assert info.value.attempts == 5
    assert "was not started" in str(info.value) and info.value.task_name == "Down"
    assert [e for _t, _a, e in seen.attempts] == ["ConnectionError"] * 2 + ["CircuitOpen"] * 3
    assert len(seen.refused) == 3
    assert breaker.state == "open"


def test_timeouts_count_as_breaker_failures(pool: ProcessExecutor, tmp_path: Path) -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=60.0)
    cfg = TaskConfig(retry=RetryPolicy.none(), timeout=0.2, circuit_breaker=breaker)
    flow = (
        Workflow(start=S.GO, executor=pool)
        .register(S.GO, Down(cfg, str(tmp_path / "runs"), sleep=10))
        .add_exit_state(S.DONE)
    )
    with pytest.raises(TaskTimeout):
        flow.orchestrate()
    assert breaker.state == "open"


def test_a_success_closes_a_half_open_breaker(pool: ProcessExecutor) -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=0.1)
    breaker.failure()
    time.sleep(0.15)
    flow = (
        Workflow(start=S.GO, executor=pool)
        .register(S.GO, Quick(0, TaskConfig(circuit_breaker=breaker)))
        .add_exit_state(S.DONE)
    )
    flow.orchestrate()
    assert breaker.state == "closed"


class Items(BatchTask[S, int, int]):
    next_states = (S.DONE,)
    on_error = "collect"

    def __init__(self, n: int, config: TaskConfig, fail_from: int | None = None) -> None:
        self.n, self.config, self.fail_from = n, config, fail_from

    def load(self, store: SharedStore) -> list[int]:
        return list(range(self.n))

    def process(self, item: int) -> int:
        if self.fail_from is not None and item >= self.fail_from:
            raise ConnectionError(f"item {item}: down")
        return item * 2

    def finish(self, store: SharedStore, results: list[Any]) -> S:
        store["results"] = results
        return S.DONE


@pytest.mark.parametrize("executor", ["process", "inline"])
def test_batch_items_take_one_token_each(executor: str, pool: ProcessExecutor) -> None:
    limiter = RateLimiter(rate=40, burst=5)
    ex = pool if executor == "process" else InlineExecutor()
    flow = (
        Workflow(start=S.GO, executor=ex)
        .register(S.GO, Items(30, TaskConfig(rate_limit=limiter)))
        .add_exit_state(S.DONE)
    )
    started = time.monotonic()
    with SharedStore() as store:
        flow.orchestrate(store=store)
        assert store["results"] == [i * 2 for i in range(30)]
    assert time.monotonic() - started >= (30 - 5) / 40 - 0.05
    assert limiter.stats["admitted"] == 30


def test_batch_items_are_refused_once_their_breaker_opens(pool: ProcessExecutor) -> None:
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=60.0)
    cfg = TaskConfig(retry=RetryPolicy.none(), circuit_breaker=breaker)
    # one item per chunk, one chunk at a time: the items after the third failure are refused
    task = Items(10, cfg, fail_from=2)
    task.chunk_size, task.max_parallel = 1, 1  # type: ignore[misc]
    flow = Workflow(start=S.GO, executor=pool).register(S.GO, task).add_exit_state(S.DONE)
    with SharedStore() as store:
        flow.orchestrate(store=store)
        results = store["results"]
    assert results[:2] == [0, 2]
    errors = [type(r.error).__name__ for r in results[2:] if isinstance(r, ItemFailure)]
    assert errors == ["ConnectionError"] * 3 + ["CircuitOpen"] * 5
    assert breaker.stats["refused"] == 5


def test_task_config_checks_its_types() -> None:
    with pytest.raises(Exception, match="circuit_breaker must be"):
        TaskConfig(circuit_breaker="api")  # type: ignore[arg-type]
    with pytest.raises(Exception, match="rate_limit must be"):
        TaskConfig(rate_limit=5)  # type: ignore[arg-type]
    assert issubclass(CircuitOpen, TaskError)
