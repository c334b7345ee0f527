"""Rate limiters shared by every process of a pool: a token bucket, a fixed window, and
several of them as tiers that all must allow a call.

Each limiter is a :class:`~.shared.SharedCell`. Taking is all-or-nothing under the cells'
locks (in one global order, so tiers never deadlock): a caller either takes ``n`` from every
tier or from none, and otherwise learns how long until all of them could give ``n``. That
wait is what :meth:`acquire` sleeps (no spinning) and what the engine sleeps on its run's
event, in the driver, before it sends a call: a waiting call holds no pool slot.
"""

from __future__ import annotations

import fcntl
import math
import os
import secrets
import time
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

from .._durations import seconds, to_seconds
from .._errors import ConfigError
from .._public import public
from .shared import STATE_AT, SharedCell, lock_all, unlock_all

_getpid = os.getpid
_monotonic = time.monotonic
_flock = fcntl.flock
_LOCK_EX, _LOCK_UN = fcntl.LOCK_EX, fcntl.LOCK_UN

__all__ = ["Limiter", "MultiRateLimiter", "RateLimiter", "WindowedRateLimiter"]

# The counters every tier keeps after its own fields: admitted, timed out.
_COUNTERS = "QQ"


def _name(name: str | None, kind: str) -> str:
    if name is None:
        return f"{kind}-{secrets.token_hex(8)}"
    if not isinstance(name, str) or not name:
        raise ConfigError(f"name must be a non-empty str, got {name!r}")
    return name


