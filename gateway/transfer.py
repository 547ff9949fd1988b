"""Use cases of the transfer between gateways: route, dispatch with presence as flow control, admit offers.

Sender side (:class:`Dispatcher`, run on the asyncio loop)
- every tick: local ``stable`` units get their destination (``routing``) and move to ``queued``;
- each due unit is offered to its peer only when the peer is online and not ``dnd`` (XEP-0096 offer);
  otherwise it waits in ``waiting-peer`` with exponential backoff (``retry_base_s`` .. ``retry_max_s``);
- ``offering`` -> ``sending`` (progress in bytes, the method) -> ``sent`` once the receiver's verdict says
  ``received``; a refusal, a cut stream or a rejected bundle goes back to ``queued`` with the reason and a
  backoff; every attempt is a ``transfers`` row (sid, method, offset, bytes, outcome, error).

Receiver side (:class:`InboundPolicy`): offers only from allowed peers (refused ``forbidden``, audited
once per sender and minute with a count), whose certificate is the one pinned for them (``not-authorized``,
audited; without a pin only when ``require_e2e`` is off), up to ``max_study_bytes`` (``not-acceptable``),
and at most ``max_inbound`` at once (``resource-constraint``, and the agent shows ``dnd`` while full).
Nothing said to the peer over the XMPP server names a study: receipts and verdicts refer to the bundle by
the SHA-256 of its manifest, and their texts are redacted (``gateway.pins.redact``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from gateway.addressing import destination_jid
from gateway.claims import Claims
from gateway.lifecycle import State
from gateway.logs import bind
from gateway.manifest import DEFAULT_CHUNK_BYTES, BundleFile, Manifest, stream_bundle
from gateway.model import StudySummary
from gateway.pins import redact
from gateway.retry import ErrorKind, RetryPolicy, classify
from gateway.store import ConcurrentMove, QueueStore, utcnow
from gateway.wire import Adaptive, encode_frames

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Receipt:
    """The receiving gateway's word that its PACS holds a study (or refused it for good)."""

    study_instance_uid: str
    bundle_sha256: str  # SHA-256 of the bundle manifest: names exactly which instances and bytes
    instances: int
    delivered: bool
    detail: str = ""


class ReceiptPort(Protocol):
    def peer_online(self, bare_jid: str) -> str | None: ...
    def send_receipt(self, peer_full_jid: str, receipt: Receipt) -> Awaitable[tuple[bool, str]]: ...


@dataclass
class SendOutcome:
    ok: bool
    method: str = ""
    offset: int = 0
    bytes_sent: int = 0
    detail: str = ""
    attempts: list[dict[str, Any]] = field(default_factory=list)


class SenderPort(Protocol):
    online: bool

    def peer_availability(self, bare_jid: str) -> tuple[str | None, str]: ...

    def send_bundle(
        self,
        peer_full_jid: str,
        size: int,
        manifest_sha256: str,
        stream_from: Callable[[int, bool], Iterator[bytes]],
        progress: Callable[[int, str], None],
    ) -> Awaitable[SendOutcome]: ...


def manifest_for(store: QueueStore, unit: StudySummary) -> tuple[Manifest, list[Path]]:
    """The unit's bundle manifest and the spool paths of its files, in bundle order."""
    instances = store.unit_instances(unit.unit_id)
    files = tuple(
        BundleFile(i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid, i.size_bytes, i.sha256) for i in instances
    )
    return Manifest(unit.study_instance_uid, unit.unit_seq, DEFAULT_CHUNK_BYTES, files), [Path(i.spool_path) for i in instances]


@dataclass(frozen=True)
class RoutingRules:
    """Where stable studies go. ``default_destination`` names a peer gateway (``department.institution``)."""

    domain: str
    default_destination: str = ""

    def destination_for(self, unit: StudySummary) -> str | None:
        return destination_jid(self.default_destination, self.domain) if self.default_destination else None


