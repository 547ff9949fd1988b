"""Storage Commitment with the gateway as SCP (issue 17 §1, PS3.4 J; IHE RAD-10), with real SCUs: Orthanc as the
modality (it C-STOREs a study to the gateway, asks for commitment, and reads the gateway's N-EVENT-REPORT on a
new association), and pynetdicom for a report on the request's own association."""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from adapters.lab.localpeers import Orthanc, free_port
from adapters.lab.modality import report_handlers
from adapters.lab.synthetic import generate_ct_study
from gateway.bootstrap import GatewayController
from gateway.settings import ModalitySettings
from gateway.store import utcnow
from tests.helpers import wait_for
from tests.integration.test_scp import make_settings

GW_AE = "DICOMGW"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def post(orthanc: Orthanc, path: str, body: Any) -> Any:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{orthanc.http_port}{path}", data=data, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_orthanc_as_modality_gets_its_commitment_report(tmp_path: Path) -> None:
    """Orthanc stores a study to the gateway, then asks for commitment of those instances: Success. A request
    that also names an instance never sent: Orthanc's report lists exactly that one failed with 0x0112."""
    port = free_port()
    with Orthanc(tmp_path / "orthanc", ae_title="CT_ORTHANC",
                 extra={"DicomModalities": {"gateway": [GW_AE, "127.0.0.1", port]}}) as orthanc:
        orthanc.start()
        settings = make_settings(tmp_path / "gw", port)
        settings = replace(settings, dicom=replace(
            settings.dicom, modalities=(ModalitySettings("CT_ORTHANC", "127.0.0.1", orthanc.dicom_port),),
            allowed_calling_ae_titles=settings.dicom.allowed_calling_ae_titles + ("CT_ORTHANC",)))
        controller = GatewayController(settings)
        gw = controller.start()
        try:
            study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=4, rows=32, columns=32)
            for path in study.files:
                post(orthanc, "/instances", path.read_bytes())
            (study_id,) = orthanc.rest("/studies")
            post(orthanc, "/modalities/gateway/store", {"Resources": [study_id], "Synchronous": True})
            assert gw.store.count_instances() == 4

            refs = [{"SOPClassUID": CT_IMAGE, "SOPInstanceUID": uid} for uid in study.sop_instance_uids]
            asked = post(orthanc, "/modalities/gateway/storage-commitment", {"DicomInstances": refs})
            report = wait_for(lambda: (r := orthanc.rest(f"/storage-commitment/{asked['ID']}"))["Status"] != "Pending" and r,
                              30, 0.2, what="Orthanc to receive the gateway's report")
            assert report["Status"] == "Success" and not report.get("Failures"), report

            never_sent = "1.2.826.0.1.3680043.8.498.999999"
            asked = post(orthanc, "/modalities/gateway/storage-commitment",
                         {"DicomInstances": refs + [{"SOPClassUID": CT_IMAGE, "SOPInstanceUID": never_sent}]})
            report = wait_for(lambda: (r := orthanc.rest(f"/storage-commitment/{asked['ID']}"))["Status"] != "Pending" and r,
                              30, 0.2, what="Orthanc to receive the second report")
            assert report["Status"] == "Failure", report
            assert [(f["SOPInstanceUID"], f["FailureReason"]) for f in report["Failures"]] == [(never_sent, 0x0112)]
            assert sorted(s["SOPInstanceUID"] for s in report["Success"]) == sorted(study.sop_instance_uids)

            # The gateway marks a request reported once Orthanc has answered its N-EVENT-REPORT, a moment after
            # Orthanc's own record (read above) changed: waited for, not raced.
            rows = wait_for(lambda: (found := gw.store.commitment_requests()) and
                            [r["state"] for r in found] == ["reported", "reported"] and found, 30, 0.1,
                            what="both requests recorded as reported")
            assert [r["event_type"] for r in rows] == [2, 1]
            events = [e["event"] for e in gw.store.audit_entries(limit=500)]
            assert events.count("commitment_requested") == 2 and events.count("commitment_reported") == 2
            from gateway import dashboard

            shown = dashboard.study(gw.store, study.study_instance_uid)["commitments"]  # the study's web page
            assert [(c["modality"], c["state"], c["committed"], c["failed"]) for c in shown] == [
                ("CT_ORTHANC", "reported", 4, 1), ("CT_ORTHANC", "reported", 4, 0)]
        finally:
            controller.stop()


