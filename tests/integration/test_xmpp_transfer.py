"""Two gateways and a real Prosody (started here, on loopback, with mod_proxy65): studies cross over XMPP."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from adapters.lab.localpeers import Prosody
from adapters.lab.synthetic import generate_ct_study
from adapters.xmpp.stanzas import NS_S5B
from gateway.bootstrap import Gateway, GatewayController
from gateway.settings import PacsSettings, RoutingSettings, WebSettings, XmppSettings
from tests.helpers import TamperingRelay, dataset_bytes, free_port, storescu, wait_for
from tests.integration.test_scp import make_settings

DOMAIN = "helsenett.test"
A_JID = f"radiology.hospital-a@{DOMAIN}"
B_JID = f"radiology.hospital-b@{DOMAIN}"
STRANGER_JID = f"radiology.hospital-x@{DOMAIN}"
SITE_OF = {A_JID: "a", B_JID: "b", STRANGER_JID: "x"}  # each site's directory under tmp_path


def site_identity(tmp_path: Path, name: str) -> tuple[Path, Path, str]:
    """A site's identity files (made on first use, as `dicomgw keys init` does) and its fingerprint."""
    from adapters.xmpp.e2e import ensure_identity

    key, cert = tmp_path / name / "identity" / "gateway.key", tmp_path / name / "identity" / "gateway.crt"
    identity, _created = ensure_identity(key, cert, name)
    return key, cert, identity.fingerprint


PROXY65_VARIANT = Path(__file__).resolve().parents[2] / "conf" / "prosody" / "plugins"


@contextmanager
def running_prosody(workdir: Path, **options: Any) -> Iterator[Prosody]:
    """A Prosody on loopback with the three gateway accounts of these tests, stopped by PID at the end."""
    server = Prosody(workdir, domain=DOMAIN, **options)
    for user in ("radiology.hospital-a", "radiology.hospital-b", "radiology.hospital-x"):
        server.add_account(user, f"pw-{user}")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["stock-proxy65", "dicomgw-proxy65"])
def prosody(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Prosody]:
    """Every transfer test runs against Debian's proxy65 and against the variant shipped in conf/prosody."""
    with running_prosody(tmp_path / "prosody", plugin_paths=[PROXY65_VARIANT] if request.param == "dicomgw-proxy65" else []) as server:
        yield server


@dataclass
class Site:
    controller: GatewayController
    gateway: Gateway

    def stop(self) -> None:
        self.controller.stop()


def start_site(tmp_path: Path, name: str, jid: str, prosody: Prosody, peers: tuple[str, ...], destination: str = "",
               pacs: PacsSettings | None = None, allowed_ae: tuple[str, ...] = (), dicom_port: int | None = None,  # None: any free port, bound by the SCP itself (no race with another test for it)
               routing: RoutingSettings | None = None, web: WebSettings | None = None, dicom: dict[str, Any] | None = None,
               settings_extra: dict[str, Any] | None = None, stable_age_s: float = 0.3, **xmpp: object) -> Site:
    # The sites' stable age is short (tests run many studies), and storescu on a loaded machine can pause longer
    # than that between two instances: an open association holds its study (association_pause_s), so that a
    # study is one unit however busy the machine (a split showed as three units for two studies in CI).
    settings = make_settings(tmp_path / name, dicom_port or 0, stable_age_s=stable_age_s, stable_check_interval_s=0.1,
                             association_pause_s=120.0)
    settings = replace(settings, pacs=pacs or PacsSettings(),
                       dicom=replace(settings.dicom, allowed_calling_ae_titles=settings.dicom.allowed_calling_ae_titles + allowed_ae,
                                     **(dicom or {})))
    local = jid.split("@")[0]
    key, cert, _fp = site_identity(tmp_path, name)
    pins = tuple((p, site_identity(tmp_path, SITE_OF[p])[2]) for p in peers if p in SITE_OF)
    settings = replace(
        settings,
        xmpp=replace(
            XmppSettings(
                jid=f"{jid}/gw1", password=f"pw-{local}", host="127.0.0.1", port=prosody.c2s_port, use_tls=prosody.tls,
                ca_file=prosody.ca_file,
                peers=peers, retry_base_s=0.2, retry_max_s=1.0, verdict_timeout_s=60, dispatch_interval_s=0.1,
                identity_key_file=key, identity_cert_file=cert, peer_pins=pins,
            ),
            **xmpp,
        ),
        routing=routing or RoutingSettings(default_destination=destination),
        web=web or settings.web,
        **(settings_extra or {}),
    )
    controller = GatewayController(settings)
    return Site(controller, controller.start())


def unit_states(gw: Gateway) -> list[str]:
    return [s.state for s in gw.store.studies()]


def push_while_b_is_offline(a: Site, tmp_path: Path) -> Any:
    """A small CT study pushed into A while B is offline: A holds it ``waiting-peer``."""
    study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=3, rows=64, columns=64)
    assert storescu(a.gateway.scp.port, study.files).returncode == 0
    wait_for(lambda: unit_states(a.gateway) == ["waiting-peer"], 60, 0.1, what="A to wait for offline B")
    return study


def received_instances(gw: Gateway) -> dict[str, Path]:
    found = {}
    for summary in gw.store.studies():
        if summary.origin_peer:
            for _unit, rows in gw.store.study_units(summary.study_instance_uid):
                found.update({i.sop_instance_uid: gw.spool.absolute(i.spool_path) for i in rows})
    return found


