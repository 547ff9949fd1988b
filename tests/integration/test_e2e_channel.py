"""The end-to-end channel between gateways, against a real Prosody and its proxy65: what the XMPP server
and the proxy relay never names a patient or a study, the receiving side still gets the original bytes,
and a certificate that is not the pinned one is refused on both sides."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.lab.localpeers import Prosody
from adapters.lab.synthetic import generate_ct_study
from tests.helpers import CapturingRelay, dataset_bytes, storescu, wait_for
from tests.integration.test_xmpp_transfer import (  # noqa: F401  (the prosody fixture)
    A_JID,
    B_JID,
    prosody,  # noqa: F401  (a fixture)
    received_instances,
    running_prosody,
    site_identity,
    start_site,
    unit_states,
)


@pytest.fixture
def plain_prosody(tmp_path: Path) -> Iterator[Prosody]:
    """c2s without TLS, so that the capture reads the stanzas as the XMPP server itself reads them."""
    with running_prosody(tmp_path / "prosody-plain", tls=False) as server:
        yield server



def ibb_split(data: bytes) -> list[tuple[str, bytes]]:
    """The captured bytes as the stanzas' text without IBB payloads, and the payloads decoded: "DICM" is a
    valid run of base64 characters, so a 270 KB base64 stream holds it by chance about once in 60 runs (seen);
    what must not cross is the plaintext, in the stanzas or inside a payload."""
    import base64
    import re

    payloads = re.findall(rb"<data[^>]*>([A-Za-z0-9+/=\s]*)</data>", data)
    text = re.sub(rb"(<data[^>]*>)[A-Za-z0-9+/=\s]*(</data>)", rb"\1\2", data)
    return [("stanzas", text), ("IBB payloads, decoded", b"".join(base64.b64decode(p) for p in payloads))]


@pytest.mark.parametrize("method", ["s5b", "ibb"])
def test_relayed_bytes_name_no_patient_no_study_and_carry_no_dicom(tmp_path: Path, plain_prosody: Prosody, method: str) -> None:
    prosody = plain_prosody  # noqa: F811
    c2s_a, c2s_b = CapturingRelay(prosody.c2s_port), CapturingRelay(prosody.c2s_port)
    proxy = CapturingRelay(prosody.proxy_port)
    # c2s in plaintext through the capture: the strongest check, since the server itself reads every stanza.
    b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,), port=c2s_b.port, s5b_proxy=f"127.0.0.1:{proxy.port}")
    a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b", port=c2s_a.port,
                   s5b_proxy=f"127.0.0.1:{proxy.port}", methods=(method,))
    try:
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=6, rows=128, columns=128)
        assert storescu(a.gateway.scp.port, study.files).returncode == 0
        wait_for(lambda: unit_states(a.gateway) == ["sent"], 60, 0.1, what="A's study to be sent")
        received = received_instances(b.gateway)
        for path, uid in zip(study.files, study.sop_instance_uids, strict=True):
            assert dataset_bytes(received[uid]) == dataset_bytes(path)  # the original bytes arrived
        assert [t["method"] for t in a.gateway.store.transfers()] == [method]
        relayed = {"c2s A": c2s_a.captured(), "c2s B": c2s_b.captured(), "proxy65": proxy.captured()}
        assert len(relayed["proxy65" if method == "s5b" else "c2s A"]) > sum(p.stat().st_size for p in study.files) // 2
        (unit,) = a.gateway.store.studies()
        secrets = [b"DICM", b"DEMO^PATIENT", study.study_instance_uid.encode(), b'"sop_instance_uid"', b'"files"',
                   *(uid.encode() for uid in study.sop_instance_uids)]
        for where, data in relayed.items():
            for part, content in ibb_split(data):
                for secret in secrets:
                    assert secret not in content, f"{secret!r} crossed {where} in clear ({part})"
        assert unit.bundle_sha256 is not None and unit.bundle_sha256.encode() in relayed["c2s A"]  # the opaque id does
    finally:
        a.stop()
        b.stop()
        for relay in (c2s_a, c2s_b, proxy):
            relay.stop()


def test_a_certificate_that_is_not_the_pinned_one_is_refused_on_both_sides(tmp_path: Path, prosody: Prosody) -> None:  # noqa: F811
    wrong = "0" * 64
    # B pins a wrong certificate for A: B refuses A's offer before admitting anything.
    b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,), peer_pins=((A_JID, wrong),))
    a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b")
    try:
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=2, rows=32, columns=32)
        assert storescu(a.gateway.scp.port, study.files).returncode == 0
        wait_for(lambda: a.gateway.store.transfers(), 30, 0.1, what="a refused attempt")
        first = a.gateway.store.transfers()[0]
        a_fp = site_identity(tmp_path, "a")[2]
        assert first["outcome"] == "refused" and first["error"].startswith("not-authorized:")
        assert f"certificate SHA-256 {a_fp} of {A_JID} does not match the pin {wrong}" in first["error"]
        refusals = wait_for(lambda: [e["detail"] for e in b.gateway.store.audit_entries() if e["event"] == "e2e_refused"],
                            30, 0.1, what="B's e2e_refused audit row (written off the loop within a second)")
        assert a_fp in refusals[0]
        assert b.gateway.store.studies() == [] and list((b.gateway.spool.root / "inbox").glob("*")) == []
    finally:
        a.stop()
        b.stop()
    # A pins a wrong certificate for B: A refuses B's certificate after the handshake, before any byte.
    b = start_site(tmp_path, "b2", B_JID, prosody, peers=(A_JID,))
    a = start_site(tmp_path, "a2", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b",
                   peer_pins=((B_JID, wrong),))
    try:
        b.gateway.store.add_peer(A_JID, "", site_identity(tmp_path, "a2")[2])
        wait_for(lambda: b.gateway.pin_for(A_JID) == site_identity(tmp_path, "a2")[2], 10, 0.05,
                 what="B to read the new pin (its peer table is re-read every second)")
        study = generate_ct_study(tmp_path / "ct2", series=1, slices_per_series=2, rows=32, columns=32)
        assert storescu(a.gateway.scp.port, study.files).returncode == 0
        wait_for(lambda: a.gateway.store.transfers(), 30, 0.1, what="a refused attempt")
        first = a.gateway.store.transfers()[0]
        assert first["outcome"] == "refused" and first["bytes"] == 0
        assert f"does not match the pin {wrong}" in first["error"] and "('" not in first["error"]  # plain text, no tuple
        (unit,) = a.gateway.store.studies()
        assert "('" not in (unit.error or "")
        wait_for(lambda: any(e["event"] == "e2e_refused" and wrong in e["detail"] for e in a.gateway.store.audit_entries()),
                 30, 0.1, what="A's e2e_refused audit row")
        wait_for(lambda: [t["outcome"] for t in b.gateway.store.transfers()] != [], 30, 0.1, what="B to end the attempt")
        b_fp = site_identity(tmp_path, "b2")[2]
        said = wait_for(lambda: [e["detail"] for e in b.gateway.store.audit_entries() if e["event"] == "e2e_refused"],
                        30, 0.1, what="B's e2e_refused audit row: A closed the channel after the handshake")
        assert "closed by the sender after the handshake, before any byte" in said[0] and b_fp in said[0]
        assert all(s.state != "received" for s in b.gateway.store.studies())
        assert received_instances(b.gateway) == {}
    finally:
        a.stop()
        b.stop()


def test_no_pin_no_exchange(tmp_path: Path, prosody: Prosody) -> None:  # noqa: F811
    b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,))
    a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b", peer_pins=())
    try:
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=2, rows=32, columns=32)
        assert storescu(a.gateway.scp.port, study.files).returncode == 0
        wait_for(lambda: any("no pinned certificate" in (s.error or "") for s in a.gateway.store.studies()), 30, 0.1,
                 what="A to hold the study for want of a pin")
        assert a.gateway.store.transfers() == [] and b.gateway.store.studies() == []
    finally:
        a.stop()
        b.stop()
