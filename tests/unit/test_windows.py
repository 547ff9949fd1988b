"""Transfer windows at their edges, with an injected clock."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from gateway.windows import parse_schedule

OSLO = timezone(timedelta(hours=1))


def at(day: int, hour: int, minute: int = 0) -> datetime:
    """2026-11-23 is a Monday; ``day`` days from it."""
    return datetime(2026, 11, 23, hour, minute, tzinfo=OSLO) + timedelta(days=day)


def test_night_window_edges() -> None:
    nights = parse_schedule("22:00-06:00")
    assert nights.next_opening(at(0, 21, 59)) == at(0, 22, 0)
    assert nights.next_opening(at(0, 22, 0)) is None  # opens on the minute
    assert nights.next_opening(at(1, 3, 0)) is None  # past midnight, still the Monday window
    assert nights.next_opening(at(1, 5, 59)) is None
    assert nights.next_opening(at(1, 6, 0)) == at(1, 22, 0)  # closes on the minute


def test_weekdays_evenings_and_whole_weekend() -> None:
    schedule = parse_schedule("mon-fri 18:00-07:00; sat,sun 00:00-24:00")
    assert schedule.next_opening(at(0, 12)) == at(0, 18)
    assert schedule.is_open(at(4, 23))  # Friday night
    assert schedule.is_open(at(5, 6, 59))  # Saturday morning: both Friday's window and Saturday's
    assert schedule.is_open(at(6, 23, 59))
    # Monday 06:30: Sunday's window ended at midnight and no weekday window began on Sunday evening
    assert schedule.next_opening(at(7, 6, 30)) == at(7, 18)


def test_wrapping_day_range_and_single_day() -> None:
    schedule = parse_schedule("fri-mon 20:00-22:00")
    assert schedule.next_opening(at(1, 21)) == at(4, 20)  # Tuesday: next is Friday
    assert schedule.is_open(at(7, 21))  # the following Monday
    assert parse_schedule("wed 09:00-10:00").next_opening(at(2, 10)) == at(9, 9)


def test_empty_schedule_is_always_open() -> None:
    assert parse_schedule("").next_opening(at(3, 3)) is None
    assert parse_schedule(" ; ").windows == ()


@pytest.mark.parametrize("text", ["22-06", "mon-fry 10:00-11:00", "25:00-01:00", "10:60-11:00", "24:30-01:00"])
def test_unreadable_schedules_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="transfer window"):
        parse_schedule(text)


@pytest.mark.parametrize(("saturday", "monday_9_utc"), [
    (datetime(2027, 3, 27, 12, 0), datetime(2027, 3, 29, 7, 0)),  # spring: CET -> CEST on Sunday 28 March
    (datetime(2027, 10, 30, 12, 0), datetime(2027, 11, 1, 8, 0)),  # autumn: CEST -> CET on Sunday 31 October
])
def test_windows_follow_the_zone_across_daylight_saving_changes(saturday: datetime, monday_9_utc: datetime) -> None:
    """`mon 09:00-10:00` read on the Saturday before a change opens at 09:00 local on the Monday after it (a
    fixed-offset clock computed 10:00 or 08:00 and missed the window)."""
    from gateway.windows import local_zone

    oslo = local_zone("Europe/Oslo")
    schedule = parse_schedule("mon 09:00-10:00")
    opening = schedule.next_opening(saturday.replace(tzinfo=oslo))
    assert opening is not None and opening.astimezone(timezone.utc).replace(tzinfo=None) == monday_9_utc
    monday_930 = (monday_9_utc + timedelta(minutes=30)).replace(tzinfo=timezone.utc).astimezone(oslo)
    assert schedule.is_open(monday_930) and monday_930.hour == 9
    nights = parse_schedule("22:00-06:00")  # the night of the change: open until 06:00 local, whatever its length
    change_night = saturday.replace(hour=23, tzinfo=oslo)
    assert nights.is_open(change_night) and nights.is_open(change_night.replace(day=saturday.day + 1, hour=5, minute=59))
    assert not nights.is_open(change_night.replace(day=saturday.day + 1, hour=6))


def test_the_zone_is_a_setting_checked_at_load() -> None:
    from gateway.settings import SettingsError, _routing
    from gateway.windows import local_zone

    assert _routing({"timezone": "Europe/Oslo"}).timezone == "Europe/Oslo"
    with pytest.raises(SettingsError, match="unknown time zone 'Europe/Osloo'"):
        _routing({"timezone": "Europe/Osloo"})
    assert local_zone("") is not None  # the system's
