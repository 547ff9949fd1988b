"""Keys rotate without a gap (issue 16 §4). B rotates its end-to-end key while A streams a study to it: the
stream goes on, the study and the ones after it are delivered while A still pins only B's old certificate (B
serves it the old one and signs its verdicts and receipts with it); A adds B's new pin, then the overlap ends
(B retires the old key, audited) and A drops the old pin: studies still go. Then A rotates while B pins only
A's old certificate: B accepts A's previous one, named in the accept. Not one attempt fails or is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.lab.localpeers import Orthanc, Prosody
from adapters.lab.netem import FaultRelay
from adapters.lab.synthetic import generate_ct_study
from gateway.bootstrap import identity_paths, rotate_keys
from gateway.settings import PacsSettings
from tests.helpers import storescu, wait_for
from tests.integration.test_operations import in_orthanc
from tests.integration.test_xmpp_transfer import (
    A_JID,
    B_JID,
    PROXY65_VARIANT,
    running_prosody,
    site_identity,
    start_site,
)


@pytest.mark.parametrize("variant", [False, True], ids=["stock-proxy65", "dicomgw-proxy65"])
def test_rotating_either_side_loses_no_study(tmp_path: Path, variant: bool) -> None:
    """On the variant a sender that is not rotating starts its handshake as soon as its leg is up (early link);
    one that rotates waits for the receiver's accept, which names the certificate it pins."""
    with running_prosody(tmp_path / "prosody", plugin_paths=[PROXY65_VARIANT] if variant else []) as prosody, \
            Orthanc(tmp_path / "orthanc") as orthanc:
        orthanc.start()
        _scenario(tmp_path, prosody, orthanc)


def _scenario(tmp_path: Path, prosody: Prosody, orthanc: Orthanc) -> None:
    relay = FaultRelay(prosody.proxy_port, rate_bytes_s=1_500_000)  # A's proxy link: a study takes seconds
    pacs = PacsSettings(ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port, calling_ae_title="GWB",
                        timeout_s=10, retry_base_s=0.2, retry_max_s=0.5)
    b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,), pacs=pacs)
    a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b",
                   s5b_proxy=f"127.0.0.1:{relay.port}")
    b_old, a_old = site_identity(tmp_path, "b")[2], site_identity(tmp_path, "a")[2]
    sent: list[str] = []

    def send(n: int, slices: int = 8) -> str:
        study = generate_ct_study(tmp_path / f"ct{n}", series=1, slices_per_series=slices, rows=256, columns=256, seed=n)
        assert storescu(a.gateway.scp.port, study.files).returncode == 0
        sent.append(study.study_instance_uid)
        return study.study_instance_uid

    def delivered(uid: str, count: int) -> None:
        wait_for(lambda: in_orthanc(orthanc, uid) == count, 120, 0.2, what=f"study {uid} in B's PACS")
        wait_for(lambda: {s.state for s in a.gateway.store.studies() if s.study_instance_uid == uid} == {"delivered"},
                 60, 0.1, what=f"A's receipt for {uid} (signed with a key A pins)")

    try:
        first = send(1, slices=40)
        wait_for(lambda: any(s.state == "sending" and s.progress_bytes > 0 for s in a.gateway.store.studies()), 60, 0.05,
                 what="A streaming the first study")
        rotated, old = rotate_keys(b.gateway.settings, overlap_s=3600)  # what `dicomgw keys rotate` does
        assert old == b_old and rotated.current.fingerprint != b_old
        b_new = rotated.current.fingerprint
        wait_for(lambda: b.gateway.agent.identities.previous is not None, 10, 0.05, what="B to take over its new key")
        second = send(2)  # A still pins only B's old certificate
        delivered(first, 40)
        delivered(second, 8)
        pinning = lambda site, fp: [jid for jid, _at in site.gateway.store.peers_pinning(fp)]  # noqa: E731  (`keys show`)
        wait_for(lambda: pinning(b, b_old) == [A_JID], 10, 0.05, what="B to know A pins only its old key")

        a.gateway.store.add_peer(B_JID, "", f"{b_old},{b_new}")  # `peers edit B --add-fingerprint NEW`
        wait_for(lambda: b_new in (a.gateway.pin_for(B_JID) or ""), 10, 0.05, what="A to read B's second pin")
        third = send(3)
        delivered(third, 8)
        wait_for(lambda: pinning(b, b_old) == [], 10, 0.05, what="B to know A pins its new key too")

        meta = identity_paths(b.gateway.settings)[1].with_name("gateway.crt.previous.json")
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "until": "2000-01-01T00:00:00+00:00"}))  # time passes
        wait_for(lambda: b.gateway.agent.identities.previous is None, 10, 0.05, what="B to retire its old key")
        assert any(e["event"] == "identity_retired" and b_old in e["detail"] for e in b.gateway.store.audit_entries())
        assert not identity_paths(b.gateway.settings)[0].with_name("gateway.key.previous").exists()
        a.gateway.store.edit_peer(B_JID, fingerprint=b_new)  # `peers edit B --remove-fingerprint OLD`
        wait_for(lambda: a.gateway.pin_for(B_JID) == b_new, 10, 0.05, what="A to drop B's old pin")
        fourth = send(4)
        delivered(fourth, 8)

        a_rotated, a_was = rotate_keys(a.gateway.settings, overlap_s=3600)  # now A rotates; B pins A's old one only
        assert a_was == a_old
        wait_for(lambda: a.gateway.agent.identities.previous is not None, 10, 0.05, what="A to take over its new key")
        fifth = send(5)
        delivered(fifth, 8)
        wait_for(lambda: pinning(a, a_old) == [B_JID], 10, 0.05, what="A to know B pins only its old key (B's accept)")
        b.gateway.store.add_peer(A_JID, "", a_rotated.current.fingerprint)  # B pins A's new certificate only
        wait_for(lambda: b.gateway.pin_for(A_JID) == a_rotated.current.fingerprint, 10, 0.05, what="B's new pin for A")
        sixth = send(6)
        delivered(sixth, 8)
        wait_for(lambda: pinning(a, a_old) == [], 10, 0.05, what="A to know B pins its new key")

        outcomes = [t["outcome"] for t in a.gateway.store.transfers() + b.gateway.store.transfers()]
        assert set(outcomes) == {"received"}, outcomes  # not one refused, cut or failed attempt
        for site in (a, b):
            events = {e["event"] for e in site.gateway.store.audit_entries(limit=2000)}
            assert not events & {"e2e_refused", "receipt_refused"}, events
        assert len(sent) == 6
    finally:
        a.stop()
        b.stop()
        relay.stop()