def _request(uids: list[str]) -> Any:
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    ds = Dataset()
    ds.TransactionUID = generate_uid()
    refs = []
    for uid in uids:
        item = Dataset()
        item.ReferencedSOPClassUID = CT_IMAGE
        item.ReferencedSOPInstanceUID = uid
        refs.append(item)
    ds.ReferencedSOPSequence = refs
    return ds


def test_pynetdicom_gets_the_report_on_its_own_association(tmp_path: Path) -> None:
    """An SCU that negotiates the role for Storage Commitment and waits on its association gets the report
    there, right after the N-ACTION-RSP (commit_when = stored)."""
    from pynetdicom import AE, build_role
    from pynetdicom.sop_class import CTImageStorage, StorageCommitmentPushModel

    port = free_port()
    settings = make_settings(tmp_path / "gw", port)
    settings = replace(settings, dicom=replace(settings.dicom, allowed_calling_ae_titles=("MR01",)))
    controller = GatewayController(settings)
    gw = controller.start()
    reports: list[tuple[int, list[str], list[tuple[str, int]]]] = []

    def on_report(event: Any) -> None:
        info = event.event_information
        reports.append((int(event.request.EventTypeID),
                        [str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])],
                        [(str(i.ReferencedSOPInstanceUID), int(i.FailureReason)) for i in info.get("FailedSOPSequence", [])]))

    handlers, answered = report_handlers(on_report)

    try:
        study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=2, rows=16, columns=16)
        ae = AE(ae_title="MR01")
        ae.add_requested_context(StorageCommitmentPushModel)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title=GW_AE,
                             ext_neg=[build_role(StorageCommitmentPushModel, scu_role=True, scp_role=True)],
                             evt_handlers=handlers)
        assert assoc.is_established
        try:
            import pydicom

            for path in study.files:
                assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
            missing = "1.2.826.0.1.3680043.8.498.424242"
            status, _reply = assoc.send_n_action(_request([*study.sop_instance_uids, missing]), 1,
                                                 StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
            assert status.Status == 0x0000
            wait_for(answered.is_set, 20, 0.05, what="the report on the same association, answered")
        finally:
            assoc.release()
        ((event_type, committed, failed),) = reports
        assert event_type == 2 and sorted(committed) == sorted(study.sop_instance_uids) and failed == [(missing, 0x0112)]
        wait_for(lambda: [r["state"] for r in gw.store.commitment_requests()] == ["reported"], 10, 0.1,
                 what="the request marked reported (its N-EVENT-REPORT-RSP)")
        # reported: no longer due, so no second report on a new association can follow
        assert gw.store.due_commitments(utcnow() + timedelta(days=1)) == []
        assert [e["event"] for e in gw.store.audit_entries()].count("commitment_reported") == 1
    finally:
        controller.stop()


def test_a_report_the_modality_cannot_take_is_retried_and_survives_a_restart(tmp_path: Path) -> None:
    """The modality's listener is down: the report is retried with backoff and the request stays pending; the
    gateway restarts; once the modality listens, the report arrives (pynetdicom as the modality's SCU side)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StorageCommitmentPushModel

    port, modality_port = free_port(), free_port()
    settings = make_settings(tmp_path / "gw", port)
    settings = replace(settings, dicom=replace(settings.dicom, allowed_calling_ae_titles=("MR01",),
                                               modalities=(ModalitySettings("MR01", "127.0.0.1", modality_port),)))
    controller = GatewayController(settings)
    gw = controller.start()
    try:
        ae = AE(ae_title="MR01")
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate("127.0.0.1", port, ae_title=GW_AE)
        status, _reply = assoc.send_n_action(_request(["1.2.826.0.1.3680043.8.498.1"]), 1, StorageCommitmentPushModel,
                                             "1.2.840.10008.1.20.1.1")
        assoc.release()
        assert status.Status == 0x0000
        (row,) = wait_for(lambda: [r for r in gw.store.commitment_requests() if r["attempts"] >= 1], 20, 0.1,
                          what="a failed report attempt")
        assert row["state"] == "pending" and "refused" in (row["last_error"] or "").lower()
    finally:
        controller.stop()

    got: list[int] = []
    listener = AE(ae_title="MR01")
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = listener.start_server(("127.0.0.1", modality_port), block=False,
                                   evt_handlers=[(evt.EVT_N_EVENT_REPORT, lambda e: (got.append(int(e.request.EventTypeID)), (0x0000, None))[1])])
    controller = GatewayController(settings)
    gw = controller.start()
    try:
        wait_for(lambda: got, 30, 0.1, what="the report after the restart (backoff 5 s)")
        assert got == [2]  # the one instance was never stored: failed 0x0112
        wait_for(lambda: [r["state"] for r in gw.store.commitment_requests()] == ["reported"], 10, 0.1, what="reported")
    finally:
        controller.stop()
        server.shutdown()


def test_commit_when_delivered_waits_for_the_remote_pacs(tmp_path: Path) -> None:
    """commit_when = "delivered" through two gateways: Orthanc-the-modality's report arrives only once B's PACS
    holds the study (A has B's receipt), and it is Success."""
    from adapters.lab.netem import FaultRelay
    from gateway.settings import PacsSettings
    from tests.integration.test_operations import in_orthanc
    from tests.integration.test_xmpp_transfer import (
        A_JID,
        B_JID,
        running_prosody,
        start_site,
    )

    a_port = free_port()
    with running_prosody(tmp_path / "prosody") as prosody, \
            Orthanc(tmp_path / "modality", ae_title="CT_ORTHANC",
                    extra={"DicomModalities": {"gateway": [GW_AE, "127.0.0.1", a_port]}}) as modality, \
            Orthanc(tmp_path / "pacs", ae_title="PACS_B") as pacs:
        modality.start()
        pacs.start()
        pacs_link = FaultRelay(pacs.dicom_port, rate_bytes_s=300_000)  # B's PACS link: the import takes seconds
        b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,),
                       pacs=PacsSettings(ae_title="PACS_B", host="127.0.0.1", port=pacs_link.port, calling_ae_title="GWB"))
        a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b", dicom_port=a_port,
                       allowed_ae=("CT_ORTHANC",),
                       dicom={"modalities": (ModalitySettings("CT_ORTHANC", "127.0.0.1", modality.dicom_port),),
                              "commit_when": "delivered", "commit_timeout_s": 300.0})
        try:
            study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=10, rows=128, columns=128)
            for path in study.files:
                post(modality, "/instances", path.read_bytes())
            (study_id,) = modality.rest("/studies")
            post(modality, "/modalities/gateway/store", {"Resources": [study_id], "Synchronous": True})
            refs = [{"SOPClassUID": CT_IMAGE, "SOPInstanceUID": uid} for uid in study.sop_instance_uids]
            asked = post(modality, "/modalities/gateway/storage-commitment", {"DicomInstances": refs})
            seen_pending_while_not_in_pacs = False
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                report = modality.rest(f"/storage-commitment/{asked['ID']}")
                in_pacs = in_orthanc(pacs, study.study_instance_uid)
                if report["Status"] != "Pending":
                    break
                seen_pending_while_not_in_pacs |= in_pacs < len(study.files)
                time.sleep(0.2)
            assert report["Status"] == "Success", report
            assert in_orthanc(pacs, study.study_instance_uid) == len(study.files)  # B's PACS held it first
            assert seen_pending_while_not_in_pacs  # the report waited for the delivery
            assert [s.state for s in a.gateway.store.studies()] == ["delivered"]
        finally:
            a.stop()
            b.stop()
            pacs_link.stop()


