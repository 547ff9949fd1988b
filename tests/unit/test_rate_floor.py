"""The floor an inbound XMPP stream's rate must keep once its grace has passed (adapters.xmpp.common.RateFloor)."""

from __future__ import annotations

import pytest

from adapters.xmpp.common import RateFloor


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_slow_start_is_allowed_for_the_grace_then_the_average_must_hold() -> None:
    clock = Clock()
    floor = RateFloor(min_bytes_per_s=1000, grace_s=10, clock=clock)
    clock.now += 9
    floor.add(10)  # 1 byte/s, within the grace
    clock.now += 2
    floor.add(20_000)  # 11 s: 20,010 bytes, over 11,000
    clock.now += 10
    with pytest.raises(TimeoutError, match=r"stream at 953 bytes/s after 21 s \(at least 1000 required\)"):
        floor.add(0)  # 21 s: 20,010 bytes, under 21,000


def test_a_stream_at_the_floor_is_never_cut() -> None:
    clock = Clock()
    floor = RateFloor(min_bytes_per_s=1000, grace_s=1, clock=clock)
    for _ in range(100):
        clock.now += 1
        floor.add(1000)
    assert floor.total == 100_000
