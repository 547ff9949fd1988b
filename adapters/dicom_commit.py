"""Storage Commitment reports to modalities (the gateway as SCP of the Push Model, PS3.4 J.3.3).

- :func:`parse_request`: an N-ACTION-RQ's data set (Transaction UID, Referenced SOP Sequence), checked.
- :func:`report_dataset` / :func:`report_command`: the N-EVENT-REPORT-RQ for a decision (``gateway.commitment``):
  event type 1 (Referenced SOP Sequence) or 2 (and the Failed SOP Sequence with each Failure Reason).
- :func:`send_report`: on a new association to the modality (``[[dicom.modalities]]``), proposing the SCP role
  for the Storage Commitment SOP class (SCP/SCU Role Selection, PS3.7 D.3.3.4), as the standard asks of an SCP
  that opens the association itself.
"""

from __future__ import annotations

import io
import re
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import ImplicitVRLittleEndian

from adapters.dicom_tls import client_context
from adapters.dicom_ul import (
    UI,
    US,
    Association,
    AssociationAborted,
    DimseRefusal,
    encode_command,
)
from adapters.pacs import encode_dataset
from gateway.commitment import Decision
from gateway.settings import ModalitySettings

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP instance (PS3.4 J.3.5)
N_EVENT_REPORT_RQ, N_EVENT_REPORT_RSP = 0x0100, 0x8100
MAX_REFERENCES = 100_000
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")




def parse_request(dataset: bytes) -> tuple[str, list[tuple[str, str]]]:
    """(Transaction UID, [(SOP class, SOP instance)]) of a Request Storage Commitment; raises
    :class:`DimseRefusal` with 0x0120 (missing attribute) or 0x0106 (invalid value)."""
    try:
        ds = read_dataset(io.BytesIO(dataset), is_implicit_VR=True, is_little_endian=True)
        transaction = str(ds.get("TransactionUID", "") or "")
        items = list(ds.get("ReferencedSOPSequence", []) or [])
        refs = [(str(i.get("ReferencedSOPClassUID", "") or ""), str(i.get("ReferencedSOPInstanceUID", "") or ""))
                for i in items[:MAX_REFERENCES + 1]]
    except Exception as exc:  # pydicom raises anything on hostile bytes
        raise DimseRefusal(0x0110, f"unreadable Storage Commitment request ({type(exc).__name__})") from exc
    if not transaction or not items:
        raise DimseRefusal(0x0120, "Transaction UID and Referenced SOP Sequence are required")
    if len(refs) > MAX_REFERENCES:
        raise DimseRefusal(0x0106, f"more than {MAX_REFERENCES} referenced instances")
    if not all(_is_uid(cls) and _is_uid(uid) for cls, uid in refs) or not _is_uid(transaction):
        raise DimseRefusal(0x0106, "a Transaction UID or reference that is not a UID (digits and dots, at most 64)")
    return transaction, refs


def _is_uid(text: str) -> bool:
    return 0 < len(text) <= 64 and UID_RE.match(text) is not None


def report_dataset(transaction_uid: str, decision: Decision) -> bytes:
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    if decision.committed:
        ds.ReferencedSOPSequence = [_item(cls, uid) for cls, uid in decision.committed]
    if decision.failed:
        failed = []
        for cls, uid, reason in decision.failed:
            item = _item(cls, uid)
            item.FailureReason = reason
            failed.append(item)
        ds.FailedSOPSequence = failed
    return encode_dataset(ds, ImplicitVRLittleEndian)


def _item(sop_class: str, uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = uid
    return item


def report_command(message_id: int, decision: Decision) -> bytes:
    return encode_command([
        (0x00000002, UI, STORAGE_COMMITMENT_PUSH), (0x00000100, US, N_EVENT_REPORT_RQ), (0x00000110, US, message_id),
        (0x00000800, US, 0x0000), (0x00001000, UI, STORAGE_COMMITMENT_INSTANCE), (0x00001002, US, decision.event_type),
    ])


def send_report(modality: ModalitySettings, calling_ae: str, transaction_uid: str, decision: Decision,
                timeout_s: float = 30.0, tls_files: tuple[Any, Any, Any] = (None, None, None)) -> str:
    """The report on a new association (over TLS when the modality says ``tls``: its certificate checked against
    ``tls_files[0]``, the gateway's own certificate and key ``tls_files[1:]`` presented); returns how it went (for the
    audit), raises on any failure."""
    tls = client_context(*tls_files) if modality.tls else None
    assoc = Association.open(modality.host, modality.port, calling_ae, modality.ae_title,
                             [(STORAGE_COMMITMENT_PUSH, (ImplicitVRLittleEndian,))], timeout_s,
                             roles={STORAGE_COMMITMENT_PUSH: (False, True)}, tls=tls)
    try:
        context_id = assoc.context_for(STORAGE_COMMITMENT_PUSH, ImplicitVRLittleEndian)
        if context_id is None:
            raise ConnectionError(f"{modality.ae_title} did not accept Storage Commitment on the report's association")
        assoc.send_message(context_id, report_command(1, decision), report_dataset(transaction_uid, decision))
        _ctx, response, _ds = assoc.receive_message()
    except (OSError, AssociationAborted):
        assoc.abort()
        raise
    assoc.release()
    status = response.us(0x00000900)
    if response.command_field != N_EVENT_REPORT_RSP or status != 0x0000:
        raise ConnectionError(f"{modality.ae_title} answered the report with status 0x{status:04X}")
    return f"new association{' over TLS' if tls else ''} to {modality.ae_title}@{modality.host}:{modality.port}"
