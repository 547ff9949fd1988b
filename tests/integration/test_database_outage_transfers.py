"""Transfers while a gateway's queue database takes no writes (PostgreSQL read-only, as after a failover to a
standby): an offer to it is refused busy with the reason; a send or an import it was doing when its database
stopped taking writes is taken up again once it does; each study arrives whole, once. Real Prosody, real
PostgreSQL (and Orthanc), both gateways in this process; the moment the database turns read-only is chosen by
wrapping one of the gateway's own steps (the step itself runs unchanged, against the read-only database)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from adapters.lab.localpeers import Orthanc, Prosody, orthanc_instances
from adapters.lab.postgres import PrivatePostgres
from adapters.lab.synthetic import generate_ct_study
from gateway import dispatch, importing, receiving
from gateway.settings import PacsSettings, QueueSettings
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
        with sites.running_prosody(tmp_path / "prosody", plugin_paths=[sites.PROXY65_VARIANT]) as prosody, \
                _sites(tmp_path, prosody, database, on="b") as (a, b):
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
            wait_for(lambda: sites.unit_states(a.gateway) == ["sent"], 120, 0.2,
                     what=lambda: f"the study sent ({sites.situation(a, b)})")
            sites.assert_received_whole(b.gateway, study)
    finally:
        database.remove()
    said = [r.getMessage() for r in caplog.records]
    assert not any("Slixmpp got into trouble" in m or "Error handling" in m for m in said), said
    assert not any(r.exc_info for r in caplog.records if r.name.startswith(("adapters", "slixmpp"))), said


def _queue_on(database: PrivatePostgres) -> QueueSettings:
    return replace(QueueSettings(db_url=database.url, stable_age_s=0.3), stable_check_interval_s=0.1, association_pause_s=120.0)


@contextmanager
def _sites(tmp_path: Path, prosody: Prosody, database: PrivatePostgres, on: str,
           pacs: PacsSettings | None = None) -> Iterator[tuple[sites.Site, sites.Site]]:
    """(A, B) on ``prosody``, A sending to B; the site ``on`` ("a" or "b") keeps its queue in ``database``;
    both stopped after."""
    def queue(site: str) -> dict[str, object] | None:
        return {"queue": _queue_on(database)} if site == on else None

    b = sites.start_site(tmp_path, "b", sites.B_JID, prosody, peers=(sites.A_JID,), pacs=pacs, settings_extra=queue("b"))
    try:
        a = sites.start_site(tmp_path, "a", sites.A_JID, prosody, peers=(sites.B_JID,), destination=sites.B_JID,
                             settings_extra=queue("a"))
        try:
            yield a, b
        finally:
            a.stop()
    finally:
        b.stop()


def _read_only_before(database: PrivatePostgres, cls: type, name: str, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """``cls.name`` runs as ever, but the first call finds the queue database read-only (turned so just before)."""
    original, turned = getattr(cls, name), []

    def wrapped(*args: object, **kwargs: object) -> object:
        if not turned:
            turned.append(True)
            database.read_only(True)
        return original(*args, **kwargs)

    monkeypatch.setattr(cls, name, wrapped)
    return turned


def _no_traceback_nor_lost_task(caplog: pytest.LogCaptureFixture) -> None:
    said = [r.getMessage() for r in caplog.records]
    assert not any("Task exception was never retrieved" in m or "failed unexpectedly" in m for m in said), said
    assert not any(r.exc_info for r in caplog.records), [r.getMessage() for r in caplog.records if r.exc_info]


@contextmanager
def _private_database(caplog: pytest.LogCaptureFixture) -> Iterator[PrivatePostgres]:
    """A PostgreSQL for one site's queue, removed after; then no traceback and no lost task in the log."""
    caplog.set_level(logging.WARNING)
    database = PrivatePostgres().start()
    try:
        yield database
    finally:
        database.remove()
    _no_traceback_nor_lost_task(caplog)


def _assert_moved(site: sites.Site, state: str, because: str) -> None:
    """The site's history has a move to ``state`` whose detail begins with ``because``."""
    history = [e["detail"] for e in site.gateway.store.audit_entries() if e.get("to_state") == state]
    assert any(d.startswith(because) for d in history), history


def _push_until_cut(a: sites.Site, b: sites.Site, tmp_path: Path, caplog: pytest.LogCaptureFixture, turned: list[bool],
                    work: str) -> object:
    """A small study pushed into A; returns once ``work`` ('sending unit', 'import of unit', 'stream') was cut
    by the read-only database, as the log says in one line."""
    study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=4, rows=128, columns=128)
    assert storescu(a.gateway.scp.port, study.files).returncode == 0
    cut = ": the queue database cannot be written: it is read-only"
    wait_for(lambda: turned and any(r.getMessage().startswith(work) and cut in r.getMessage() for r in caplog.records),
             90, 0.1, what=lambda: f"{work} ... cut ({sites.situation(a, b)})")
    return study