class Dispatcher:
    """Offers due units, one claimed unit at a time (``gateway.claims``), spacing retries by
    ``gateway.retry``: transient failures back off per peer and end in ``dead`` after the policy's attempts or
    age; permanent ones stop the unit in ``failed``; a spool file that changed since ingest stops its unit."""

    def __init__(
        self,
        store: QueueStore,
        spool_root: Path,
        sender: SenderPort,
        routing: RoutingRules,
        policy: RetryPolicy | None = None,
        receipt_timeout_s: float = 3600.0,
        max_sends: int = 3,
        claims: Claims | None = None,
        max_per_tick: int = 1000,
    ) -> None:
        self.store = store
        self.spool_root = spool_root
        self.sender = sender
        self.routing = routing
        self.policy = policy or RetryPolicy()
        self.receipt_timeout_s = receipt_timeout_s
        self.max_sends = max_sends
        self.claims = claims or Claims(store.engine)
        self.max_per_tick = max_per_tick
        self._adaptive: dict[str, Adaptive] = {}  # per peer: whether compressing its stream pays (gateway.wire)

    async def tick(self) -> None:
        await asyncio.to_thread(self.store.route_stable, self.routing.destination_for)
        await asyncio.to_thread(self._chase_receipts)
        if not self.sender.online:
            return
        for _ in range(self.max_per_tick):
            claimed = await asyncio.to_thread(self.claims.claim_due, self.store.due_for_sending_where(), 1)
            if not claimed:
                return
            try:
                await self._dispatch(await asyncio.to_thread(self.store.unit, claimed[0]))
            finally:
                await asyncio.to_thread(self.claims.release, claimed[0])

    def _chase_receipts(self) -> None:
        """``sent`` without a delivery receipt for ``receipt_timeout_s``: send again (the receiver recognises
        the bundle and only repeats its receipt), and after ``max_sends`` sends mark it failed."""
        for unit in self.store.overdue_sent(self.receipt_timeout_s):
            if not self.claims.claim(unit.unit_id):
                continue
            try:
                sends = sum(1 for t in self.store.transfers(unit.unit_id) if t["direction"] == "out" and t["outcome"] in ("received", "held"))
                if sends >= self.max_sends:
                    self.store.transition(
                        unit.unit_id, State.FAILED, f"no delivery receipt from {unit.destination} after {sends} send(s)",
                        f"no delivery receipt after {sends} send(s) and {self.receipt_timeout_s:g} s",
                    )
                else:
                    self.store.transition(
                        unit.unit_id, State.QUEUED, f"no delivery receipt after {self.receipt_timeout_s:g} s: sending again",
                        "no delivery receipt yet", next_attempt_at=None,
                    )
            except ConcurrentMove:
                pass  # a late receipt moved it first
            finally:
                self.claims.release(unit.unit_id)

    def _age_s(self, unit: StudySummary) -> float:
        return (utcnow() - unit.created_at).total_seconds()

    async def _dispatch(self, unit: StudySummary) -> None:
        with bind(study_uid=unit.study_instance_uid, unit_id=unit.unit_id, peer=unit.destination):
            await self._dispatch_unit(unit)

    async def _dispatch_unit(self, unit: StudySummary) -> None:
        peer_bare = unit.destination or ""
        full_jid, availability = self.sender.peer_availability(peer_bare)
        if full_jid is None:
            await asyncio.to_thread(self._peer_unavailable, unit, peer_bare, availability)
            return
        manifest, relative_paths = await asyncio.to_thread(manifest_for, self.store, unit)
        paths = [self.spool_root / p for p in relative_paths]
        damaged = await asyncio.to_thread(check_spool, manifest, paths)
        if damaged is not None:
            await asyncio.to_thread(self.store.transition, unit.unit_id, State.FAILED, f"not sent: {damaged}", damaged)
            await asyncio.to_thread(self.store.audit, "integrity", damaged, unit.unit_id, unit.study_instance_uid)
            return
        encoded = manifest.encode()
        size = manifest.bundle_bytes
        await asyncio.to_thread(
            self.store.transition, unit.unit_id, State.OFFERING, f"offering {size} bytes to {full_jid}", None,
            bundle_bytes=size, progress_bytes=0, bundle_sha256=hashlib.sha256(encoded).hexdigest(),
        )
        progress = _ProgressWriter(self.store, unit.unit_id, full_jid)
        adaptive = self._adaptive.setdefault(peer_bare, Adaptive())  # what it learnt of this peer's link

        def stream_from(offset: int, framed: bool = False) -> Iterator[bytes]:
            return encode_frames(manifest, paths, offset, adaptive) if framed else stream_bundle(manifest, paths, offset)

        outcome = await self.sender.send_bundle(full_jid, size, hashlib.sha256(encoded).hexdigest(), stream_from, progress.update)
        await asyncio.to_thread(progress.finish, outcome)
        if outcome.ok:
            self.policy.peer_ok(peer_bare)
            await asyncio.to_thread(progress.ensure_sending, _method_name(outcome.method))
            await asyncio.to_thread(
                self.store.mark_sent, unit.unit_id, f"{full_jid} verified it: {outcome.detail}",
                method=_method_name(outcome.method), progress_bytes=size,
            )
            return
        if outcome.detail.startswith("peer refused the offer: conflict") and not progress.moved_to_sending:
            await asyncio.to_thread(
                self.store.mark_sent, unit.unit_id, f"{full_jid} already holds this bundle: {outcome.detail}",
            )
            return
        await asyncio.to_thread(self._attempt_failed, unit, peer_bare, outcome.detail, progress.moved_to_sending)

    def _peer_unavailable(self, unit: StudySummary, peer_bare: str, availability: str) -> None:
        """The peer is offline or busy: wait with the peer's backoff (not a failed attempt of the study), until
        the study's age says ``dead``."""
        if self.policy.gives_up(0, self._age_s(unit)):
            self.store.transition(unit.unit_id, State.DEAD, f"gave up: {peer_bare} {availability} for "
                                  f"{self._age_s(unit):.0f} s", f"peer {availability}")
            return
        # The first unit of this peer this round counts one failure of the peer; the others wait with it.
        delay = self.policy.peer_wait_s(peer_bare) or self.policy.peer_failed(peer_bare)
        next_at = utcnow() + timedelta(seconds=delay)
        if unit.state != State.WAITING_PEER.value:
            self.store.transition(unit.unit_id, State.WAITING_PEER, f"{peer_bare} is {availability}",
                                  f"peer {availability}", next_attempt_at=next_at)
        else:
            self.store.reschedule(unit.unit_id, next_at, unit.attempts, error=f"peer {availability}")

    def _attempt_failed(self, unit: StudySummary, peer_bare: str, detail: str, streamed: bool) -> None:
        attempts = unit.attempts + 1
        if classify(detail) is ErrorKind.PERMANENT:
            self.store.transition(unit.unit_id, State.FAILED, f"attempt {attempts} refused for good: {detail}", detail,
                                  attempts=attempts)
            return
        if self.policy.gives_up(attempts, self._age_s(unit)):
            self.store.transition(unit.unit_id, State.DEAD, f"gave up after {attempts} attempt(s) over "
                                  f"{self._age_s(unit):.0f} s: {detail}", detail, attempts=attempts)
            return
        busy = "resource-constraint" in detail and not streamed
        delay = self.policy.peer_failed(peer_bare) if busy else self.policy.delay_s(attempts)
        target = State.WAITING_PEER if busy else State.QUEUED
        self.store.transition(
            unit.unit_id, target, f"attempt {attempts} failed: {detail}", detail,
            next_attempt_at=utcnow() + timedelta(seconds=delay), attempts=attempts,
        )


