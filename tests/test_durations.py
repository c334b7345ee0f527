"""Every duration is checked when given: seconds or a timedelta; ``inf`` is "no limit" where
that makes sense (else a ConfigError); ``nan`` and negatives are a ConfigError."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import timedelta
from enum import Enum, auto
from typing import Any

import pytest

from cano_mp import (
    ConcurrentWorkflow,
    ConfigError,
    JoinConfig,
    JoinStrategy,
    RetryPolicy,
    SharedStore,
    TaskConfig,
    WaitStrategy,
    Workflow,
    task,
)

NAN, INF = math.nan, math.inf


class S(Enum):
    A = auto()
    B = auto()
    DONE = auto()


# Each builder makes the object with one duration set to the given value.
BUILDERS: dict[str, Callable[[Any], object]] = {
    "Workflow(timeout)": lambda v: Workflow(timeout=v),
    "Workflow(cancel_grace)": lambda v: Workflow(cancel_grace=v),
    "TaskConfig(timeout)": lambda v: TaskConfig(timeout=v),
    "@task(timeout)": lambda v: task(timeout=v)(lambda store: S.DONE),
    "JoinConfig(timeout)": lambda v: JoinConfig(JoinStrategy.all(), S.DONE, timeout=v),
    "RetryPolicy.fixed(delay)": lambda v: RetryPolicy.fixed(2, v),
    "RetryPolicy.exponential(base_delay)": lambda v: RetryPolicy.exponential(2, base_delay=v),
    "RetryPolicy.exponential(max_delay)": lambda v: RetryPolicy.exponential(2, max_delay=v),
    "WaitStrategy.duration": lambda v: WaitStrategy.duration(v),
    "WaitStrategy.quota_or_duration": lambda v: WaitStrategy.quota_or_duration(2, v),
}
# Where inf reads as "no limit" (or "no cap"); everywhere else it is a ConfigError.
INF_MEANS_NO_LIMIT = {
    "Workflow(timeout)",
    "TaskConfig(timeout)",
    "@task(timeout)",
    "JoinConfig(timeout)",
    "RetryPolicy.exponential(max_delay)",
    "WaitStrategy.duration",
    "WaitStrategy.quota_or_duration",
}


@pytest.mark.parametrize("where", BUILDERS)
@pytest.mark.parametrize("bad", [NAN, -1, -0.001, -INF, timedelta(seconds=-1)])
def test_nan_and_negative_durations_are_config_errors(where: str, bad: object) -> None:
    with pytest.raises(ConfigError):
        BUILDERS[where](bad)


@pytest.mark.parametrize("where", BUILDERS)
def test_inf_is_no_limit_where_that_makes_sense_else_a_config_error(where: str) -> None:
    if where in INF_MEANS_NO_LIMIT:
        BUILDERS[where](INF)
    else:
        with pytest.raises(ConfigError):
            BUILDERS[where](INF)


@pytest.mark.parametrize("where", BUILDERS)
def test_timedelta_is_accepted_everywhere(where: str) -> None:
    BUILDERS[where](timedelta(milliseconds=1500))


def test_infinite_limits_are_stored_as_none() -> None:
    assert Workflow(timeout=INF).timeout is None
    assert TaskConfig(timeout=INF) == TaskConfig()
    assert task(timeout=INF)(lambda store: S.DONE).config.timeout is None
    assert JoinConfig(JoinStrategy.all(), S.DONE, timeout=INF).timeout is None
    assert WaitStrategy.duration(INF) == WaitStrategy.forever()
    assert WaitStrategy.quota_or_duration(3, INF) == WaitStrategy.quota(3)


def test_timedeltas_become_seconds() -> None:
    td = timedelta(milliseconds=1500)
    assert Workflow(timeout=td).timeout == 1.5
    assert Workflow(cancel_grace=td).cancel_grace == 1.5
    assert JoinConfig(JoinStrategy.all(), S.DONE, timeout=td).timeout == 1.5
    assert WaitStrategy.duration(td).seconds == 1.5
    assert RetryPolicy.exponential(2, base_delay=td, max_delay=td).max_delay == 1.5


def test_zero_cancel_grace_and_retry_delay_are_valid_but_zero_limits_are_not() -> None:
    assert Workflow(cancel_grace=0).cancel_grace == 0.0
    assert RetryPolicy.fixed(1, 0).delay_for_attempt(0) == 0.0
    for build in (
        lambda: Workflow(timeout=0),
        lambda: TaskConfig(timeout=0),
        lambda: JoinConfig(JoinStrategy.all(), S.DONE, timeout=0),
        lambda: WaitStrategy.duration(0),
    ):
        with pytest.raises(ConfigError):
            build()


def test_cancel_grace_inf_is_a_config_error_that_says_why() -> None:
    with pytest.raises(ConfigError, match="cancel_grace must be a finite"):
        Workflow(cancel_grace=INF)


def test_partial_timeout_needs_a_finite_join_timeout() -> None:
    with pytest.raises(ConfigError, match="partial_timeout"):
        JoinConfig(JoinStrategy.partial_timeout(), S.DONE, timeout=INF)


def test_non_numbers_are_config_errors() -> None:
    for build in (
        lambda: Workflow(timeout="10"),  # type: ignore[arg-type]
        lambda: Workflow(cancel_grace=None),  # type: ignore[arg-type]
        lambda: TaskConfig(timeout=True),
        lambda: WaitStrategy.duration(None),  # type: ignore[arg-type]
        lambda: RetryPolicy.exponential(2, multiplier=INF),
        lambda: RetryPolicy.exponential(2, multiplier=NAN),
        lambda: RetryPolicy.exponential(2, jitter=NAN),
    ):
        with pytest.raises(ConfigError):
            build()


def test_an_uncapped_exponential_delay_stays_finite() -> None:
    policy = RetryPolicy.exponential(5_000, base_delay=1, max_delay=INF, jitter=0.5)
    assert policy.delay_for_attempt(3) == pytest.approx(8, rel=0.5)
    huge = policy.delay_for_attempt(4_000)  # 2**4000 overflows a float
    assert huge is not None and math.isfinite(huge) and huge > 1e6


# -- at run time, an infinite limit behaves exactly as None ----------------------------------


@task(next=(S.B,))
def first(store: SharedStore) -> S:
    store.append("trail", "A")
    return S.B


@task(next=(S.DONE,))
def second(store: SharedStore) -> S:
    store.append("trail", "B")
    return S.DONE


def test_infinite_timeouts_run_as_no_limit(executor: object, store: SharedStore) -> None:
    flow = (
        Workflow(start=S.A, executor=executor, timeout=INF)  # type: ignore[arg-type]
        .register(S.A, first, config=TaskConfig(timeout=INF, retry=RetryPolicy.none()))
        .register_split(
            S.B,
            [second, second],
            JoinConfig(JoinStrategy.all(), S.DONE, timeout=INF),
        )
        .add_exit_state(S.DONE)
    )
    assert flow.orchestrate(store=store) is S.DONE
    assert store["trail"] == ["A", "B", "B"]


def nap(store: SharedStore) -> S:
    time.sleep(0.2)  # the driver waits on its deadlines meanwhile
    return S.DONE


@pytest.mark.parametrize(
    "build",
    [
        lambda ex: Workflow(executor=ex, timeout=INF).register(S.A, nap),
        lambda ex: Workflow(executor=ex).register_split(
            S.A, [nap], JoinConfig(JoinStrategy.all(), S.DONE, timeout=INF)
        ),
    ],
    ids=["workflow timeout", "join timeout"],
)
def test_an_infinite_deadline_does_not_overflow_the_driver_wait(
    pool: object, build: Callable[[object], Workflow[S]]
) -> None:
    assert build(pool).add_exit_state(S.DONE).orchestrate(S.A) is S.DONE


def test_infinite_wait_strategy_runs_every_instance(executor: object) -> None:
    flow = (
        Workflow(start=S.A, executor=executor)  # type: ignore[arg-type]
        .register(S.A, first)
        .register(S.B, second)
        .add_exit_state(S.DONE)
    )
    with ConcurrentWorkflow(flow).execute(3, wait=WaitStrategy.duration(INF)) as result:
        assert result.completed == 3 and result.cancelled == 0
