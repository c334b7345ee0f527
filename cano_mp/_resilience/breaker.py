"""CircuitBreaker: stop calling what keeps failing, for every process of the pool at once.

::

    closed --failure_threshold failures in a row--> open --reset_timeout--> half-open
      ^                                               ^                        |
      +---------------- a probe succeeds -------------+---- a probe fails -----+

Half-open lets ``half_open_max_calls`` probes through; the others are refused until one
reports. Probes that never report (their worker was killed) are forgotten after another
``reset_timeout``, so a breaker never stays half-open and shut for good.

The state is a :class:`~.shared.SharedCell`: a breaker opened by failures in one worker
refuses calls in all the others (and in the driver) from the next call on.
"""

from __future__ import annotations

import secrets
import time
from datetime import timedelta
from types import TracebackType
from typing import Any

from .._durations import seconds
from .._errors import CircuitOpen, ConfigError
from .._public import public
from .shared import SharedCell

__all__ = ["CircuitBreaker"]

_CLOSED, _OPEN, _HALF_OPEN = 0, 1, 2
_NAMES = {_CLOSED: "closed", _OPEN: "open", _HALF_OPEN: "half_open"}
# state, failures in a row, opened at, probes out, half-open since,
# then counters: times opened, calls refused, successes, failures
_FIELDS = "QQdQdQQQQ"


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be an int >= 1, got {value!r}")
    return value


