"""Receipts and verdicts are bound to the peer's identity (a real Prosody, real gateways).

A client logged in on B's own account with another resource (what the XMPP server's operator, or anyone
holding B's password, can do) sends gateway A delivery receipts and verdicts. Only statements signed with the
key pinned for B, and a verdict only from the full JID the offer was agreed with, move anything; the rest are
refused with ``not-authorized`` (or ``bad-request``) and audited ``receipt_refused``."""

from __future__ import annotations

import asyncio
import base64
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from slixmpp.exceptions import XMPPError
from slixmpp.xmlstream.handler import CoroutineCallback
from slixmpp.xmlstream.matcher import MatchXPath
from sqlalchemy import text

from adapters.lab import localpeers
from adapters.lab.localpeers import Prosody
from adapters.lab.synthetic import generate_ct_study
from adapters.xmpp import attest
from adapters.xmpp.e2e import ensure_identity
from adapters.xmpp.stanzas import (
    NS_IBB,
    NS_SI,
    Signature,
    build_accept,
    build_receipt,
    build_result,
    q,
)
from gateway.settings import PacsSettings
from gateway.transfer import Receipt
from tests.helpers import storescu, wait_for
from tests.integration.test_xmpp_hostile import Intruder
from tests.integration.test_xmpp_transfer import (
    A_JID,
    B_JID,
    running_prosody,
    site_identity,
    start_site,
    unit_states,
)

A_FULL = f"{A_JID}/gw1"


@pytest.fixture
def prosody(tmp_path: Path) -> Iterator[Prosody]:
    with running_prosody(tmp_path / "prosody") as server:
        yield server


def refused(gw: Any) -> list[dict[str, Any]]:
    return [e for e in gw.store.audit_entries(limit=500) if e["event"] == "receipt_refused"]


def forged_receipt(bundle: str, signature: Signature | None) -> ET.Element:
    return build_receipt(Receipt("", bundle, 3, True, "3 instance(s) stored in the PACS"), signature)


def test_a_forged_delivery_receipt_from_the_peers_account_moves_nothing(tmp_path: Path, prosody: Prosody) -> None:
    """B's PACS is down (B importing, A sent): receipts from B's account that B's key did not sign are refused,
    also for a unit that failed at A; B's own signed receipt, once its PACS is back, is taken."""
    dead_pacs = PacsSettings(ae_title="ORTHANC", host="127.0.0.1", port=localpeers.free_port(), calling_ae_title="GWB",
                             timeout_s=2, retry_base_s=0.2, retry_max_s=0.5)
    b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,), pacs=dead_pacs)
    a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b")
    try:
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=3, rows=32, columns=32)
        assert storescu(a.gateway.scp.port, study.files).returncode == 0
        wait_for(lambda: unit_states(a.gateway) == ["sent"], 60, 0.1, what="A's study to be sent")
        (unit,) = a.gateway.store.studies()
        bundle = unit.bundle_sha256
        assert bundle
        key, cert, _fp = site_identity(tmp_path, "b")
        b_cert = base64.b64encode(ssl.PEM_cert_to_DER_cert(cert.read_text())).decode()
        own, _created = ensure_identity(tmp_path / "forger" / "k.pem", tmp_path / "forger" / "c.pem", "forger")
        statement = attest.canonical("receipt", B_JID, A_JID, bundle, "3", "delivered", "3 instance(s) stored in the PACS")
        own_cert, own_sig = attest.sign(own, statement)

        async def forge(signatures: list[Signature | None]) -> list[tuple[str, str]]:
            forger = Intruder(prosody, "radiology.hospital-b")
            await forger.start()
            answers = [await forger.iq(forged_receipt(bundle, signature), to=A_FULL) for signature in signatures]
            await forger.stop()
            return answers

        # unsigned; signed with the forger's own key; B's (public) certificate with the forger's signature
        answers = asyncio.run(forge([None, Signature(own_cert, own_sig), Signature(b_cert, own_sig)]))
        assert answers == [("error", "not-authorized")] * 3
        assert unit_states(a.gateway) == ["sent"]  # not delivered: B's PACS does not hold it
        # The same unit failed at A (as when B never stored it): a forged receipt does not make it delivered.
        with a.gateway.engine.begin() as conn:
            conn.execute(text("UPDATE study_units SET state='failed'"))
        assert asyncio.run(forge([None])) == [("error", "not-authorized")]
        assert unit_states(a.gateway) == ["failed"]
        rows = wait_for(lambda: refused(a.gateway) if sum(r["count"] for r in refused(a.gateway)) == 4 else None, 30, 0.1,
                        what="four refused receipts in A's audit log")
        assert all("radiology.hospital-b@" in r["detail"] for r in rows)
        assert "not signed" in " ".join(r["detail"] for r in rows)
        assert b.gateway.store.studies()[0].state != "delivered"
    finally:
        a.stop()
        b.stop()


