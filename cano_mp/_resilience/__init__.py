"""Resilience shared across the processes of a pool: circuit breakers and rate limiters
(state in shared memory, see :mod:`.shared`), and per-process resources."""

from __future__ import annotations

from .breaker import CircuitBreaker
from .limiter import Limiter, MultiRateLimiter, RateLimiter, WindowedRateLimiter

__all__ = [
    "CircuitBreaker",
    "Limiter",
    "MultiRateLimiter",
    "RateLimiter",
    "WindowedRateLimiter",
]
