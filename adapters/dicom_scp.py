"""The DICOM edge for modalities: Verification (C-ECHO) and Storage (C-STORE) SCP, on ``adapters.dicom_ul``.

Contract (PS3.4 Annex A and B, PS3.7 9.1.1, PS3.8)
- Associations are accepted only from calling AE titles in ``allowed_calling_ae_titles`` (when the list is
  not empty); others get A-ASSOCIATE-RJ "calling AE title not recognised" (permanent) and an audit row.
  Above ``max_associations`` at once: A-ASSOCIATE-RJ "local limit exceeded" (transient).
- Every standard storage SOP class is accepted with every transfer syntax pynetdicom knows (compressed
  ones included); per context the requestor's first acceptable syntax wins, so the modality's choice holds.
- The data set is written to a staged file as its PDVs arrive (never held whole in memory), exactly as
  received, behind a new File Meta Information header. Success (0x0000) is answered only after the file is
  fsynced, renamed into the spool and its row committed (``IngestService.ingest`` returned).
- Nothing raises into the network: a full spool or a DB failure answers 0xA700 Out of Resources, a data set
  without the identifying UIDs answers 0xC000 Cannot Understand (its bytes kept in quarantine). Each
  failure carries an Error Comment (0000,0902).
- Storage Commitment (PS3.4 J.3.3): the PACS's N-EVENT-REPORT for a commitment the gateway requested
  arrives on a new association (the PACS proposes the SCP role through SCP/SCU role selection, which we
  accept); it is handed to ``on_commitment(transaction_uid, committed_uids, failed_uids_with_reason)`` and
  answered Success, or 0x0119 (no such SOP instance) for a transaction that is not ours.

Why not pynetdicom here: its association and DUL threads poll with sleeps and build every PDU in Python;
a bare pynetdicom SCP took about as long as Orthanc plus half again (bench/ingest). One thread per
association here reads whole PDUs with ``recv_into`` and writes fragments straight to the staged file.

Events handed out: ``on_stored(IngestResult)`` runs on the association's thread; the composition root
wraps it with ``loop.call_soon_threadsafe`` to reach the asyncio side.
"""

from __future__ import annotations

import io
import logging
import socket
import threading
from collections.abc import Callable
from enum import IntEnum

from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.dsutils import encode_file_meta

from adapters.dicom_files import RejectedFile, header_from_dataset_bytes
from adapters.dicom_ul import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    LO,
    RELEASE_RP,
    UI,
    US,
    AssociateRequest,
    Association,
    AssociationAborted,
    Command,
    PresentationContext,
    associate_ac,
    associate_rj,
    encode_command,
    iter_pdvs,
    parse_associate_rq,
    read_pdu,
)
from adapters.spool import Spool, SpoolFull, StagedWriter
from gateway.model import IngestResult
from gateway.service import IngestService
from gateway.settings import DicomSettings

log = logging.getLogger(__name__)

AuditFn = Callable[[str, str], None]
CommitmentFn = Callable[[str, set[str], dict[str, int]], bool]
PART10_PREFIX = b"\x00" * 128 + b"DICM"  # PS3.10 7.1: preamble and prefix
VERIFICATION = "1.2.840.10008.1.1"
STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
HEADER_PREFIX_BYTES = 256 * 1024  # enough of a data set for its group 0008-0020 header, kept in memory
C_STORE_RQ, C_ECHO_RQ, N_EVENT_REPORT_RQ = 0x0001, 0x0030, 0x0100


