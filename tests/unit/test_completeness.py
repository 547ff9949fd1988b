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