class CircuitBreaker:
    """Fails calls fast while what they call is down; shared by every process of the pool.

    ::

        api = CircuitBreaker(failure_threshold=5, reset_timeout=30.0, name="api")
        with api:                      # raises CircuitOpen at once while open
            fetch(url)                 # an exception here counts as a failure

        TaskConfig(circuit_breaker=api)   # or let the engine check it before each attempt

    ``failure_threshold`` failures in a row open it; after ``reset_timeout`` seconds it lets
    ``half_open_max_calls`` probes through: one success closes it, a failure opens it again.

    Identity: one breaker per ``name`` in a pool (the driver and all its workers). Without a
    name, a random one is made here and travels with the object when it is pickled to a
    worker. A breaker built at import time in a module that workers import again must be
    given a ``name`` to be the same breaker there. Two breakers of one name must have the
    same settings (``ConfigError`` otherwise). On Dask each worker process has its own.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_timeout: float | timedelta = 30.0,
        half_open_max_calls: int = 1,
        name: str | None = None,
    ) -> None:
        self.failure_threshold = _count(failure_threshold, "failure_threshold")
        self.reset_timeout = seconds(reset_timeout, "reset_timeout")
        self.half_open_max_calls = _count(half_open_max_calls, "half_open_max_calls")
        if name is not None and (not isinstance(name, str) or not name):
            raise ConfigError(f"name must be a non-empty str, got {name!r}")
        self.name = name if name is not None else f"breaker-{secrets.token_hex(8)}"
        self._cell = SharedCell(
            "breaker",
            self.name,
            (self.failure_threshold, self.reset_timeout, self.half_open_max_calls),
            _FIELDS,
            (_CLOSED, 0, 0.0, 0, 0.0, 0, 0, 0, 0),
        )

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(failure_threshold={self.failure_threshold}, "
            f"reset_timeout={self.reset_timeout}, half_open_max_calls="
            f"{self.half_open_max_calls}, name={self.name!r})"
        )

    # -- decisions, under the cell's lock --------------------------------------------------
    def _admit(self) -> float | None:
        """``None``: the call may go (as a probe when half-open); else the seconds until a
        probe may go (refused: counted)."""
        cell = self._cell
        cell.lock()
        try:
            st, fails, opened_at, probes, since, n_open, refused, ok, bad = cell.read()
            now = time.monotonic()
            if st == _CLOSED:
                return None
            if st == _OPEN:
                if now - opened_at < self.reset_timeout:
                    cell.write((st, fails, opened_at, probes, since, n_open, refused + 1, ok, bad))
                    return float(opened_at + self.reset_timeout - now)
                st, probes, since = _HALF_OPEN, 0, now
            elif probes >= self.half_open_max_calls and now - since >= self.reset_timeout:
                probes, since = 0, now  # the probes never reported: let new ones go
            if probes < self.half_open_max_calls:
                cell.write((st, fails, opened_at, probes + 1, since, n_open, refused, ok, bad))
                return None
            cell.write((st, fails, opened_at, probes, since, n_open, refused + 1, ok, bad))
            return 0.0
        finally:
            cell.unlock()

    def _record(self, success: bool, count: int = 1) -> bool:
        """Record a call's outcome (``count`` successes); True when this failure opened
        the breaker."""
        cell = self._cell
        cell.lock()
        try:
            st, fails, opened_at, probes, since, n_open, refused, ok, bad = cell.read()
            if success:
                cell.write((_CLOSED, 0, opened_at, 0, since, n_open, refused, ok + count, bad))
                return False
            fails, bad = fails + 1, bad + 1
            opens: bool = st == _HALF_OPEN or (st == _CLOSED and fails >= self.failure_threshold)
            if opens:
                st, opened_at, probes, n_open = _OPEN, time.monotonic(), 0, n_open + 1
            cell.write((st, fails, opened_at, probes, since, n_open, refused, ok, bad))
            return opens
        finally:
            cell.unlock()

    def _release(self) -> None:
        """A probe that ended without a verdict (cancelled): give its place back."""
        cell = self._cell
        cell.lock()
        try:
            st, fails, opened_at, probes, since, *rest = cell.read()
            if st == _HALF_OPEN and probes > 0:
                cell.write((st, fails, opened_at, probes - 1, since, *rest))
        finally:
            cell.unlock()

    def _refusal(self, retry_after: float) -> CircuitOpen:
        err = CircuitOpen(
            f"circuit breaker {self.name!r} is open"
            + (
                f": calls are refused for {retry_after:.3g}s more"
                if retry_after > 0
                else f" (half-open: its {self.half_open_max_calls} probe(s) are out)"
            )
        )
        err.breaker, err.retry_after = self.name, retry_after
        return err

    # -- public ------------------------------------------------------------------------------
    def allow(self) -> None:
        """Let one call through or raise :class:`CircuitOpen`; the caller must then report
        it with :meth:`success` or :meth:`failure` (``with breaker:`` does both)."""
        wait = self._admit()
        if wait is not None:
            raise self._refusal(wait)

    def success(self) -> None:
        """The call succeeded: closes a half-open breaker, clears the failure count."""
        self._record(True)

    def failure(self) -> None:
        """The call failed: counts toward ``failure_threshold``; reopens a half-open one."""
        self._record(False)

    def reset(self) -> None:
        """Close the breaker now and forget its failures (counters are kept)."""
        cell = self._cell
        cell.lock()
        try:
            _st, _f, opened_at, _p, since, *rest = cell.read()
            cell.write((_CLOSED, 0, opened_at, 0, since, *rest))
        finally:
            cell.unlock()

    def __enter__(self) -> CircuitBreaker:
        self.allow()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self._record(True)
        elif issubclass(exc_type, Exception):
            self._record(False)
        else:  # KeyboardInterrupt, SystemExit: no verdict on what was called
            self._release()

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"`` (open past its ``reset_timeout``
        reads as half-open: the next call is a probe)."""
        cell = self._cell
        cell.lock()
        try:
            st, _f, opened_at, *_ = cell.read()
        finally:
            cell.unlock()
        if st == _OPEN and time.monotonic() - opened_at >= self.reset_timeout:
            st = _HALF_OPEN
        return _NAMES[st]

    @property
    def stats(self) -> dict[str, Any]:
        """``state``, ``failures`` (in a row), ``opened`` (times), ``refused``,
        ``successes`` and ``failures_total`` — for the whole pool."""
        cell = self._cell
        cell.lock()
        try:
            _st, fails, _o, _p, _s, n_open, refused, ok, bad = cell.read()
        finally:
            cell.unlock()
        return {
            "state": self.state,
            "failures": fails,
            "opened": n_open,
            "refused": refused,
            "successes": ok,
            "failures_total": bad,
        }


public(CircuitBreaker)