def test_the_report_goes_over_tls_to_a_modality_that_asks_for_it(tmp_path: Path) -> None:
    """[[dicom.modalities]] tls = true: the report's association is TLS, the modality's certificate checked against
    [dicom] tls_ca_file and the gateway's own certificate presented (pynetdicom's TLS server as the modality)."""
    import ssl

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StorageCommitmentPushModel

    from adapters.lab.localpeers import issue_test_cert, make_test_pki

    ca, cert, key = make_test_pki(tmp_path / "pki", "localhost")
    gw_cert, gw_key = issue_test_cert(tmp_path / "pki", "gateway")
    port, modality_port = free_port(), free_port()
    settings = make_settings(tmp_path / "gw", port)
    settings = replace(settings, dicom=replace(
        settings.dicom, allowed_calling_ae_titles=("MR01",), tls_ca_file=ca, tls_cert_file=gw_cert, tls_key_file=gw_key,
        modalities=(ModalitySettings("MR01", "127.0.0.1", modality_port, tls=True),)))
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    server_tls.load_cert_chain(cert, key)
    server_tls.verify_mode = ssl.CERT_REQUIRED  # the modality wants the gateway's certificate
    got: list[int] = []
    listener = AE(ae_title="MR01")
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = listener.start_server(("127.0.0.1", modality_port), block=False, ssl_context=server_tls,
                                   evt_handlers=[(evt.EVT_N_EVENT_REPORT, lambda e: (got.append(int(e.request.EventTypeID)), (0x0000, None))[1])])
    controller = GatewayController(settings)
    gw = controller.start()
    try:
        ae = AE(ae_title="MR01")
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate("127.0.0.1", port, ae_title=GW_AE)
        status, _reply = assoc.send_n_action(_request(["1.2.826.0.1.3680043.8.498.7"]), 1, StorageCommitmentPushModel,
                                             "1.2.840.10008.1.20.1.1")
        assoc.release()
        assert status.Status == 0x0000
        wait_for(lambda: got, 30, 0.1, what="the report over TLS")
        assert got == [2]
        audit = wait_for(lambda: [e["detail"] for e in gw.store.audit_entries() if e["event"] == "commitment_reported"],
                         10, 0.1, what="the report audited (after the modality's answer)")
        assert "new association over TLS to MR01@127.0.0.1" in audit[0]
    finally:
        controller.stop()
        server.shutdown()


