"""DICOM SCU helpers for admins: C-ECHO (PS3.7 9.1.5) to check that a peer AE answers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pynetdicom import AE, _config, evt
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    detail: str


# The values pynetdicom 3.0 turns into a primitive (``pdu_primitives``): a PDU that carries any other value
# killed its reactor thread with a ``ValueError`` traceback on stderr, and the client then waited for its timeout.
_RJ_RESULTS, _RJ_SOURCES, _RJ_REASONS = {1, 2}, {1, 2, 3}, {1, 2, 3, 7}
_ABORT_SOURCES, _PROVIDER_REASONS = {0, 1, 2}, {0, 1, 2, 4, 5, 6}


def _outside_table(pdu: object) -> str | None:
    """The words for an A-ASSOCIATE-RJ or A-ABORT whose fields lie outside PS3.8 Tables 9-21 / 9-26, after
    setting them to values the library reads (what the SCP sent is said, never what the library was given)."""
    if isinstance(pdu, A_ASSOCIATE_RJ):
        sent = (pdu.result, pdu.source, pdu.reason_diagnostic)
        if sent[0] in _RJ_RESULTS and sent[1] in _RJ_SOURCES and sent[2] in _RJ_REASONS:
            return None
        pdu.result, pdu.source, pdu.reason_diagnostic = 1, 1, 1
        return f"an A-ASSOCIATE-RJ with values outside PS3.8 Table 9-21 (result {sent[0]}, source {sent[1]}, reason {sent[2]})"
    if isinstance(pdu, A_ABORT_RQ):
        sent = (pdu.source, pdu.reason_diagnostic)
        if sent[0] in _ABORT_SOURCES and (sent[0] != 2 or sent[1] in _PROVIDER_REASONS):
            return None
        pdu.source, pdu.reason_diagnostic = 0, 0
        return f"an A-ABORT with values outside PS3.8 Table 9-26 (source {sent[0]}, reason {sent[1]})"
    return None


@contextmanager
def _reactor_failures() -> Iterator[list[str]]:
    """Collect, instead of printing a traceback, what kills a pynetdicom reactor thread while the block runs
    (a hostile answer the library cannot read and :func:`_outside_table` does not know)."""
    failures: list[str] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.thread is not None and "run_reactor" in args.thread.name and args.exc_type is not SystemExit:
            failures.append(f"{args.exc_type.__name__}: {args.exc_value}"[:200])
        else:
            previous(args)

    # pynetdicom's own debug-log handlers come first on EVT_PDU_RECV and fail on such values, which skipped
    # ours (one ``try`` around all handlers in ``events.trigger``): this client binds none of them.
    level, _config.LOG_HANDLER_LEVEL = _config.LOG_HANDLER_LEVEL, "none"
    threading.excepthook = hook
    try:
        yield failures
    finally:
        threading.excepthook = previous
        _config.LOG_HANDLER_LEVEL = level


def echo(called_ae: str, host: str, port: int, calling_ae: str = "DICOMGW", timeout_s: float = 10.0) -> EchoResult:
    """Associate, send one C-ECHO, release. Never raises for network trouble: the result says what failed."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.add_requested_context(Verification)
    rejections: list[A_ASSOCIATE_RJ] = []
    hostile: list[str] = []

    def on_pdu(event: evt.Event) -> None:
        if (words := _outside_table(event.pdu)) is not None:
            hostile.append(words)
        elif isinstance(event.pdu, A_ASSOCIATE_RJ):
            rejections.append(event.pdu)

    # The A-ASSOCIATE-RJ is taken from the PDU as it arrives, not from ``assoc.is_rejected``: pynetdicom 3.0's
    # requestor (``acse._negotiate_as_requestor``) checks that its socket is still connected before it reads
    # the answer, and its own reactor closes that socket as soon as it has read an RJ (``fsm.AE_4``, PS3.8 AE-4);
    # on a busy machine the check often came second and the rejection was read as an abort (9 in 200 here
    # beside CPU hogs), whichever SCP rejected.
    with _reactor_failures() as failures:
        try:
            assoc = ae.associate(host, port, ae_title=called_ae, evt_handlers=[(evt.EVT_PDU_RECV, on_pdu)])
        except OSError as exc:  # a host name that does not resolve
            return EchoResult(False, f"no association with {called_ae}@{host}:{port}: {exc.strerror or exc}")
    unreadable = (f"it answered {hostile[0]}" if hostile
                  else f"its answer could not be read ({failures[0]})" if failures else "")
    if unreadable:
        if assoc.is_established:
            assoc.abort()
        return EchoResult(False, f"no association with {called_ae}@{host}:{port}: {unreadable}")
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
