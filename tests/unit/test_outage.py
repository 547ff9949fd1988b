"""gateway.outage: a database outage said once when it begins and once when it ends, from any loop."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy.exc import OperationalError

from gateway.outage import DatabaseOutage, unreachable


def test_an_outage_is_said_once_at_its_start_and_once_at_its_end_other_errors_each_time(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    outage = DatabaseOutage(clock=lambda: now[0])
    down = OperationalError("SELECT 1", {}, Exception("connection refused"))
    caplog.set_level(logging.WARNING, logger="gateway.outage")
    outage.answered()  # nothing to end
    for where in ("tick", "lease heartbeat", "tick", "dispatch tick"):
        outage.failed(where, down)
    assert outage.down and outage.failures == 4
    now[0] = 112.0
    outage.answered()
    outage.answered()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("queue database unreachable (tick: connection refused)") and "A700" in lines[0]
    assert lines[1] == "queue database answers again after 12 s (4 failed attempts); the gateway goes on"
    assert not outage.down and unreachable(down) and not unreachable(ValueError("a bug"))
    caplog.clear()
    outage.failed("tick", ValueError("a bug"))
    outage.failed("tick", ValueError("a bug"))
    assert [r.exc_info is not None for r in caplog.records] == [True, True] and not outage.down