def test_a_send_whose_verdict_meets_a_read_only_database_is_offered_again_and_arrives_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A's database turns read-only after B verified the study, before A wrote the verdict: A's send task used to
    die with it ('Task exception was never retrieved'), its unit left 'sending' and claimed by a live process
    that no recovery takes back: the study stopped for good. Now the unit is put back to queued at A's first
    tick that can write, offered again, and B (which holds it) answers so: 'sent', B has it once."""
    with _private_database(caplog) as database, \
            sites.running_prosody(tmp_path / "prosody", plugin_paths=[sites.PROXY65_VARIANT]) as prosody, \
            _sites(tmp_path, prosody, database, on="a") as (a, b):
        turned = _read_only_before(database, dispatch._ProgressWriter, "finish", monkeypatch)
        study = _push_until_cut(a, b, tmp_path, caplog, turned, "sending unit")
        assert sites.unit_states(a.gateway) in (["sending"], ["offering"])  # read: the database answers reads
        database.read_only(False)
        wait_for(lambda: sites.unit_states(a.gateway) == ["sent"], 90, 0.2,
                 what=lambda: f"A's study sent ({sites.situation(a, b)})")
        sites.assert_received_whole(b.gateway, study)
        assert [u.instances for u in b.gateway.store.studies()] == [len(study.files)]  # once
        _assert_moved(a, "queued", "its send was cut by a queue database outage while ")


def test_an_import_whose_end_meets_a_read_only_database_is_taken_up_again_and_delivered_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """B's database turns read-only as its import into the PACS ends: the import thread used to die with it, its
    unit left 'importing' for good (no receipt to A). Now it goes back to received at B's first tick that can
    write, the import runs again (nothing is sent to the PACS twice: its instances' statuses were kept), B's unit
    is delivered and A gets its receipt."""
    with _private_database(caplog) as database, \
            sites.running_prosody(tmp_path / "prosody", plugin_paths=[sites.PROXY65_VARIANT]) as prosody, \
            Orthanc(tmp_path / "orthanc") as orthanc:
        orthanc.start()
        pacs = PacsSettings(ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port, calling_ae_title="GWB",
                            timeout_s=10, retry_base_s=0.2, retry_max_s=0.5)
        with _sites(tmp_path, prosody, database, on="b", pacs=pacs) as (a, b):
            turned = _read_only_before(database, importing.ImportService, "_delivered", monkeypatch)
            study = _push_until_cut(a, b, tmp_path, caplog, turned, "import of unit")
            assert sites.unit_states(b.gateway) == ["importing"]
            database.read_only(False)
            wait_for(lambda: sites.unit_states(a.gateway) == ["delivered"], 90, 0.2,
                     what=lambda: f"A's study delivered ({sites.situation(a, b)})")
            assert sites.unit_states(b.gateway) == ["delivered"]
            assert set(orthanc_instances(orthanc)) == set(study.sop_instance_uids)
            _assert_moved(b, "received", "its import was cut by a queue database outage while importing")


def test_a_stream_whose_end_meets_a_read_only_database_is_kept_and_taken_at_the_next_offer(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """B's database turns read-only as the last byte of a stream arrives: the verdict says 'incomplete' with the
    reason (not 'rejected': the bundle is not at fault), B keeps what it received, refuses A's next offers busy
    while it cannot write, and takes the study at the first offer once it can; B has it once."""
    with _private_database(caplog) as database, \
            sites.running_prosody(tmp_path / "prosody", plugin_paths=[sites.PROXY65_VARIANT]) as prosody, \
            _sites(tmp_path, prosody, database, on="b") as (a, b):
        turned = _read_only_before(database, receiving.AuditedSink, "finish", monkeypatch)
        study = _push_until_cut(a, b, tmp_path, caplog, turned, "stream ")
        told = "the receiver's queue database cannot be written: it is read-only; offer it again"
        wait_for(lambda: any(t["direction"] == "out" and t["error"] == "receiver: " + told
                             for t in a.gateway.store.transfers()), 60, 0.1,
                 what=lambda: f"A to hear the verdict ({sites.situation(a, b)})")
        database.read_only(False)
        wait_for(lambda: sites.unit_states(a.gateway) == ["sent"], 120, 0.2,
                 what=lambda: f"A's study sent ({sites.situation(a, b)})")
        sites.assert_received_whole(b.gateway, study)
        assert [u.instances for u in b.gateway.store.studies()] == [len(study.files)]  # once

