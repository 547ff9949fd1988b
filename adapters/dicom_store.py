"""The DIMSE side of one association: C-STORE (streamed to a staged file), C-ECHO, N-EVENT-REPORT.

Contract (PS3.4 B.2, PS3.7 9.1.1, 9.3.1, 10.1.1): ``AssociationHandler(scp, link, address).run()`` reads
PDUs until release or abort and assembles each message. A C-STORE data set goes to a staged file as it
arrives, its element structure followed by ``adapters.dicom_walk.DatasetWalker``; the answer is Success
only after the file is durable and its row committed, 0xA700 when it cannot be, 0xA900 when the command's
UIDs differ from the data set's, 0x0122 when the command's SOP Class is not its presentation context's
abstract syntax (nothing written), 0xC000 when the data set is unreadable or does not end on an element
boundary (its bytes kept in quarantine with the reason) or the command lacks a valid Affected SOP
Instance UID. A message that breaks PS3.7/PS3.8 (a command inside a data set, a fragment on another
context, no Message ID, a data set with C-ECHO) raises :class:`ProtocolViolation`: A-ABORT, nothing kept.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from enum import IntEnum
from typing import Any, Protocol

from pydicom.filereader import read_dataset

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
    Command,
    DimseRefusal,
    ProtocolError,
    encode_command,
    iter_pdvs,
    read_pdu,
)
from adapters.dicom_walk import DatasetWalker
from adapters.spool import SpoolFull, StagedWriter
from gateway.outage import comment as outage_comment
from gateway.outage import said, unreachable
from gateway.routing import scp_source
from gateway.service import CompletenessService

log = logging.getLogger(__name__)

AuditFn = Callable[[str, str], None]
CommitmentFn = Callable[[str, set[str], dict[str, int]], bool]
# (calling AE, address, transaction UID, [(class, instance)], report on this association?) -> (request id, decision)
CommitRequestFn = Callable[[str, str, str, list[tuple[str, str]], bool], tuple[int, object]]
PART10_PREFIX = b"\x00" * 128 + b"DICM"  # PS3.10 7.1: preamble and prefix
VERIFICATION = "1.2.840.10008.1.1"
STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
HEADER_PREFIX_BYTES = 256 * 1024  # enough of a data set for its group 0008-0020 header, kept in memory
C_STORE_RQ, C_ECHO_RQ, N_EVENT_REPORT_RQ, N_EVENT_REPORT_RSP, N_ACTION_RQ = 0x0001, 0x0030, 0x0100, 0x8100, 0x0130
N_CREATE_RQ, N_SET_RQ = 0x0140, 0x0120
MAX_COMMAND_BYTES = 64 * 1024  # a command set is a few hundred bytes
SPARE_FILES = 3  # staged files kept ready on an association that has stored one instance
DATASET_GRACE_S = 10.0  # a data set may start slowly for this long ...
MIN_DATASET_BYTES_PER_S = 1024  # ... then must have averaged this rate (a 1 Mbit/s link moves 125,000)
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class StoreStatus(IntEnum):
    """C-STORE response statuses used here (PS3.4 Table B.2-1)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    SOP_CLASS_NOT_SUPPORTED = 0x0122  # Refused: the command's class is not the context's abstract syntax
    DATASET_MISMATCH = 0xA900  # Data Set does not match SOP Class (dcmtk and Orthanc answer it for a UID mismatch)
    CANNOT_UNDERSTAND = 0xC000


class ScpServices(Protocol):
    """What an association's handler uses of its SCP (``adapters.dicom_scp.StorageSCP`` provides it): the spool,
    the ingest service and the callbacks of the services in the table of ``AssociationHandler._dispatch``. Declared
    here so that this module does not import ``dicom_scp`` (which imports this one)."""

    _spool: Any
    _ingest: Any
    _audit: AuditFn
    _on_stored: Callable[..., None] | None
    _on_commitment: CommitmentFn | None
    _on_commit_request: CommitRequestFn | None
    _on_commit_reported: Callable[[int, str], None] | None
    _on_mpps: Callable[..., tuple[int, str]] | None
    _feeds: CompletenessService | None


class ProtocolViolation(ProtocolError):
    """The requestor broke PS3.7/PS3.8 (a message on a context we did not accept, a stray fragment):
    the association is aborted and nothing of the message is kept."""