def _positive(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{what} must be a number > 0, got {value!r}")
    if not 0 < value < math.inf:
        raise ConfigError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


class Limiter:
    """What every limiter offers: :meth:`acquire`, :meth:`try_acquire`, :attr:`stats`."""

    capacity: float  # the most one acquire() may ask for

    def _tiers(self) -> Sequence[_Tier]:
        raise NotImplementedError

    def _check_n(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"n must be an int >= 1, got {n!r}")
        if n > self.capacity:
            raise ConfigError(
                f"cannot acquire {n} at once from {self!r}: its burst is {self.capacity:g} "
                "(ask for less at a time, or raise burst/limit)"
            )

    def try_acquire(self, n: int = 1) -> float:
        """Take ``n`` now from every tier and return 0.0, or take nothing and return the
        seconds until all tiers could give ``n`` (a lower bound: others may take first)."""
        self._check_n(n)
        return self._take(n)

    def _take(self, n: int) -> float:
        return _take(self._tiers(), n)

    def acquire(self, n: int = 1, timeout: float | timedelta | None = None) -> bool:
        """Wait until ``n`` may go and take them: True; False if ``timeout`` seconds pass
        first (nothing taken). ``timeout=0`` never waits; ``None`` waits as long as needed.
        ``n`` larger than the burst is a ``ConfigError`` (it could never be granted)."""
        self._check_n(n)
        wait = self._take(n)
        if wait == 0.0:
            return True
        end = None
        if timeout is not None:
            t = to_seconds(timeout, "timeout")
            if t < 0:
                raise ConfigError(f"timeout must be >= 0 seconds, got {timeout!r}")
            end = time.monotonic() + t if math.isfinite(t) else None
        while True:
            if end is not None:
                left = end - time.monotonic()
                if left <= 0 or left < wait:
                    if left > 0:
                        time.sleep(left)  # what a caller with this timeout would see
                        if self._take(n) == 0.0:
                            return True
                    _count_timeout(self._tiers())
                    return False
            time.sleep(wait)
            wait = self._take(n)
            if wait == 0.0:
                return True

    @property
    def stats(self) -> dict[str, Any]:
        """Pool-wide counters: ``admitted`` (units taken), ``timed_out`` (acquire() calls
        that gave up) and ``available`` (units that could be taken now)."""
        tiers = self._tiers()
        cells = lock_all([t.cell for t in tiers])
        try:
            now = time.monotonic()
            rows = [t.peek(now) for t in tiers]
        finally:
            unlock_all(cells)
        return {
            "admitted": min(r[0] for r in rows),
            "timed_out": max(r[1] for r in rows),
            "available": min(r[2] for r in rows),
        }


class _Tier(Limiter):
    cell: SharedCell
    name: str

    def _tiers(self) -> Sequence[_Tier]:
        return (self,)

    def wait(self, state: tuple[Any, ...], n: int, now: float) -> tuple[float, tuple[Any, ...]]:
        """(seconds until ``n`` can be taken, the state refreshed to ``now``)."""
        raise NotImplementedError

    def take(self, state: tuple[Any, ...], n: int) -> tuple[Any, ...]:
        raise NotImplementedError

    def peek(self, now: float) -> tuple[int, int, float]:
        raise NotImplementedError


class RateLimiter(_Tier):
    """A token bucket: ``rate`` calls per ``per`` seconds on average, bursts up to ``burst``
    (default: ``rate``), for the whole pool (the driver and every worker process).

    ::

        api = RateLimiter(rate=100, per=1.0, burst=20, name="api")
        api.acquire()                     # waits for a token; True
        api.acquire(5, timeout=0.5)       # False if 5 tokens are not there within 0.5 s
        TaskConfig(rate_limit=api)        # the engine waits in the driver before each call

    The bucket starts full. Identity and naming as for :class:`CircuitBreaker`: one bucket
    per ``name`` in a pool; objects built at import time in modules that workers import
    again need ``name=`` to share theirs. On Dask each worker process has its own.
    """

    def __init__(
        self,
        rate: float,
        per: float | timedelta = 1.0,
        burst: int | None = None,
        name: str | None = None,
    ) -> None:
        self.rate = _positive(rate, "rate")
        self.per = seconds(per, "per", zero=False)
        if burst is None:
            burst_f = max(1.0, float(math.floor(self.rate)))
        elif isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ConfigError(f"burst must be an int >= 1, got {burst!r}")
        else:
            burst_f = float(burst)
        self.burst = burst_f
        self.capacity = burst_f
        self._per_second = self.rate / self.per
        self.name = _name(name, "limiter")
        # tokens, refilled at, then the counters
        self.cell = SharedCell(
            "bucket", self.name, (self.rate, self.per, burst_f), "dd" + _COUNTERS, (-1.0, 0.0, 0, 0)
        )

    def __repr__(self) -> str:
        return (
            f"RateLimiter(rate={self.rate:g}, per={self.per:g}, burst={self.burst:g}, "
            f"name={self.name!r})"
        )

    def wait(self, state: tuple[Any, ...], n: int, now: float) -> tuple[float, tuple[Any, ...]]:
        tokens, at, admitted, timed_out = state
        if tokens < 0:  # first use anywhere: the bucket starts full
            tokens, at = self.burst, now
        tokens = min(self.burst, tokens + max(0.0, now - at) * self._per_second)
        state = (tokens, now, admitted, timed_out)
        if tokens >= n - 1e-9:  # float dust after sleeping exactly the computed wait
            return 0.0, state
        return (n - tokens) / self._per_second, state

    def take(self, state: tuple[Any, ...], n: int) -> tuple[Any, ...]:
        tokens, at, admitted, timed_out = state
        return (tokens - n, at, admitted + n, timed_out)

    def _take(self, n: int) -> float:
        # The hot path of a lone bucket, written out: ~2 µs of it are the two flock calls.
        cell = self.cell
        if cell._pid != _getpid():
            cell._reopen()
        tlock, fd, mm, fields = cell._tlock, cell._fd, cell._mm, cell.fields
        tlock.acquire()
        try:
            _flock(fd, _LOCK_EX)
            try:
                tokens, at, admitted, timed_out = fields.unpack_from(mm, STATE_AT)
                now = _monotonic()
                if tokens < 0:
                    tokens, at = self.burst, now
                tokens = min(self.burst, tokens + max(0.0, now - at) * self._per_second)
                if tokens >= n - 1e-9:
                    fields.pack_into(mm, STATE_AT, tokens - n, now, admitted + n, timed_out)
                    return 0.0
                fields.pack_into(mm, STATE_AT, tokens, now, admitted, timed_out)
                return float((n - tokens) / self._per_second)
            finally:
                _flock(fd, _LOCK_UN)
        finally:
            tlock.release()

    def peek(self, now: float) -> tuple[int, int, float]:
        _w, (tokens, _at, admitted, timed_out) = self.wait(self.cell.read(), 1, now)
        return admitted, timed_out, tokens


class WindowedRateLimiter(_Tier):
    """At most ``limit`` calls per fixed window of ``window`` seconds, for the whole pool.

    Windows are aligned on the system's monotonic clock (shared by its processes), so a
    burst of ``limit`` at the end of one window may meet another at the start of the next:
    use a :class:`RateLimiter` tier beside it to smooth that.
    """

    def __init__(self, limit: int, window: float | timedelta, name: str | None = None) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"limit must be an int >= 1, got {limit!r}")
        self.limit = limit
        self.window = seconds(window, "window", zero=False)
        self.capacity = float(limit)
        self.name = _name(name, "window")
        # window start, used in it, then the counters
        self.cell = SharedCell(
            "window", self.name, (limit, self.window), "dQ" + _COUNTERS, (0.0, 0, 0, 0)
        )

    def __repr__(self) -> str:
        return (
            f"WindowedRateLimiter(limit={self.limit}, window={self.window:g}, name={self.name!r})"
        )

    def wait(self, state: tuple[Any, ...], n: int, now: float) -> tuple[float, tuple[Any, ...]]:
        start, used, admitted, timed_out = state
        current = math.floor(now / self.window) * self.window
        if current != start:
            start, used = current, 0
        state = (start, used, admitted, timed_out)
        if used + n <= self.limit:
            return 0.0, state
        return max(start + self.window - now, 1e-6), state

    def take(self, state: tuple[Any, ...], n: int) -> tuple[Any, ...]:
        start, used, admitted, timed_out = state
        return (start, used + n, admitted + n, timed_out)

    def peek(self, now: float) -> tuple[int, int, float]:
        _w, (_s, used, admitted, timed_out) = self.wait(self.cell.read(), 1, now)
        return admitted, timed_out, float(self.limit - used)


