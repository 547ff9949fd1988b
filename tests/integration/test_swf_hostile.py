"""Hostile input on the new DICOM paths (Storage Commitment N-ACTION, MPPS N-CREATE/N-SET): truncated and garbage
data sets, oversized and control-character UIDs, non-UTF-8 bytes, the same bad request 1000 times. Each is refused
with a DIMSE status on an association that goes on; nothing is recorded; a modality is served afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from adapters.lab.localpeers import free_port
from adapters.lab.synthetic import generate_ct_study
from gateway.bootstrap import Gateway, GatewayController
from tests.helpers import storescu
from tests.integration.test_scp import make_settings

COMMIT, MPPS, CT = "1.2.840.10008.1.20.1", "1.2.840.10008.3.1.2.3.3", "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    settings = make_settings(tmp_path / "gw", free_port())
    settings = replace(settings, dicom=replace(settings.dicom, allowed_calling_ae_titles=("MR01", "STORESCU")))
    controller = GatewayController(settings)
    gw = controller.start()
    try:
        yield gw
    finally:
        controller.stop()


def associate(port: int):  # type: ignore[no-untyped-def]
    from pynetdicom import AE

    ae = AE(ae_title="MR01")
    ae.add_requested_context(COMMIT)
    ae.add_requested_context(MPPS)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGW")
    assert assoc.is_established
    return assoc


def refs(*uids: str) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = generate_uid()
    items = []
    for uid in uids:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CT, uid
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def test_hostile_commitment_requests_are_refused_and_the_gateway_keeps_serving(gateway: Gateway, tmp_path: Path) -> None:
    assoc = associate(gateway.scp.port)
    try:
        no_refs = Dataset()
        no_refs.TransactionUID = generate_uid()
        bad_transaction = refs("1.2.3")
        bad_transaction.TransactionUID = "1.2.\x1b[2J"
        cases = [
            (refs("1.2.3." + "9" * 80), 0x0106),  # oversized UID
            (refs("1.2.\x00\x07evil"), 0x0106),  # control characters
            (refs("1.2.3.\xff\xfe"), 0x0106),  # not ASCII
            (no_refs, 0x0120),  # no Referenced SOP Sequence
            (bad_transaction, 0x0106),
        ]
        for ds, status in cases:
            answer, _ = assoc.send_n_action(ds, 1, COMMIT, "1.2.840.10008.1.20.1.1")
            assert answer.Status == status, (ds, hex(answer.Status))
        answer, _ = assoc.send_n_action(refs("1.2.3"), 7, COMMIT, "1.2.840.10008.1.20.1.1")  # no such action
        assert answer.Status == 0x0123
    finally:
        assoc.release()
    assert gateway.store.commitment_requests() == []
    study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=2, rows=16, columns=16)
    assert storescu(gateway.scp.port, study.files).returncode == 0  # still serving modalities
    assert gateway.store.count_instances() == 2


def test_hostile_mpps_messages_are_refused_and_the_gateway_keeps_serving(gateway: Gateway, tmp_path: Path) -> None:
    def created(study_uid: str) -> Dataset:
        ds = Dataset()
        item = Dataset()
        item.StudyInstanceUID = study_uid
        ds.ScheduledStepAttributesSequence = [item]
        ds.PerformedProcedureStepStatus, ds.Modality = "IN PROGRESS", "CT"
        return ds

    assoc = associate(gateway.scp.port)
    try:
        assert assoc.send_n_create(created("1.2.\x1b]0;x\x07"), MPPS, generate_uid())[0].Status == 0x0106
        assert assoc.send_n_create(created("9" * 200), MPPS, generate_uid())[0].Status == 0x0106
        no_status = Dataset()
        no_status.Modality = "CT"
        assert assoc.send_n_create(no_status, MPPS, generate_uid())[0].Status == 0x0120
        step = generate_uid()
        assert assoc.send_n_create(created("1.2.3"), MPPS, step)[0].Status == 0x0000
        done = Dataset()
        done.PerformedProcedureStepStatus = "COMPLETED"
        series = Dataset()
        image = Dataset()
        image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = CT, "1.2.3.\xff"
        series.ReferencedImageSequence = [image]
        done.PerformedSeriesSequence = [series]
        assert assoc.send_n_set(done, MPPS, step)[0].Status == 0x0106
        bogus = Dataset()
        bogus.PerformedProcedureStepStatus = "X" * 16
        assert assoc.send_n_set(bogus, MPPS, step)[0].Status == 0x0106
        assert gateway.store.mpps_step(step)["status"] == "IN PROGRESS"
    finally:
        assoc.release()
    study = generate_ct_study(tmp_path / "ct", series=1, slices_per_series=2, rows=16, columns=16)
    assert storescu(gateway.scp.port, study.files).returncode == 0
    assert gateway.store.count_instances() == 2


def test_truncated_and_garbage_data_sets_on_the_wire(gateway: Gateway) -> None:
    """Raw DIMSE: an N-ACTION and an N-CREATE whose data sets are cut mid-element, or random bytes 1000 times
    each: every one answered with a failure status on the same association, nothing recorded."""
    import os

    from adapters.dicom_ul import UI, US, Association, encode_command

    assoc = Association.open("127.0.0.1", gateway.scp.port, "MR01", "DICOMGW",
                             [(COMMIT, ("1.2.840.10008.1.2",)), (MPPS, ("1.2.840.10008.1.2.1",))], 30)
    try:
        for abstract, field, data in ((COMMIT, 0x0130, b"\x08\x00\x95\x11\xff\xff\x00\x00"), (COMMIT, 0x0130, os.urandom(300)),
                                      (MPPS, 0x0140, b"\x40\x00\x52\x02CS\x20\x00IN"), (MPPS, 0x0140, os.urandom(300))):
            context = next(c for c in assoc.contexts.values() if c.abstract_syntax == abstract)
            elements = [(0x00000003 if field == 0x0130 else 0x00000002, UI, abstract), (0x00000100, US, field),
                        (0x00000110, US, 1), (0x00000800, US, 0x0000)]
            if field == 0x0130:
                elements += [(0x00001001, UI, "1.2.840.10008.1.20.1.1"), (0x00001008, US, 1)]
            else:
                elements += [(0x00001000, UI, generate_uid())]
            for _ in range(1000 if data[:1] != b"\x08" and len(data) == 300 else 1):  # random ones 1000 times each
                assoc.send_message(context.id, encode_command(elements), data if len(data) < 300 else os.urandom(300))
                _ctx, response, _ds = assoc.receive_message()
                assert response.us(0x00000900) in (0x0110, 0x0120, 0x0106), hex(response.us(0x00000900))
    finally:
        assoc.release()
    assert gateway.store.commitment_requests() == []
    assert gateway.store.mpps_steps() == []