def test_a_receipt_after_a_restart_in_the_overlap_is_signed_with_the_key_the_sender_pins(tmp_path: Path) -> None:
    """B rotates its key; A still pins only B's old certificate. A study reaches B, B cannot import it (its PACS
    is down) and is restarted. The receipt it sends once the PACS is back is signed with the key A pins (as the
    stream that brought the study showed, kept in B's queue: B's memory of it went with the restart), and A takes it: delivered, not
    refused."""
    with running_prosody(tmp_path / "prosody") as prosody:
        orthanc = Orthanc(tmp_path / "orthanc")  # ports chosen, not started yet: B's import waits
        pacs = PacsSettings(ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port, calling_ae_title="GWB",
                            timeout_s=10, retry_base_s=0.2, retry_max_s=0.5)
        b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,), pacs=pacs)
        a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b")
        b_old = site_identity(tmp_path, "b")[2]
        try:
            rotated, _old = rotate_keys(b.gateway.settings, overlap_s=3600)
            wait_for(lambda: b.gateway.agent.identities.previous is not None, 10, 0.05, what="B to take over its new key")
            assert a.gateway.pin_for(B_JID) == b_old and rotated.current.fingerprint != b_old
            study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=4, rows=64, columns=64)
            assert storescu(a.gateway.scp.port, study.files).returncode == 0
            wait_for(lambda: any(u.attempts >= 1 and u.state in ("received", "importing") for u in b.gateway.store.studies()),
                     60, 0.1, what="B to have the study and fail to import it")
            wait_for(lambda: [s.state for s in a.gateway.store.studies()] == ["sent"], 30, 0.1, what="A's verdict")
            b.stop()
            b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,), pacs=pacs)  # the same site, restarted
            assert b.gateway.agent.identities.previous is not None  # still in the overlap
            with orthanc:
                orthanc.start()
                wait_for(lambda: [s.state for s in a.gateway.store.studies()] == ["delivered"], 90, 0.1,
                         what=lambda: f"A to take B's receipt: {a.gateway.store.audit_entries(limit=5)}")
                assert in_orthanc(orthanc, study.study_instance_uid) == 4
            events = {e["event"] for e in a.gateway.store.audit_entries(limit=2000)}
            assert "receipt_refused" not in events, events
        finally:
            a.stop()
            b.stop()
