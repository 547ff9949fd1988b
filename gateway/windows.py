"""Transfer windows: when routine studies may go to a peer (``dicomgw peers edit JID --schedule``).

A schedule is windows separated by ``;``, each ``[DAYS] HH:MM-HH:MM`` in the gateway's local time (the zone of
``[routing] timezone``, default the system's: :func:`local_zone`; read zone-aware, so a ``mon 09:00-10:00`` window
opens at 09:00 on the Monday after a daylight-saving change, not at 09:00 of the offset before it):
``"22:00-06:00"`` (every night), ``"mon-fri 18:00-07:00; sat,sun 00:00-24:00"`` (evenings and weekends).
DAYS is a comma-separated list of days or day ranges (``mon``..``sun``); without it, every day. A window
whose end is not after its start runs past midnight and belongs to the day it starts on. An empty schedule
is always open. STAT studies ignore windows (``gateway.transfer``). Pure functions of a given time, so tests
inject the clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(r"^(?:(?P<days>[a-z,\-]+)\s+)?(?P<h1>\d{1,2}):(?P<m1>\d{2})\s*-\s*(?P<h2>\d{1,2}):(?P<m2>\d{2})$")


def local_zone(name: str = "") -> tzinfo:
    """The zone ``name`` (IANA, e.g. ``Europe/Oslo``), or with none the system's (``TZ``, ``/etc/localtime``).
    Raises ValueError for a name the zone database does not have."""
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {name!r} (an IANA name such as Europe/Oslo)") from exc
    import os

    if os.environ.get("TZ", "").strip(":"):
        try:
            return ZoneInfo(os.environ["TZ"].strip(":"))
        except (ZoneInfoNotFoundError, ValueError):
            pass
    localtime = Path("/etc/localtime")
    if localtime.exists():
        with localtime.open("rb") as fh:
            return ZoneInfo.from_file(fh, key="localtime")
    return ZoneInfo("UTC")


def local_clock(zone: tzinfo) -> datetime:
    """Now in ``zone`` (aware, with the zone's rules: the dispatcher's clock for windows)."""
    return datetime.now(zone)


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # 0 = Monday
    start_min: int
    end_min: int  # <= start_min: ends the next day


@dataclass(frozen=True)
class Schedule:
    windows: tuple[Window, ...] = ()
    text: str = ""

    def next_opening(self, now: datetime) -> datetime | None:
        """None while a window is open at ``now``, else when the next one opens (same tzinfo as ``now``)."""
        if not self.windows:
            return None
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        soonest: datetime | None = None
        for day_offset in range(-1, 8):
            day = midnight + timedelta(days=day_offset)
            for window in self.windows:
                if day.weekday() not in window.days:
                    continue
                start = day + timedelta(minutes=window.start_min)
                length = (window.end_min - window.start_min) % (24 * 60) or 24 * 60
                if start <= now < start + timedelta(minutes=length):
                    return None
                if start > now and (soonest is None or start < soonest):
                    soonest = start
        return soonest

    def is_open(self, now: datetime) -> bool:
        return self.next_opening(now) is None


def parse_schedule(text: str) -> Schedule:
    """The schedule in ``text``; raises ValueError naming the part it cannot read."""
    windows = []
    for part in (p.strip().lower() for p in text.split(";")):
        if not part:
            continue
        found = _WINDOW.match(part)
        if not found:
            raise ValueError(f"transfer window {part!r}: write [DAYS] HH:MM-HH:MM, e.g. \"mon-fri 18:00-07:00\"")
        start = _minutes(found["h1"], found["m1"], part)
        end = _minutes(found["h2"], found["m2"], part)
        windows.append(Window(_days(found["days"], part) if found["days"] else frozenset(range(7)), start, end))
    return Schedule(tuple(windows), "; ".join(p.strip() for p in text.split(";") if p.strip()))


def _minutes(hours: str, minutes: str, part: str) -> int:
    h, m = int(hours), int(minutes)
    if m > 59 or h > 24 or (h == 24 and m):
        raise ValueError(f"transfer window {part!r}: {hours}:{minutes} is not a time of day")
    return h * 60 + m


def _days(text: str, part: str) -> frozenset[int]:
    days: set[int] = set()
    for item in text.split(","):
        first, _, last = item.partition("-")
        if first not in DAYS or (last and last not in DAYS):
            raise ValueError(f"transfer window {part!r}: days are mon, tue, wed, thu, fri, sat, sun (or ranges mon-fri)")
        a, b = DAYS.index(first), DAYS.index(last or first)
        days.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    return frozenset(days)