def assert_received_whole(gw: Gateway, study: Any) -> None:
    """Every instance of ``study`` is in ``gw``'s spool as received, byte for byte."""
    received = received_instances(gw)
    assert set(received) == set(study.sop_instance_uids)
    for path, uid in zip(study.files, study.sop_instance_uids, strict=True):
        assert dataset_bytes(received[uid]) == dataset_bytes(path)


def small_study_goes_through(a: Site, b: Site, tmp_path: Path, within_s: float) -> None:
    """A 5-slice study pushed into A is sent and every instance is at B."""
    study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=5, rows=64, columns=64)
    assert storescu(a.gateway.scp.port, study.files).returncode == 0
    wait_for(lambda: unit_states(a.gateway) == ["sent"], within_s, 0.1, what="A's study to be sent")
    assert set(received_instances(b.gateway)) == set(study.sop_instance_uids)


def situation(*sites: Any) -> str:
    """What each site's queue and transfer rows say (a failed wait prints it)."""
    return "; ".join(
        f"{i}: units {[(u.state, u.error) for u in site.gateway.store.studies()]}, transfers "
        f"{[(t['direction'], t['method'], t['outcome'], t['bytes'], t['error']) for t in site.gateway.store.transfers()]}"
        for i, site in enumerate(sites))


def test_study_crosses_from_a_to_b_over_mediated_s5b(tmp_path: Path, prosody: Prosody) -> None:
    b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,))
    a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b")
    try:
        study = generate_ct_study(tmp_path / "ct", series=2, slices_per_series=20, rows=128, columns=128)
        assert storescu(a.gateway.scp.port, study.files).returncode == 0
        wait_for(lambda: unit_states(a.gateway) == ["sent"], 60, 0.1,
                 what=lambda: f"A's study to be sent (A, B: {situation(a, b)})")
        assert_received_whole(b.gateway, study)
        received = received_instances(b.gateway)
        sent_by_a = {i.sop_instance_uid: i.sha256 for _u, rows in a.gateway.store.study_units(study.study_instance_uid) for i in rows}
        assert {uid: hashlib.sha256(p.read_bytes()).hexdigest() for uid, p in received.items()} == sent_by_a
        (unit,) = a.gateway.store.studies()
        assert (unit.method, unit.destination, unit.progress_bytes) == ("s5b", B_JID, unit.bundle_bytes)
        (b_unit,) = b.gateway.store.studies()
        assert (b_unit.state, b_unit.origin_peer, b_unit.instances) == ("received", A_JID, 40)
        assert b_unit.patient_name == "DEMO^PATIENT" and b_unit.bundle_bytes == unit.bundle_bytes
        moves = [(e["from_state"], e["to_state"]) for e in b.gateway.store.audit_entries(unit_id=b_unit.unit_id)]
        assert moves[::-1] == [(None, "receiving"), ("receiving", "received")]
        out = a.gateway.store.transfers()
        assert [(t["direction"], t["method"], t["outcome"]) for t in out] == [("out", "s5b", "received")]
        assert a.gateway.agent.stream_managed and b.gateway.agent.stream_managed  # XEP-0198 on Prosody
        status = a.gateway.agent.status  # what `dicomgw status` shows
        assert (status["state"], status["tls_version"]) == ("online", "TLSv1.3") and len(status["server_cert_sha256"]) == 64
    finally:
        a.stop()
        b.stop()


def test_ibb_carries_the_study_when_the_server_has_no_proxy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """... and the IBB blocks (serialised by us, sent raw) are counted by XEP-0198 stream management as the stanzas
    slixmpp sends itself: no "inconsistent sequence numbers" error at the server's acks (the unacked queue a
    resumed stream resends stays right)."""
    server = Prosody(tmp_path / "prosody", domain=DOMAIN, proxy65=False)
    for user in ("radiology.hospital-a", "radiology.hospital-b"):
        server.add_account(user, f"pw-{user}")
    server.start()
    b = start_site(tmp_path, "b", B_JID, server, peers=(A_JID,))
    a = start_site(tmp_path, "a", A_JID, server, peers=(B_JID,), destination="radiology.hospital-b")
    try:
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=10, rows=256, columns=256)
        assert storescu(a.gateway.scp.port, study.files).returncode == 0
        wait_for(lambda: unit_states(a.gateway) == ["sent"], 60, 0.1, what="A's study to be sent")
        assert set(received_instances(b.gateway)) == set(study.sop_instance_uids)
        (unit,) = a.gateway.store.studies()
        assert unit.method == "ibb"
        assert [r.getMessage() for r in caplog.records if "sequence numbers" in r.getMessage()] == []
        attempts = [(t["method"], t["outcome"]) for t in a.gateway.store.transfers()]
        assert attempts == [("s5b", "cut"), ("ibb", "received")]
        assert "no SOCKS5 proxy" in (a.gateway.store.transfers()[0]["error"] or "")
    finally:
        a.stop()
        b.stop()
        server.stop()