def check_spool(manifest: Manifest, paths: list[Path]) -> str | None:
    """Re-hash every spool file against the size and SHA-256 recorded at ingest; the first difference, or None."""
    for entry, path in zip(manifest.files, paths, strict=True):
        try:
            digest = hashlib.sha256()
            size = 0
            with path.open("rb") as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)
                    size += len(block)
        except OSError as exc:
            return f"spool file of instance {entry.sop_instance_uid} cannot be read: {exc.strerror or exc}"
        if size != entry.size or digest.hexdigest() != entry.sha256:
            return (f"spool file of instance {entry.sop_instance_uid} changed since ingest ({size} bytes, SHA-256 "
                    f"{digest.hexdigest()[:16]}..., recorded {entry.size} bytes, {entry.sha256[:16]}...)")
    return None


class _ProgressWriter:
    """Moves the unit to ``sending`` at the first byte; each stream attempt gets its ``transfers`` row at its
    first byte, whose byte count follows the stream (written at most once a second) and is closed by
    :meth:`finish` (a killed gateway leaves it ``running``, closed as ``interrupted`` at recovery)."""

    def __init__(self, store: QueueStore, unit_id: int, peer_jid: str) -> None:
        self.store = store
        self.unit_id = unit_id
        self.peer_jid = peer_jid
        self.moved_to_sending = False
        self._last = 0.0
        self._rows: dict[str, tuple[int, int]] = {}  # sid -> (row id, offset)
        self._lock = threading.Lock()
        self._rows_lock = threading.Lock()
        self._finished = False

    def ensure_sending(self, method: str) -> None:
        with self._lock:
            if not self.moved_to_sending:
                self.moved_to_sending = True
                self.store.transition(self.unit_id, State.SENDING, f"streaming over {method}", None, method=method)

    def update(self, position: int, method: str, sid: str = "", offset: int = 0) -> None:
        self.ensure_sending(method)
        with self._rows_lock:
            if self._finished:
                return
            if sid and sid not in self._rows:
                self._rows[sid] = (self.store.open_transfer(self.unit_id, sid, self.peer_jid, "out", method, offset), offset)
            now = time.monotonic()
            if now - self._last >= 1.0:
                self._last = now
                self.store.set_progress(self.unit_id, position, method)
                if sid:
                    self.store.transfer_progress(self._rows[sid][0], position - self._rows[sid][1])

    def finish(self, outcome: SendOutcome) -> None:
        """Close (or write) one row per attempt of ``outcome`` with its bytes, outcome and error."""
        with self._rows_lock:
            self._finished = True
        for attempt in outcome.attempts:
            sid = str(attempt.get("sid", ""))
            self.store.close_transfer(
                self._rows.get(sid, (None, 0))[0], self.unit_id, sid, self.peer_jid, "out",
                _method_name(str(attempt.get("method", ""))), int(attempt.get("offset", 0) or 0),
                int(attempt.get("bytes", 0) or 0),
                datetime.fromtimestamp(float(attempt.get("started", time.time())), UTC).replace(tzinfo=None),
                str(attempt.get("outcome", "")), str(attempt.get("error") or "") or None,
                float(attempt["stream_s"]) if attempt.get("stream_s") is not None else None,
            )


