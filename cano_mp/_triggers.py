"""When scheduled flows are due: pure arithmetic on instants, no threads.

* Interval grids are absolute: tick ``k`` is due at ``anchor + k * interval``, so lateness
  never accumulates; a tick missed while the previous run was busy is skipped, not made up.
* Cron times are computed on the wall clock of the flow's time zone (croniter, behind
  :class:`CronSchedule`) and turned into UTC instants:

  - a wall-clock time that occurs twice (the hour repeated when clocks go back) fires
    once, at its first occurrence;
  - a wall-clock time that does not exist (the hour skipped when clocks go forward) fires
    once, at the first instant after the gap (02:30 on a spring-forward night runs at
    03:00 local time); several skipped times collapse into that one run.
"""

from __future__ import annotations

import math
import os
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from ._errors import ConfigError

__all__ = ["CronSchedule", "IntervalGrid", "local_zone", "resolve_zone"]


class IntervalGrid:
    """Ticks at ``anchor + k * interval`` (any clock, in seconds)."""

    __slots__ = ("anchor", "interval")

    def __init__(self, anchor: float, interval: float) -> None:
        if not interval > 0 or math.isinf(interval):
            raise ConfigError(f"interval must be > 0 seconds and finite, got {interval!r}")
        self.anchor = anchor
        self.interval = interval

    def tick_at_or_after(self, t: float) -> tuple[int, float]:
        """The first tick at or after ``t``: ``(k, time)``."""
        if t <= self.anchor:
            return 0, self.anchor
        k = math.ceil((t - self.anchor) / self.interval)
        due = self.anchor + k * self.interval
        if due < t:  # float rounding
            k += 1
            due = self.anchor + k * self.interval
        return k, due

    def tick_after(self, t: float) -> tuple[int, float]:
        """The first tick strictly after ``t``."""
        k, due = self.tick_at_or_after(t)
        if due <= t:
            k += 1
            due = self.anchor + k * self.interval
        return k, due


def local_zone() -> tzinfo:
    """The machine's time zone with its daylight-saving rules (not a fixed offset)."""
    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    try:
        target = os.path.realpath("/etc/localtime")
        if "zoneinfo/" in target:
            return ZoneInfo(target.split("zoneinfo/", 1)[1])
    except (OSError, ZoneInfoNotFoundError, ValueError):
        pass
    try:
        with open("/etc/localtime", "rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError):
        return UTC


def resolve_zone(tz: str | tzinfo | None) -> tzinfo:
    """``None``: the local zone; a name: ``ZoneInfo(name)``; a tzinfo as is."""
    if tz is None:
        return local_zone()
    if isinstance(tz, tzinfo):
        return tz
    if isinstance(tz, str):
        try:
            return ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigError(f"unknown time zone {tz!r}") from exc
    raise ConfigError(f"tz must be a zone name, a tzinfo or None, got {tz!r}")


def _exists(wall: datetime, zone: tzinfo) -> bool:
    aware = wall.replace(tzinfo=zone)
    return aware.astimezone(UTC).astimezone(zone).replace(tzinfo=None) == wall


class CronSchedule:
    """A cron expression in a time zone: 5 fields, or 6 with seconds last (as croniter
    reads them)."""

    __slots__ = ("expr", "zone")

    def __init__(self, expr: str, tz: str | tzinfo | None = None) -> None:
        if not isinstance(expr, str):
            raise ConfigError(f"a cron expression must be a str, got {expr!r}")
        fields = expr.split()
        if len(fields) not in (5, 6) or not croniter.is_valid(expr):
            raise ConfigError(
                f"invalid cron expression {expr!r}: expected 5 fields (minute hour day month "
                "weekday) or 6 with seconds last"
            )
        self.expr = expr
        self.zone = resolve_zone(tz)

    def next_after(self, after: datetime) -> datetime:
        """The first fire time strictly after the aware instant ``after`` (UTC result)."""
        if after.tzinfo is None:
            raise ValueError("after must be an aware datetime")
        after_utc = after.astimezone(UTC)
        # croniter iterates naive wall-clock times; start an hour early so that a time in
        # a repeated hour is seen again (and dropped: it already fired), never missed.
        wall = after_utc.astimezone(self.zone).replace(tzinfo=None) - timedelta(hours=2)
        it = croniter(self.expr, wall)
        for _ in range(100_000):
            candidate: datetime = it.get_next(datetime)
            instant = self._instant(candidate)
            if instant > after_utc:
                return instant
        raise ConfigError(f"cron expression {self.expr!r} never fires")  # pragma: no cover

    def _instant(self, wall: datetime) -> datetime:
        zone = self.zone
        if _exists(wall, zone):
            # fold=0: the first occurrence of a repeated wall-clock time
            return wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
        # In a gap: the first wall-clock minute after it.
        probe = wall.replace(second=0, microsecond=0)
        for _ in range(24 * 60):
            probe += timedelta(minutes=1)
            if _exists(probe, zone):
                return probe.replace(tzinfo=zone).astimezone(UTC)
        raise ConfigError(f"no valid time after {wall} in {zone}")  # pragma: no cover

    def __repr__(self) -> str:
        return f"CronSchedule({self.expr!r}, {self.zone})"