def test_unknown_sender_is_refused_and_audited(tmp_path: Path, prosody: Prosody) -> None:
    b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,))
    x = start_site(tmp_path, "x", STRANGER_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b")
    try:
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=2, rows=32, columns=32)
        assert storescu(x.gateway.scp.port, study.files).returncode == 0
        wait_for(lambda: x.gateway.store.transfers(), 30, 0.1, what="a refused attempt")
        first = x.gateway.store.transfers()[0]
        assert first["outcome"] == "refused" and first["error"].startswith("forbidden:")
        assert b.gateway.store.studies() == []
        wait_for(lambda: any(e["event"] == "offer_refused" and STRANGER_JID in e["detail"] for e in b.gateway.store.audit_entries()),
                 30, 0.1, what="B's offer_refused audit row (written off the loop within a second)")
        # A refusal no retry can change (gateway.retry: permanent) stops the unit in `failed` with the reason.
        wait_for(lambda: unit_states(x.gateway) == ["failed"], 10, 0.05, what="the unit failed with the refusal")
        (unit,) = x.gateway.store.studies()
        assert unit.error is not None and unit.error.startswith("peer refused the offer: forbidden")
        assert len(x.gateway.store.transfers()) == 1  # not retried by itself
        # B's admin admits X (`dicomgw peers add JID --fingerprint SHA256`, read out of band); X's admin
        # retries the study (`dicomgw queue retry`).
        b.gateway.store.add_peer(STRANGER_JID, "admitted by the admin", site_identity(tmp_path, "x")[2])
        wait_for(lambda: b.gateway.directory.allowed(STRANGER_JID), 10, 0.05,
                 what="B to know the new peer (its peer table is re-read every second)")
        x.gateway.store.retry_unit(unit.unit_id)
        wait_for(lambda: unit_states(x.gateway) == ["sent"], 30, 0.1,
                 what=lambda: f"the admitted peer's study to be sent: {x.gateway.store.transfers()[-3:]}")
        assert set(received_instances(b.gateway)) == set(study.sop_instance_uids)
    finally:
        x.stop()
        b.stop()


def test_an_activation_the_proxy_refuses_ends_the_early_handshake_and_the_study_goes_over_ibb(
        tmp_path: Path, prosody: Prosody, caplog: pytest.LogCaptureFixture) -> None:
    """The TLS handshake starts behind the activation; when the proxy refuses the activation (here: it names a
    target the proxy has no leg of), the handshake waiting behind it ends at once, nothing of it is left
    unread, and the study goes over IBB, whole. (A proxy that links the legs before any activation, the
    variant, is used here as one that does not: its early link is the proxy_legs test's.)"""
    import logging

    caplog.set_level(logging.WARNING)
    b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,))
    a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b")
    try:
        agent = a.gateway.agent
        wait_for(lambda: agent.s5b.proxy is not None, 30, 0.1, what="A to know the proxy (looked up at session start)")
        agent.s5b.links_early = False
        send_iq = agent.send_iq

        async def wrong_target(iq: Any, timeout_s: float | None = None) -> Any:
            activate = iq.xml.find("{http://jabber.org/protocol/bytestreams}query/{http://jabber.org/protocol/bytestreams}activate")
            if activate is not None:
                activate.text = "nobody@helsenett.test/none"
            return await send_iq(iq, timeout_s)

        agent.send_iq = wrong_target
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=4, rows=64, columns=64)
        assert storescu(a.gateway.scp.port, study.files).returncode == 0
        wait_for(lambda: unit_states(a.gateway) == ["sent"], 60, 0.1, what="A's study to be sent")
        attempts = a.gateway.store.transfers()
        assert [(t["method"], t["outcome"]) for t in attempts] == [("s5b", "cut"), ("ibb", "received")], \
            [(t["method"], t["outcome"], t["error"]) for t in attempts]
        assert set(received_instances(b.gateway)) == set(study.sop_instance_uids)
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
        # B did not wait out its handshake timeout for a sender stuck in a dead handshake (and report it as a
        # refused end-to-end channel):
        assert not [r for r in caplog.records if "no end-to-end TLS handshake" in r.getMessage()]
    finally:
        a.stop()
        b.stop()


def test_proxy_connection_cut_mid_stream_resumes_over_ibb(tmp_path: Path, prosody: Prosody) -> None:
    relay = TamperingRelay(prosody.proxy_port, after_bytes=1_500_000, mode="cut")
    b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,))
    a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b", s5b_proxy=f"127.0.0.1:{relay.port}")
    try:
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=30, rows=256, columns=256)  # ~4 MB
        assert storescu(a.gateway.scp.port, study.files).returncode == 0
        wait_for(lambda: unit_states(a.gateway) == ["sent"], 60, 0.1, what="A's study to be sent")
        assert relay.tampered.is_set()
        attempts = a.gateway.store.transfers()
        assert [(t["method"], t["outcome"]) for t in attempts] == [("s5b", "cut"), ("ibb", "received")]
        assert attempts[1]["offset_bytes"] > 0 and attempts[1]["offset_bytes"] % 65536 == 0
        assert_received_whole(b.gateway, study)
        inbound = [t for t in b.gateway.store.transfers() if t["direction"] == "in"]
        assert [t["outcome"] for t in inbound] == ["cut", "received"] and inbound[1]["offset_bytes"] > 0
        (b_unit,) = b.gateway.store.studies()
        paused = [e["detail"] for e in b.gateway.store.audit_entries(unit_id=b_unit.unit_id) if e["event"] == "receive_paused"]
        assert len(paused) == 1 and f"resumes when {A_JID} offers it again" in paused[0]
        assert b_unit.error is None  # the resumed stream cleared it
    finally:
        a.stop()
        b.stop()
        relay.stop()


