"""Patient identity reconciled on import (issue 17 §3): B's `[[import.coerce]]` rule for studies from A sets the
issuer, maps A's Patient ID through a CSV table and holds a study whose patient is not in it. Real Prosody, two
gateways, Orthanc as B's PACS: the PACS holds the local ID, the issuer and the Original Attributes Sequence with A's
ID; pixel data byte for byte; B's spool keeps A's files as sent; A's receipt names what was coerced; the held study
is imported after the mapping is added and an admin releases it."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pydicom

from adapters.lab.localpeers import Orthanc
from adapters.lab.synthetic import generate_ct_study
from gateway.coercion import parse_rules
from gateway.settings import PacsSettings
from tests.helpers import REPO, storescu, wait_for
from tests.integration.test_operations import in_orthanc
from tests.integration.test_xmpp_transfer import (
    A_JID,
    B_JID,
    received_instances,
    running_prosody,
    start_site,
)


def orthanc_instance(orthanc: Orthanc, sop_uid: str) -> pydicom.Dataset:
    import json
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{orthanc.http_port}/tools/lookup", data=sop_uid.encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        (found,) = [m for m in json.loads(response.read()) if m["Type"] == "Instance"]
    return pydicom.dcmread(io.BytesIO(orthanc.raw(f"/instances/{found['ID']}/file")))


def test_identity_coerced_on_import_and_a_held_study_released(tmp_path: Path) -> None:
    table = tmp_path / "patients.csv"
    table.write_text("foreign_id,local_id\nDEMO0001,B-000123\n")
    rules = parse_rules([{"name": "hospital a", "from": [A_JID], "set": {"IssuerOfPatientID": "{peer_institution}"},
                          "patient_id_map": str(table), "on_unmapped": "hold", "remove": ["OtherPatientIDs"]}], tmp_path)
    with running_prosody(tmp_path / "prosody") as prosody, Orthanc(tmp_path / "pacs", ae_title="PACS_B") as pacs:
        pacs.start()
        b = start_site(tmp_path, "b", B_JID, prosody, peers=(A_JID,),
                       pacs=PacsSettings(ae_title="PACS_B", host="127.0.0.1", port=pacs.dicom_port, calling_ae_title="GWB"),
                       settings_extra={"coerce": rules})
        a = start_site(tmp_path, "a", A_JID, prosody, peers=(B_JID,), destination="radiology.hospital-b")
        try:
            study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=3, rows=64, columns=64)
            for path in study.files:  # an attribute the rule removes
                ds = pydicom.dcmread(path)
                ds.OtherPatientIDs = "X-1"
                ds.save_as(path)
            assert storescu(a.gateway.scp.port, study.files).returncode == 0
            wait_for(lambda: [s.state for s in a.gateway.store.studies()] == ["delivered"], 90, 0.2,
                     what="A's study delivered (B's receipt)")
            for path, uid in zip(study.files, study.sop_instance_uids, strict=True):
                sent = pydicom.dcmread(path)
                got = orthanc_instance(pacs, uid)
                assert (got.PatientID, got.IssuerOfPatientID, "OtherPatientIDs" in got) == ("B-000123", "hospital-a", False)
                (item,) = got.OriginalAttributesSequence
                assert (item.ModifyingSystem, item.SourceOfPreviousValues, item.ReasonForTheAttributeModification) == (
                    "DICOMGW", A_JID, "COERCE")
                (original,) = item.ModifiedAttributesSequence
                assert (original.PatientID, original.OtherPatientIDs) == ("DEMO0001", "X-1")
                assert got.PixelData == sent.PixelData  # never decoded
            spooled = received_instances(b.gateway)
            for path, uid in zip(study.files, study.sop_instance_uids, strict=True):  # B's spool: A's bytes
                assert pydicom.dcmread(spooled[uid]).PatientID == "DEMO0001"
            receipts = [e["detail"] for e in a.gateway.store.audit_entries() if e["event"] == "transition"
                        and e["to_state"] == "delivered"]
            assert any("coerced by rule 'hospital a': IssuerOfPatientID, PatientID set; OtherPatientIDs removed" in d
                       for d in receipts), receipts

            other = generate_ct_study(tmp_path / "ct2", series=1, slices_per_series=2, rows=32, columns=32, seed=7)
            for path in other.files:
                ds = pydicom.dcmread(path)
                ds.PatientID = "DEMO0002"
                ds.save_as(path)
            assert storescu(a.gateway.scp.port, other.files).returncode == 0
            held = wait_for(lambda: [s for s in b.gateway.store.studies() if "held" in s.flags], 90, 0.2,
                            what="B to hold the study of an unmapped patient")
            assert "DEMO0002" in (held[0].error or "") and in_orthanc(pacs, other.study_instance_uid) == 0
            table.write_text(table.read_text() + "DEMO0002,B-000456\n")
            config = tmp_path / "b-cli.toml"
            config.write_text(f'[paths]\nspool_dir = "{tmp_path}/b/spool"\nwatch_dir = ""\nquarantine_dir = "{tmp_path}/q"\n'
                              f'[queue]\ndb_url = "{b.gateway.settings.queue.db_url}"\n')
            released = subprocess.run([sys.executable, "-m", "gateway", "queue", "release", str(held[0].unit_id),
                                       "--config", str(config)], cwd=REPO, capture_output=True, text=True, timeout=60)
            assert released.returncode == 0 and "imports it" in released.stdout, released.stderr
            wait_for(lambda: in_orthanc(pacs, other.study_instance_uid) == 2, 60, 0.2, what="the released study in the PACS")
            assert orthanc_instance(pacs, other.sop_instance_uids[0]).PatientID == "B-000456"
        finally:
            a.stop()
            b.stop()