def test_verdicts_only_from_the_agreed_jid_signed_and_from_the_closed_set(tmp_path: Path, prosody: Prosody,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A client on B's account (B's gateway is not running) takes A's offer, then sends verdicts: from another
    resource, unsigned, and with an outcome outside the set. None ends A's attempt as received."""
    a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b", methods=("ibb",))
    site_identity(tmp_path, "b")  # B's pin is known to A; its key is not the forger's

    async def forge() -> list[tuple[str, str]]:
        forger = Intruder(prosody, "radiology.hospital-b")
        other = Intruder(prosody, "radiology.hospital-b", resource="second")
        answers: list[tuple[str, str]] = []
        done = asyncio.Event()

        async def on_offer(iq: Any) -> None:
            reply = iq.reply()
            reply.xml.append(build_accept(NS_IBB, 0))
            reply.send()

        async def on_ibb_open(iq: Any) -> None:  # A waits for the verdict of this stream id from now on
            sid = iq.xml.find(q(NS_IBB, "open")).get("sid")
            answers.append(await other.iq(build_result(sid, "received", "all good"), to=A_FULL))
            answers.append(await forger.iq(build_result(sid, "received", "all good"), to=A_FULL))
            answers.append(await forger.iq(build_result(sid, "x" * 40, "all good"), to=A_FULL))
            done.set()
            raise XMPPError("not-acceptable", "the forger ends the attempt here")

        forger.client.register_handler(CoroutineCallback("offer", MatchXPath(f"{{jabber:client}}iq/{q(NS_SI, 'si')}"), on_offer))
        forger.client.register_handler(CoroutineCallback("open", MatchXPath(f"{{jabber:client}}iq/{q(NS_IBB, 'open')}"), on_ibb_open))
        await other.start()
        await forger.start()
        forger.client.send_presence()
        await asyncio.wait_for(done.wait(), 90)
        await forger.stop()
        await other.stop()
        return answers

    try:
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=2, rows=32, columns=32)
        assert storescu(a.gateway.scp.port, study.files).returncode == 0
        answers = asyncio.run(forge())
        assert answers == [("error", "not-authorized"), ("error", "not-authorized"), ("error", "bad-request")]
        wait_for(lambda: sum(r["count"] for r in refused(a.gateway)) == 3, 30, 0.1, what="three refused verdicts audited")
        (row,) = refused(a.gateway)  # one row per sender and minute, with the count
        assert "refused: the stream was agreed with radiology.hospital-b@helsenett.test/intruder" in row["detail"]
        warnings = caplog.text
        assert "/intruder refused: not signed, and radiology.hospital-b@helsenett.test has a pinned certificate" in warnings
        assert "/intruder refused: verdict outcome must be one of received, rejected, incomplete, refused" in warnings
        assert all(t["outcome"] != "received" for t in a.gateway.store.transfers())
        assert all(state not in ("sent", "delivered") for state in unit_states(a.gateway))
    finally:
        a.stop()