def resumed_over_ibb_past_a_bad_proxy(tmp_path: Path, prosody: Prosody, mode: str, idle_s: float) -> list[dict[str, Any]]:
    """A ~42 MB study (more than the socket buffers along the path hold, so that A's writes block too) sent
    through a proxy path that misbehaves after 1.5 MB (``TamperingRelay`` ``mode``): the S5B attempt is cut on
    both sides, the study resumes over IBB from B's offset and arrives byte for byte. A's attempts."""
    relay = TamperingRelay(prosody.proxy_port, after_bytes=1_500_000, mode=mode)
    b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,), s5b_idle_timeout_s=idle_s)
    a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b",
                   s5b_proxy=f"127.0.0.1:{relay.port}", s5b_idle_timeout_s=idle_s)
    try:
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=80, rows=512, columns=512)
        assert storescu(a.gateway.scp.port, study.files).returncode == 0
        wait_for(lambda: unit_states(a.gateway) == ["sent"], 90, 0.1,
                 what=lambda: f"A's study to be sent ({situation(a, b)})")
        assert relay.tampered.is_set()
        attempts = a.gateway.store.transfers()
        assert [(t["method"], t["outcome"]) for t in attempts] == [("s5b", "cut"), ("ibb", "received")]
        inbound = [t for t in b.gateway.store.transfers() if t["direction"] == "in"]
        assert [t["outcome"] for t in inbound] == ["cut", "received"] and inbound[1]["offset_bytes"] > 0
        assert_received_whole(b.gateway, study)
        return attempts
    finally:
        a.stop()
        b.stop()
        relay.stop()


def test_a_proxy_that_stalls_mid_stream_cuts_the_attempt_after_the_idle_limit_and_the_study_resumes(
        tmp_path: Path, prosody: Prosody) -> None:
    """The proxy path stops relaying mid-stream and closes nothing (a hung proxy): the end-to-end TLS streams
    give up after ``s5b_idle_timeout_s`` (2 s here) and the study resumes over IBB from what B kept. Before,
    inside TLS, the receiver's read (and the sender's write, once the buffers filled) waited for ever: no
    verdict, the study stayed ``sending``."""
    resumed_over_ibb_past_a_bad_proxy(tmp_path, prosody, "stall", 2.0)


def test_a_proxy_that_trickles_is_cut_by_the_receivers_rate_floor_and_the_sender_stops_at_its_verdict(
        tmp_path: Path, prosody: Prosody, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile proxy path: after 1.5 MB, 500 bytes/s, within every idle limit, and A's leg held open whatever
    B's side does. B's rate floor (lowered here: 100 kB/s after 1 s) cuts its side and says so in its verdict;
    A, whose write is still blocked, stops at that verdict (before, it sent on: the trickle's progress keeps
    its idle limit, 30 s here, from firing), and the study resumes over IBB."""
    import adapters.xmpp.common as xmpp_common

    monkeypatch.setattr(xmpp_common, "STREAM_GRACE_S", 1.0)
    monkeypatch.setattr(xmpp_common, "MIN_STREAM_BYTES_PER_S", 100_000)
    attempts = resumed_over_ibb_past_a_bad_proxy(tmp_path, prosody, "trickle", 30.0)
    error = attempts[0]["error"] or ""
    assert error.startswith("receiver: ") and "bytes before the stream ended" in error, attempts[0]  # B's verdict


def test_corrupted_byte_is_rejected_and_the_study_resent(tmp_path: Path, prosody: Prosody) -> None:
    """Lab mode (no end-to-end channel): the receiver's SHA-256 check catches the flipped byte."""
    relay = TamperingRelay(prosody.proxy_port, after_bytes=300_000, mode="flip")
    b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,), require_e2e=False, peer_pins=())
    a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b",
                   s5b_proxy=f"127.0.0.1:{relay.port}", require_e2e=False, peer_pins=())
    try:
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=8, rows=256, columns=256)
        assert storescu(a.gateway.scp.port, study.files).returncode == 0
        wait_for(lambda: unit_states(a.gateway) == ["sent"], 60, 0.1, what="A's study to be sent")
        outcomes = [(t["method"], t["outcome"]) for t in a.gateway.store.transfers()]
        assert outcomes == [("s5b", "rejected"), ("s5b", "received")]
        error = a.gateway.store.transfers()[0]["error"] or ""
        assert "SHA-256 mismatch for instance <instance " in error  # the verdict over XMPP names no UID
        assert not any(uid in error for uid in study.sop_instance_uids)
        assert set(received_instances(b.gateway)) == set(study.sop_instance_uids)
        (reason,) = b.gateway.spool.quarantine_dir.glob("*.reason.txt")  # the bad bundle is kept, not deleted
        assert "SHA-256 mismatch" in reason.read_text()
        kept = Path(str(reason).removesuffix(".reason.txt"))
        assert (kept / "head").is_file() and len(list(kept.glob("*.dcm"))) == len(study.files)
        states = sorted((s.state, s.error or "") for s in b.gateway.store.studies())
        assert states[0][0] == "failed" and "SHA-256 mismatch" in states[0][1] and states[1] == ("received", "")
        assert any("NOT encrypted" in e["detail"] for e in b.gateway.store.audit_entries() if e["event"] == "offer_accepted")
    finally:
        a.stop()
        b.stop()
        relay.stop()