def _method_name(method: str) -> str:
    return {"http://jabber.org/protocol/bytestreams": "s5b", "http://jabber.org/protocol/ibb": "ibb"}.get(method, method)


class InboundPolicy:
    """Which offers the receiving gateway accepts (thread-safe counter of active inbound transfers)."""

    def __init__(self, store: QueueStore, allowed_peers: tuple[str, ...], max_study_bytes: int, max_inbound: int,
                 on_capacity: Callable[[bool], None] | None = None,
                 pin_for: Callable[[str], str | None] | None = None, require_e2e: bool = True,
                 claims: Claims | None = None) -> None:
        self.store = store
        self.claims = claims
        self.pin_for = pin_for or (lambda _jid: None)
        self.require_e2e = require_e2e
        self.allowed_peers = allowed_peers
        self.max_study_bytes = max_study_bytes
        self.max_inbound = max_inbound
        self.on_capacity = on_capacity
        self.active = 0
        self.maintenance: str | None = None  # the admin's maintenance text while it is on (gateway.maintenance)
        self._lock = threading.Lock()

    def authorize(self, peer_bare: str, size: int, bundle_sha256: str = "", cert_sha256: str | None = None) -> tuple[str, str] | None:
        """None to admit (then :meth:`release` must follow on every path), else (stanza condition, text).
        ``cert_sha256``: the fingerprint of the certificate the offer carries (None: a plaintext offer)."""
        bundle = bundle_sha256[:12] or "?"
        if peer_bare not in self.allowed_peers and not self.store.peer_allowed(peer_bare):
            self.store.audit_repeated("offer_refused", peer_bare, f"offer from {peer_bare}: not an allowed peer")
            return "forbidden", f"{peer_bare} is not an allowed peer of this gateway"
        if self.maintenance is not None:
            return "resource-constraint", f"busy: {self.maintenance}"
        refusal = self._check_pin(peer_bare, cert_sha256)
        if refusal is not None:
            self.store.audit("e2e_refused", f"offer of bundle {bundle} from {peer_bare}: {refusal}")
            return "not-authorized", refusal
        held = self.store.inbound_bundle_state(peer_bare, bundle_sha256) if bundle_sha256 else None
        if held is not None:
            unit_id, state = held
            if state in (State.DELIVERED.value, State.FAILED.value):
                self.store.resend_receipt(unit_id, f"{peer_bare} offered bundle {bundle_sha256[:12]} again: receipt sent again")
            self.store.audit("offer_refused", f"bundle {bundle} from {peer_bare}: already here ({state})", unit_id)
            return "conflict", f"already received here (unit {unit_id}, {state}); the receipt follows"
        if size < 0 or size > self.max_study_bytes:
            self.store.audit("offer_refused", f"offer of bundle {bundle} from {peer_bare}: {size} bytes over the limit")
            return "not-acceptable", f"study of {size} bytes exceeds this gateway's limit of {self.max_study_bytes}"
        with self._lock:
            if self.active >= self.max_inbound:
                return "resource-constraint", f"busy: {self.active} inbound transfer(s) running"
            self.active += 1
            full = self.active >= self.max_inbound
        holder = self.claims.claim_stream(bundle_sha256, peer_bare) if self.claims and bundle_sha256 else None
        if holder is not None:
            self.release()
            self.store.audit("offer_refused", f"bundle {bundle} from {peer_bare}: a stream of it is running ({holder})")
            return "resource-constraint", "busy: this bundle is being received on another stream"
        self.store.audit("offer_accepted", f"bundle {bundle} ({size} bytes) from {peer_bare}"
                         f"{', end-to-end encrypted' if cert_sha256 else ', NOT encrypted (require_e2e is off)'}")
        if full and self.on_capacity:
            self.on_capacity(True)
        return None

    def _check_pin(self, peer_bare: str, cert_sha256: str | None) -> str | None:
        pin = self.pin_for(peer_bare)
        if cert_sha256 is None:
            return "this gateway exchanges studies end-to-end encrypted only" if self.require_e2e or pin else None
        if pin is None:
            return (f"no certificate pinned for {peer_bare} (its SHA-256 is {cert_sha256}; verify it out of band, then "
                    f"dicomgw peers add {peer_bare} --fingerprint SHA256)") if self.require_e2e else None
        if pin != cert_sha256:
            return f"certificate SHA-256 {cert_sha256} of {peer_bare} does not match the pin {pin}"
        return None

    @property
    def full(self) -> bool:
        with self._lock:
            return self.active >= self.max_inbound

    def release(self, bundle_sha256: str = "") -> None:
        """End an admission; with the bundle, its stream claim too (another stream of it may start)."""
        if bundle_sha256 and self.claims is not None:
            self.claims.release_stream(bundle_sha256)
        with self._lock:
            was_full = self.active >= self.max_inbound
            self.active = max(0, self.active - 1)
        if was_full and self.on_capacity:
            self.on_capacity(False)


