"""Durations: one place that turns what users pass (seconds or a ``timedelta``) into floats.

Every duration of the public API goes through these functions when it is given, so that the
same rules hold everywhere:

- a ``float`` / ``int`` of seconds or a ``datetime.timedelta`` is accepted;
- ``nan``, negatives, ``bool`` and non-numbers are a :class:`ConfigError`;
- ``math.inf`` means "no limit" where no limit makes sense (a timeout, a wait), and is then
  turned into ``None`` at construction, so that nothing downstream ever computes a deadline
  of ``monotonic() + inf`` (``threading`` waits overflow on it); elsewhere (a grace period,
  a retry delay) it is a :class:`ConfigError`.
"""

from __future__ import annotations

import math
from datetime import timedelta

from ._errors import ConfigError

__all__ = ["limit", "seconds", "to_seconds"]


def to_seconds(value: float | timedelta, what: str) -> float:
    """``value`` as float seconds (a ``timedelta`` is accepted); reject non-numbers and NaN.

    No sign or range check: :func:`seconds` and :func:`limit` add those.
    """
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{what} must be a number of seconds or a timedelta, got {value!r}")
    result = float(value)
    if math.isnan(result):
        raise ConfigError(f"{what} must be a number of seconds, got NaN")
    return result


def seconds(value: float | timedelta, what: str, *, zero: bool = True, inf: bool = False) -> float:
    """A duration that must be given: ``>= 0`` (``> 0`` unless ``zero``), finite unless ``inf``.

    ``inf=True`` is for values where infinity reads naturally ("no cap", as a retry policy's
    ``max_delay``) and the caller handles it.
    """
    result = to_seconds(value, what)
    if result < 0 or (result == 0 and not zero):
        bound = ">= 0" if zero else "> 0"
        raise ConfigError(f"{what} must be {bound} seconds, got {value!r}")
    if math.isinf(result) and not inf:
        raise ConfigError(f"{what} must be a finite number of seconds, got {value!r}")
    return result


def limit(value: float | timedelta | None, what: str) -> float | None:
    """An optional time limit: ``None`` or ``math.inf`` mean no limit (returned as ``None``);
    anything else must be a number of seconds ``> 0``."""
    if value is None:
        return None
    result = to_seconds(value, what)
    if math.isinf(result) and result > 0:
        return None
    if not result > 0:
        raise ConfigError(
            f"{what} must be > 0 seconds (None or math.inf for no limit), got {value!r}"
        )
    return result