def test_tampering_with_the_encrypted_stream_is_caught_by_tls_and_the_study_resumed(tmp_path: Path, prosody: Prosody) -> None:
    """End to end: a flipped byte fails the TLS record's authentication; what came before it is kept and
    the study resumes over IBB, whole and verified."""
    relay = TamperingRelay(prosody.proxy_port, after_bytes=1_500_000, mode="flip")
    b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,))
    a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b", s5b_proxy=f"127.0.0.1:{relay.port}")
    try:
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=30, rows=256, columns=256)  # ~4 MB
        assert storescu(a.gateway.scp.port, study.files).returncode == 0
        wait_for(lambda: unit_states(a.gateway) == ["sent"], 60, 0.1, what="A's study to be sent")
        assert relay.tampered.is_set()
        attempts = a.gateway.store.transfers()
        assert [(t["method"], t["outcome"]) for t in attempts] == [("s5b", "cut"), ("ibb", "received")]
        assert attempts[1]["offset_bytes"] > 0
        wait_for(lambda: any(e["event"] == "e2e_refused" and "bad record mac" in e["detail"].lower()
                             for e in b.gateway.store.audit_entries()), 30, 0.1, what="B's e2e_refused audit row")
        received = received_instances(b.gateway)
        for path, uid in zip(study.files, study.sop_instance_uids, strict=True):
            assert dataset_bytes(received[uid]) == dataset_bytes(path)
        assert list(b.gateway.spool.quarantine_dir.glob("*.reason.txt")) == []
    finally:
        a.stop()
        b.stop()
        relay.stop()


def test_busy_receiver_makes_the_sender_wait_then_send(tmp_path: Path, prosody: Prosody) -> None:
    b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,))
    b.controller._loop.call_soon_threadsafe(b.gateway.agent.set_busy, True, "busy: at the inbound transfer limit")  # noqa: SLF001
    a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b")
    try:
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=3, rows=64, columns=64)
        assert storescu(a.gateway.scp.port, study.files).returncode == 0
        wait_for(lambda: unit_states(a.gateway) == ["waiting-peer"], 30, 0.1, what="A to wait for busy B")
        (unit,) = a.gateway.store.studies()
        assert unit.error == "peer busy (at the inbound transfer limit)" and a.gateway.store.transfers() == []
        b.controller._loop.call_soon_threadsafe(b.gateway.agent.set_busy, False, "ready")  # noqa: SLF001
        wait_for(lambda: unit_states(a.gateway) == ["sent"], 30, 0.1, what="A to send once B is free")
        assert set(received_instances(b.gateway)) == set(study.sop_instance_uids)
    finally:
        a.stop()
        b.stop()


def test_offline_receiver_gets_the_study_when_it_comes_back(tmp_path: Path, prosody: Prosody) -> None:
    a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b")
    b = None
    try:
        study = push_while_b_is_offline(a, tmp_path)
        assert a.gateway.store.studies()[0].error == "peer offline"
        b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,))
        wait_for(lambda: unit_states(a.gateway) == ["sent"], 30, 0.1, what="A to send once B is online")
        assert set(received_instances(b.gateway)) == set(study.sop_instance_uids)
    finally:
        a.stop()
        if b is not None:
            b.stop()


def test_a_spool_file_changed_since_ingest_stops_its_study_and_not_the_others(tmp_path: Path, prosody: Prosody) -> None:
    a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b")
    b = None
    try:
        damaged = generate_ct_study(tmp_path / "ct1", series=1, slices_per_series=3, rows=64, columns=64)
        intact = generate_ct_study(tmp_path / "ct2", series=1, slices_per_series=3, rows=64, columns=64)
        for study in (damaged, intact):
            assert storescu(a.gateway.scp.port, study.files).returncode == 0
        wait_for(lambda: unit_states(a.gateway) == ["waiting-peer"] * 2, 60, 0.1,
                 what=lambda: f"A to wait for offline B: {[(s.state, s.error) for s in a.gateway.store.studies()]}")
        (victim,) = [u for u in a.gateway.store.studies() if u.study_instance_uid == damaged.study_instance_uid]
        spool_file = a.gateway.spool.absolute(a.gateway.store.unit_instances(victim.unit_id)[1].spool_path)
        raw = bytearray(spool_file.read_bytes())
        raw[-1] ^= 0xFF  # a disk or a hand changed one pixel byte
        spool_file.write_bytes(bytes(raw))
        b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,))
        wait_for(lambda: sorted(unit_states(a.gateway)) == ["failed", "sent"], 30, 0.1, what="one failed, one sent")
        stopped = a.gateway.store.unit(victim.unit_id)
        assert stopped.state == "failed" and "changed since ingest" in (stopped.error or "")
        assert a.gateway.store.transfers(victim.unit_id) == []  # not one byte of it left
        assert set(received_instances(b.gateway)) == set(intact.sop_instance_uids)
        assert any(e["event"] == "integrity" for e in a.gateway.store.audit_entries(unit_id=victim.unit_id))
    finally:
        a.stop()
        if b is not None:
            b.stop()


