"""The DICOM edge for modalities: Verification (C-ECHO) and Storage (C-STORE) SCP on pynetdicom.

Contract (PS3.4 Annex A and B, PS3.7 9.1.1)
- Associations are accepted only from calling AE titles in ``allowed_calling_ae_titles`` (when the list is
  not empty); others are rejected at association with "calling AE title not recognised" and audited.
- Every standard storage SOP class is accepted with every transfer syntax pynetdicom knows, compressed
  ones included; the acceptor takes the requestor's first acceptable syntax, so the modality's choice wins.
- The data set is stored exactly as received (``event.encoded_dataset()``: no decode, no re-encode) behind
  a File Meta Information header. Success (0x0000) is answered only after the file is fsynced, renamed into
  the spool and its row committed (``IngestService.ingest`` returned).
- Handler exceptions never reach the network: a full spool or a DB failure answers 0xA700 Out of
  Resources, a data set without the identifying UIDs answers 0xC000 Cannot Understand (and the bytes are
  kept in quarantine). Each failure carries an Error Comment (0000,0902).

Storage Commitment (PS3.4 J.3.3): the PACS's N-EVENT-REPORT for a commitment the gateway requested arrives
on a new association (the PACS as requestor, in the SCP role, negotiated with SCP/SCU role selection); it
is handed to ``on_commitment(transaction_uid, committed_uids, failed_uids_with_reason)``, and answered
Success, or 0x0119 (no such SOP instance) for a transaction that is not ours.

Events handed out: ``on_stored(IngestResult)`` runs on the association's thread; the composition root
wraps it with ``loop.call_soon_threadsafe`` to reach the asyncio side.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from enum import IntEnum

from pydicom import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification  # type: ignore[attr-defined]

from adapters.dicom_files import RejectedFile, header_from_dataset_bytes
from adapters.spool import Spool, SpoolFull
from gateway.model import IngestResult
from gateway.service import IngestService
from gateway.settings import DicomSettings

log = logging.getLogger(__name__)

AuditFn = Callable[[str, str], None]
CommitmentFn = Callable[[str, set[str], dict[str, int]], bool]
DUL_LOOP_DELAY_S = 0.0001
PART10_PREFIX = b"\x00" * 128 + b"DICM"  # PS3.10 7.1: preamble and prefix


class StoreStatus(IntEnum):
    """C-STORE response statuses used here (PS3.4 Table B.2-1)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    CANNOT_UNDERSTAND = 0xC000