class Link:
    """An accepted association: the UL object, the request it answered, and its slot to give back."""

    def __init__(self, assoc: Association, request: AssociateRequest, release: Callable[[], None],
                 max_pdu_bytes: int, pdu_timeout_s: float = 60.0) -> None:
        self.assoc, self.request, self._release = assoc, request, release
        self.max_pdu_bytes = max_pdu_bytes  # what we announced: a P-DATA-TF above it is a protocol error
        self.pdu_timeout_s = pdu_timeout_s  # each whole PDU (and an idle association's next one) within this

    def release_slot(self) -> None:
        self._release()


class AssociationHandler:
    """Reads PDUs until release or abort; assembles each DIMSE message and answers it."""

    def __init__(self, scp: ScpServices, link: Link, address: str) -> None:
        self.scp = scp
        self.assoc = link.assoc
        self.link = link
        self.source = scp_source(link.request.calling_ae, link.request.called_ae, address.rsplit(':', 1)[0])
        self.command = bytearray()
        self.pending: Command | None = None  # a command whose data set is arriving
        self.context_id = 0
        self.writer: StagedWriter | None = None
        # The next instances' staged files, created on the spool's threads ahead of need while the modality
        # sends: a create is kernel time on the critical path otherwise, 0.25 ms on a quiet file system and
        # 1.1-1.3 ms (CPU, ext4 skipping the inodes of files deleted in the last seconds: a retention sweep, a
        # delivered study's cleanup) on a busy one; a few ready files keep it off the path either way.
        self.spares: deque[Future[StagedWriter]] = deque()
        self.write_error: Exception | None = None
        self.prefix = bytearray()
        self.dataset = bytearray()  # N-EVENT-REPORT data sets only (small)
        self.refusal: tuple[StoreStatus, str] | None = None  # a C-STORE refused from its command alone
        self.walker: DatasetWalker | None = None  # the data set's element structure, followed as it streams
        self.reports: dict[int, int] = {}  # our N-EVENT-REPORTs on this association: message id -> request id
        self.dataset_started = 0.0  # monotonic time of the data set's command, and its bytes so far
        self.dataset_bytes = 0
        # Which study this association sends, and whether it waits for the modality (gateway.service.Feed).
        self.feed = scp._feeds.open_feed() if scp._feeds is not None else None

    def run(self) -> None:
        feed = self.feed
        try:
            while True:
                if feed is not None:
                    feed.waiting_since = time.monotonic()
                pdu_type, body = read_pdu(self.assoc.sock, self.link.max_pdu_bytes,
                                          deadline=time.monotonic() + self.link.pdu_timeout_s)
                if feed is not None:
                    feed.waiting_since = None  # ours to work on: its study stays open meanwhile
                if pdu_type == 0x05:
                    self._drop_spare()  # gone before the modality hears the release: nothing left behind
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
            self._drop_spare()
            if feed is not None:
                self.scp._feeds.close_feed(feed)  # type: ignore[union-attr]
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
                if command.us(0x00000110) < 0 and not command.command_field & 0x8000:  # a response has (0000,0120)
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
        self._check_rate(len(fragment))
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
            raise ProtocolViolation("an N-EVENT-REPORT or N-ACTION data set over 4 MiB")

    def _check_rate(self, fragment_bytes: int) -> None:
        """A data set must come at ``MIN_DATASET_BYTES_PER_S`` or more once ``DATASET_GRACE_S`` have passed: a
        sender trickling bytes (each PDU in time) cannot hold an association slot for ever."""
        self.dataset_bytes += fragment_bytes
        elapsed = time.monotonic() - self.dataset_started
        if elapsed > DATASET_GRACE_S and self.dataset_bytes < MIN_DATASET_BYTES_PER_S * elapsed:
            raise ProtocolViolation(f"data set arriving at {self.dataset_bytes / elapsed:.0f} bytes/s after {elapsed:.0f} s "
                                    f"(at least {MIN_DATASET_BYTES_PER_S} required)")

    # -- C-STORE ---------------------------------------------------------------------------------
    def _begin_dataset(self, command: Command) -> None:
        self.pending = command
        self.dataset_started, self.dataset_bytes = time.monotonic(), 0
        self.prefix.clear()
        self.write_error = None
        self.refusal = None
        if command.command_field not in (C_STORE_RQ, N_EVENT_REPORT_RQ, N_ACTION_RQ, N_CREATE_RQ, N_SET_RQ):
            raise ProtocolViolation(f"a data set with DIMSE command 0x{command.command_field:04X}")
        if command.command_field != C_STORE_RQ:
            return
        missing = [name for tag, name in ((0x00000002, "Affected SOP Class UID"), (0x00001000, "Affected SOP Instance UID"))
                   if not _uid(command.text(tag))]
        if missing:  # answered once the data set is off the wire; nothing of it is written
            self.refusal = (StoreStatus.CANNOT_UNDERSTAND, f"C-STORE-RQ without a valid {' and '.join(missing)}")
            return
        context = self.assoc.contexts.get(self.context_id)
        if context is not None and command.text(0x00000002) != context.abstract_syntax:  # PS3.7 9.1.1.1.2
            self.refusal = (StoreStatus.SOP_CLASS_NOT_SUPPORTED, f"SOP Class {command.text(0x00000002)} on a "
                            f"presentation context for {context.abstract_syntax}")
            return
        transfer_syntax = context.transfer_syntax if context else IMPLICIT_LE
        self.walker = DatasetWalker(transfer_syntax)
        meta = file_meta_bytes(command.text(0x00000002), command.text(0x00001000), transfer_syntax, self.link.request.calling_ae)
        try:
            self.writer = self._take_spare() or self.scp._spool.open_staged(hashed=False)  # hashed beside its fsync
            self.writer.write(PART10_PREFIX + meta)
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
            elements.append((0x00000902, LO, _lo(comment)))
        self.assoc.send_message(self.context_id, encode_command(elements))
        self._top_up_spares()

    def _top_up_spares(self) -> None:
        """Keep ``SPARE_FILES`` staged files ready for the next instances (made while the modality sends; an
        empty one a crash leaves behind is removed at start)."""
        spool = self.scp._spool
        while len(self.spares) < SPARE_FILES:
            self.spares.append(spool.fsync_pool.submit(spool.open_staged, False))

    def _drop_spare(self) -> None:
        while self.spares:
            spare = self._take_spare()
            if spare is not None:
                spare.abort()

    def _take_spare(self) -> StagedWriter | None:
        """The oldest spare staged file, or None when there is none or it could not be made (the caller opens
        its own and meets the error there)."""
        if not self.spares:
            return None
        try:
            return self.spares.popleft().result()
        except OSError:
            return None

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
        # The fsync runs on the spool's threads while the header is read and the duplicate looked up; the
        # file is placed (or kept in quarantine) only once it is durable.
        staged, durable = writer.close_deferred(self.scp._spool.fsync_pool)
        walker, self.walker = self.walker, None
        problem: RejectedFile | None = None
        status = StoreStatus.CANNOT_UNDERSTAND
        header = None
        if walker is not None and not walker.complete():
            problem = RejectedFile(walker.problem())
        else:
            try:
                header = self._header(bytes(self.prefix), staged.temp_path, transfer_syntax)
            except RejectedFile as exc:
                problem = exc
        if header is not None:
            mismatch = [f"{name} {ours!r} in the data set, {theirs!r} in the command"
                        for name, ours, theirs in (("SOP Instance UID", header.sop_instance_uid, sop_instance_uid),
                                                   ("SOP Class UID", header.sop_class_uid, command.text(0x00000002)))
                        if ours != theirs]
            if mismatch:
                problem, status = RejectedFile("; ".join(mismatch)), StoreStatus.DATASET_MISMATCH
        if problem is not None or header is None:
            try:
                durable()
            except OSError as exc:
                log.error("refusing %s from %s: %s", sop_instance_uid, self.source, exc)
                return StoreStatus.OUT_OF_RESOURCES, f"gateway spool full: {getattr(exc, 'strerror', '')}"
            return self._refuse_unreadable(staged.temp_path, problem or RejectedFile("no header"), status)
        try:
            result = self.scp._ingest.ingest(header, staged, self.source, durable=durable)
        except SpoolFull as exc:
            log.error("refusing %s from %s: %s", sop_instance_uid, self.source, exc)
            return StoreStatus.OUT_OF_RESOURCES, f"gateway spool full: {exc.strerror}"
        except Exception as exc:  # DB down, I/O error: never Success, never an exception on the wire
            if unreachable(exc):  # one line each: the outage itself is said once (gateway.outage)
                log.error("refusing %s from %s: %s", sop_instance_uid, self.source, said(exc))
                return StoreStatus.OUT_OF_RESOURCES, outage_comment(exc)
            log.exception("refusing %s from %s", sop_instance_uid, self.source)
            return StoreStatus.OUT_OF_RESOURCES, f"gateway could not store the instance: {type(exc).__name__}"
        if self.feed is not None:
            self.feed.unit = result.unit_id
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

    # -- C-ECHO, N-EVENT-REPORT, N-ACTION: the service table ----------------------------------------
    def _dispatch(self, command: Command, dataset: bytes = b"") -> None:
        """DIMSE command -> its handler (C-STORE streams apart: ``_begin_dataset``/``_finish_store``)."""
        handler = {
            C_ECHO_RQ: self._echo,
            N_EVENT_REPORT_RQ: self._n_event_report,  # the PACS's commitment report (we asked it)
            N_ACTION_RQ: self._n_action,  # a modality asks us for Storage Commitment
            N_EVENT_REPORT_RSP: self._n_event_report_rsp,  # the modality's answer to our report
            N_CREATE_RQ: self._mpps,  # a modality starts a Performed Procedure Step
            N_SET_RQ: self._mpps,  # ... and completes or discontinues it
        }.get(command.command_field)
        if handler is None:
            raise ProtocolViolation(f"unsupported DIMSE command 0x{command.command_field:04X}")
        handler(command, dataset)

    def _echo(self, command: Command, _dataset: bytes) -> None:
        self.assoc.send_message(self.context_id, encode_command([
            (0x00000002, UI, VERIFICATION), (0x00000100, US, 0x8030), (0x00000120, US, command.us(0x00000110)),
            (0x00000800, US, 0x0101), (0x00000900, US, 0x0000),
        ]))

    def _n_event_report(self, command: Command, dataset: bytes) -> None:
        status = self._event_report(dataset)
        self.assoc.send_message(self.context_id, encode_command([
            (0x00000002, UI, _uid(command.text(0x00000002))), (0x00000100, US, 0x8100),
            (0x00000120, US, command.us(0x00000110)), (0x00000800, US, 0x0101), (0x00000900, US, status),
            (0x00001000, UI, _uid(command.text(0x00001000))), (0x00001002, US, max(0, command.us(0x00001002))),
        ]))

    def _n_action(self, command: Command, dataset: bytes) -> None:
        """Request Storage Commitment (PS3.4 J.3.2): recorded durably, then answered; the report follows
        (``gateway.commitment``), on this association when the modality negotiated the role for it."""
        from adapters.dicom_commit import (
            STORAGE_COMMITMENT_INSTANCE,
            parse_request,
            report_command,
            report_dataset,
        )

        context = self.assoc.contexts.get(self.context_id)
        requested = command.text(0x00000003)
        decision = None
        if context is None or context.abstract_syntax != STORAGE_COMMITMENT_PUSH or requested != STORAGE_COMMITMENT_PUSH:
            status, comment = 0x0122, "N-ACTION is only served for Storage Commitment Push Model"
        elif command.us(0x00001008) != 1:
            status, comment = 0x0123, f"action type {command.us(0x00001008)} (only 1, Request Storage Commitment)"
        elif self.scp._on_commit_request is None:
            status, comment = 0x0122, "this gateway takes no Storage Commitment requests"
        else:
            try:
                transaction, refs = parse_request(dataset)
                here = STORAGE_COMMITMENT_PUSH in self.link.request.roles  # the modality takes the report here
                request_id, decision = self.scp._on_commit_request(
                    self.link.request.calling_ae, self.source.rsplit("@", 1)[-1], transaction, refs, here)
                status, comment = 0x0000, ""
            except DimseRefusal as exc:
                status, comment = exc.status, str(exc)
            except Exception as exc:  # the queue database away: the modality asks again later
                status, comment = 0x0110, _not_recorded(exc, "a Storage Commitment request", self.source, "the request")
        elements = [
            (0x00000002, UI, STORAGE_COMMITMENT_PUSH), (0x00000100, US, 0x8130), (0x00000120, US, command.us(0x00000110)),
            (0x00000800, US, 0x0101), (0x00000900, US, status),
            (0x00001000, UI, _uid(command.text(0x00001001)) or STORAGE_COMMITMENT_INSTANCE),
            (0x00001008, US, max(0, command.us(0x00001008))),
        ]
        if comment:
            elements.append((0x00000902, LO, _lo(comment)))
        self.assoc.send_message(self.context_id, encode_command(elements))
        if status:
            log.warning("Storage Commitment request from %s refused (0x%04X): %s", self.source, status, comment)
            return
        if decision is not None:
            message_id = 0x7000 + len(self.reports) % 0x1000
            self.reports[message_id] = request_id
            self.assoc.send_message(self.context_id, report_command(message_id, decision),
                                    report_dataset(transaction, decision))

    def _mpps(self, command: Command, dataset: bytes) -> None:
        """MPPS N-CREATE / N-SET (PS3.4 F.7): answered with the status ``gateway.mpps`` gives."""
        from adapters.dicom_mpps import MPPS_SOP_CLASS, parse

        creating = command.command_field == N_CREATE_RQ
        context = self.assoc.contexts.get(self.context_id)
        uid = _uid(command.text(0x00001000 if creating else 0x00001001))
        if creating and not uid:
            from pydicom.uid import generate_uid

            uid = generate_uid()  # the SCP assigns it when the SCU gives none (PS3.7 10.1.5.1.4)
        if context is None or context.abstract_syntax != MPPS_SOP_CLASS or self.scp._on_mpps is None:
            status, comment = 0x0122, "N-CREATE/N-SET are only served for Modality Performed Procedure Step"
        elif not uid:
            status, comment = 0x0106, "no valid SOP Instance UID"
        else:
            try:
                message = parse(dataset, context.transfer_syntax, creating)
                status, comment = self.scp._on_mpps(creating, self.link.request.calling_ae, uid, message)
            except DimseRefusal as exc:
                status, comment = exc.status, str(exc)
            except Exception as exc:
                status, comment = 0x0110, _not_recorded(exc, "an MPPS message", self.source, "the step")
        elements = [
            (0x00000002, UI, MPPS_SOP_CLASS), (0x00000100, US, 0x8140 if creating else 0x8120),
            (0x00000120, US, command.us(0x00000110)), (0x00000800, US, 0x0101), (0x00000900, US, status),
            (0x00001000, UI, uid),
        ]
        if comment:
            elements.append((0x00000902, LO, _lo(comment)))
        if status:
            log.warning("MPPS %s from %s refused (0x%04X): %s", "N-CREATE" if creating else "N-SET", self.source, status, comment)
        self.assoc.send_message(self.context_id, encode_command(elements))

    def _n_event_report_rsp(self, command: Command, _dataset: bytes) -> None:
        request_id = self.reports.pop(command.us(0x00000120), None)
        status = command.us(0x00000900)
        if request_id is None:
            log.warning("N-EVENT-REPORT-RSP from %s answers nothing we sent", self.source)
        elif status == 0x0000 and self.scp._on_commit_reported is not None:
            self.scp._on_commit_reported(request_id, "on the request's association")
        else:  # not taken: the report goes again on a new association (gateway.commitment)
            log.warning("the commitment report to %s on its own association was answered 0x%04X", self.source, status)

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


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str) -> bytes:
    """The File Meta Information (PS3.10 7.1, group 0002, explicit VR little endian) of a stored instance:
    the bytes pynetdicom's ``encode_file_meta`` makes of the same values (``tests/unit/test_file_meta.py``),
    without building a pydicom data set per C-STORE (0.3 ms of a 3.8 ms instance, ``bench/ingest``). The
    UIDs were checked by ``_uid`` where they matter; a value is written as given, padded to even length."""
    body = b"".join((
        _element(0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
        _element(0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
        _element(0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
        _element(0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\x00")),
        _element(0x0013, b"SH", _padded(IMPLEMENTATION_VERSION, b" ")),
        *((_element(0x0016, b"AE", _padded(source_ae.strip(), b" ")),) if source_ae.strip() else ()),
    ))
    return _element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):  # PS3.5 7.1.2: 2 reserved bytes, 4-byte length
        return struct.pack("<HH", 0x0002, element) + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


def _lo(text: str) -> str:
    """An Error Comment as LO: 64 characters at most, of the default repertoire (it may quote what was received)."""
    return "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in text[:64])


def _uid(text: str) -> str:
    """``text`` if it is a UID (PS3.5 9.1: digits and dots, at most 64 characters), else ""."""
    return text if len(text) <= 64 and UID_RE.match(text) else ""


def _meta_length(raw: bytes) -> int:
    """Length of the File Meta group after 'DICM' (its first element is the group length, PS3.10 7.1)."""
    start = raw.index(b"DICM") + 4
    return 12 + int.from_bytes(raw[start + 8 : start + 12], "little")


def _not_recorded(exc: BaseException, what: str, source: str, thing: str) -> str:
    """A request the gateway could not record, logged (one line while the queue database cannot be used: the
    outage itself is said once; else with its traceback); returns the refusal's Error Comment."""
    if unreachable(exc):
        log.error("could not record %s from %s: %s", what, source, said(exc))
        return outage_comment(exc)
    log.exception("could not record %s from %s", what, source)
    return f"the gateway could not record {thing}"