def test_a_spool_file_changed_without_a_trace_in_its_times_is_refused_by_the_receiver_and_stops_its_study(
    tmp_path: Path, prosody: Prosody,
) -> None:
    """The first offer trusts a spool file whose inode has not changed since its row was written (it is not
    read before the offer). A disk's silent error changes bytes and no time: here the row is dated after the
    change. The receiver's SHA-256 check refuses the study; the retry hashes every file first, names the
    changed one and stops the study there, instead of sending it again and again."""
    a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b")
    b = None
    try:
        push_while_b_is_offline(a, tmp_path)
        (unit,) = a.gateway.store.studies()
        rotten = a.gateway.store.unit_instances(unit.unit_id)[1]
        spool_file = a.gateway.spool.absolute(rotten.spool_path)
        raw = bytearray(spool_file.read_bytes())
        raw[-1] ^= 0xFF
        spool_file.write_bytes(bytes(raw))
        with a.gateway.store.engine.begin() as conn:
            conn.execute(text("UPDATE instances SET received_at = :later WHERE unit_id = :unit"),
                         {"later": datetime.now(UTC).replace(tzinfo=None) + timedelta(days=1), "unit": unit.unit_id})
        b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,))
        wait_for(lambda: unit_states(a.gateway) == ["failed"], 60, 0.1,
                 what=lambda: f"A's study to stop: {[(s.state, s.error) for s in a.gateway.store.studies()]}")
        stopped = a.gateway.store.unit(unit.unit_id)
        assert f"spool file of instance {rotten.sop_instance_uid} changed since ingest" in (stopped.error or "")
        attempts = [(t["outcome"], t["error"] or "") for t in a.gateway.store.transfers(unit.unit_id)]
        assert len(attempts) == 1 and attempts[0][0] == "rejected" and "SHA-256 mismatch" in attempts[0][1]
        assert any(e["event"] == "integrity" for e in a.gateway.store.audit_entries(unit_id=unit.unit_id))
        assert not received_instances(b.gateway)
    finally:
        a.stop()
        if b is not None:
            b.stop()


def test_a_study_that_keeps_failing_goes_dead_with_its_last_error_and_the_admin_brings_it_back(
        tmp_path: Path, prosody: Prosody, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import _retry

    b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,))
    a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b",
                   methods=("s5b",), s5b_proxy=f"127.0.0.1:{free_port()}", retry_max_attempts=3)  # a proxy that is down
    try:
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=2, rows=32, columns=32)
        assert storescu(a.gateway.scp.port, study.files).returncode == 0
        wait_for(lambda: unit_states(a.gateway) == ["dead"], 30, 0.1, what="the unit to go dead after 3 attempts")
        (unit,) = a.gateway.store.studies()
        assert unit.attempts == 3 and unit.error is not None and unit.error.startswith("S5B failed")
        assert [t["outcome"] for t in a.gateway.store.transfers()] == ["cut"] * 3
        gaps = [e["at"] for e in a.gateway.store.audit_entries(unit_id=unit.unit_id) if e["to_state"] == "queued"]
        assert len(gaps) >= 2  # it waited between attempts (backoff), each attempt audited
        assert _retry(a.gateway.store, study.study_instance_uid) == 0
        assert "is queued again" in capsys.readouterr().out
        wait_for(lambda: len(a.gateway.store.transfers()) > 3, 30, 0.1, what="a new attempt after the retry")
        assert b.gateway.store.studies() == []
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("method", ["s5b", "ibb"])
def test_a_scanner_like_study_crosses_a_slow_link_compressed_and_arrives_byte_for_byte(
        tmp_path: Path, prosody: Prosody, method: str) -> None:
    from adapters.lab.netem import FaultRelay

    link = FaultRelay(prosody.proxy_port if method == "s5b" else prosody.c2s_port, rate_bytes_s=4e6)  # 32 Mbit/s
    b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,))
    route = {"s5b_proxy": f"127.0.0.1:{link.port}"} if method == "s5b" else {"port": link.port}
    a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b",
                   methods=(method,), **route)
    try:
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=12, rows=256, columns=256, phantom=True)
        assert storescu(a.gateway.scp.port, study.files).returncode == 0
        wait_for(lambda: unit_states(a.gateway) == ["sent"], 60, 0.1, what="A's study to be sent")
        (unit,) = a.gateway.store.studies()
        (attempt,) = a.gateway.store.transfers(unit.unit_id)
        assert attempt["method"] == method and attempt["outcome"] == "received"
        # One byte convention: study bytes (the bundle's own) at both ends, the compressed stream beside them.
        assert attempt["bytes"] == unit.bundle_bytes and unit.progress_bytes == unit.bundle_bytes
        assert attempt["wire_bytes"] < 0.6 * unit.bundle_bytes  # on the wire: compressed (phantom ~2.5x)
        (inbound,) = [t for t in b.gateway.store.transfers() if t["outcome"] == "received"]
        assert (inbound["bytes"], inbound["wire_bytes"]) == (attempt["bytes"], attempt["wire_bytes"])
        assert inbound["stream_s"] is not None and inbound["stream_s"] > 0
        from gateway import stats

        at_a = stats.summary(stats.attempts(a.gateway.engine))["by_method"][method]
        at_b = stats.summary(stats.attempts(b.gateway.engine))["by_method"][method]
        assert at_a["mb"] == at_b["mb"] == round(unit.bundle_bytes / 1e6, 3) and at_b["mb_s"] > 0
        assert at_a["compression"] == at_b["compression"] > 1.6
        sent = {i.sop_instance_uid: i.sha256 for i in a.gateway.store.unit_instances(unit.unit_id)}
        received = received_instances(b.gateway)
        for path, uid in zip(study.files, study.sop_instance_uids, strict=True):
            assert hashlib.sha256(received[uid].read_bytes()).hexdigest() == sent[uid]  # the spool file, byte for byte
            assert dataset_bytes(received[uid]) == dataset_bytes(path)  # the modality's data set
    finally:
        a.stop()
        b.stop()
        link.stop()


