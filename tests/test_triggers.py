"""Trigger arithmetic without threads: interval grids and cron times across DST."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cano_mp import ConfigError
from cano_mp._scheduler.triggers import CronSchedule, IntervalGrid, local_zone, resolve_zone


def fires(expr: str, tz: str, start: datetime, n: int) -> list[datetime]:
    sched = CronSchedule(expr, tz)
    out, t = [], start
    for _ in range(n):
        t = sched.next_after(t)
        out.append(t)
    return out


def local(times: list[datetime], tz: str) -> list[str]:
    return [t.astimezone(ZoneInfo(tz)).strftime("%m-%d %H:%M:%S%z") for t in times]


# -- interval grids -----------------------------------------------------------------------------
def test_grid_ticks_are_absolute() -> None:
    g = IntervalGrid(100.0, 0.5)
    assert g.tick_at_or_after(90.0) == (0, 100.0)
    assert g.tick_at_or_after(100.0) == (0, 100.0)
    assert g.tick_after(100.0) == (1, 100.5)
    assert g.tick_after(103.2) == (7, 103.5)  # late: missed ticks are skipped, not made up
    assert g.tick_at_or_after(103.5) == (7, 103.5)


@given(
    anchor=st.floats(0, 1e6),
    interval=st.floats(1e-3, 1e4),
    offset=st.floats(0, 1e6),
)
def test_grid_never_drifts(anchor: float, interval: float, offset: float) -> None:
    g = IntervalGrid(anchor, interval)
    k, due = g.tick_after(anchor + offset)
    assert due > anchor + offset
    assert due == anchor + k * interval
    assert due - interval <= anchor + offset + 1e-9 * max(1.0, due)


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan")])
def test_grid_rejects_bad_intervals(bad: float) -> None:
    with pytest.raises(ConfigError):
        IntervalGrid(0.0, bad)


# -- cron ----------------------------------------------------------------------------------------
def test_five_fields_in_utc() -> None:
    got = fires("*/15 9-10 * * 1-5", "UTC", datetime(2026, 11, 27, 10, 40, tzinfo=UTC), 4)
    # Friday 10:45, then Monday 09:00...
    assert local(got, "UTC") == [
        "11-27 10:45:00+0000",
        "11-30 09:00:00+0000",
        "11-30 09:15:00+0000",
        "11-30 09:30:00+0000",
    ]


def test_six_fields_have_seconds_last() -> None:
    got = fires("*/10 * * * * 30", "UTC", datetime(2026, 1, 1, 0, 0, 31, tzinfo=UTC), 3)
    assert local(got, "UTC") == [
        "01-01 00:10:30+0000",
        "01-01 00:20:30+0000",
        "01-01 00:30:30+0000",
    ]


@pytest.mark.parametrize(
    ("tz", "spring_day", "expected"),
    [
        # clocks go 02:00 -> 03:00: a daily 02:30 run happens once, at 03:00
        ("America/New_York", datetime(2026, 3, 7, 12, tzinfo=UTC),
         ["03-08 03:00:00-0400", "03-09 02:30:00-0400"]),
        ("Europe/Berlin", datetime(2026, 3, 28, 12, tzinfo=UTC),
         ["03-29 03:00:00+0200", "03-30 02:30:00+0200"]),
    ],
)  # fmt: skip
def test_a_skipped_wall_time_runs_once_after_the_gap(
    tz: str, spring_day: datetime, expected: list[str]
) -> None:
    assert local(fires("30 2 * * *", tz, spring_day, 2), tz) == expected


@pytest.mark.parametrize(
    ("tz", "fall_day", "expected"),
    [
        # clocks go 02:00 -> 01:00: 01:30 happens twice; the run happens once (the first)
        ("America/New_York", datetime(2026, 10, 31, 12, tzinfo=UTC),
         ["11-01 01:30:00-0400", "11-02 01:30:00-0500"]),
        ("Europe/Berlin", datetime(2026, 10, 24, 12, tzinfo=UTC),
         ["10-25 02:30:00+0200", "10-26 02:30:00+0100"]),
    ],
)  # fmt: skip
def test_a_repeated_wall_time_runs_once(tz: str, fall_day: datetime, expected: list[str]) -> None:
    expr = "30 1 * * *" if tz == "America/New_York" else "30 2 * * *"
    assert local(fires(expr, tz, fall_day, 2), tz) == expected


def test_from_inside_the_repeated_hour_nothing_fires_twice() -> None:
    ny = ZoneInfo("America/New_York")
    # 01:40 EST: the second pass through 01:xx; 01:30 already fired at 01:30 EDT
    inside = datetime(2026, 11, 1, 1, 40, tzinfo=ny, fold=1)
    got = fires("30 1 * * *", "America/New_York", inside, 1)
    assert local(got, "America/New_York") == ["11-02 01:30:00-0500"]
    every20 = fires("*/20 * * * *", "America/New_York", datetime(2026, 11, 1, 5, 50, tzinfo=UTC), 5)
    instants = [t.timestamp() for t in every20]
    assert instants == sorted(set(instants))  # strictly increasing: no duplicates


def test_sub_hourly_cron_across_spring_forward_is_strictly_increasing() -> None:
    got = fires("*/20 * * * *", "America/New_York", datetime(2026, 3, 8, 6, 30, tzinfo=UTC), 4)
    assert local(got, "America/New_York") == [
        "03-08 01:40:00-0500",
        "03-08 03:00:00-0400",  # 02:00, 02:20, 02:40 do not exist: one run at 03:00
        "03-08 03:20:00-0400",
        "03-08 03:40:00-0400",
    ]


@pytest.mark.parametrize(
    "expr", ["", "* * * *", "61 * * * *", "* * * * * * * *", "every minute", "* * 32 * *"]
)
def test_invalid_cron_is_a_config_error(expr: str) -> None:
    with pytest.raises(ConfigError):
        CronSchedule(expr)


def test_zones() -> None:
    assert resolve_zone("Europe/Paris") == ZoneInfo("Europe/Paris")
    assert resolve_zone(UTC) is UTC
    with pytest.raises(ConfigError, match="unknown time zone"):
        resolve_zone("Mars/Olympus")
    zone = local_zone()
    now = datetime.now(zone)
    assert abs(now.utcoffset() or timedelta()) < timedelta(hours=15)
    with pytest.raises(ValueError):
        CronSchedule("* * * * *").next_after(datetime(2026, 1, 1))  # naive


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("61 * * * *", "the minute field '61' is out of range: 61 is not in 0-59"),
        ("0 25 * * *", "the hour field '25' is out of range: 25 is not in 0-23"),
        ("0 0 32 * *", "the day-of-month field '32' is out of range: 32 is not in 1-31"),
        ("0 0 0 * *", "the day-of-month field '0' is out of range: 0 is not in 1-31"),
        ("0 0 * 13 *", "the month field '13' is out of range: 13 is not in 1-12"),
        ("0 0 * * 8", "the day-of-week field '8' is out of range: 8 is not in 0-7"),
        ("0 0 * * * 60", "the second field '60' is out of range: 60 is not in 0-59"),
        ("0,70 * * * *", "the minute field '0,70' is out of range: 70 is not in 0-59"),
        ("1-70/5 * * * *", "the minute field '1-70/5' is out of range: 70 is not in 0-59"),
        ("*/0 * * * *", "the minute field '*/0' is not valid"),
        ("0 0 * foo *", "the month field 'foo' is not valid"),
        ("* * * *", "it has 4 field(s); expected 5 fields"),
        ("@reboot", "it has 1 field(s)"),
    ],
)
def test_a_bad_cron_field_is_named(expr: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        CronSchedule(expr, "UTC")
    assert str(err.value).startswith(f"invalid cron expression {expr!r}: ")
    assert message in str(err.value)


def test_a_cron_that_never_fires_is_refused_when_given() -> None:
    with pytest.raises(ConfigError, match="never fires"):
        CronSchedule("0 0 31 2 *", "UTC")  # 31 February


@pytest.mark.parametrize(
    ("alias", "expected"),
    [
        ("@hourly", ["01-15 11:00:00+0000", "01-15 12:00:00+0000"]),
        ("@daily", ["01-16 00:00:00+0000", "01-17 00:00:00+0000"]),
        ("@midnight", ["01-16 00:00:00+0000", "01-17 00:00:00+0000"]),
        ("@weekly", ["01-18 00:00:00+0000", "01-25 00:00:00+0000"]),  # Sundays
        ("@monthly", ["02-01 00:00:00+0000", "03-01 00:00:00+0000"]),
        ("@yearly", ["01-01 00:00:00+0000", "01-01 00:00:00+0000"]),
        ("@annually", ["01-01 00:00:00+0000", "01-01 00:00:00+0000"]),
        ("@DAILY", ["01-16 00:00:00+0000", "01-17 00:00:00+0000"]),
    ],
)
def test_cron_aliases(alias: str, expected: list[str]) -> None:
    got = fires(alias, "UTC", datetime(2026, 1, 15, 10, 30, tzinfo=UTC), 2)
    assert local(got, "UTC") == expected
    if alias == "@yearly":
        assert [t.year for t in got] == [2027, 2028]
    assert CronSchedule(alias).expr == alias


def test_an_alias_follows_the_zone_across_dst() -> None:
    got = fires("@daily", "Europe/Paris", datetime(2026, 3, 28, 12, tzinfo=UTC), 2)
    assert local(got, "Europe/Paris") == ["03-29 00:00:00+0100", "03-30 00:00:00+0200"]


class AlwaysLookBack(CronSchedule):
    __slots__ = ()

    def _offset_changes_near(self, instant: datetime) -> bool:
        return True


@given(
    expr=st.sampled_from(
        ["*/20 * * * *", "30 1 * * *", "30 2 * * *", "0 * * * *", "*/7 * * * * 30", "@daily"]
    ),
    tz=st.sampled_from(["America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "UTC"]),
    after=st.datetimes(
        min_value=datetime(2026, 1, 1), max_value=datetime(2027, 1, 1), timezones=st.just(UTC)
    ),
)
def test_the_next_time_does_not_depend_on_the_lookback_shortcut(
    expr: str, tz: str, after: datetime
) -> None:
    # Far from a change of UTC offset, next_after starts croniter at `after` itself; the
    # answer must be the one of the two-hour lookback it uses near a change.
    assert CronSchedule(expr, tz).next_after(after) == AlwaysLookBack(expr, tz).next_after(after)


def test_near_a_dst_change_the_lookback_is_used() -> None:
    ny = CronSchedule("*/20 * * * *", "America/New_York")
    assert ny._offset_changes_near(datetime(2026, 11, 1, 6, 0, tzinfo=UTC))
    assert not ny._offset_changes_near(datetime(2026, 7, 1, 12, 0, tzinfo=UTC))