class StorageSCP:
    """Start/stop a non-blocking Storage + Verification SCP bound to ``settings.host:settings.port``."""

    def __init__(
        self,
        settings: DicomSettings,
        ingest: IngestService,
        spool: Spool,
        audit: AuditFn,
        on_stored: Callable[[IngestResult], None] | None = None,
        on_commitment: CommitmentFn | None = None,
    ) -> None:
        self._on_commitment = on_commitment
        self._settings = settings
        self._ingest = ingest
        self._spool = spool
        self._audit = audit
        self._on_stored = on_stored
        self._server: object | None = None
        self._ready = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        ae = AE(ae_title=self._settings.ae_title)
        ae.maximum_pdu_size = self._settings.max_pdu_bytes
        ae.maximum_associations = self._settings.max_associations
        ae.network_timeout = self._settings.network_timeout_s
        ae.dimse_timeout = self._settings.network_timeout_s
        if self._settings.allowed_calling_ae_titles:
            ae.require_calling_aet = list(self._settings.allowed_calling_ae_titles)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        handlers = [
            (evt.EVT_N_EVENT_REPORT, self._on_event_report),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        self._server = ae.start_server(
            (self._settings.host, self._settings.port), block=False, evt_handlers=handlers
        )
        log.info("DICOM SCP %s listening on %s:%s", self._settings.ae_title, self._settings.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # type: ignore[attr-defined]
            self._server = None

    @property
    def port(self) -> int:
        if self._server is None:
            return self._settings.port
        return int(self._server.server_address[1])  # type: ignore[attr-defined]

    # -- handlers (pynetdicom threads) -----------------------------------------------------------
    def _on_connection(self, event: evt.Event) -> None:
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # pynetdicom's DUL reactor sleeps this long whenever it finds nothing to do (default 1 ms), which
        # adds up to a millisecond to every PDU turn-around; the attribute is pynetdicom's documented knob.
        event.assoc.dul._run_loop_delay = DUL_LOOP_DELAY_S
        if sock is not None:
            event.assoc.dul.socket.recv = _whole_reader(sock)

    def _on_echo(self, event: evt.Event) -> int:
        return StoreStatus.SUCCESS

    def _on_event_report(self, event: evt.Event) -> int:
        """Storage Commitment result: event type 1 (all committed) or 2 (failures exist), PS3.4 J.3.3."""
        try:
            info = event.event_information
            transaction_uid = str(info.TransactionUID)
            committed = {str(item.ReferencedSOPInstanceUID) for item in info.get("ReferencedSOPSequence", [])}
            failed = {
                str(item.ReferencedSOPInstanceUID): int(item.get("FailureReason", 0x0110))
                for item in info.get("FailedSOPSequence", [])
            }
        except Exception:  # malformed report: refuse it, never raise into pynetdicom
            log.exception("unreadable N-EVENT-REPORT from %s", event.assoc.requestor.ae_title)
            return 0x0110
        self._audit("commitment_report", f"N-EVENT-REPORT from {event.assoc.requestor.ae_title}: transaction "
                    f"{transaction_uid}, {len(committed)} committed, {len(failed)} failed")
        if self._on_commitment is None or not self._on_commitment(transaction_uid, committed, failed):
            return 0x0119
        return 0x0000

    def _on_rejected(self, event: evt.Event) -> None:
        calling = event.assoc.requestor.ae_title
        address = event.assoc.requestor.address
        self._audit("association_rejected", f"calling AE title {calling!r} from {address} is not in the allowlist")

    def _on_store(self, event: evt.Event) -> int | Dataset:
        calling = event.assoc.requestor.ae_title
        source = f"scp:{calling}@{event.assoc.requestor.address}"
        dataset = event.encoded_dataset(include_meta=False)
        meta = PART10_PREFIX + encode_file_meta(event.file_meta)
        try:
            header = header_from_dataset_bytes(dataset, str(event.context.transfer_syntax))
        except RejectedFile as exc:
            return self._refuse_unreadable(meta + dataset, source, exc)
        try:
            staged = self._spool.stage_bytes([meta, dataset])
            result = self._ingest.ingest(header, staged, source)
        except SpoolFull as exc:
            log.error("refusing %s from %s: %s", header.sop_instance_uid, source, exc)
            return _failure(StoreStatus.OUT_OF_RESOURCES, f"gateway spool full: {exc.strerror}")
        except Exception as exc:  # DB down, I/O error: never Success, never an exception on the wire
            log.exception("refusing %s from %s", header.sop_instance_uid, source)
            return _failure(StoreStatus.OUT_OF_RESOURCES, f"gateway could not store the instance: {type(exc).__name__}")
        if self._on_stored is not None:
            self._on_stored(result)
        return StoreStatus.SUCCESS

    def _refuse_unreadable(self, raw: bytes, source: str, exc: RejectedFile) -> Dataset:
        reason = f"received from {source} but refused: {exc}"
        try:
            kept = self._spool.quarantine_bytes(raw, "network-instance.dcm", reason)
            self._audit("quarantined", f"{reason}; kept at {kept}")
        except OSError:
            log.exception("could not quarantine a refused instance from %s", source)
        return _failure(StoreStatus.CANNOT_UNDERSTAND, str(exc)[:64])


def _whole_reader(sock: socket.socket) -> Callable[[int], bytearray]:
    """``AssociationSocket.recv`` with the same contract (block until ``nr_bytes`` are read or the peer
    closes; return what was read) but reading straight into one buffer instead of 4 KiB ``recv`` calls
    appended one by one: a 128 KiB P-DATA PDU is a handful of syscalls instead of 32 plus copies."""

    def recv(nr_bytes: int) -> bytearray:
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        read = 0
        while read < nr_bytes:
            got = sock.recv_into(view[read:], nr_bytes - read)
            if not got:
                del view
                return buffer[:read]
            read += got
        del view
        return buffer

    return recv


def _failure(status: StoreStatus, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = int(status)
    ds.ErrorComment = comment[:64]  # LO: 64 characters at most
    return ds