def test_maintenance_makes_peers_hold_their_sends_until_it_ends(tmp_path: Path, prosody: Prosody) -> None:
    from gateway.maintenance import set_maintenance

    b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,))
    a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b")
    try:
        set_maintenance(b.gateway.store, True, "PACS upgrade until 14:00")  # what `dicomgw maintenance on` does
        wait_for(lambda: a.gateway.agent.peer_availability(B_JID)[1] == "busy (maintenance: PACS upgrade until 14:00)",
                 20, 0.05, what="A to see B's maintenance presence")
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=3, rows=64, columns=64)
        assert storescu(a.gateway.scp.port, study.files).returncode == 0
        wait_for(lambda: unit_states(a.gateway) == ["waiting-peer"], 60, 0.05,
                 what=lambda: f"A to hold the study: {[(s.state, s.error) for s in a.gateway.store.studies()]}")
        assert a.gateway.store.studies()[0].error == "peer busy (maintenance: PACS upgrade until 14:00)"
        assert a.gateway.store.transfers() == [] and b.gateway.store.studies() == []
        assert any(e["event"] == "maintenance" and "PACS upgrade" in e["detail"] for e in b.gateway.store.audit_entries())
        set_maintenance(b.gateway.store, False)
        wait_for(lambda: unit_states(a.gateway) == ["sent"], 30, 0.1, what="A to send once maintenance ends")
        assert set(received_instances(b.gateway)) == set(study.sop_instance_uids)
    finally:
        a.stop()
        b.stop()


def test_a_study_is_offered_as_soon_as_it_is_stable_not_at_the_next_dispatch_tick(tmp_path: Path, prosody: Prosody) -> None:
    b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,))
    # With an hour between dispatch ticks, only the wake-up from the completeness check can send it in time.
    a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b", dispatch_interval_s=3600)
    try:
        small_study_goes_through(a, b, tmp_path, 60)
    finally:
        a.stop()
        b.stop()


def test_xmpp_server_killed_mid_transfer_fails_the_attempt_at_once_and_delivers_after_restart(tmp_path: Path) -> None:
    """Prosody SIGKILLed while A streams over IBB, then started again on the same ports: A's waiting IQs
    fail at once with "XMPP connection lost" (not the 30 s IQ timeout), and after reconnecting A offers the
    study again; B resumes from what it kept, every instance arrives once."""
    with running_prosody(tmp_path / "prosody", plugin_paths=[PROXY65_VARIANT]) as server:
        b = start_site(tmp_path, "b", B_JID, server, peers=(A_JID,))
        a = start_site(tmp_path, "a", A_JID, server, peers=(B_JID,), destination="radiology.hospital-b",
                       methods=("ibb",), ibb_block_bytes=4096, ibb_window=1)
        try:
            study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=10, rows=512, columns=512)  # ~5 MB: 4 after the kill
            assert storescu(a.gateway.scp.port, study.files).returncode == 0
            wait_for(lambda: any(s.state == "sending" and s.progress_bytes > 1_000_000 for s in a.gateway.store.studies()),
                     60, 0.02, what="A to be streaming")
            server.kill()  # SIGKILL: no goodbye on any stream
            server.start()
            wait_for(lambda: unit_states(a.gateway) == ["sent"], 120, 0.1,
                     what=lambda: f"A study sent after the restart: {a.gateway.store.transfers()}")
            attempts = a.gateway.store.transfers()
            assert attempts[0]["outcome"] == "cut" and "XMPP connection lost" in (attempts[0]["error"] or ""), [(t["method"], t["outcome"], t["bytes"], t["error"]) for t in attempts]
            assert attempts[0]["bytes"] > 0 and attempts[-1]["outcome"] in ("received", "held")
            assert_received_whole(b.gateway, study)
        finally:
            a.stop()
            b.stop()