class MultiRateLimiter(Limiter):
    """Several limits at once (``[RateLimiter(100), WindowedRateLimiter(5000, 3600)]``): a
    call goes when every tier allows it, and takes from every tier or from none."""

    def __init__(self, limiters: Iterable[Limiter]) -> None:
        tiers: dict[tuple[str, str], _Tier] = {}
        for lim in limiters:
            if not isinstance(lim, Limiter):
                raise ConfigError(f"MultiRateLimiter takes limiters, got {lim!r}")
            for t in lim._tiers():
                tiers.setdefault((t.cell.kind, t.cell.name), t)
        if not tiers:
            raise ConfigError("MultiRateLimiter needs at least one limiter")
        self.limiters = tuple(tiers.values())
        self.capacity = min(t.capacity for t in self.limiters)
        self.name = "+".join(t.name for t in self.limiters)

    def __repr__(self) -> str:
        return f"MultiRateLimiter([{', '.join(repr(t) for t in self.limiters)}])"

    def _tiers(self) -> Sequence[_Tier]:
        return self.limiters


def _take(tiers: Sequence[_Tier], n: int) -> float:
    """All or nothing: 0.0 once ``n`` is taken from every tier, else the longest wait."""
    if len(tiers) == 1:  # the common case, without sorting
        tier = tiers[0]
        cell = tier.cell
        cell.lock()
        try:
            wait, state = tier.wait(cell.read(), n, time.monotonic())
            cell.write(tier.take(state, n) if wait == 0.0 else state)
        finally:
            cell.unlock()
        return wait
    cells = lock_all([t.cell for t in tiers])
    try:
        now = time.monotonic()
        looked = [(t, *t.wait(t.cell.read(), n, now)) for t in tiers]
        longest = max(w for _t, w, _s in looked)
        for t, _w, state in looked:
            t.cell.write(t.take(state, n) if longest == 0.0 else state)
    finally:
        unlock_all(cells)
    return longest


def _count_timeout(tiers: Sequence[_Tier]) -> None:
    cells = lock_all([t.cell for t in tiers])
    try:
        for t in tiers:
            *head, timed_out = t.cell.read()
            t.cell.write((*head, timed_out + 1))
    finally:
        unlock_all(cells)


public(MultiRateLimiter, RateLimiter, WindowedRateLimiter)
