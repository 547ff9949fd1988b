"""Which server announcements switch maintenance, and which are only noted."""

from __future__ import annotations

import pytest

from gateway.maintenance import parse_announcement


@pytest.mark.parametrize("text, expected", [
    ("dicomgw maintenance on: XMPP server upgrade 22:00-22:30", (True, "XMPP server upgrade 22:00-22:30")),
    ("Dicomgw Maintenance ON", (True, "")),
    ("dicomgw maintenance on: PACS network work\nmore text below", (True, "PACS network work")),
    ("  dicomgw maintenance off  ", (False, "")),
    ("DICOMGW MAINTENANCE OFF: done", (False, "done")),
    ("dicomgw maintenance on: a\x00b\x1b[2Jc\x07", (True, "ab[2Jc")),  # control characters and NUL taken out
    ("Maintenance on the roof tomorrow 10:00", None),  # an operator's notice, not a switch
    ("maintenance on-call list attached", None),
    ("maintenance on: XMPP upgrade", None),  # the form is exact: the dicomgw prefix is part of it
    ("dicomgw maintenance on PACS work", None),  # a message needs the colon
    ("Reminder: dicomgw maintenance on", None),
    ("dicomgw maintenance online", None),
    ("", None),
])
def test_announcements(text: str, expected: tuple[bool, str] | None) -> None:
    assert parse_announcement(text) == expected