@pytest.mark.parametrize("links_early", [False, True], ids=["stock-proxy65", "dicomgw-proxy65"])
def test_both_proxy_legs_open_while_the_offer_is_answered_and_a_failed_early_leg_costs_only_its_time(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, links_early: bool) -> None:
    """The offer names the proxy, the receiver opens its leg while its accept travels and the sender its own
    while it waits; the streamhost query travels right behind the offer and the TLS handshake right behind the
    activation: the sender's log line for the attempt shows no wait for its own leg ("proxy 0 ms") and two
    round trips before the first byte (the offer; the activation with the handshake). On the proxy variant
    (which links the legs as soon as both are up and says so) the handshake starts as soon as the sender's leg
    is up: one round trip (the offer). When the receiver's early leg fails (a proxy that refused it), the
    XEP-0065 query connects again and the study still goes over S5B. A receiver that answers the early query
    before deciding the offer (item-not-found, as a version without the wait would) is asked again: one round
    trip more, and the study goes over S5B."""
    import asyncio
    import logging

    from adapters.xmpp import socks5

    caplog.set_level(logging.INFO, logger="adapters.xmpp.offer")
    trips = 1 if links_early else 2
    with running_prosody(tmp_path / "prosody", plugin_paths=[PROXY65_VARIANT] if links_early else []) as prosody:
        b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,))
        a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b")
        try:
            wait_for(lambda: a.gateway.agent.s5b.proxy is not None, 30, 0.1, what="A to know the proxy (looked up at session start)")
            assert a.gateway.agent.s5b.links_early is links_early  # the variant's disco feature, read at session start
            study = generate_ct_study(tmp_path / "ct1", series=1, slices_per_series=5, rows=64, columns=64)
            assert storescu(a.gateway.scp.port, study.files).returncode == 0
            wait_for(lambda: unit_states(a.gateway) == ["sent"], 60, 0.1, what="the first study to be sent")
            lines = [r.getMessage() for r in caplog.records if "before the first byte" in r.getMessage()]
            assert len(lines) == 1 and lines[0].startswith("S5B attempt"), lines
            assert "proxy 0 ms" in lines[0] and f"; {trips} round trip{'s' * (trips > 1)} before the first byte" in lines[0], lines[0]
            assert ("activate" in lines[0]) is not links_early, lines[0]  # early: the linked legs do not wait for it

            async def refused() -> object:
                raise socks5.Socks5Error("proxy answered CONNECT with status 2")

            connect_early = b.gateway.agent.s5b.connect_streamhost_early
            b.gateway.agent.s5b.connect_streamhost_early = lambda *_args: asyncio.ensure_future(refused())  # type: ignore[method-assign]
            second = generate_ct_study(tmp_path / "ct2", series=1, slices_per_series=5, rows=64, columns=64, seed=7)
            assert storescu(a.gateway.scp.port, second.files).returncode == 0
            wait_for(lambda: unit_states(a.gateway) == ["sent", "sent"], 60, 0.1, what="the second study to be sent")
            assert set(second.sop_instance_uids) <= set(received_instances(b.gateway))
            assert [(t["method"], t["outcome"]) for t in a.gateway.store.transfers()] == [("s5b", "received")] * 2

            from slixmpp.exceptions import XMPPError

            asked: set[str] = set()

            async def too_early(sid: str, _peer: str) -> None:  # the first query of each stream: not waiting
                if sid not in asked:
                    asked.add(sid)
                    raise XMPPError("item-not-found", "no accepted offer with this stream id")

            b.gateway.agent.offers.offer_decided = too_early  # type: ignore[method-assign]
            b.gateway.agent.s5b.connect_streamhost_early = connect_early  # its leg works again
            third = generate_ct_study(tmp_path / "ct3", series=1, slices_per_series=5, rows=64, columns=64, seed=8)
            assert storescu(a.gateway.scp.port, third.files).returncode == 0
            wait_for(lambda: unit_states(a.gateway) == ["sent"] * 3, 60, 0.1, what="the third study to be sent")
            assert set(third.sop_instance_uids) <= set(received_instances(b.gateway))
            assert [(t["method"], t["outcome"]) for t in a.gateway.store.transfers()] == [("s5b", "received")] * 3
            lines = [r.getMessage() for r in caplog.records if "before the first byte" in r.getMessage()]
            assert len(asked) == 1 and f"; {trips + 1} round trips before the first byte" in lines[-1], lines[-1]
        finally:
            a.stop()
            b.stop()


@pytest.mark.parametrize("encrypted", [False, True], ids=["lab-plaintext", "end-to-end-rotating"])
def test_an_activation_answered_after_a_small_study_is_through_does_not_cut_it(tmp_path: Path, encrypted: bool) -> None:
    """On a proxy that links the legs as soon as both are up, a small study can be through, its legs closed,
    before the proxy reads the sender's activation, which it then answers item-not-found (seen beside a CPU hog:
    the attempt was recorded 'cut' and the study sent again). The activation is held here until B has verified
    the study: the attempt is the one that delivers it. End to end the handshake waits for the activation only
    while the sender rotates its key (otherwise it starts on the early leg), so that case is the encrypted one."""
    import asyncio

    with running_prosody(tmp_path / "prosody", plugin_paths=[PROXY65_VARIANT]) as prosody:
        plain = {} if encrypted else {"require_e2e": False, "peer_pins": ()}
        b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,), **plain)  # type: ignore[arg-type]
        a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b", **plain)  # type: ignore[arg-type]
        try:
            wait_for(lambda: a.gateway.agent.s5b.links_early, 30, 0.1, what="A to know the proxy links early")
            if encrypted:
                from gateway.bootstrap import rotate_keys

                rotate_keys(a.gateway.settings, overlap_s=3600)  # B pins A's old certificate: named in its accept
                wait_for(lambda: a.gateway.agent.identities.previous is not None, 10, 0.05, what="A to take its new key")
            real_send_iq = a.gateway.agent.send_iq

            async def activation_late(iq: Any, timeout_s: float | None = None) -> Any:
                if iq.xml.find(f".//{{{NS_S5B}}}activate") is not None:
                    for _ in range(600):  # bounded: until B has the study (its legs closed by then)
                        if any(s.state in ("received", "importing", "delivered") for s in b.gateway.store.studies()):
                            break
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(0.5)  # and the proxy has let the pair go
                return await real_send_iq(iq, timeout_s)

            a.gateway.agent.send_iq = activation_late  # type: ignore[method-assign]
            study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=3, rows=64, columns=64)
            assert storescu(a.gateway.scp.port, study.files).returncode == 0
            wait_for(lambda: unit_states(a.gateway) == ["sent"], 90, 0.1, what="A's study to be sent")
            assert [(t["method"], t["outcome"]) for t in a.gateway.store.transfers()] == [("s5b", "received")]
            assert set(received_instances(b.gateway)) == set(study.sop_instance_uids)
        finally:
            a.stop()
            b.stop()
