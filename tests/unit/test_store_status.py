"""C-STORE status mapping (PS3.4 B.2.3, PS3.7 C): what is stored, retried, or refused for good."""

from __future__ import annotations

import pytest

from gateway.importing import Verdict, classify_store_status


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (0x0000, Verdict.STORED),
        (0x0001, Verdict.WARNING), (0xB000, Verdict.WARNING), (0xB006, Verdict.WARNING), (0xB007, Verdict.WARNING),
        (0xA700, Verdict.TRANSIENT), (0xA7FF, Verdict.TRANSIENT), (0x0110, Verdict.TRANSIENT),
        (0xA900, Verdict.PERMANENT), (0xA9FF, Verdict.PERMANENT), (0xC000, Verdict.PERMANENT), (0xCFFF, Verdict.PERMANENT),
        (0x0122, Verdict.PERMANENT), (0x0124, Verdict.PERMANENT),
    ],
)
def test_statuses(status: int, verdict: Verdict) -> None:
    assert classify_store_status(status) == verdict


def test_a_warning_outside_b000_b007_is_not_counted_as_stored() -> None:
    assert classify_store_status(0xB008) == Verdict.TRANSIENT
