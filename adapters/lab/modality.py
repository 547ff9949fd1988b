"""A modality's Scheduled Workflow messages, with pynetdicom as the SCU (dcmtk has no MPPS SCU): the demo and the
benchmarks send MPPS and ask for Storage Commitment as a scanner would."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

MPPS_CLASS = "1.2.840.10008.3.1.2.3.3"
COMMITMENT_CLASS = "1.2.840.10008.1.20.1"


def send_mpps(port: int, called_ae: str, study: Any, step: str, phase: str, calling_ae: str = "MODALITY") -> int:
    """N-CREATE IN PROGRESS (``phase="create"``) or N-SET COMPLETED (``"complete"``, referencing every instance of
    ``study``) for MPPS ``step``; returns the status."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(MPPS_CLASS)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        raise ConnectionError(f"no association with {called_ae}@127.0.0.1:{port}")
    try:
        ds = Dataset()
        if phase == "create":
            item = Dataset()
            item.StudyInstanceUID = study.study_instance_uid
            ds.ScheduledStepAttributesSequence = [item]
            ds.PerformedProcedureStepStatus, ds.Modality, ds.PerformedProcedureStepID = "IN PROGRESS", "CT", "1"
            status, _ = assoc.send_n_create(ds, MPPS_CLASS, step)
        else:
            ds.PerformedProcedureStepStatus = "COMPLETED"
            series = Dataset()
            series.ReferencedImageSequence = [_ref(uid) for uid in study.sop_instance_uids]
            ds.PerformedSeriesSequence = [series]
            status, _ = assoc.send_n_set(ds, MPPS_CLASS, step)
        return int(status.Status) if status else -1
    finally:
        assoc.release()


def report_handlers(on_report: Callable[[Any], None]) -> tuple[list[tuple[Any, Any]], threading.Event]:
    """pynetdicom handlers for Storage Commitment reports on the request's own association: ``on_report(event)``
    for each, answered Success; and an event set once the answer (N-EVENT-REPORT-RSP) is on the wire. Release
    only after it: pynetdicom queues the answer after the handler returns (``EVT_DIMSE_SENT`` fires before
    that), and a release queued first kills its DUL thread ("Invalid event 'Evt9' for the current state
    'Sta7'"), the release then waiting out its 30 s ACSE timeout and the gateway never getting the answer."""
    from pynetdicom import evt

    reported, answered = threading.Event(), threading.Event()

    def report(event: Any) -> tuple[int, None]:
        on_report(event)
        reported.set()
        return 0x0000, None

    def sent(event: Any) -> None:  # a P-DATA-TF after a report: its answer (a command alone, one PDU)
        if reported.is_set() and type(event.pdu).__name__ == "P_DATA_TF":
            answered.set()

    return [(evt.EVT_N_EVENT_REPORT, report), (evt.EVT_PDU_SENT, sent)], answered


def request_commitment(port: int, called_ae: str, study: Any, timeout_s: float = 30.0,
                       calling_ae: str = "MODALITY") -> tuple[int, int, int]:
    """Request Storage Commitment for every instance of ``study`` and wait for the report on the same association
    (the role negotiated), answered before the release: (event type, committed, failed); (0, 0, 0) when no
    report came in time."""
    from pynetdicom import AE, build_role

    got: list[tuple[int, int, int]] = []

    def on_report(event: Any) -> None:
        info = event.event_information
        got.append((int(event.request.EventTypeID), len(info.get("ReferencedSOPSequence", []) or []),
                    len(info.get("FailedSOPSequence", []) or [])))

    handlers, answered = report_handlers(on_report)
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(COMMITMENT_CLASS)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae,
                         ext_neg=[build_role(COMMITMENT_CLASS, scu_role=True, scp_role=True)], evt_handlers=handlers)
    if not assoc.is_established:
        raise ConnectionError(f"no association with {called_ae}@127.0.0.1:{port}")
    try:
        ds = Dataset()
        ds.TransactionUID = generate_uid()
        ds.ReferencedSOPSequence = [_ref(uid) for uid in study.sop_instance_uids]
        status, _ = assoc.send_n_action(ds, 1, COMMITMENT_CLASS, "1.2.840.10008.1.20.1.1")
        if not status or status.Status != 0x0000:
            return 0, 0, 0
        answered.wait(timeout_s)
    finally:
        assoc.release()
    return got[0] if got else (0, 0, 0)


def _ref(uid: str) -> Dataset:
    image = Dataset()
    image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", uid
    return image
