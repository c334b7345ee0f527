"""RetryPolicy and TaskConfig: pure values, validated when constructed."""

from __future__ import annotations

from datetime import timedelta

import pytest

from cano_mp import ConfigError, RetryPolicy, TaskConfig


def test_none_has_one_attempt() -> None:
    p = RetryPolicy.none()
    assert p.max_attempts == 1
    assert p.delay_for_attempt(0) is None


def test_fixed_delays_then_none() -> None:
    p = RetryPolicy.fixed(2, 0.5)
    assert p.max_attempts == 3
    assert [p.delay_for_attempt(i) for i in range(3)] == [0.5, 0.5, None]


def test_exponential_without_jitter_doubles_and_caps() -> None:
    p = RetryPolicy.exponential(5, base_delay=0.1, multiplier=2.0, max_delay=0.5, jitter=0)
    delays = [p.delay_for_attempt(i) for i in range(5)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert p.delay_for_attempt(5) is None


def test_exponential_jitter_stays_within_bounds() -> None:
    p = RetryPolicy.exponential(3, base_delay=1.0, multiplier=2.0, max_delay=100, jitter=0.25)
    for attempt, base in enumerate([1.0, 2.0, 4.0]):
        for _ in range(200):
            d = p.delay_for_attempt(attempt)
            assert d is not None
            assert base * 0.75 <= d <= base * 1.25


def test_huge_attempt_numbers_do_not_overflow() -> None:
    p = RetryPolicy.exponential(10_000, base_delay=1, max_delay=7, jitter=0)
    assert p.delay_for_attempt(5_000) == 7


def test_default_config_is_exponential_three_retries() -> None:
    cfg = TaskConfig()
    assert cfg.retry.max_attempts == 4
    assert cfg.timeout is None and cfg.inline is False
    assert TaskConfig.minimal().retry.max_attempts == 1


def test_timedelta_accepted() -> None:
    assert RetryPolicy.fixed(1, timedelta(milliseconds=250)).delay_for_attempt(0) == 0.25
    assert TaskConfig(timeout=timedelta(seconds=2)).timeout == 2.0


@pytest.mark.parametrize(
    "build",
    [
        lambda: RetryPolicy.fixed(-1, 0.1),
        lambda: RetryPolicy.fixed(1, -0.1),
        lambda: RetryPolicy.exponential(2, base_delay=-1),
        lambda: RetryPolicy.exponential(2, max_delay=-1),
        lambda: RetryPolicy.exponential(2, jitter=1.5),
        lambda: RetryPolicy.exponential(2, jitter=-0.1),
        lambda: RetryPolicy.exponential(2, multiplier=0.5),
        lambda: RetryPolicy.fixed(1.5, 0.1),  # type: ignore[arg-type]
        lambda: TaskConfig(timeout=0),
        lambda: TaskConfig(timeout=-3),
        lambda: TaskConfig(timeout=float("nan")),
        lambda: TaskConfig(retry="3"),  # type: ignore[arg-type]
    ],
)
def test_invalid_values_raise_config_error(build: object) -> None:
    with pytest.raises(ConfigError):
        build()  # type: ignore[operator]
