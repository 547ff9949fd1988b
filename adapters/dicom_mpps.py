"""MPPS messages from modalities (PS3.4 F.7): N-CREATE and N-SET data sets read into ``gateway.mpps.StepMessage``.

Checked here: the attributes an N-CREATE must carry to be of use (Performed Procedure Step Status, Modality, the
Study Instance UID in the Scheduled Step Attributes Sequence: 0x0120 when absent, 0x0121 when empty), and the
references of the Performed Series Sequence (each image's SOP Class and Instance UID).
"""

from __future__ import annotations

import io

from pydicom.filereader import read_dataset

from adapters.dicom_commit import _is_uid
from adapters.dicom_ul import DimseRefusal
from gateway.mpps import StepMessage

MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
MISSING_ATTRIBUTE, MISSING_VALUE, PROCESSING_FAILURE, INVALID_VALUE = 0x0120, 0x0121, 0x0110, 0x0106
EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"




def parse(dataset: bytes, transfer_syntax: str, creating: bool) -> StepMessage:
    try:
        ds = read_dataset(io.BytesIO(dataset), is_implicit_VR=transfer_syntax == IMPLICIT_LE, is_little_endian=True)
        status = str(ds.PerformedProcedureStepStatus).strip() if "PerformedProcedureStepStatus" in ds else None
        studies = [str(item.get("StudyInstanceUID", "") or "") for item in ds.get("ScheduledStepAttributesSequence", []) or []]
        refs = None
        if "PerformedSeriesSequence" in ds:
            refs = [(str(image.get("ReferencedSOPClassUID", "") or ""), str(image.get("ReferencedSOPInstanceUID", "") or ""))
                    for series in ds.PerformedSeriesSequence or []
                    for image in (series.get("ReferencedImageSequence", []) or [])]
        reason = ""
        for item in ds.get("PerformedProcedureStepDiscontinuationReasonCodeSequence", []) or []:
            reason = str(item.get("CodeMeaning", "") or item.get("CodeValue", "") or "")
        modality = str(ds.get("Modality", "") or "") if "Modality" in ds else None
    except Exception as exc:  # pydicom raises anything on hostile bytes
        raise DimseRefusal(PROCESSING_FAILURE, f"unreadable MPPS data set ({type(exc).__name__})") from exc
    if creating:
        for name, value in (("Performed Procedure Step Status", status), ("Modality", modality)):
            if value is None:
                raise DimseRefusal(MISSING_ATTRIBUTE, f"{name} is required at N-CREATE")
            if not value:
                raise DimseRefusal(MISSING_VALUE, f"{name} has no value")
        if not studies:
            raise DimseRefusal(MISSING_ATTRIBUTE, "Scheduled Step Attributes Sequence (with the Study Instance UID) is required")
    if refs is not None and not all(_is_uid(cls) and _is_uid(uid) for cls, uid in refs):
        raise DimseRefusal(INVALID_VALUE, "a Referenced Image Sequence item whose SOP Class or Instance UID is not a UID")
    if any(not _is_uid(study) for study in studies if study):
        raise DimseRefusal(INVALID_VALUE, "a Study Instance UID that is not a UID")
    return StepMessage(status, [s for s in studies if s], refs, reason[:200])
