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
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from enum import IntEnum

from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.dsutils import encode_file_meta

from adapters.dicom_files import RejectedFile, header_from_dataset_bytes
from adapters.dicom_tls import server_context
from adapters.dicom_walk import DatasetWalker
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
    ProtocolError,
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
    DATASET_MISMATCH = 0xA900  # Data Set does not match SOP Class (dcmtk and Orthanc answer it for a UID mismatch)
    CANNOT_UNDERSTAND = 0xC000


MAX_UNASSOCIATED = 64  # connections that have not associated yet; more are closed at once


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
        self._tls_listener: socket.socket | None = None
        self._slots = threading.BoundedSemaphore(settings.max_associations)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._unassociated = threading.BoundedSemaphore(MAX_UNASSOCIATED)
        self.storage_classes = frozenset(c.abstract_syntax for c in AllStoragePresentationContexts)
        self.transfer_syntaxes = tuple(str(ts) for ts in ALL_TRANSFER_SYNTAXES)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        listener = socket.create_server((self._settings.host, self._settings.port), backlog=64)
        self._listener = listener
        threading.Thread(target=self._accept_loop, args=(listener,), name="dicom-scp", daemon=True).start()
        log.info("DICOM SCP %s listening on %s:%s", self._settings.ae_title, self._settings.host, self.port)
        s = self._settings
        if s.tls_port and s.tls_cert_file and s.tls_key_file:
            context = server_context(s.tls_cert_file, s.tls_key_file, s.tls_ca_file, s.require_client_cert)
            self._tls_listener = socket.create_server((s.host, s.tls_port), backlog=64)
            threading.Thread(target=self._accept_loop, args=(self._tls_listener, context), name="dicom-scp-tls", daemon=True).start()
            log.info("DICOM SCP %s listening for TLS on %s:%s (client certificate %s)", s.ae_title, s.host, self.tls_port,
                     "required" if s.require_client_cert else "optional")

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        tls_listener, self._tls_listener = self._tls_listener, None
        if tls_listener is not None:
            tls_listener.close()
        with self._lock:
            for sock in list(self._open):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    @property
    def tls_port(self) -> int:
        return int(self._tls_listener.getsockname()[1]) if self._tls_listener is not None else 0

    @property
    def port(self) -> int:
        if self._listener is None:
            return self._settings.port
        return int(self._listener.getsockname()[1])

    def _accept_loop(self, listener: socket.socket, tls: ssl.SSLContext | None = None) -> None:
        """Accept until ``stop``; an accept error (EMFILE at the descriptor limit, ENOBUFS) is logged and
        retried with backoff, never the end of the loop."""
        backoff_s = 0.05
        while listener in (self._listener, self._tls_listener):
            try:
                sock, address = listener.accept()
            except OSError as exc:
                if listener not in (self._listener, self._tls_listener):
                    return  # closed by stop()
                log.error("DICOM SCP cannot accept a connection (%s); retrying in %.2f s", exc, backoff_s)
                time.sleep(backoff_s)
                backoff_s = min(2.0, backoff_s * 2)
                continue
            backoff_s = 0.05
            if not self._unassociated.acquire(blocking=False):
                log.warning("connection from %s closed: %d connections have not associated yet", address[0], MAX_UNASSOCIATED)
                sock.close()
                continue
            try:
                threading.Thread(target=self._serve, args=(sock, f"{address[0]}:{address[1]}", tls), name="dicom-assoc", daemon=True).start()
            except RuntimeError:  # cannot start a thread: the connection goes, the loop stays
                self._unassociated.release()
                sock.close()

    # -- one association ------------------------------------------------------------------------
    def _serve(self, raw_sock: socket.socket, address: str, tls: ssl.SSLContext | None = None) -> None:
        raw_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._open.add(raw_sock)
        sock = raw_sock
        link: _Link | None = None
        unassociated = True
        try:
            try:
                if tls is not None:  # the handshake counts against the association's ARTIM deadline
                    raw_sock.settimeout(self._settings.artim_timeout_s)
                    try:
                        sock = tls.wrap_socket(raw_sock, server_side=True)
                    except ssl.SSLError as exc:
                        self._audit("association_rejected", f"TLS from {address} refused: {getattr(exc, 'verify_message', '') or exc.reason or exc}")
                        return
                sock.settimeout(self._settings.network_timeout_s)
                link = self._negotiate(sock, address)
            finally:
                unassociated = False
                self._unassociated.release()
            if link is not None:
                _AssociationHandler(self, link, address).run()
        except (OSError, AssociationAborted) as exc:
            log.info("association from %s ended: %s", address, exc or type(exc).__name__)
            if isinstance(exc, ProtocolError):
                _send_abort(sock)  # A-ABORT: the peer learns the association is gone (PS3.8 7.3)
        except Exception:  # never a dead thread with the peer left waiting: log, A-ABORT, keep serving others
            log.exception("association from %s failed", address)
            _send_abort(sock)
        finally:
            if unassociated:
                self._unassociated.release()
            with self._lock:
                self._open.discard(raw_sock)
            sock.close()
            raw_sock.close()

    def _negotiate(self, sock: socket.socket, address: str) -> _Link | None:
        pdu_type, body = read_pdu(sock, deadline=time.monotonic() + self._settings.artim_timeout_s)
        if pdu_type != 0x01:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
        rejection = _check_associate_rq(body)
        if rejection is not None:
            (result, source, reason), why = rejection
            sock.sendall(associate_rj(result, source, reason))
            self._audit("association_rejected", f"A-ASSOCIATE-RQ from {address} rejected: {why}")
            return None
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
        return _Link(Association(sock, contexts, request.max_pdu or (1 << 20), self._settings.network_timeout_s), request, self._slots,
                     self._settings.max_pdu_bytes or 64 * 1024 * 1024)

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


