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

Hostile connections (issues 8, 15): an accept error (EMFILE) is logged and retried with backoff; at most
``MAX_UNASSOCIATED`` connections per listener, and ``MAX_UNASSOCIATED_PER_ADDRESS`` per source address, wait
to associate, each with ``artim_timeout_s`` for its whole TLS handshake and its whole A-ASSOCIATE-RQ; at most
``max_associations_per_address`` associations come from one address (``dicom_guard``); a requestor whose
Maximum Length Received is below ``MIN_PEER_PDU_BYTES`` is rejected. Once associated, each PDU must arrive
whole within ``network_timeout_s`` and a data set at ``MIN_DATASET_BYTES_PER_S`` or more (``dicom_store``).
An optional second listener (``tls_port``) wraps each connection in TLS (``dicom_tls``).

The DICOM edge by part: this module (listeners, accept, negotiation), ``dicom_assoc`` (association request
checks), ``dicom_ul`` (PDU and P-DATA framing, bounded reads), ``dicom_store`` (the DIMSE handler: C-STORE,
C-ECHO, N-EVENT-REPORT), ``dicom_walk`` (the data-set walker).

Events handed out: ``on_stored(IngestResult)`` runs on the association's thread; the composition root
wraps it with ``loop.call_soon_threadsafe`` to reach the asyncio side.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable

from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts

from adapters.dicom_assoc import decode_associate_rq, send_abort
from adapters.dicom_guard import Admission, Reaper
from adapters.dicom_store import (
    AssociationHandler,
    AuditFn,
    CommitmentFn,
    CommitRequestFn,
    Link,
)
from adapters.dicom_tls import server_context, tls_refusal_reason
from adapters.dicom_ul import (
    AssociateRequest,
    Association,
    AssociationAborted,
    PresentationContext,
    ProtocolError,
    associate_ac,
    associate_rj,
    read_pdu,
)
from adapters.spool import Spool
from gateway.model import IngestResult
from gateway.service import CompletenessService, IngestService
from gateway.settings import DicomSettings

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"


