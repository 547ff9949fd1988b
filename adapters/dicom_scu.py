"""DICOM SCU helpers for admins: C-ECHO (PS3.7 9.1.5) to check that a peer AE answers."""

from __future__ import annotations

from dataclasses import dataclass

from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    detail: str


def echo(called_ae: str, host: str, port: int, calling_ae: str = "DICOMGW", timeout_s: float = 10.0) -> EchoResult:
    """Associate, send one C-ECHO, release. Never raises for network trouble: the result says what failed."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.add_requested_context(Verification)
    rejections: list[A_ASSOCIATE_RJ] = []

    def on_pdu(event: evt.Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            rejections.append(event.pdu)

    # The A-ASSOCIATE-RJ is taken from the PDU as it arrives, not from ``assoc.is_rejected``: pynetdicom 3.0's
    # requestor (``acse._negotiate_as_requestor``) checks that its socket is still connected before it reads
    # the answer, and its own reactor closes that socket as soon as it has read an RJ (``fsm.AE_4``, PS3.8 AE-4);
    # on a busy machine the check often came second and the rejection was read as an abort (9 in 200 here
    # beside CPU hogs), whichever SCP rejected.
    assoc = ae.associate(host, port, ae_title=called_ae, evt_handlers=[(evt.EVT_PDU_RECV, on_pdu)])
    if not assoc.is_established:
        if rejections or assoc.is_rejected:
            why = f": {rejections[0].result_str}, {rejections[0].source_str}: {rejections[0].reason_str}" if rejections else ""
            return EchoResult(False, f"association rejected by {called_ae}@{host}:{port}{why}")
        return EchoResult(False, f"no association with {called_ae}@{host}:{port} (refused, aborted or timed out)")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if status is None or "Status" not in status:
        return EchoResult(False, "no C-ECHO response (timeout or abort)")
    code = int(status.Status)
    if code == 0x0000:
        return EchoResult(True, f"C-ECHO to {called_ae}@{host}:{port}: Success")
    return EchoResult(False, f"C-ECHO to {called_ae}@{host}:{port}: status 0x{code:04X}")


def store_files(called_ae: str, host: str, port: int, files: list[str], calling_ae: str = "DICOMGW", timeout_s: float = 30.0) -> list[int]:
    """C-STORE each Part-10 file over one association (PS3.4 B.2), proposing each file's own SOP class and
    transfer syntax; returns the status of each file in order (-1 when no response came)."""
    import pydicom

    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout_s
    contexts = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets})
    for sop_class, syntax in contexts[:128]:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        return [-1] * len(files)
    statuses = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if status is not None and "Status" in status else -1)
    finally:
        assoc.release()
    return statuses
