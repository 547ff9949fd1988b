"""Which server announcements switch maintenance, and which are only noted."""

from __future__ import annotations

import pytest

from gateway.maintenance import parse_announcement


@pytest.mark.parametrize("text, expected", [
    ("maintenance on: XMPP server upgrade 22:00-22:30", (True, "XMPP server upgrade 22:00-22:30")),
    ("Maintenance ON", (True, "")),
    ("dicomgw maintenance on PACS network work\nmore text below", (True, "PACS network work")),
    ("  maintenance off  ", (False, "")),
    ("DICOMGW MAINTENANCE OFF: done", (False, "done")),
    ("Reminder: maintenance on Monday", None),
    ("maintenance online", None),
    ("", None),
])
def test_announcements(text: str, expected: tuple[bool, str] | None) -> None:
    assert parse_announcement(text) == expected