def test_the_tick_never_reports_on_a_new_association_what_goes_on_the_request_s_own(tmp_path: Path) -> None:
    """The report for a request made on an association that took the role goes there; the periodic tick, run at
    the worst moment (right after the request is recorded, before it is answered), finds nothing due: the
    modality's listener gets no second report and the log no false "not sent" (the row was due for that
    moment before, and the tick sent a report on a new association too)."""
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import StorageCommitmentPushModel

    port, modality_port = free_port(), free_port()
    settings = make_settings(tmp_path / "gw", port)
    settings = replace(settings, dicom=replace(settings.dicom, allowed_calling_ae_titles=("MR01",),
                                               modalities=(ModalitySettings("MR01", "127.0.0.1", modality_port),)))
    elsewhere: list[int] = []
    listener = AE(ae_title="MR01")
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = listener.start_server(("127.0.0.1", modality_port), block=False, evt_handlers=[
        (evt.EVT_N_EVENT_REPORT, lambda e: (elsewhere.append(int(e.request.EventTypeID)), (0x0000, None))[1])])
    controller = GatewayController(settings)
    gw = controller.start()
    recorded = gw.store.add_commitment_request
    ticks: list[int] = []

    def record_then_tick(*args: Any, **kwargs: Any) -> int:
        request_id = recorded(*args, **kwargs)
        ticks.append(gw.commitments.tick())  # the tick thread, between the record and the answer
        return request_id

    gw.store.add_commitment_request = record_then_tick  # type: ignore[method-assign]
    here: list[int] = []
    handlers, answered = report_handlers(lambda e: here.append(int(e.request.EventTypeID)))
    try:
        ae = AE(ae_title="MR01")
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate("127.0.0.1", port, ae_title=GW_AE,
                             ext_neg=[build_role(StorageCommitmentPushModel, scu_role=True, scp_role=True)],
                             evt_handlers=handlers)
        try:
            status, _reply = assoc.send_n_action(_request(["1.2.826.0.1.3680043.8.498.7"]), 1, StorageCommitmentPushModel,
                                                 "1.2.840.10008.1.20.1.1")
            assert status.Status == 0x0000
            wait_for(answered.is_set, 20, 0.05, what="the report on the request's own association, answered")
        finally:
            assoc.release()
        (row,) = wait_for(lambda: [r for r in gw.store.commitment_requests() if r["state"] == "reported"], 10, 0.1,
                          what="the request reported")
        assert ticks == [0] and here == [2] and elsewhere == []
        assert (row["attempts"], row["last_error"]) == (1, None)  # the one report, on the request's association
    finally:
        controller.stop()
        server.shutdown()
