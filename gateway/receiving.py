"""The receiving use case (beside the sender's ``gateway.dispatch``): what the XMPP agent hands an offer, a stream,
a receipt, an announcement or a status change to.

- :class:`Inbound` is the agent's ``InboundPort``: the admission policy (``gateway.transfer.InboundPolicy``) screens
  and authorizes an offer (the sender's certificate it pins: ``gateway.pins.pinned_cert``), ``open_sink`` turns an
  admitted offer into an :class:`AuditedSink`, receipts confirm deliveries, refusals are counted in memory.
- :class:`AuditedSink` follows one stream into its bundle: the unit is made when the manifest arrives, progress is
  written at most once a second, the verdict is given (rejected, incomplete, received), the transfer row written and
  the admission released at its end; a verified bundle is handed to the import (or the early import finishes it).

The edges come in through the composition root (``ReceivingHost``): ``open_bundle`` (``adapters.inbox``) and
``early_import`` (the PACS's streaming import), so this module imports no adapter.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from gateway.lifecycle import State
from gateway.maintenance import obey_announcement
from gateway.outage import said, unreachable
from gateway.pins import cert_fingerprint as fingerprint
from gateway.pins import pinned_cert, redact
from gateway.store import utcnow
from gateway.transfer import Receipt

log = logging.getLogger(__name__)

NS_S5B = "http://jabber.org/protocol/bytestreams"


def short_method(method: str) -> str:
    return "s5b" if method == NS_S5B else "ibb"


class ReceivingHost(Protocol):
    """What the receiving side uses of the gateway (``gateway.bootstrap.Gateway`` provides it)."""

    store: Any
    inbound_policy: Any
    refusals: Any
    coercer: Any
    _loop: Any
    _xmpp_refused: Any
    _beat_due: Any

    directory: Any

    def pin_for(self, peer_jid: str) -> str | None: ...
    def kick_import(self) -> None: ...
    def _check_maintenance(self) -> None: ...
    def open_bundle(self, peer_jid: str, bundle_key: str, size: int, on_file: Callable[..., None] | None) -> Any: ...
    def early_import(self) -> Any: ...


class Inbound:
    """The agent's InboundPort: the core's admission policy + the inbox sink, with a transfer row per attempt.
    ``gateway`` is the composition root (``ReceivingHost``): the store, the policy, the refusal log, and the two
    edge factories ``open_bundle`` and ``early_import`` (the inbox and the PACS's streaming import)."""

    def __init__(self, gateway: ReceivingHost) -> None:
        self.gateway = gateway

    def authorize(self, peer_jid: str, offer: Any) -> tuple[str, str] | None:
        assert self.gateway.inbound_policy is not None
        cert = fingerprint(pinned_cert(offer, self.gateway.pin_for(peer_jid))) if offer.cert_der else None
        return self.gateway.inbound_policy.authorize(peer_jid, offer.size, offer.manifest_sha256, cert, offer.priority)

    def release(self, offer: Any) -> None:
        assert self.gateway.inbound_policy is not None
        self.gateway.inbound_policy.release(offer.manifest_sha256)

    def receipt(self, peer_jid: str, receipt: Receipt) -> str:
        outcome = self.gateway.store.confirm_delivery(
            peer_jid, receipt.study_instance_uid, receipt.bundle_sha256, receipt.delivered,
            f"{receipt.instances} instance(s): {receipt.detail}",
        )
        self.gateway.store.audit("receipt", f"{'delivery' if receipt.delivered else 'failure'} receipt from {peer_jid} for "
                                 f"bundle {receipt.bundle_sha256[:12]}: {outcome}")
        return outcome

    def pin_for(self, peer_jid: str) -> str | None:
        return self.gateway.pin_for(peer_jid)

    def signing_for(self, peer_jid: str) -> str | None:
        """Our identity ``peer_jid`` pins, as its last completed exchange showed (with this process or another,
        before a restart too)."""
        return self.gateway.directory.signing(peer_jid)

    def note_signing(self, peer_jid: str, fingerprint: str) -> None:
        """An exchange with ``peer_jid`` completed under this identity of ours (a bundle received under its
        handshake, or its signed verdict on ours): kept in memory now and in the queue off the loop (only when it
        changed: after a rotation, once per peer)."""
        if not self.gateway.directory.note_signing(peer_jid, fingerprint):
            return

        def keep() -> None:
            try:
                self.gateway.store.note_signing(peer_jid, fingerprint)
            except Exception as exc:  # the receipt falls back to this process's memory, then the current key
                if unreachable(exc):  # one line: the outage itself is said once (gateway.outage)
                    log.warning("could not keep which identity %s pins: %s", peer_jid, said(exc))
                else:
                    log.exception("could not keep which identity %s pins", peer_jid)

        if self.gateway._loop is not None:
            self.gateway._loop.run_in_executor(None, keep)
        else:
            keep()

    def security_event(self, peer_jid: str, text: str) -> None:
        self.gateway.refusals.note("e2e_refused", peer_jid, text)

    def statement_refused(self, peer_jid: str, text: str) -> None:
        self.gateway.refusals.note("receipt_refused", peer_jid, text)

    def screen(self, peer_jid: str, offer: Any) -> tuple[str, str] | None:
        assert self.gateway.inbound_policy is not None
        cert = fingerprint(pinned_cert(offer, self.gateway.pin_for(peer_jid))) if offer.cert_der else None
        return self.gateway.inbound_policy.screen(peer_jid, offer.manifest_sha256, cert)

    def status_changed(self, status: dict) -> None:
        """The process's heartbeat carries the state (``gateway.processes``): written now, off the loop."""
        if status.get("state") == "refused":
            self.gateway._xmpp_refused = dict(status)
        elif status.get("state") == "online":
            self.gateway._xmpp_refused = None
        if self.gateway._loop is not None:
            self.gateway._loop.call_soon_threadsafe(self.gateway._beat_due.set)

    def server_announcement(self, server: str, text: str) -> None:
        """The server operator's broadcast (``gateway.maintenance``): obeyed off the loop, at once."""
        def obey() -> None:
            if obey_announcement(self.gateway.store, server, text) is not None:
                self.gateway._check_maintenance()

        if self.gateway._loop is not None:
            self.gateway._loop.run_in_executor(None, obey)

    def open_sink(self, peer_jid: str, offer: Any, method: str) -> AuditedSink:
        """Takes over the admission ``authorize`` gave: released here if the sink cannot be made."""
        try:
            # No early import where a coercion rule applies: it happens on the import, after verification.
            early = self.gateway.early_import() if self.gateway.coercer.rule_for(peer_jid) is None else None
            bundle = self.gateway.open_bundle(peer_jid, offer.manifest_sha256, offer.size, early.feed if early else None)
            if early is not None:
                early.bundle = bundle
            return AuditedSink(self.gateway, bundle, peer_jid, offer, short_method(method), early)
        except BaseException:
            assert self.gateway.inbound_policy is not None
            self.gateway.inbound_policy.release(offer.manifest_sha256)
            raise


class AuditedSink:
    """One inbound stream into its bundle: the unit made when the manifest arrives, progress, the verdict, the
    transfer row; the admission is released at its end."""

    def __init__(self, gateway: ReceivingHost, bundle: Any, peer_jid: str, offer: Any, method: str,
                 early: Any = None) -> None:
        self.gateway, self.bundle, self.peer_jid, self.offer, self.method = gateway, bundle, peer_jid, offer, method
        self.early = early
        self.started = utcnow()
        self.size = bundle.size
        self.bundle_key = offer.manifest_sha256
        self._ended = False
        self._last_progress = 0.0
        self.wire_bytes: int | None = None  # set by a compressed stream's decoder (adapters.xmpp.common.FramedSink)
        self._first_byte: float | None = None  # perf_counter at the first byte: the row's stream_s
        self.unit_id: int | None = None  # the offer names no study: the unit is made when the manifest arrives
        self._begin()

    def _begin(self) -> None:
        manifest = self.bundle.manifest
        if self.unit_id is None and manifest is not None:
            self.unit_id = self.gateway.store.begin_receiving(
                manifest.study_instance_uid, self.peer_jid, self.size, self.bundle.offset, self.method, self.offer.manifest_sha256
            )

    @property
    def offset(self) -> int:
        return self.bundle.offset

    def write(self, data: bytes | memoryview) -> None:
        if self._first_byte is None:
            self._first_byte = time.perf_counter()
        self.bundle.write(data)
        assert self.gateway.inbound_policy is not None
        self.gateway.inbound_policy.landed(self.bundle_key, len(data))  # on disk: no longer counted as to come
        if self.unit_id is None:
            self._begin()
        now = time.monotonic()
        last = self.bundle.offset >= self.size  # every byte here: shown as such while the bundle is verified
        if self.unit_id is not None and (now - self._last_progress >= 1.0 or last):  # `dicomgw queue`: "receiving n %"
            self._last_progress = now
            self.gateway.store.set_progress(self.unit_id, self.bundle.offset)

    def _redacted(self, text: str) -> str:
        """What the verdict may say over the XMPP server: no study or instance UID."""
        manifest = self.bundle.manifest
        if manifest is None:
            return text
        return redact(text, manifest.study_instance_uid, [f.sop_instance_uid for f in manifest.files])

    def finish(self) -> tuple[bool, str]:
        self._begin()
        if self.unit_id is None:  # no valid manifest came: fails, and what came goes to quarantine
            ok, detail = self.bundle.finish()
            self._end("rejected", detail)
            return False, detail

        received = (self.unit_id, f"bundle verified ({self.size} bytes over {self.method})", self.size)
        try:  # the unit's move to received commits with the instance rows (one fsync less before the verdict)
            ok, detail = self.bundle.finish(received=received, keep_files=self.early is not None)
        except Exception as exc:  # an import failure is a rejection the sender retries, never a hang
            if unreachable(exc):  # not the bundle's fault: kept as it is, its verdict says why, the sender resumes
                raise
            log.exception("importing bundle from %s failed", self.peer_jid)
            ok, detail = False, f"receiver could not store the study: {type(exc).__name__}"
        if ok and self.early is not None:
            # The verdict goes out now; the early import finishes in the background, then the regular import
            # (only what the early one did not store) and the receipt follow.
            threading.Thread(target=self._after_early_import, name="early-import-wait", daemon=True).start()
        elif ok:
            self.gateway.store.ready_for_import(self.unit_id)
            self.gateway.kick_import()
        else:
            if self.early is not None:  # stop feeding it (nothing more of a rejected bundle goes to the PACS)
                threading.Thread(target=self.early.finish, name="early-import-stop", daemon=True).start()
            state = self.gateway.store.unit(self.unit_id).state
            if state in (State.RECEIVING.value, State.RECEIVED.value):
                self.gateway.store.transition(self.unit_id, State.FAILED, f"rejected: {detail}", detail)
        self._end("received" if ok else "rejected", None if ok else detail)
        return ok, self._redacted(detail)

    def _after_early_import(self) -> None:
        assert self.early is not None
        try:
            outcomes = self.early.finish()
            if outcomes:
                self.gateway.store.record_imports_by_uid(self.unit_id, outcomes)
            self.bundle.cleanup()
        finally:
            self.gateway.store.ready_for_import(self.unit_id)
            self.gateway.kick_import()

    def close(self, reason: str) -> None:
        if self.early is not None:  # what it stored is stored; the regular import sends the rest
            threading.Thread(target=self.early.finish, name="early-import-stop", daemon=True).start()
        self.bundle.close(reason)
        if self.unit_id is not None and not self._ended:  # `dicomgw queue` says why it stopped and what comes next
            self.gateway.store.receive_paused(
                self.unit_id, self.bundle.offset,
                f"paused at {self.bundle.offset} of {self.size} bytes ({reason}); resumes when {self.peer_jid} offers it again",
            )
        self._end("cut", reason)

    def _end(self, outcome: str, error: str | None) -> None:
        if self._ended:
            return
        self._ended = True
        assert self.gateway.inbound_policy is not None
        try:  # the row first: whoever sees the admission released also sees the attempt recorded
            self.gateway.store.record_transfer(
                self.unit_id, self.offer.sid, self.peer_jid, "in", self.method, self.bundle.resumed_from,
                self.bundle.offset - self.bundle.resumed_from, self.started, outcome, error,
                time.perf_counter() - self._first_byte if self._first_byte is not None else None, self.wire_bytes,
            )
        finally:
            self.gateway.inbound_policy.release(self.offer.manifest_sha256)
