"""Which studies the open associations still feed (gateway.service.CompletenessService.held): pure logic on an
injected clock; the SCP's use of it is tested with dcmtk in tests/integration/test_scp.py."""

from __future__ import annotations

from gateway.service import CompletenessService


def test_a_study_is_held_while_its_association_is_busy_or_briefly_silent_and_released_otherwise() -> None:
    now = [100.0]
    service = CompletenessService(store=None, stable_age_s=5.0, clock=lambda: now[0])  # type: ignore[arg-type]
    busy, silent, fresh = service.open_feed(), service.open_feed(), service.open_feed()
    busy.unit, busy.waiting_since = 1, None  # the gateway works on its next PDU, however long it takes
    silent.unit, silent.waiting_since = 2, 90.0  # the modality silent for 10 s: beyond the stable age
    fresh.waiting_since = 99.0  # nothing stored yet: holds nothing
    assert service.held() == [1]
    silent.waiting_since = 96.0  # silent for 4 s: within the stable age
    assert service.held() == [1, 2]
    busy.unit = 3  # the association went on to the next study: the first is no longer held
    assert service.held() == [2, 3]
    now[0] = 200.0
    service.close_feed(busy)  # released or aborted
    assert service.held() == []


def test_a_longer_association_pause_holds_a_silent_association_s_study_that_long() -> None:
    """``[queue] association_pause_s``: a modality that pauses between two instances of one association (longer
    than the stable age, shorter than the pause) keeps its study open; beyond the pause it is released."""
    now = [100.0]
    service = CompletenessService(store=None, stable_age_s=5.0, clock=lambda: now[0], pause_s=60.0)  # type: ignore[arg-type]
    feed = service.open_feed()
    feed.unit, feed.waiting_since = 7, 100.0
    now[0] = 159.0  # silent 59 s: beyond the stable age, within the pause
    assert service.held() == [7]
    now[0] = 160.0
    assert service.held() == []