class ProtocolViolation(ProtocolError):
    """The requestor broke PS3.7/PS3.8 (a message on a context we did not accept, a stray fragment):
    the association is aborted and nothing of the message is kept."""


class _Link:
    """An accepted association: the UL object, the request it answered, and its slot to give back."""

    def __init__(self, assoc: Association, request: AssociateRequest, slots: threading.BoundedSemaphore,
                 max_pdu_bytes: int) -> None:
        self.assoc, self.request, self._slots = assoc, request, slots
        self.max_pdu_bytes = max_pdu_bytes  # what we announced: a P-DATA-TF above it is a protocol error

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
        self.refusal: tuple[StoreStatus, str] | None = None  # a C-STORE refused from its command alone
        self.walker: DatasetWalker | None = None  # the data set's element structure, followed as it streams

    def run(self) -> None:
        try:
            while True:
                pdu_type, body = read_pdu(self.assoc.sock, self.link.max_pdu_bytes)
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
                if len(self.command) > MAX_COMMAND_BYTES:
                    raise ProtocolViolation(f"command set of {len(self.command)} bytes")
                if self.pending is not None:
                    raise ProtocolViolation("a new command while the previous data set is incomplete")
                command = Command.decode(bytes(self.command))
                self.command.clear()
                if command.us(0x00000110) < 0:
                    raise ProtocolViolation("command without a Message ID (0000,0110)")
                self.context_id = context_id
                if command.has_dataset:
                    self._begin_dataset(command)
                else:
                    self._dispatch(command)
            return
        if self.command:
            raise ProtocolViolation("a data set fragment inside a command")
        if self.pending is None:
            raise ProtocolViolation("data set fragment without a command")
        if context_id != self.context_id:
            raise ProtocolViolation(f"data set fragment on context {context_id}, its command came on {self.context_id}")
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
        elif self.pending is not None and self.pending.command_field != C_STORE_RQ and len(self.dataset) > MAX_COMMAND_BYTES * 64:
            raise ProtocolViolation("an N-EVENT-REPORT data set over 4 MiB")

    # -- C-STORE ---------------------------------------------------------------------------------
    def _begin_dataset(self, command: Command) -> None:
        self.pending = command
        self.prefix.clear()
        self.write_error = None
        self.refusal = None
        if command.command_field not in (C_STORE_RQ, N_EVENT_REPORT_RQ):
            raise ProtocolViolation(f"a data set with DIMSE command 0x{command.command_field:04X}")
        if command.command_field != C_STORE_RQ:
            return
        missing = [name for tag, name in ((0x00000002, "Affected SOP Class UID"), (0x00001000, "Affected SOP Instance UID"))
                   if not _uid(command.text(tag))]
        if missing:  # answered once the data set is off the wire; nothing of it is written
            self.refusal = (StoreStatus.CANNOT_UNDERSTAND, f"C-STORE-RQ without a valid {' and '.join(missing)}")
            return
        context = self.assoc.contexts.get(self.context_id)
        self.walker = DatasetWalker(context.transfer_syntax if context else IMPLICIT_LE)
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
        if self.walker is not None:
            self.walker.feed(fragment)
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
            (0x00000002, UI, _uid(command.text(0x00000002))), (0x00000100, US, 0x8001),
            (0x00000120, US, command.us(0x00000110)), (0x00000800, US, 0x0101), (0x00000900, US, int(status)),
            (0x00001000, UI, _uid(command.text(0x00001000))),
        ]
        if comment:
            # LO: 64 characters at most, of the default repertoire (the reason may quote what was received)
            elements.append((0x00000902, LO, "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in comment[:64])))
        self.assoc.send_message(self.context_id, encode_command(elements))

    def _store(self, command: Command) -> tuple[StoreStatus, str]:
        writer, self.writer = self.writer, None
        sop_instance_uid = command.text(0x00001000)
        if self.refusal is not None:
            log.warning("refusing a C-STORE from %s: %s", self.source, self.refusal[1])
            return self.refusal
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
        walker, self.walker = self.walker, None
        if walker is not None and not walker.complete():
            return self._refuse_unreadable(staged.temp_path, RejectedFile(walker.problem()))
        try:
            header = self._header(bytes(self.prefix), staged.temp_path, transfer_syntax)
        except RejectedFile as exc:
            return self._refuse_unreadable(staged.temp_path, exc)
        mismatch = [f"{name} {ours!r} in the data set, {theirs!r} in the command"
                    for name, ours, theirs in (("SOP Instance UID", header.sop_instance_uid, sop_instance_uid),
                                               ("SOP Class UID", header.sop_class_uid, command.text(0x00000002)))
                    if ours != theirs]
        if mismatch:
            return self._refuse_unreadable(staged.temp_path, RejectedFile("; ".join(mismatch)), StoreStatus.DATASET_MISMATCH)
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

    def _refuse_unreadable(self, staged_path: object, exc: RejectedFile,
                           status: StoreStatus = StoreStatus.CANNOT_UNDERSTAND) -> tuple[StoreStatus, str]:
        reason = f"received from {self.source} but refused: {exc}"
        try:
            kept = self.scp._spool.quarantine(staged_path, reason)  # type: ignore[arg-type]
            self.scp._audit("quarantined", f"{reason}; kept at {kept}")
        except OSError:
            log.exception("could not quarantine a refused instance from %s", self.source)
        return status, str(exc)

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
                (0x00000002, UI, _uid(command.text(0x00000002))), (0x00000100, US, 0x8100),
                (0x00000120, US, command.us(0x00000110)), (0x00000800, US, 0x0101), (0x00000900, US, status),
                (0x00001000, UI, _uid(command.text(0x00001000))), (0x00001002, US, max(0, command.us(0x00001002))),
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


MAX_COMMAND_BYTES = 64 * 1024  # a command set is a few hundred bytes
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def _uid(text: str) -> str:
    """``text`` if it is a UID (PS3.5 9.1: digits and dots, at most 64 characters), else ""."""
    return text if len(text) <= 64 and UID_RE.match(text) else ""


def _send_abort(sock: socket.socket) -> None:
    """A-ABORT (service provider, reason not specified), best effort (PS3.8 9.3.8)."""
    try:
        sock.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00")
    except OSError:
        pass


def _check_associate_rq(body: bytes | bytearray) -> tuple[tuple[int, int, int], str] | None:
    """Validate an A-ASSOCIATE-RQ (PS3.8 9.3.2): None when acceptable, else the A-ASSOCIATE-RJ (result,
    source, reason) and why. Items whose lengths do not fit, and anything pynetdicom's PDU codec cannot
    decode, raise :class:`ProtocolError` (A-ABORT)."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ

    raw = bytes(body)
    if len(raw) < 68:
        raise ProtocolError("A-ASSOCIATE-RQ shorter than its fixed fields")
    version = int.from_bytes(raw[0:2], "big")
    if version != 1:
        return (1, 2, 2), f"protocol version {version} (only 1 is supported)"
    called, calling = raw[4:20], raw[20:36]
    if any(b < 0x20 or b > 0x7E for b in called) or not called.strip():
        return (1, 1, 7), "called AE title is not printable ASCII"
    if any(b < 0x20 or b > 0x7E for b in calling) or not calling.strip():
        return (1, 1, 3), "calling AE title is not printable ASCII"
    _check_items(raw, 68, nested=(0x20, 0x50))
    try:
        request = A_ASSOCIATE_RQ()
        request.decode(b"\x01\x00" + len(raw).to_bytes(4, "big") + raw)
        contexts = request.presentation_context
    except Exception as exc:  # pynetdicom raises anything from struct.error to ValueError on bad items
        raise ProtocolError(f"malformed A-ASSOCIATE-RQ: {type(exc).__name__}") from exc
    if not contexts:
        return (1, 1, 1), "no presentation context proposed"
    return None


def _check_items(raw: bytes, pos: int, nested: tuple[int, ...] = ()) -> None:
    """Every item (type, reserved, 16-bit length) ends inside its parent; UIDs and names are ASCII; a role
    selection sub-item's UID length fits it (PS3.7 D.3.3.4)."""
    end = len(raw)
    while pos < end:
        if pos + 4 > end:
            raise ProtocolError("A-ASSOCIATE-RQ ends inside an item header")
        item_type, _r, length = struct.unpack_from(">BBH", raw, pos)
        payload = raw[pos + 4 : pos + 4 + length]
        if len(payload) != length:
            raise ProtocolError(f"item 0x{item_type:02X} of {length} bytes runs past the PDU")
        if item_type == 0x20:
            _check_items(payload, 4)
        elif item_type == 0x50:
            _check_items(payload, 0)
        elif item_type == 0x54:
            if length < 4 or 2 + struct.unpack_from(">H", payload)[0] + 2 != length:
                raise ProtocolError("role selection item's UID length overruns it")
        elif item_type in (0x10, 0x30, 0x40, 0x52, 0x55) and any(b > 0x7E for b in payload):
            raise ProtocolError(f"item 0x{item_type:02X} is not ASCII")
        pos += 4 + length


def _meta_length(raw: bytes) -> int:
    """Length of the File Meta group after 'DICM' (its first element is the group length, PS3.10 7.1)."""
    start = raw.index(b"DICM") + 4
    return 12 + int.from_bytes(raw[start + 8 : start + 12], "little")
