"""Retry policies and per-task configuration: pure values, checked when constructed."""

from __future__ import annotations

import math
import random
import threading
from dataclasses import dataclass, field
from datetime import timedelta

from ._durations import limit, seconds, to_seconds
from ._errors import ConfigError
from ._public import public
from ._resilience import CircuitBreaker, Limiter

__all__ = ["RetryPolicy", "TaskConfig", "to_seconds"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often, and after which delays, a failed attempt is retried.

    Build one with :meth:`none`, :meth:`fixed` or :meth:`exponential`::

        RetryPolicy.exponential(3, base_delay=0.2)   # 4 attempts: waits ~0.2, 0.4, 0.8 s

    The exponential delay before retry ``k`` (0-based) is
    ``min(base_delay * multiplier**k, max_delay) * (1 ± jitter*U[-1, 1])``.
    """

    retries: int
    base_delay: float = 0.0
    multiplier: float = 1.0
    max_delay: float = 0.0
    jitter: float = 0.0
    _rng: random.Random = field(
        default_factory=random.Random, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ConfigError(f"retries must be an int >= 0, got {self.retries!r}")
        object.__setattr__(self, "base_delay", seconds(self.base_delay, "base_delay"))
        # No cap on the delay reads naturally as max_delay=math.inf.
        object.__setattr__(self, "max_delay", seconds(self.max_delay, "max_delay", inf=True))
        multiplier = _number(self.multiplier, "multiplier")
        if not 1.0 <= multiplier < math.inf:
            raise ConfigError(f"multiplier must be >= 1 and finite, got {self.multiplier!r}")
        object.__setattr__(self, "multiplier", multiplier)
        jitter = _number(self.jitter, "jitter")
        if not 0.0 <= jitter <= 1.0:
            raise ConfigError(f"jitter must be within [0, 1], got {self.jitter!r}")
        object.__setattr__(self, "jitter", jitter)

    @classmethod
    def none(cls) -> RetryPolicy:
        """No retries: one attempt."""
        return cls(0)

    @classmethod
    def fixed(cls, retries: int, delay: float | timedelta) -> RetryPolicy:
        """``retries`` retries, each after the same ``delay`` seconds."""
        wait = seconds(delay, "delay")
        return cls(retries, base_delay=wait, multiplier=1.0, max_delay=wait)

    @classmethod
    def exponential(
        cls,
        max_retries: int = 3,
        *,
        base_delay: float | timedelta = 0.1,
        multiplier: float = 2.0,
        max_delay: float | timedelta = 30.0,
        jitter: float = 0.1,
    ) -> RetryPolicy:
        """Up to ``max_retries`` retries with exponentially growing, jittered delays.

        ``max_delay=math.inf`` leaves the delay uncapped.
        """
        return cls(
            max_retries,
            base_delay=seconds(base_delay, "base_delay"),
            multiplier=multiplier,
            max_delay=seconds(max_delay, "max_delay", inf=True),
            jitter=jitter,
        )

    @property
    def max_attempts(self) -> int:
        """Total attempts: retries + 1."""
        return self.retries + 1

    def delay_for_attempt(self, attempt: int) -> float | None:
        """Delay before retrying after failed attempt ``attempt`` (0-based).

        ``None`` once the retries are spent.
        """
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        if attempt >= self.retries:
            return None
        try:
            raw = self.base_delay * self.multiplier**attempt
        except OverflowError:
            raw = math.inf
        delay = min(raw, self.max_delay)
        if self.jitter:
            delay *= 1.0 + self.jitter * self._rng.uniform(-1.0, 1.0)
        return min(max(0.0, delay), _LONGEST_DELAY)


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    return float(value)


# An uncapped exponential delay (max_delay=inf) still has to fit the platform's timers:
# waits longer than threading.TIMEOUT_MAX (~292 years on Linux) overflow.
_LONGEST_DELAY = threading.TIMEOUT_MAX / 4

_DEFAULT_RETRY = RetryPolicy.exponential(3)


@dataclass(frozen=True, slots=True)
class TaskConfig:
    """Retry policy, per-attempt timeout and placement of a task.

    ``timeout`` bounds each attempt: an attempt that overruns is stopped (cooperative flag,
    then its worker is terminated) and counts as a failed attempt (``TaskTimeout``).
    ``None`` or ``math.inf`` mean no limit (stored as ``None``); a ``timedelta`` is accepted.
    ``inline=True`` runs the task in the driver process instead of the pool.

    ``circuit_breaker`` is checked before each attempt (each item of a ``BatchTask``): while
    it is open the attempt fails at once with ``CircuitOpen`` and the retry policy decides,
    as for any failure; failed, timed-out and crashed attempts count as its failures.
    ``rate_limit`` (a ``RateLimiter``, ``WindowedRateLimiter`` or ``MultiRateLimiter``) is
    taken from in the driver before each attempt is sent (one per item of a batch): the
    wait holds no pool slot and does not count toward ``timeout``.
    """

    retry: RetryPolicy = _DEFAULT_RETRY
    timeout: float | None = None
    inline: bool = False
    circuit_breaker: CircuitBreaker | None = None
    rate_limit: Limiter | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.retry, RetryPolicy):
            raise ConfigError(f"retry must be a RetryPolicy, got {self.retry!r}")
        object.__setattr__(self, "timeout", limit(self.timeout, "timeout"))
        if not isinstance(self.inline, bool):
            raise ConfigError(f"inline must be a bool, got {self.inline!r}")
        if self.circuit_breaker is not None and not isinstance(
            self.circuit_breaker, CircuitBreaker
        ):
            raise ConfigError(
                f"circuit_breaker must be a CircuitBreaker, got {self.circuit_breaker!r}"
            )
        if self.rate_limit is not None and not isinstance(self.rate_limit, Limiter):
            raise ConfigError(
                "rate_limit must be a RateLimiter, WindowedRateLimiter or MultiRateLimiter, "
                f"got {self.rate_limit!r}"
            )

    @classmethod
    def minimal(cls) -> TaskConfig:
        """No retries, no timeout."""
        return cls(retry=RetryPolicy.none())


public(RetryPolicy, TaskConfig)
