"""When scheduled flows are due: pure arithmetic on instants, no threads.

* Durations given to the scheduler are checked by :func:`duration` when they are given:
  NaN and negatives are refused, ``inf`` only where it means "no limit".
* Interval grids are absolute: tick ``k`` is due at ``anchor + k * interval``, so lateness
  never accumulates; a tick missed while the previous run was busy is skipped, not made up.
  :class:`Every` is an interval flow's schedule: that grid (``mode="rate"``) or a wait of
  one interval after each run ends (``mode="delay"``).
* Cron times are computed on the wall clock of the flow's time zone (croniter, behind
  :class:`CronSchedule`) and turned into UTC instants:

  - a wall-clock time that occurs twice (the hour repeated when clocks go back) fires
    once, at its first occurrence;
  - a wall-clock time that does not exist (the hour skipped when clocks go forward) fires
    once, at the first instant after the gap (02:30 on a spring-forward night runs at
    03:00 local time); several skipped times collapse into that one run.

  An expression is checked when it is given: a field out of range is named
  (``"61 * * * *"``: the minute field), and ``@hourly``, ``@daily`` / ``@midnight``,
  ``@weekly``, ``@monthly``, ``@yearly`` / ``@annually`` stand for their 5-field forms.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from .._errors import ConfigError
from .._retry import to_seconds

__all__ = [
    "CronSchedule",
    "Every",
    "IntervalGrid",
    "Mode",
    "duration",
    "local_zone",
    "resolve_zone",
]

Mode = Literal["rate", "delay"]


def duration(value: float | timedelta, what: str, *, inf_ok: bool, zero_ok: bool = True) -> float:
    """``value`` as float seconds, or :class:`ConfigError` naming ``what``.

    A number or a ``timedelta``; never NaN or negative; ``0`` only with ``zero_ok``;
    ``math.inf`` only with ``inf_ok`` (where it means "no limit").
    """
    seconds = to_seconds(value, what)  # numbers and timedeltas; NaN refused
    if seconds < 0 or (seconds == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ConfigError(f"{what} must be {bound} seconds, got {value!r}")
    if math.isinf(seconds) and not inf_ok:
        raise ConfigError(f"{what} must be a finite number of seconds, got {value!r}")
    return seconds


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


@dataclass(frozen=True, slots=True)
class Every:
    """An interval flow's schedule: ``interval`` seconds (> 0, finite), and ``mode``:
    ``"rate"`` ticks on a grid anchored at ``start()``; ``"delay"`` waits ``interval``
    after each run ends. Both run first at ``start()``."""

    interval: float
    mode: Mode = "rate"

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "interval", duration(self.interval, "interval", inf_ok=False, zero_ok=False)
        )
        if self.mode not in ("rate", "delay"):
            raise ConfigError(f"mode must be 'rate' or 'delay', got {self.mode!r}")

    def grid(self, anchor: float) -> IntervalGrid:
        """The ``"rate"`` grid of ticks from ``anchor``."""
        return IntervalGrid(anchor, self.interval)

    def describe(self) -> str:
        base = f"every {self.interval:g}s"
        return base if self.mode == "rate" else f"{base} after each run"


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


# Expanded here rather than by croniter, whose aliases vary between its releases.
CRON_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# (name, lowest, highest) of each field, in croniter's order: seconds come last.
CRON_FIELDS = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day-of-month", 1, 31),
    ("month", 1, 12),
    ("day-of-week", 0, 7),
    ("second", 0, 59),
)
_SHAPE = (
    "5 fields (minute hour day-of-month month day-of-week), 6 with seconds last, "
    "or @hourly, @daily, @weekly, @monthly, @yearly"
)


def _field_problem(fields: list[str]) -> str:
    """Which field of a cron expression croniter refuses, in words."""
    for i, text in enumerate(fields):
        probe = ["*"] * len(fields)
        probe[i] = text
        if croniter.is_valid(" ".join(probe)):
            continue
        name, low, high = CRON_FIELDS[i]
        for part in text.split(","):
            bounds = part.partition("/")[0]
            for number in re.findall(r"\d+", bounds):
                if not low <= int(number) <= high:
                    return (
                        f"the {name} field {text!r} is out of range: "
                        f"{number} is not in {low}-{high}"
                    )
        return f"the {name} field {text!r} is not valid ({name}: {low}-{high}, with * , - /)"
    return f"the fields are not valid together; expected {_SHAPE}"


class CronSchedule:
    """A cron expression in a time zone: 5 fields, or 6 with seconds last (as croniter
    reads them), or one of ``@hourly @daily @midnight @weekly @monthly @yearly
    @annually``."""

    __slots__ = ("_fields", "expr", "zone")

    def __init__(self, expr: str, tz: str | tzinfo | None = None) -> None:
        if not isinstance(expr, str):
            raise ConfigError(f"a cron expression must be a str, got {expr!r}")
        text = CRON_ALIASES.get(expr.strip().lower(), expr)
        fields = text.split()
        if len(fields) not in (5, 6):
            raise ConfigError(
                f"invalid cron expression {expr!r}: it has {len(fields)} field(s); "
                f"expected {_SHAPE}"
            )
        if not croniter.is_valid(text):
            raise ConfigError(f"invalid cron expression {expr!r}: {_field_problem(fields)}")
        self.expr = expr
        self._fields = " ".join(fields)
        self.zone = resolve_zone(tz)
        self.next_after(datetime.now(UTC))  # "0 0 31 2 *" is valid field by field

    def next_after(self, after: datetime) -> datetime:
        """The first fire time strictly after the aware instant ``after`` (UTC result)."""
        if after.tzinfo is None:
            raise ValueError("after must be an aware datetime")
        after_utc = after.astimezone(UTC)
        # croniter iterates naive wall-clock times. Near a change of UTC offset, start two
        # hours early so that a time in a repeated hour is seen again (and dropped: it
        # already fired), never missed; elsewhere start at once (a per-second expression
        # would iterate 7,200 times).
        wall = after_utc.astimezone(self.zone).replace(tzinfo=None)
        if self._offset_changes_near(after_utc):
            wall -= timedelta(hours=2)
        it = croniter(self._fields, wall)
        try:
            for _ in range(100_000):
                candidate: datetime = it.get_next(datetime)
                instant = self._instant(candidate)
                if instant > after_utc:
                    return instant
        except CroniterBadDateError:
            pass
        raise ConfigError(f"cron expression {self.expr!r} never fires")

    def _offset_changes_near(self, instant: datetime) -> bool:
        offsets = {
            (instant + timedelta(hours=h)).astimezone(self.zone).utcoffset() for h in (-3, 0, 3)
        }
        return len(offsets) > 1

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

    def describe(self) -> str:
        return f"cron {self.expr!r} ({self.zone})"

    def __repr__(self) -> str:
        return f"CronSchedule({self.expr!r}, {self.zone})"
