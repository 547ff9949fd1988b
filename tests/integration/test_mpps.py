"""MPPS SCP (issue 17 §2, PS3.4 F.7; IHE RAD-6/7) with pynetdicom as the modality's MPPS SCU (dcmtk has none) and
dcmtk's storescu for the images, stable_age_s = 300: a COMPLETED step makes its study stable within a second of
the N-SET; a referenced instance missing keeps it open until it arrives; DISCONTINUED with hold flags it for an
admin; illegal moves and missing attributes get the statuses of PS3.4 F.7."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from adapters.lab.localpeers import free_port
from adapters.lab.synthetic import generate_ct_study
from gateway.bootstrap import Gateway, GatewayController
from tests.helpers import REPO, storescu, wait_for
from tests.integration.test_scp import make_settings

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Gateway]:
    settings = make_settings(tmp_path / "gw", free_port(), stable_age_s=300, stable_check_interval_s=0.2)
    hold = getattr(request, "param", "send")
    settings = replace(settings, dicom=replace(settings.dicom, on_discontinued=hold,
                                               allowed_calling_ae_titles=("STORESCU", "CT01")))
    controller = GatewayController(settings)
    gw = controller.start()
    try:
        yield gw
    finally:
        controller.stop()


def created(study_uid: str) -> Dataset:
    ds = Dataset()
    step = Dataset()
    step.StudyInstanceUID = study_uid
    step.AccessionNumber = "A1"
    ds.ScheduledStepAttributesSequence = [step]
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "CT01"
    ds.PerformedProcedureStepStartDate = "20261130"
    ds.PerformedProcedureStepStartTime = "101500"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.Modality = "CT"
    ds.PatientName = "MPPS^TEST"
    ds.PerformedSeriesSequence = []
    return ds


def completed(study: Any, status: str = "COMPLETED", uids: list[str] | None = None, reason: str = "") -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = "20261130"
    ds.PerformedProcedureStepEndTime = "102000"
    series = Dataset()
    series.SeriesInstanceUID = study.series_instance_uids[0] if hasattr(study, "series_instance_uids") else generate_uid()
    series.ReferencedImageSequence = []
    for uid in uids if uids is not None else study.sop_instance_uids:
        image = Dataset()
        image.ReferencedSOPClassUID = CT_IMAGE
        image.ReferencedSOPInstanceUID = uid
        series.ReferencedImageSequence.append(image)
    ds.PerformedSeriesSequence = [series]
    if reason:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "110514", "DCM", reason
        ds.PerformedProcedureStepDiscontinuationReasonCodeSequence = [code]
    return ds


class Modality:
    """pynetdicom as the MPPS SCU on one association."""

    def __init__(self, port: int) -> None:
        from pynetdicom import AE
        from pynetdicom.sop_class import ModalityPerformedProcedureStep

        self.cls = ModalityPerformedProcedureStep
        ae = AE(ae_title="CT01")
        ae.add_requested_context(ModalityPerformedProcedureStep)
        self.assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGW")
        assert self.assoc.is_established

    def create(self, ds: Dataset, uid: str) -> int:
        status, _attrs = self.assoc.send_n_create(ds, self.cls, uid)
        return int(status.Status)

    def set(self, ds: Dataset, uid: str) -> int:
        status, _attrs = self.assoc.send_n_set(ds, self.cls, uid)
        return int(status.Status)

    def close(self) -> None:
        self.assoc.release()


def state(gw: Gateway) -> list[str]:
    return [s.state for s in gw.store.studies()]


def test_completed_step_makes_the_study_stable_at_once(gateway: Gateway, tmp_path: Path) -> None:
    study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=5, rows=32, columns=32)
    modality = Modality(gateway.scp.port)
    try:
        uid = generate_uid()
        assert modality.create(created(study.study_instance_uid), uid) == 0x0000
        assert modality.create(created(study.study_instance_uid), uid) == 0x0111  # duplicate
        assert storescu(gateway.scp.port, study.files).returncode == 0
        assert state(gateway) == ["received"]  # stable_age_s = 300: only the step can make it stable now
        assert modality.set(completed(study), uid) == 0x0000
        answered = time.monotonic()
        wait_for(lambda: state(gateway) == ["stable"], 30, 0.05, what="the study stable after N-SET COMPLETED")
        assert time.monotonic() - answered < 1.0
        audit = [e["detail"] for e in gateway.store.audit_entries()]
        assert any(d.startswith(f"MPPS {uid} COMPLETED: all 5 referenced instance(s) received") for d in audit)
        from gateway import dashboard

        (shown,) = dashboard.study(gateway.store, study.study_instance_uid)["mpps"]  # the study's web page
        assert (shown["status"], shown["instances"], shown["settled"]) == ("COMPLETED", 5, True)
        assert modality.set(completed(study, "DISCONTINUED"), uid) == 0x0110  # may no longer be updated
        assert modality.set(completed(study), generate_uid()) == 0x0112  # no such step
        bad = created(study.study_instance_uid)
        del bad.Modality
        assert modality.create(bad, generate_uid()) == 0x0120
        bad = created(study.study_instance_uid)
        bad.PerformedProcedureStepStatus = "COMPLETED"
        assert modality.create(bad, generate_uid()) == 0x0106
    finally:
        modality.close()


def test_a_missing_instance_keeps_the_study_open_until_it_arrives(gateway: Gateway, tmp_path: Path) -> None:
    study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=4, rows=32, columns=32)
    modality = Modality(gateway.scp.port)
    try:
        uid = generate_uid()
        assert modality.create(created(study.study_instance_uid), uid) == 0x0000
        assert storescu(gateway.scp.port, study.files[:3]).returncode == 0
        assert modality.set(completed(study), uid) == 0x0000  # the step is settled, or not, before this answer
        assert state(gateway) == ["received"] and not gateway.store.mpps_step(uid)["settled"]  # one instance missing
        assert storescu(gateway.scp.port, study.files[3:]).returncode == 0
        wait_for(lambda: state(gateway) == ["stable"], 10, 0.05, what="stable once the last instance came")
    finally:
        modality.close()


@pytest.mark.parametrize("gateway", ["hold"], indirect=True)
def test_discontinued_with_hold_waits_for_an_admin(gateway: Gateway, tmp_path: Path) -> None:
    study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=3, rows=32, columns=32)
    modality = Modality(gateway.scp.port)
    try:
        uid = generate_uid()
        assert modality.create(created(study.study_instance_uid), uid) == 0x0000
        assert storescu(gateway.scp.port, study.files).returncode == 0
        assert modality.set(completed(study, "DISCONTINUED", reason="Patient refused"), uid) == 0x0000
        wait_for(lambda: "held" in gateway.store.studies()[0].flags, 10, 0.05, what="the unit held")
        (unit,) = gateway.store.studies()
        assert unit.state == "received" and "Patient refused" in (unit.error or "")
        config = tmp_path / "cli.toml"
        config.write_text(f'[paths]\nspool_dir = "{tmp_path}/gw/spool"\nwatch_dir = ""\nquarantine_dir = "{tmp_path}/q"\n'
                          f'[queue]\ndb_url = "{gateway.settings.queue.db_url}"\n')
        shown = subprocess.run([sys.executable, "-m", "gateway", "queue", "--json", "--config", str(config)], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
        assert json.loads(shown.stdout)[0]["flags"] == ["held"]
        released = subprocess.run([sys.executable, "-m", "gateway", "queue", "release", str(unit.unit_id), "--config",
                                   str(config)], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert released.returncode == 0, released.stderr
        wait_for(lambda: state(gateway) == ["stable"], 10, 0.05, what="stable once released")
        assert gateway.store.studies()[0].flags == ""
    finally:
        modality.close()
