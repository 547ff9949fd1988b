"""A receiving gateway whose queue database takes no writes (PostgreSQL read-only, as after a failover to a
standby): a peer's offer is refused busy with the reason, the sender holds the study without counting a failed
attempt and offers it again, and the study crosses whole once the database takes writes again. Real Prosody,
real PostgreSQL, both gateways in this process."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest

from adapters.lab.postgres import PrivatePostgres
from adapters.lab.synthetic import generate_ct_study
from gateway.settings import QueueSettings
from tests.helpers import storescu, wait_for
from tests.integration import test_xmpp_transfer as sites

SAID = "busy: the receiver's queue database cannot be written: it is read-only"


def test_an_offer_to_a_gateway_whose_queue_database_takes_no_writes_waits_and_crosses_once_it_does(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """B answered such an offer with slixmpp's 'undefined-condition (Slixmpp got into trouble.)' after a traceback,
    and each refused offer kept one of B's inbound admissions (its claim write failed after the count): more
    refusals than ``max_inbound`` left B 'busy: N inbound transfer(s) running' for good."""
    caplog.set_level(logging.WARNING)
    database = PrivatePostgres().start()
    try:
        with sites.running_prosody(tmp_path / "prosody", plugin_paths=[sites.PROXY65_VARIANT]) as prosody:
            queue = replace(QueueSettings(db_url=database.url, stable_age_s=0.3), stable_check_interval_s=0.1,
                            association_pause_s=120.0)
            b = sites.start_site(tmp_path, "b", sites.B_JID, prosody, peers=(sites.A_JID,), settings_extra={"queue": queue})
            a = sites.start_site(tmp_path, "a", sites.A_JID, prosody, peers=(sites.B_JID,), destination=sites.B_JID)
            try:
                database.read_only(True)
                wait_for(lambda: b.gateway.outage.down, 60, 0.1, what="B to find its queue database read-only")
                study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=3, rows=64, columns=64)
                assert storescu(a.gateway.scp.port, study.files).returncode == 0

                def refusals() -> int:
                    return sum(1 for r in caplog.records if r.getMessage().endswith(
                        f"from {sites.A_JID}: the queue database cannot be written: it is read-only"))

                limit = b.gateway.settings.xmpp.max_inbound + b.gateway.settings.xmpp.stat_reserve
                wait_for(lambda: refusals() > limit, 90, 0.1, what=lambda: f"A's offers refused ({sites.situation(a, b)})")

                def waiting() -> object:  # between two offers (A offers again every second here)
                    units = a.gateway.store.studies()
                    return units if [(u.state, SAID in (u.error or "")) for u in units] == [("waiting-peer", True)] else None

                (unit,) = wait_for(waiting, 60, 0.02, what=lambda: f"A to wait for B ({sites.situation(a, b)})")
                assert unit.attempts == 0  # busy: not a failed attempt of the study
                assert b.gateway.inbound_policy is not None and b.gateway.inbound_policy.active == 0  # none kept
                database.read_only(False)
                wait_for(lambda: sites.unit_states(a.gateway) == ["sent"], 120, 0.2, what=lambda: f"the study sent ({sites.situation(a, b)})")
                sites.assert_received_whole(b.gateway, study)
            finally:
                a.stop()
                b.stop()
    finally:
        database.remove()
    said = [r.getMessage() for r in caplog.records]
    assert not any("Slixmpp got into trouble" in m or "Error handling" in m for m in said), said
    assert not any(r.exc_info for r in caplog.records if r.name.startswith(("adapters", "slixmpp"))), said