MAX_UNASSOCIATED = 64  # connections per listener that have not associated yet; more are closed at once
MAX_UNASSOCIATED_PER_ADDRESS = 16  # ... of them from one source address
MIN_PEER_PDU_BYTES = 64  # a peer's Maximum Length Received below this is refused (0 means no limit, PS3.8 D.1)


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
        refused: Callable[[str, str, str], None] | None = None,
        on_commit_request: CommitRequestFn | None = None,
        on_commit_reported: Callable[[int, str], None] | None = None,
        on_mpps: Callable[..., tuple[int, str]] | None = None,
        feeds: CompletenessService | None = None,
    ) -> None:
        self._settings = settings
        self._feeds = feeds  # each association's hold on the study it sends (not stable while it is fed)
        self._on_mpps = on_mpps  # (creating, calling AE, SOP instance UID, gateway.mpps.StepMessage) -> (status, comment)
        self._on_commit_request = on_commit_request  # a modality's N-ACTION (gateway.commitment)
        self._on_commit_reported = on_commit_reported
        self._note_refusal = refused
        self._ingest = ingest
        self._spool = spool
        self._audit = audit
        self._on_stored = on_stored
        self._on_commitment = on_commitment
        self._listener: socket.socket | None = None
        self._tls_listener: socket.socket | None = None
        per_address = settings.max_associations_per_address or max(1, settings.max_associations * 3 // 4)
        self._admission = Admission(MAX_UNASSOCIATED, MAX_UNASSOCIATED_PER_ADDRESS, settings.max_associations, per_address)
        self._reaper = Reaper()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.storage_classes = frozenset(c.abstract_syntax for c in AllStoragePresentationContexts)
        self.transfer_syntaxes = tuple(str(ts) for ts in ALL_TRANSFER_SYNTAXES)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        listener = socket.create_server((self._settings.host, self._settings.port), backlog=64)
        self._listener = listener
        threading.Thread(target=self._accept_loop, args=(listener, None, "plain"), name="dicom-scp", daemon=True).start()
        log.info("DICOM SCP %s listening on %s:%s", self._settings.ae_title, self._settings.host, self.port)
        s = self._settings
        if s.tls_port and s.tls_cert_file and s.tls_key_file:
            context = server_context(s.tls_cert_file, s.tls_key_file, s.tls_ca_file, s.require_client_cert)
            self._tls_listener = socket.create_server((s.host, s.tls_port), backlog=64)
            threading.Thread(target=self._accept_loop, args=(self._tls_listener, context, "TLS"), name="dicom-scp-tls",
                             daemon=True).start()
            log.info("DICOM SCP %s listening for TLS on %s:%s (client certificate %s)", s.ae_title, s.host, self.tls_port,
                     "required" if s.require_client_cert else "optional")

    def stop(self) -> None:
        for attribute in ("_listener", "_tls_listener"):
            listener = getattr(self, attribute)
            setattr(self, attribute, None)
            if listener is not None:
                # shutdown first: close() alone leaves a thread blocked in accept() holding the port (Linux), so a
                # restarted gateway in the same process could not listen on it again
                with contextlib.suppress(OSError):
                    listener.shutdown(socket.SHUT_RDWR)
                listener.close()
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
    def listening(self) -> bool:
        return self._listener is not None

    @property
    def port(self) -> int:
        if self._listener is None:
            return self._settings.port
        return int(self._listener.getsockname()[1])

    def _accept_loop(self, listener: socket.socket, tls: ssl.SSLContext | None = None, kind: str = "plain") -> None:
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
            refusal = self._admission.wait(kind, address[0])
            if refusal is not None:
                self._refused("waiting", f"{address[0]}:{address[1]}", f"DICOM connection from {address[0]} closed at "
                              f"once: {refusal}")
                sock.close()
                continue
            try:
                threading.Thread(target=self._serve, args=(sock, f"{address[0]}:{address[1]}", tls, kind), name="dicom-assoc",
                                 daemon=True).start()
            except RuntimeError:  # cannot start a thread: the connection goes, the loop stays
                self._admission.done_waiting(kind, address[0])
                sock.close()

    def _refused(self, kind: str, address: str, detail: str) -> None:
        """An association refused: audited ``association_rejected``, counted in memory (``refused``: one row per
        source address, kind and minute with a count, and one log line per address, kind and minute: see
        ``gateway.refusals``) so that a flood of hostile connections writes nothing per connection; without
        ``refused``, one audit row and log line each. ``detail`` names the address, the phase and the reason."""
        if self._note_refusal is not None:
            self._note_refusal("association_rejected", f"{address.rsplit(':', 1)[0]} {kind}", detail)
        else:
            log.warning("%s", detail)
            self._audit("association_rejected", detail)

    # -- one association ------------------------------------------------------------------------
    def _serve(self, raw_sock: socket.socket, address: str, tls: ssl.SSLContext | None = None, kind: str = "plain") -> None:
        raw_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._open.add(raw_sock)
        sock = raw_sock
        link: Link | None = None
        unassociated = True
        host = address.rsplit(":", 1)[0]
        try:
            try:
                if tls is not None:  # the whole handshake within the ARTIM deadline, however slowly it trickles
                    raw_sock.settimeout(self._settings.artim_timeout_s)
                    self._reaper.arm(raw_sock, self._settings.artim_timeout_s)
                    try:
                        sock = tls.wrap_socket(raw_sock, server_side=True)
                    except (ssl.SSLError, OSError) as exc:
                        self._refused("tls", address, f"DICOM TLS handshake from {address} refused: "
                                      f"{tls_refusal_reason(exc, self._settings.artim_timeout_s)}")
                        return
                    finally:
                        self._reaper.disarm(raw_sock)
                sock.settimeout(self._settings.network_timeout_s)
                try:
                    link = self._negotiate(sock, address)
                except ssl.SSLError as exc:  # TLS 1.3: the client's verdict on our certificate comes after the handshake
                    self._refused("tls", address, f"DICOM TLS from {address} ended after the handshake: "
                                  f"{tls_refusal_reason(exc, self._settings.artim_timeout_s)}")
                    return
                except TimeoutError:
                    self._refused("request", address, f"DICOM association request from {address} refused: no "
                                  f"A-ASSOCIATE-RQ within {self._settings.artim_timeout_s:g} s (ARTIM)")
                    return
                except ProtocolError as exc:
                    self._refused("request", address, f"DICOM association request from {address} aborted: {exc}")
                    send_abort(sock)
                    return
            finally:
                unassociated = False
                self._admission.done_waiting(kind, host)
            if link is not None:
                AssociationHandler(self, link, address).run()
        except TimeoutError:
            self._refused("stalled", address, f"DICOM association from {address} aborted: no PDU for "
                          f"{self._settings.network_timeout_s:g} s while a message was due (the peer stalled)")
            send_abort(sock)
        except ProtocolError as exc:
            self._refused("protocol", address, f"DICOM association from {address} aborted: {exc}")
            send_abort(sock)  # A-ABORT: the peer learns the association is gone (PS3.8 7.3)
        except (OSError, AssociationAborted) as exc:
            log.info("association from %s ended: %s", address, exc or type(exc).__name__)
        except Exception:  # never a dead thread with the peer left waiting: log, A-ABORT, keep serving others
            log.exception("association from %s failed", address)
            send_abort(sock)
        finally:
            if unassociated:
                self._admission.done_waiting(kind, host)
            with self._lock:
                self._open.discard(raw_sock)
            sock.close()
            raw_sock.close()

    def _negotiate(self, sock: socket.socket, address: str) -> Link | None:
        pdu_type, body = read_pdu(sock, deadline=time.monotonic() + self._settings.artim_timeout_s)
        if pdu_type != 0x01:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
        request, rejection = decode_associate_rq(body)
        if rejection is not None or request is None:
            (result, source, reason), why = rejection or ((1, 1, 1), "no request")
            sock.sendall(associate_rj(result, source, reason))
            self._refused("request", address, f"DICOM association request from {address} rejected: {why}")
            return None
        allowed = self._settings.allowed_calling_ae_titles
        if allowed and request.calling_ae not in allowed:
            sock.sendall(associate_rj(1, 1, 3))  # rejected-permanent, service user, calling AE not recognised
            self._refused("calling-ae", address, f"DICOM association request from {address} rejected: calling AE title "
                          f"{request.calling_ae!r} is not in the allowlist ([dicom] allowed_calling_ae_titles)")
            return None
        if 0 < request.max_pdu < MIN_PEER_PDU_BYTES:  # each response would be PDUs of a few bytes, without end
            sock.sendall(associate_rj(1, 1, 1))  # rejected-permanent, service user, no reason given
            self._refused("max-pdu", address, f"DICOM association request from {address} rejected: Maximum Length Received "
                        f"{request.max_pdu} is below {MIN_PEER_PDU_BYTES} bytes")
            return None
        host = address.rsplit(":", 1)[0]
        refusal = self._admission.associate(host)
        if refusal is not None:
            sock.sendall(associate_rj(2, 3, 2))  # rejected-transient, provider (presentation), local limit exceeded
            self._refused("limit", address, f"DICOM association request from {address} rejected (transient): {refusal}")
            return None
        try:
            results, contexts, roles = self._choose(request)
            sock.sendall(associate_ac(request, results, self._settings.max_pdu_bytes, roles))
        except BaseException:
            self._admission.release(host)
            raise
        return Link(Association(sock, contexts, request.max_pdu or (1 << 20), self._settings.network_timeout_s), request,
                    lambda: self._admission.release(host), self._settings.max_pdu_bytes or 64 * 1024 * 1024,
                    self._settings.network_timeout_s)

    def _choose(self, request: AssociateRequest) -> tuple[list[tuple[int, int, str]], dict[int, PresentationContext], dict[str, tuple[bool, bool]]]:
        results, contexts = [], {}
        for context_id, abstract, proposed in request.contexts:
            if abstract in self.storage_classes or abstract == VERIFICATION:
                chosen = next((ts for ts in proposed if ts in self.transfer_syntaxes), None)
            elif abstract == STORAGE_COMMITMENT_PUSH:
                chosen = IMPLICIT_LE if IMPLICIT_LE in proposed else None
            elif abstract == MPPS_SOP_CLASS and self._on_mpps is not None:
                chosen = next((ts for ts in (EXPLICIT_LE, IMPLICIT_LE) if ts in proposed), None)
            else:
                results.append((context_id, 3, proposed[0] if proposed else IMPLICIT_LE))  # abstract syntax not supported
                continue
            result = 0 if chosen else 4  # 4: transfer syntaxes not supported
            results.append((context_id, result, chosen or (proposed[0] if proposed else IMPLICIT_LE)))
            contexts[context_id] = PresentationContext(context_id, abstract, proposed, result, chosen or "")
        roles = {uid: role for uid, role in request.roles.items() if uid == STORAGE_COMMITMENT_PUSH}
        return results, contexts, roles