class ReceiptSender:
    """Receiver side: tell each sender what became of its study (delivered to the PACS, or refused for good),
    repeating until the sender acknowledges; waits while the sender is offline."""

    def __init__(self, store: QueueStore, port: ReceiptPort) -> None:
        self.store = store
        self.port = port

    async def tick(self) -> int:
        sent = 0
        for unit in await asyncio.to_thread(self.store.receipts_due):
            peer = self.port.peer_online(unit.origin_peer or "")
            if peer is None:
                continue
            delivered = unit.state == State.DELIVERED.value
            detail = f"{unit.instances} instance(s) stored in the PACS" if delivered else (unit.error or "refused by the PACS")
            if not delivered:  # the PACS's text may name instances: not for the XMPP server's eyes
                uids = [i.sop_instance_uid for i in await asyncio.to_thread(self.store.unit_instances, unit.unit_id)]
                detail = redact(detail, unit.study_instance_uid, uids)
            receipt = Receipt(unit.study_instance_uid, unit.bundle_sha256 or "", unit.instances, delivered, detail)
            ok, detail = await self.port.send_receipt(peer, receipt)
            if ok:
                sent += 1
                await asyncio.to_thread(
                    self.store.receipt_acknowledged, unit.unit_id,
                    f"{'delivery' if delivered else 'failure'} receipt to {peer}: {detail}",
                )
            else:
                log.warning("receipt for unit %s to %s not acknowledged: %s", unit.unit_id, peer, detail)
        return sent
