"""What the web page and `dicomgw queue` say of a study being sent: a study whose every byte has been handed to
the network is still `sending` until the receiver's verdict, and says so instead of a bare 100 %."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

import pytest

from gateway.cli import _state_text
from gateway.dashboard import AWAITING_VERDICT, unit_row
from gateway.model import StudySummary

NOW = datetime(2026, 12, 1)  # naive UTC, as the store gives it
SENDING = StudySummary(unit_id=1, study_instance_uid="1.2.3", unit_seq=1, state="sending", patient_name="DOE^J",
                       patient_id="P1", study_description="CT HEAD", modalities="CT", instances=3, size_bytes=1000,
                       destination="radiology.hospital-b@helsenett.test", created_at=NOW, last_instance_at=NOW,
                       state_changed_at=NOW, flags="", error=None, method="s5b", progress_bytes=1100, bundle_bytes=1100)


def test_a_study_with_every_byte_out_says_it_waits_for_the_verdict() -> None:
    row = unit_row(SENDING)
    assert (row["percent"], row["awaiting"]) == (100, AWAITING_VERDICT)
    assert _state_text(SENDING) == f"sending 100% ({AWAITING_VERDICT}) (s5b)"


@pytest.mark.parametrize("summary", [
    replace(SENDING, progress_bytes=550),  # halfway: the percentage says it
    replace(SENDING, state="sent"),  # the verdict came
    replace(SENDING, state="receiving", destination=None, origin_peer="radiology.hospital-a@helsenett.test"),  # inbound
    replace(SENDING, bundle_bytes=0, progress_bytes=0),  # the bundle not yet built
], ids=["halfway", "sent", "inbound", "no-bundle"])
def test_other_studies_say_nothing_of_a_verdict(summary: StudySummary) -> None:
    assert unit_row(summary)["awaiting"] == ""
    assert AWAITING_VERDICT not in _state_text(summary)