class StoreStatus(IntEnum):
    """C-STORE response statuses used here (PS3.4 Table B.2-1)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    CANNOT_UNDERSTAND = 0xC000


class StorageSCP:
    """Start/stop a Storage + Verification SCP bound to ``settings.host:settings.port`` (threads)."""

    def __init__(
        self,
        settings: DicomSettings,
        ingest: IngestService,
        spool: Spool,
        audit: AuditFn,
        on_stored: Callable[[IngestResult], None] | None = None,
        on_commitment: CommitmentFn | None = None,
    ) -> None:
        self._settings = settings
        self._ingest = ingest
        self._spool = spool
        self._audit = audit
        self._on_stored = on_stored
        self._on_commitment = on_commitment
        self._listener: socket.socket | None = None
        self._slots = threading.BoundedSemaphore(settings.max_associations)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.storage_classes = frozenset(c.abstract_syntax for c in AllStoragePresentationContexts)
        self.transfer_syntaxes = tuple(str(ts) for ts in ALL_TRANSFER_SYNTAXES)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        listener = socket.create_server((self._settings.host, self._settings.port), backlog=64)
        self._listener = listener
        threading.Thread(target=self._accept_loop, args=(listener,), name="dicom-scp", daemon=True).start()
        log.info("DICOM SCP %s listening on %s:%s", self._settings.ae_title, self._settings.host, self.port)

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            for sock in list(self._open):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    @property
    def port(self) -> int:
        if self._listener is None:
            return self._settings.port
        return int(self._listener.getsockname()[1])

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, address = listener.accept()
            except OSError:
                return  # closed by stop()
            threading.Thread(target=self._serve, args=(sock, f"{address[0]}:{address[1]}"), name="dicom-assoc", daemon=True).start()

    # -- one association ------------------------------------------------------------------------
    def _serve(self, sock: socket.socket, address: str) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self._settings.network_timeout_s)
        with self._lock:
            self._open.add(sock)
        link: _Link | None = None
        try:
            link = self._negotiate(sock, address)
            if link is not None:
                _AssociationHandler(self, link, address).run()
        except (OSError, AssociationAborted) as exc:
            log.info("association from %s ended: %s", address, exc or type(exc).__name__)
            if link is not None and isinstance(exc, ProtocolViolation):
                link.assoc.abort()  # A-ABORT: the peer learns the association is gone (PS3.8 7.3)
        except Exception:  # never a dead thread with the peer left waiting: log, A-ABORT, keep serving others
            log.exception("association from %s failed", address)
            if link is not None:
                link.assoc.abort()
        finally:
            with self._lock:
                self._open.discard(sock)
            sock.close()

    def _negotiate(self, sock: socket.socket, address: str) -> _Link | None:
        pdu_type, body = read_pdu(sock)
        if pdu_type != 0x01:
            raise AssociationAborted(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
        request = parse_associate_rq(body)
        allowed = self._settings.allowed_calling_ae_titles
        if allowed and request.calling_ae not in allowed:
            sock.sendall(associate_rj(1, 1, 3))  # rejected-permanent, service user, calling AE not recognised
            self._audit("association_rejected", f"calling AE title {request.calling_ae!r} from {address} is not in the allowlist")
            return None
        if not self._slots.acquire(blocking=False):
            sock.sendall(associate_rj(2, 3, 2))  # rejected-transient, provider (presentation), local limit exceeded
            log.warning("association from %s refused: %d associations already open", address, self._settings.max_associations)
            return None
        try:
            results, contexts, roles = self._choose(request)
            sock.sendall(associate_ac(request, results, self._settings.max_pdu_bytes, roles))
        except BaseException:
            self._slots.release()
            raise
        return _Link(Association(sock, contexts, request.max_pdu or (1 << 20), self._settings.network_timeout_s), request, self._slots)

    def _choose(self, request: AssociateRequest) -> tuple[list[tuple[int, int, str]], dict[int, PresentationContext], dict[str, tuple[bool, bool]]]:
        results, contexts = [], {}
        for context_id, abstract, proposed in request.contexts:
            if abstract in self.storage_classes or abstract == VERIFICATION:
                chosen = next((ts for ts in proposed if ts in self.transfer_syntaxes), None)
            elif abstract == STORAGE_COMMITMENT_PUSH:
                chosen = IMPLICIT_LE if IMPLICIT_LE in proposed else None
            else:
                results.append((context_id, 3, proposed[0] if proposed else IMPLICIT_LE))  # abstract syntax not supported
                continue
            result = 0 if chosen else 4  # 4: transfer syntaxes not supported
            results.append((context_id, result, chosen or (proposed[0] if proposed else IMPLICIT_LE)))
            contexts[context_id] = PresentationContext(context_id, abstract, proposed, result, chosen or "")
        roles = {uid: role for uid, role in request.roles.items() if uid == STORAGE_COMMITMENT_PUSH}
        return results, contexts, roles


class ProtocolViolation(AssociationAborted):
    """The requestor broke PS3.7/PS3.8 (a message on a context we did not accept, a stray fragment):
    the association is aborted and nothing of the message is kept."""


class _Link:
    """An accepted association: the UL object, the request it answered, and its slot to give back."""

    def __init__(self, assoc: Association, request: AssociateRequest, slots: threading.BoundedSemaphore) -> None:
        self.assoc, self.request, self._slots = assoc, request, slots

    def release_slot(self) -> None:
        self._slots.release()


class _AssociationHandler:
    """Reads PDUs until release or abort; assembles each DIMSE message and answers it."""

    def __init__(self, scp: StorageSCP, link: _Link, address: str) -> None:
        self.scp = scp
        self.assoc = link.assoc
        self.link = link
        self.source = f"scp:{link.request.calling_ae}@{address.rsplit(':', 1)[0]}"
        self.command = bytearray()
        self.pending: Command | None = None  # a command whose data set is arriving
        self.context_id = 0
        self.writer: StagedWriter | None = None
        self.write_error: Exception | None = None
        self.prefix = bytearray()
        self.dataset = bytearray()  # N-EVENT-REPORT data sets only (small)

    def run(self) -> None:
        try:
            while True:
                pdu_type, body = read_pdu(self.assoc.sock)
                if pdu_type == 0x05:
                    self.assoc.sock.sendall(RELEASE_RP)
                    return
                if pdu_type == 0x07:
                    return
                if pdu_type != 0x04:
                    raise ProtocolViolation(f"unexpected PDU type 0x{pdu_type:02X}")
                for context_id, flags, fragment in iter_pdvs(body):
                    self._pdv(context_id, flags, fragment)
        finally:
            if self.writer is not None:
                self.writer.abort()
            self.link.release_slot()

    def _pdv(self, context_id: int, flags: int, fragment: memoryview) -> None:
        if flags & 0x01:  # command fragment
            self.command += fragment
            if flags & 0x02:
                context = self.assoc.contexts.get(context_id)
                if context is None or not context.transfer_syntax:
                    raise ProtocolViolation(f"a message on presentation context {context_id}, which was not accepted")
                command = Command.decode(bytes(self.command))
                self.command.clear()
                self.context_id = context_id
                if command.has_dataset:
                    self._begin_dataset(command)
                else:
                    self._dispatch(command)
            return
        if self.pending is None:
            raise ProtocolViolation("data set fragment without a command")
        if self.pending.command_field == C_STORE_RQ:
            self._store_fragment(fragment)
        else:
            self.dataset += fragment
        if flags & 0x02:
            command, self.pending = self.pending, None
            if command.command_field == C_STORE_RQ:
                self._finish_store(command)
            else:
                self._dispatch(command, bytes(self.dataset))
                self.dataset.clear()

    # -- C-STORE ---------------------------------------------------------------------------------
    def _begin_dataset(self, command: Command) -> None:
        self.pending = command
        self.prefix.clear()
        self.write_error = None
        if command.command_field != C_STORE_RQ:
            return
        context = self.assoc.contexts.get(self.context_id)
        meta = FileMetaDataset()
        meta.FileMetaInformationVersion = b"\x00\x01"
        meta.MediaStorageSOPClassUID = command.text(0x00000002)
        meta.MediaStorageSOPInstanceUID = command.text(0x00001000)
        meta.TransferSyntaxUID = context.transfer_syntax if context else IMPLICIT_LE
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION
        meta.SourceApplicationEntityTitle = self.link.request.calling_ae
        try:
            self.writer = self.scp._spool.open_staged()
            self.writer.write(PART10_PREFIX + encode_file_meta(meta))
        except OSError as exc:
            self.writer, self.write_error = None, exc

    def _store_fragment(self, fragment: memoryview) -> None:
        if len(self.prefix) < HEADER_PREFIX_BYTES:
            self.prefix += fragment[: HEADER_PREFIX_BYTES - len(self.prefix)]
        if self.writer is not None:
            try:
                self.writer.write(fragment)
            except OSError as exc:  # keep reading the data set off the wire, answer after it
                self.writer, self.write_error = None, exc

    def _finish_store(self, command: Command) -> None:
        status, comment = self._store(command)
        elements = [
            (0x00000002, UI, command.text(0x00000002)), (0x00000100, US, 0x8001),
            (0x00000120, US, command.us(0x00000110)), (0x00000800, US, 0x0101), (0x00000900, US, int(status)),
            (0x00001000, UI, command.text(0x00001000)),
        ]
        if comment:
            elements.append((0x00000902, LO, comment[:64]))  # LO: 64 characters at most
        self.assoc.send_message(self.context_id, encode_command(elements))

    def _store(self, command: Command) -> tuple[StoreStatus, str]:
        writer, self.writer = self.writer, None
        sop_instance_uid = command.text(0x00001000)
        if writer is None:
            log.error("refusing %s from %s: %s", sop_instance_uid, self.source, self.write_error)
            full = isinstance(self.write_error, SpoolFull)
            return StoreStatus.OUT_OF_RESOURCES, (f"gateway spool full: {getattr(self.write_error, 'strerror', '')}" if full
                                                  else f"gateway could not store the instance: {type(self.write_error).__name__}")
        transfer_syntax = self.assoc.contexts[self.context_id].transfer_syntax
        try:
            staged = writer.close()
        except OSError as exc:
            log.error("refusing %s from %s: %s", sop_instance_uid, self.source, exc)
            return StoreStatus.OUT_OF_RESOURCES, f"gateway spool full: {getattr(exc, 'strerror', '')}"
        try:
            header = self._header(bytes(self.prefix), staged.temp_path, transfer_syntax)
        except RejectedFile as exc:
            return self._refuse_unreadable(staged.temp_path, exc)
        try:
            result = self.scp._ingest.ingest(header, staged, self.source)
        except SpoolFull as exc:
            log.error("refusing %s from %s: %s", sop_instance_uid, self.source, exc)
            return StoreStatus.OUT_OF_RESOURCES, f"gateway spool full: {exc.strerror}"
        except Exception as exc:  # DB down, I/O error: never Success, never an exception on the wire
            log.exception("refusing %s from %s", sop_instance_uid, self.source)
            return StoreStatus.OUT_OF_RESOURCES, f"gateway could not store the instance: {type(exc).__name__}"
        if self.scp._on_stored is not None:
            self.scp._on_stored(result)
        return StoreStatus.SUCCESS, ""

    @staticmethod
    def _header(prefix: bytes, staged_path: object, transfer_syntax: str) -> object:
        try:
            return header_from_dataset_bytes(prefix, transfer_syntax)
        except RejectedFile:
            if len(prefix) < HEADER_PREFIX_BYTES:
                raise  # that was the whole data set
        with open(staged_path, "rb") as fh:  # type: ignore[call-overload]
            raw = fh.read()
        return header_from_dataset_bytes(raw[raw.index(b"DICM") + 4 :][_meta_length(raw) :], transfer_syntax)

    def _refuse_unreadable(self, staged_path: object, exc: RejectedFile) -> tuple[StoreStatus, str]:
        reason = f"received from {self.source} but refused: {exc}"
        try:
            kept = self.scp._spool.quarantine(staged_path, reason)  # type: ignore[arg-type]
            self.scp._audit("quarantined", f"{reason}; kept at {kept}")
        except OSError:
            log.exception("could not quarantine a refused instance from %s", self.source)
        return StoreStatus.CANNOT_UNDERSTAND, str(exc)

    # -- C-ECHO, N-EVENT-REPORT -----------------------------------------------------------------
    def _dispatch(self, command: Command, dataset: bytes = b"") -> None:
        field = command.command_field
        if field == C_ECHO_RQ:
            self.assoc.send_message(self.context_id, encode_command([
                (0x00000002, UI, VERIFICATION), (0x00000100, US, 0x8030), (0x00000120, US, command.us(0x00000110)),
                (0x00000800, US, 0x0101), (0x00000900, US, 0x0000),
            ]))
        elif field == N_EVENT_REPORT_RQ:
            status = self._event_report(dataset)
            self.assoc.send_message(self.context_id, encode_command([
                (0x00000002, UI, command.text(0x00000002)), (0x00000100, US, 0x8100),
                (0x00000120, US, command.us(0x00000110)), (0x00000800, US, 0x0101), (0x00000900, US, status),
                (0x00001000, UI, command.text(0x00001000)), (0x00001002, US, command.us(0x00001002)),
            ]))
        else:
            raise ProtocolViolation(f"unsupported DIMSE command 0x{field:04X}")

    def _event_report(self, dataset: bytes) -> int:
        """Storage Commitment result: event type 1 (all committed) or 2 (failures exist), PS3.4 J.3.3."""
        calling = self.link.request.calling_ae
        try:
            info = read_dataset(io.BytesIO(dataset), is_implicit_VR=True, is_little_endian=True)
            transaction_uid = str(info.TransactionUID)
            committed = {str(item.ReferencedSOPInstanceUID) for item in info.get("ReferencedSOPSequence", [])}
            failed = {
                str(item.ReferencedSOPInstanceUID): int(item.get("FailureReason", 0x0110))
                for item in info.get("FailedSOPSequence", [])
            }
        except Exception:  # malformed report: refuse it, never raise into the association
            log.exception("unreadable N-EVENT-REPORT from %s", calling)
            return 0x0110
        self.scp._audit("commitment_report", f"N-EVENT-REPORT from {calling}: transaction "
                        f"{transaction_uid}, {len(committed)} committed, {len(failed)} failed")
        if self.scp._on_commitment is None or not self.scp._on_commitment(transaction_uid, committed, failed):
            return 0x0119
        return 0x0000


def _meta_length(raw: bytes) -> int:
    """Length of the File Meta group after 'DICM' (its first element is the group length, PS3.10 7.1)."""
    start = raw.index(b"DICM") + 4
    return 12 + int.from_bytes(raw[start + 8 : start + 12], "little")
